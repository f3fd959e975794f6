"""The logit lens: read any layer's hidden state through the model's own final norm and LM head.

``z_l = T(W_U · norm(h_l))`` with ``h_l`` the raw residual stream after decoder layer ``l``
(captured by hooks, never transformers' ``hidden_states[-1]``, which is already normalised) and
``T`` the output layer's own transform, declared per family in :mod:`declens.architectures`:
``T(z) = softcap(scale * z, cap)`` (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``,
Gemma-2/3's final-logit soft-capping; the identity for most families). ``T`` is applied on every
path that makes logits: option rows (letter), full vocabulary, and the fused log-normaliser (cloze).
At the last layer this is exactly the model's own logits, which :func:`declens.models.check_lens`
verifies on a few tokens when a model is loaded.

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

from torch import Tensor

from .kernels import log_normalizer
from .models import DecoderParts

#: Layer id of the embedding output (the residual stream entering the first decoder layer) when it is
#: read through the lens or compared by CKA (``--include-embeddings``); shown as ``emb``. It is never a
#: layer of the Transition Point, the phases or pruning.
EMBEDDING_ID = -1


def layer_label(layer_id: int) -> str:
    """How a layer id is shown: ``emb`` for :data:`EMBEDDING_ID`, else the id."""
    return "emb" if layer_id == EMBEDDING_ID else str(layer_id)


class Lens:
    """Final norm + LM head + output transform (logit scaling, soft-capping) of a model, applied to hidden states.

    Args:
        parts: the model's decoder parts.
    """

    def __init__(self, parts: DecoderParts):
        self.parts = parts
        self.norm = parts.norm
        self.head = parts.head
        self.transform = parts.logit_transform
        self._rows_cache: dict[tuple, tuple[Tensor, Tensor | None]] = {}

    @property
    def softcap(self) -> float | None:
        """The final-logit soft-capping value (Gemma-2/3), or None."""
        return self.transform.cap

    def _head_rows(self, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        key = (rows.device, tuple(rows.tolist()))
        hit = self._rows_cache.get(key)
        if hit is None or hit[0].device != self.head.weight.device:
            hit = self.parts.head_rows(rows)  # [K, d] float32 (see the module docstring)
            self._rows_cache[key] = hit
        return hit

    def logits(self, h: Tensor, rows: Tensor | None = None) -> Tensor:
        """Lens logits in float32 (:meth:`declens.models.DecoderParts.lens_logits`).

        Args:
            h: hidden states ``[..., d]`` (raw residual stream, model dtype).
            rows: vocabulary ids to keep (``[K]``); None computes the whole vocabulary.

        Returns:
            ``[..., K]`` (or ``[..., V]``) float32 logits. With ``rows`` the product itself is computed
            in float32 (no ties from rounding); without, it is the head's own product in the model's
            dtype, cast to float32.
        """
        return self.parts.lens_logits(h, None if rows is None else self._head_rows(rows))

    def vocab_logits(self, h: Tensor) -> Tensor:
        """Full-vocabulary head outputs in the head's dtype, before the output transform (``[..., V]``).

        For reductions over the vocabulary (:meth:`log_normalizer` applies the transform and
        accumulates in float32) without a float32 copy of every logit.
        """
        return self.parts.head_outputs(h)

    def finish(self, z: Tensor) -> Tensor:
        """Float32 lens logits from (selected) head outputs of :meth:`vocab_logits` (``[...]`` -> ``[...]``)."""
        return self.transform(z.float())

    def log_normalizer(self, z: Tensor) -> Tensor:
        """``[U]`` float32 ``logsumexp`` of the lens logits, from ``[U, V]`` head outputs of :meth:`vocab_logits`."""
        return log_normalizer(z, self.transform.cap, self.transform.scale, fused=self.parts.options.fused_lse)
