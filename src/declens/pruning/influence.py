"""Layer-importance probes: Block Influence (ShortGPT), angular distance (Gromov et al.) and
perplexity (SLEB), measured during ordinary forward passes.

Block Influence of layer l (Eq. 3)::

    BI_l = 1 - E_t [ x_{l,t} . x_{l+1,t} / (|x_{l,t}| |x_{l+1,t}|) ]

over every real token t of every calibration sequence, with x_l the layer's input and x_{l+1}
its output. A layer that is the identity has BI 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..runner import Batch, Probe


def real_token_mask(batch: Batch) -> Tensor:
    """``[B, T]`` True at the real (non-padding) tokens of a batch."""
    T = batch.input_ids.shape[1]
    return torch.arange(T, device=batch.input_ids.device)[None, :] < batch.lengths[:, None]


class InfluenceProbe(Probe):
    """Accumulates Block Influence of every layer run, and optionally last-token states.

    Attributes:
        sums: dense layer id -> sum of token cosine similarities.
        counts: dense layer id -> number of tokens.
        last_states: with ``keep_last``: dense layer id -> list of ``[B, d]`` float32 output states at
            each row's last token (and ``-1`` -> the first layer's input), for angular distances.
    """

    def __init__(self, keep_last: bool = False):
        self.sums: dict[int, float] = {}
        self.counts: dict[int, int] = {}
        self.keep_last = keep_last
        self.last_states: dict[int, list[Tensor]] = {}
        self._buf: dict[int, tuple[float, int]] = {}
        self._last_buf: dict[int, Tensor] = {}

    def start(self, batch: Batch) -> None:
        self._buf, self._last_buf = {}, {}
        self.mask = real_token_mask(batch)
        self.n_tokens = int(self.mask.sum())
        self.pick = (torch.arange(batch.size, device=batch.input_ids.device), batch.lengths - 1)

    def layer(self, pos, layer_id, inputs, output):
        cos = torch.nn.functional.cosine_similarity(inputs.float(), output.float(), dim=-1)  # [B, T]
        self._buf[layer_id] = (float(cos[self.mask].double().sum()), self.n_tokens)
        if self.keep_last:
            if pos == 0:
                self._last_buf[-1] = inputs[self.pick].float().cpu()
            self._last_buf[layer_id] = output[self.pick].float().cpu()
        return None

    def finish(self, batch: Batch) -> None:
        for lid, (s, n) in self._buf.items():
            self.sums[lid] = self.sums.get(lid, 0.0) + s
            self.counts[lid] = self.counts.get(lid, 0) + n
        for lid, h in self._last_buf.items():
            self.last_states.setdefault(lid, []).append(h)
        self._buf, self._last_buf = {}, {}

    def block_influence(self) -> dict[int, float]:
        """Dense layer id -> BI (1 - mean cosine similarity between the layer's input and output)."""
        return {lid: 1.0 - self.sums[lid] / self.counts[lid] for lid in sorted(self.sums)}


def angular_distances(last_states: dict[int, list[Tensor]], layer_ids: list[int]) -> np.ndarray:
    """Mean angular distance ``arccos(cos(x_l, x_{l+n})) / pi`` at the last token (Gromov et al.).

    Returns:
        ``[L, L+1]`` array ``D[l, n]``: distance between the input of layer position ``l`` and the
        output of position ``l + n - 1`` (a block of ``n`` layers starting at ``l``); NaN where the
        block does not fit.
    """
    bounds = [torch.cat(last_states[-1])] + [torch.cat(last_states[lid]) for lid in layer_ids]  # L+1 boundaries
    L = len(layer_ids)
    D = np.full((L, L + 1), np.nan)
    unit = [torch.nn.functional.normalize(b.double(), dim=-1) for b in bounds]
    for l in range(L):
        for n in range(1, L - l + 1):
            cos = (unit[l] * unit[l + n]).sum(-1).clamp(-1, 1)
            D[l, n] = float(torch.arccos(cos).mean() / np.pi)
    return D


def next_token_nll(final_hidden: Tensor, batch: Batch, head, softcap: float | None) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over the real tokens of a batch, and their count.

    ``final_hidden`` is the decoder's normalised output (the LM head's input).
    """
    total, count = 0.0, 0
    for b in range(batch.size):
        n = int(batch.lengths[b])
        if n < 2:
            continue
        z = head(final_hidden[b, : n - 1]).float()
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        tgt = batch.input_ids[b, 1:n]
        total += float(torch.nn.functional.cross_entropy(z, tgt, reduction="sum"))
        count += n - 1
    return total, count
