"""The logit lens: read any layer's hidden state through the model's own final norm and LM head.

``z_l = softcap(W_U · norm(h_l))`` with ``h_l`` the raw residual stream after decoder layer
``l`` (captured by hooks, never transformers' ``hidden_states[-1]``, which is already normalised).
At the last layer this is exactly the model's own logits.

The lens only ever computes what a metric needs: the rows of ``W_U`` of the option tokens for the
letter format, the full vocabulary only at continuation positions for the cloze format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import DecoderParts


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
            w = self.head.weight[rows.to(self.head.weight.device)]
            b = self.head.bias[rows.to(self.head.weight.device)] if getattr(self.head, "bias", None) is not None else None
            hit = (w, b)
            self._rows_cache[key] = hit
        return hit

    def logits(self, h: Tensor, rows: Tensor | None = None) -> Tensor:
        """Lens logits in float32.

        Args:
            h: hidden states ``[..., d]`` (raw residual stream, model dtype).
            rows: vocabulary ids to keep (``[K]``); None computes the whole vocabulary.

        Returns:
            ``[..., K]`` (or ``[..., V]``) float32 logits.
        """
        x = self.norm(h.to(self.head.weight.device))
        if rows is None:
            z = self.head(x)
        else:
            w, b = self._head_rows(rows)
            z = F.linear(x, w, b)
        return self._cap(z.float())

    def token_logprobs(self, h: Tensor, targets: Tensor) -> Tensor:
        """Log-probability of ``targets`` under the lens distribution at each position.

        Args:
            h: hidden states ``[T, d]`` at the positions that predict the targets.
            targets: token ids ``[T]``.

        Returns:
            ``[T]`` float32 log-probabilities.
        """
        z = self.logits(h)
        return torch.log_softmax(z, dim=-1).gather(-1, targets.to(z.device).unsqueeze(-1)).squeeze(-1)
