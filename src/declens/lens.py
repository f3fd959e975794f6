"""The logit lens: read any layer's hidden state through the model's own final norm and LM head.

``z_l = softcap(W_U · norm(h_l))`` with ``h_l`` the raw residual stream after decoder layer
``l`` (captured by hooks, never transformers' ``hidden_states[-1]``, which is already normalised).
At the last layer this is exactly the model's own logits.

The lens only ever computes what a metric needs: the rows of ``W_U`` of the option tokens for the
letter format, the full vocabulary only at continuation positions for the cloze format.

Precision. The final norm runs in the model's dtype (as in the model's own forward pass). The
option rows of the letter format are then read in **float32**: the ``K`` rows of ``W_U`` (and bias)
are cast to float32 once and applied to the normed state cast to float32. In bfloat16 two option
logits that differ by less than the format's step (1/128 relative) round to the same value, and
``argmax`` would then always pick the first option, biasing Option Frequency towards ``A``; in
float32 they stay apart. It costs ``K x d`` extra floats. The full-vocabulary product of the cloze
format stays in the model's dtype (a float32 copy of ``W_U`` would double the head's memory): its
logits are rounded to the model's dtype, and the log-softmax over the vocabulary and the sums of
continuation log-probabilities are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import DecoderParts

#: Layer id of the embedding output (the residual stream entering the first decoder layer) when it is
#: read through the lens or compared by CKA (``--include-embeddings``); shown as ``emb``. It is never a
#: layer of the Transition Point, the phases or pruning.
EMBEDDING_ID = -1


def layer_label(layer_id: int) -> str:
    """How a layer id is shown: ``emb`` for :data:`EMBEDDING_ID`, else the id."""
    return "emb" if layer_id == EMBEDDING_ID else str(layer_id)


class Lens:
    """Final norm + LM head (+ Gemma soft-capping) of a model, applied to hidden states.

    Args:
        parts: the model's decoder parts.
    """

    def __init__(self, parts: DecoderParts):
        self.norm = parts.norm
        self.head = parts.head
        self.softcap = parts.softcap
        self._rows_cache: dict[tuple, tuple[Tensor, Tensor | None]] = {}

    def _cap(self, z: Tensor) -> Tensor:
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def _head_rows(self, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        key = (rows.device, tuple(rows.tolist()))
        hit = self._rows_cache.get(key)
        if hit is None or hit[0].device != self.head.weight.device:
            sel = rows.to(self.head.weight.device)
            w = self.head.weight[sel].float()  # [K, d] float32 (see the module docstring)
            bias = getattr(self.head, "bias", None)
            b = bias[sel].float() if bias is not None else None
            hit = (w, b)
            self._rows_cache[key] = hit
        return hit

    def logits(self, h: Tensor, rows: Tensor | None = None) -> Tensor:
        """Lens logits in float32.

        Args:
            h: hidden states ``[..., d]`` (raw residual stream, model dtype).
            rows: vocabulary ids to keep (``[K]``); None computes the whole vocabulary.

        Returns:
            ``[..., K]`` (or ``[..., V]``) float32 logits. With ``rows`` the product itself is computed
            in float32 (no ties from rounding); without, it is the head's own product in the model's
            dtype, cast to float32.
        """
        x = self.norm(h.to(self.head.weight.device))
        if rows is None:
            z = self.head(x)
        else:
            w, b = self._head_rows(rows)
            z = F.linear(x.float(), w, b)
        return self._cap(z.float())

    def vocab_logits(self, h: Tensor) -> Tensor:
        """Full-vocabulary lens logits in the head's dtype, before soft-capping (``[..., V]``).

        For reductions over the vocabulary (:func:`declens.kernels.log_normalizer` applies the
        soft-capping and accumulates in float32) without a float32 copy of every logit.
        """
        return self.head(self.norm(h.to(self.head.weight.device)))
