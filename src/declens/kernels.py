"""Fused reductions for the lens on large vocabularies.

The cloze lens needs, at every continuation position of every read layer, the log-normaliser
``logsumexp_v z[v]`` of the full-vocabulary logits ``z`` (``[U, V]``, V up to 152k). Computed as
``torch.logsumexp(z.float())`` it costs a float32 copy of ``z`` and four more passes over it (max,
subtract, exp, sum): on a GPU that elementwise traffic took a third of a cloze analysis. On CUDA,
:func:`log_normalizer` runs one compiled reduction kernel that reads the logits once in their own
dtype and accumulates in float32 (same numbers up to summation order). On the CPU the same
compiled kernel is used for large vocabularies (``V >= CPU_FUSED_MIN_VOCAB``: Qwen2.5's 152k,
Llama-3's 128k), where the float32 copy and its passes cost about a third of the vocabulary product
itself; its one-off compile (cached on disk by ``torch.compile``) does not pay off on small
vocabularies. The ``fused`` argument (the model's ``ExecutionOptions.fused_lse``, the ``--fused-lse``
option) switches it: ``off`` (never), ``on`` (always) or ``auto`` (default).
Elsewhere, or where ``torch.compile`` is unavailable, it is the plain float32 computation.

:class:`LogitTransform` is the output layer's own map from the head's product to logits
(logit scaling, then soft-capping); the lens applies it on every path that makes logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


def softcap(z: Tensor, cap: float | None) -> Tensor:
    """Gemma-2/3 final logit soft-capping ``tanh(z / cap) * cap`` (identity when ``cap`` is None)."""
    return torch.tanh(z / cap) * cap if cap else z


def scale_logits(z: Tensor, scale: float = 1.0) -> Tensor:
    """``z * scale`` (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``); ``z`` itself when ``scale == 1``."""
    return z if scale == 1.0 else z * scale


@dataclass(frozen=True)
class LogitTransform:
    """What a model's output layer does to the LM head's product ``W_U x`` to make its logits.

    ``logits = softcap(scale * W_U x, cap)``: ``scale`` is 1 for most families, Cohere's
    ``logit_scale``, or ``1 / logits_scaling`` for Granite; ``cap`` is Gemma-2/3's final-logit
    soft-capping (None: none). Declared per family by :mod:`declens.architectures`.
    """

    scale: float = 1.0
    cap: float | None = None

    def __call__(self, z: Tensor) -> Tensor:
        """Apply to head outputs ``[..., V]`` (call on float32 values: no rounding is added)."""
        return softcap(scale_logits(z, self.scale), self.cap)


def _lse(z: Tensor, cap: float | None, scale: float = 1.0) -> Tensor:
    return torch.logsumexp(softcap(scale_logits(z.float(), scale), cap), dim=-1)


_fused: dict[str, Callable | None] = {}

#: Smallest vocabulary for which the CPU uses the compiled log-normaliser (``fused="auto"``).
CPU_FUSED_MIN_VOCAB = 65536


def use_fused(z: Tensor, mode: str = "auto") -> bool:
    """Whether :func:`log_normalizer` runs the compiled kernel on ``z`` (``mode``: auto, on, off)."""
    if mode in ("off", "on"):
        return mode == "on"
    return z.is_cuda or z.shape[-1] >= CPU_FUSED_MIN_VOCAB


def _compiled() -> Callable | None:
    if "fn" not in _fused:
        try:
            _fused["fn"] = torch.compile(_lse, dynamic=True)
        except Exception:  # pragma: no cover - torch builds without a compiler
            _fused["fn"] = None
    return _fused["fn"]


def log_normalizer(z: Tensor, cap: float | None = None, scale: float = 1.0, fused: str = "auto") -> Tensor:
    """Row-wise ``logsumexp`` over the last axis, in float32, of (scaled, soft-capped) logits.

    Args:
        z: ``[U, V]`` head outputs in any floating dtype.
        cap: soft-capping value (Gemma-2/3), or None.
        scale: logit multiplier applied before the soft-capping (see :class:`LogitTransform`).
        fused: ``auto``, ``on`` or ``off``: the compiled kernel (see the module docstring).

    Returns:
        ``[U]`` float32: ``logsumexp_v softcap(scale * z[:, v], cap)``.
    """
    if use_fused(z, fused):
        fn = _compiled()
        if fn is not None:
            try:
                return fn(z, cap, scale)
            except Exception:  # pragma: no cover - a compiler failure falls back to the same arithmetic
                _fused["fn"] = None
    return _lse(z, cap, scale)
