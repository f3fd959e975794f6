"""Layer-importance probes: Block Influence (ShortGPT), angular distance (Gromov et al.) and
perplexity (SLEB), measured during ordinary forward passes.

Block Influence of layer l (Eq. 3)::

    BI_l = 1 - E_t [ x_{l,t} . x_{l+1,t} / (|x_{l,t}| |x_{l+1,t}|) ]

over every real token t of every calibration sequence, with x_l the layer's input and x_{l+1}
its output. A layer that is the identity has BI 0.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .. import distributed
from ..kernels import LogitTransform
from ..runner import Batch, Probe, to_device


class InfluenceProbe(Probe):
    """Accumulates Block Influence of every layer run, and optionally last-token states.

    Attributes:
        sums: dense layer id -> sum of token cosine similarities.
        counts: dense layer id -> number of tokens.
        last_states: with ``keep_last``: dense layer id -> list of ``[B, d]`` float32 output states at
            each row's last token (and ``-1`` -> the first layer's input), for angular distances.
    """

    def __init__(self, keep_last: bool = False, rows: Callable[[Batch], Tensor | None] | None = None):
        self.sums: dict[int, Tensor] = {}
        self.counts: dict[int, int] = {}
        self.keep_last = keep_last
        self.rows = rows
        self.last_states: dict[int, list[Tensor]] = {}
        self._buf: dict[int, Tensor] = {}
        self._last_buf: dict[int, Tensor] = {}

    def start(self, batch: Batch) -> None:
        self._buf, self._last_buf = {}, {}
        keep = self.rows(batch) if self.rows else None  # [B] bool on the CPU: rows that are calibration rows
        dev = batch.input_ids.device
        host = batch.host_lengths
        if keep is None or bool(keep.all()):
            self.sel, lengths, self.n_tokens = None, batch.lengths, int(host.sum())
        else:
            sel = torch.nonzero(keep.cpu()).squeeze(1)
            self.sel = to_device(sel, dev)
            lengths = batch.lengths.index_select(0, self.sel)
            self.n_tokens = int(host[sel].sum())
        T = batch.input_ids.shape[1]
        self.weights = (torch.arange(T, device=dev)[None, :] < lengths[:, None]).to(torch.float64)  # real tokens
        self.last = lengths - 1

    def _rows(self, h: Tensor) -> Tensor:
        return h if self.sel is None else h.index_select(0, self.sel.to(h.device))

    def layer(self, pos, layer_id, inputs, output):
        if self.n_tokens == 0:
            return None
        x, y = self._rows(inputs), self._rows(output)  # only the calibration rows
        cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [b, T]
        self._buf[layer_id] = (cos.double() * self.weights.to(cos.device)).sum()  # on the device: no sync per layer
        if self.keep_last:
            if pos == 0:
                self._last_buf[-1] = self._last(x)
            self._last_buf[layer_id] = self._last(y)
        return None

    def _last(self, h: Tensor) -> Tensor:
        rows = torch.arange(h.shape[0], device=h.device)
        return h[rows, self.last.to(h.device)].float().cpu()

    def finish(self, batch: Batch) -> None:
        for lid, s in self._buf.items():
            self.sums[lid] = self.sums[lid] + s if lid in self.sums else s
            self.counts[lid] = self.counts.get(lid, 0) + self.n_tokens
        for lid, h in self._last_buf.items():
            self.last_states.setdefault(lid, []).append(h)
        self._buf, self._last_buf = {}, {}

    def block_influence(self) -> dict[int, float]:
        """Dense layer id -> BI (1 - mean cosine similarity between the layer's input and output).

        Under ``torchrun`` the sums and counts of every rank are added first (every rank must call this).
        """
        ids = sorted(self.sums)
        if distributed.active():
            ids = sorted({i for part in distributed.gather_objects(ids) for i in part})
            if not ids:  # no rank measured any layer (e.g. no calibration row ran)
                return {}
            sums = torch.stack([self.sums[i].double().cpu() if i in self.sums else torch.zeros((), dtype=torch.float64)
                                for i in ids])
            counts = torch.tensor([float(self.counts.get(i, 0)) for i in ids], dtype=torch.float64)
            both = distributed.all_reduce_sum(torch.cat([sums, counts]))
            return {lid: 1.0 - float(both[k]) / float(both[len(ids) + k]) for k, lid in enumerate(ids)}
        return {lid: 1.0 - float(self.sums[lid]) / self.counts[lid] for lid in ids}

    def gathered_last_states(self) -> dict[int, list[Tensor]]:
        """``last_states`` of every rank (the rows of all ranks, for angular distances)."""
        if not distributed.active():
            return self.last_states
        merged: dict[int, list[Tensor]] = {}
        for part in distributed.gather_objects(self.last_states):
            for lid, hs in part.items():
                merged.setdefault(lid, []).extend(hs)
        return merged


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


def next_token_nll(final_hidden: Tensor, batch: Batch, head, transform: LogitTransform) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over the real tokens of a batch, and their count.

    ``final_hidden`` is the decoder's normalised output (the LM head's input); ``transform`` the
    model's output transform (``DecoderParts.logit_transform``: logit scaling, soft-capping).
    """
    total, count = 0.0, 0
    for b in range(batch.size):
        n = int(batch.lengths[b])
        if n < 2:
            continue
        z = transform(head(final_hidden[b, : n - 1]).float())
        tgt = batch.input_ids[b, 1:n]
        total += float(torch.nn.functional.cross_entropy(z, tgt, reduction="sum"))
        count += n - 1
    return total, count
