"""Fused reductions for the lens on large vocabularies.

The cloze lens needs, at every continuation position of every read layer, the log-normaliser
``logsumexp_v z[v]`` of the full-vocabulary logits ``z`` (``[U, V]``, V up to 152k). Computed as
``torch.logsumexp(z.float())`` it costs a float32 copy of ``z`` and four more passes over it (max,
subtract, exp, sum): on a GPU that elementwise traffic took a third of a cloze analysis. On CUDA,
:func:`log_normalizer` runs one compiled reduction kernel that reads the logits once in their own
dtype and accumulates in float32 (same numbers up to summation order). Elsewhere, or where
``torch.compile`` is unavailable, it is the plain float32 computation.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def softcap(z: Tensor, cap: float | None) -> Tensor:
    """Gemma-2/3 final logit soft-capping ``tanh(z / cap) * cap`` (identity when ``cap`` is None)."""
    return torch.tanh(z / cap) * cap if cap else z


def _lse(z: Tensor, cap: float | None) -> Tensor:
    return torch.logsumexp(softcap(z.float(), cap), dim=-1)


_fused: dict[str, Callable | None] = {}


def _compiled() -> Callable | None:
    if "fn" not in _fused:
        try:
            _fused["fn"] = torch.compile(_lse, dynamic=True)
        except Exception:  # pragma: no cover - torch builds without a compiler
            _fused["fn"] = None
    return _fused["fn"]


def log_normalizer(z: Tensor, cap: float | None = None) -> Tensor:
    """Row-wise ``logsumexp`` over the last axis, in float32, of (soft-capped) logits.

    Args:
        z: ``[U, V]`` logits in any floating dtype.
        cap: soft-capping value applied first (Gemma-2/3), or None.

    Returns:
        ``[U]`` float32.
    """
    if z.is_cuda:
        fn = _compiled()
        if fn is not None:
            try:
                return fn(z, cap)
            except Exception:  # pragma: no cover - a compiler failure falls back to the same arithmetic
                _fused["fn"] = None
    return _lse(z, cap)
