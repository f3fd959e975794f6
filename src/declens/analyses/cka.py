"""Layer-wise CKA alignment of a pruned model with its dense model (the paper's Figure 3, A.5, A.6).

Every kept layer of a pruned view is compared with every layer of the dense model by linear CKA
(Kornblith et al., 2019) on two signals, each an ``[N, d]`` matrix over the same N rows:

- ``hidden``: the layer output (raw residual stream) averaged over the real tokens of each row;
- ``decision``: the layer output at the decision token, the last real token of each row (the
  position whose lens logits the letter format reads).

For each pruned layer the best-matching dense layer is the argmax of its CKA row. Where it falls
below the kept layer's own dense id, the pruned network's representation at that depth resembles a
*shallower* stage of the dense network.

Linear CKA of column-centred ``X [n, d1]`` and ``Y [n, d2]``::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
              = <K, L>_F / (||K||_F ||L||_F)        with K = X X^T, L = Y Y^T   (n x n Grams)

The two forms are the same number; the Gram form is cheaper when ``n < d`` (the usual case: 500
rows, hidden sizes 576 to 8192) and lets :func:`cka_matrix` compute each layer's centred Gram once.
Everything is computed in float64. A zero-variance input (every row the same, or a single row) has
no linear structure to align: CKA is defined as ``0.0`` for it (never NaN), so a best-match argmax
never picks it.

Speed: the pruned view shares every layer before its first removed layer with the dense model, so
those features are copied from the dense pass and only the kept layers after it run, from the dense
hidden state entering the first removed layer (prefix reuse, as in the pruning engine).

Under ``torchrun`` (:mod:`declens.distributed`) each rank runs its share of the batches (round-robin
over the plan); the features of the rows are then gathered (copied, not summed), so every rank computes
the CKA of one process from the same numbers, and only rank 0 writes the result folder.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import distributed
from ..errors import CKAError
from ..formats import Requests, format_named
from ..lens import EMBEDDING_ID
from ..models import LoadedModel
from ..results import RunWriter, provenance, register_result
from ..runner import (Batch, LayerStates, Probe, collate, default_max_tokens, forward, plan_batches, run_from,
                      split_on_oom)
from ..scoring import InputRead
from ..surgery import dense_layer_ids, suffix_to_run
from ..tasks import TaskData, subsample

CKA_FILE = "cka.json"
CKA_NPZ = "cka.npz"
SIGNALS = ("hidden", "decision")

#: A centred representation whose Frobenius norm is at most this share of the uncentred one is
#: treated as constant (zero variance): float rounding of a constant column is not structure.
DEGENERATE_RTOL = 1e-12

#: The fewest rows a CKA study compares. Centring leaves n - 1 directions: with one row CKA is
#: undefined, with two every pair of non-constant representations has CKA exactly 1; three rows
#: are the least that can tell representations apart (hundreds are needed for stable numbers).
MIN_ROWS = 3


def check_rows(n: int, fix: str = f"use --limit {MIN_ROWS} or more (the paper compares 500 rows)") -> int:
    """Refuse a CKA study over fewer than :data:`MIN_ROWS` rows (its similarities would mean nothing).

    Raises:
        CKAError: ``n < MIN_ROWS``; the message ends with ``fix``.
    """
    if n < MIN_ROWS:
        raise CKAError(f"CKA needs at least {MIN_ROWS} rows to mean anything (with 2 every similarity is 1, with 1 it "
                       f"is undefined), got {n}; {fix}")
    return n


# ------------------------------------------------------------------------------------------------
# Linear CKA


def _as_f64(x: Tensor | np.ndarray, name: str) -> Tensor:
    t = torch.as_tensor(x).detach()
    if t.dim() != 2:
        raise CKAError(f"{name} must be a 2-D [n, d] matrix, got shape {tuple(t.shape)}")
    t = t.to(device="cpu", dtype=torch.float64)
    if t.numel() and not torch.isfinite(t).all():
        raise CKAError(f"{name} contains NaN or infinite values; CKA needs finite representations")
    return t


def _centred_unit(x: Tensor) -> Tensor | None:
    """Column-centred ``x`` scaled to unit Frobenius norm (``[n, d]`` float64); None if constant."""
    if x.shape[0] < 2 or x.shape[1] == 0:
        return None
    scale = float(x.abs().max())
    if scale == 0.0:
        return None
    x = x / scale  # guards against overflow with massive activations; CKA is scale-invariant
    xc = x - x.mean(dim=0, keepdim=True)
    nc = float(torch.linalg.matrix_norm(xc))
    if nc == 0.0 or nc <= DEGENERATE_RTOL * float(torch.linalg.matrix_norm(x)):
        return None
    return xc / nc


def _gram_unit(xc: Tensor) -> Tensor:
    """``[n*n]`` the Gram matrix of centred ``xc`` normalised to unit Frobenius norm, flattened."""
    k = xc @ xc.T
    return (k / torch.linalg.matrix_norm(k)).reshape(-1)


def linear_cka(X: Tensor | np.ndarray, Y: Tensor | np.ndarray) -> float:
    """Linear CKA of two representations of the same ``n`` rows, in float64.

    Args:
        X: ``[n, d1]`` (torch or numpy, any float dtype, any device).
        Y: ``[n, d2]``.

    Returns:
        CKA in ``[0, 1]``: 1 for representations equal up to an orthogonal transform and an isotropic
        scaling (and a translation). ``0.0`` when either input has zero variance after centring
        (fewer than two rows, or all rows equal): CKA is undefined there and declens reports no
        alignment rather than NaN.

    Raises:
        CKAError: not 2-D, different numbers of rows, or non-finite values.
    """
    x, y = _as_f64(X, "X"), _as_f64(Y, "Y")
    if x.shape[0] != y.shape[0]:
        raise CKAError(f"CKA compares the same rows: X has {x.shape[0]} rows, Y has {y.shape[0]}")
    xc, yc = _centred_unit(x), _centred_unit(y)
    if xc is None or yc is None:
        return 0.0
    n, d1, d2 = xc.shape[0], xc.shape[1], yc.shape[1]
    if n * (d1 + d2) < d1 * d2 + d1 * d1 + d2 * d2:  # n x n Gram form (n < d)
        num = float(_gram_unit(xc) @ _gram_unit(yc))
        return min(max(num, 0.0), 1.0)
    cross = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    den = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    return min(max(float(cross / den), 0.0), 1.0)


def cka_matrix(A: Sequence[Tensor | np.ndarray], B: Sequence[Tensor | np.ndarray]) -> np.ndarray:
    """Linear CKA of every representation in ``A`` with every one in ``B`` (same ``n`` rows).

    The centred, normalised Gram matrix of each representation is computed once (``n x n`` float64,
    ``8 n^2`` bytes each), so the full matrix costs ``len(A) + len(B)`` Grams and one matrix product.
    When ``n`` exceeds every feature width the feature-space form is used pair by pair instead.

    Args:
        A: ``La`` matrices ``[n, d_i]`` (e.g. the pruned model's layers).
        B: ``Lb`` matrices ``[n, d_j]`` (e.g. the dense model's layers).

    Returns:
        ``[La, Lb]`` float64 CKA values in ``[0, 1]`` (``0.0`` for zero-variance inputs).
    """
    xa = [_as_f64(a, f"A[{i}]") for i, a in enumerate(A)]
    xb = [_as_f64(b, f"B[{j}]") for j, b in enumerate(B)]
    ns = {x.shape[0] for x in xa + xb}
    if len(ns) > 1:
        raise CKAError(f"CKA compares the same rows, got representations with {sorted(ns)} rows")
    out = np.zeros((len(xa), len(xb)), dtype=np.float64)
    if not xa or not xb:
        return out
    n = ns.pop()
    ca = [_centred_unit(x) for x in xa]
    cb = [_centred_unit(x) for x in xb]
    dmax = max(x.shape[1] for x in xa + xb)
    if n <= dmax:  # Gram form: one [n*n] unit vector per layer, then a single product
        def stack(cs):
            return torch.stack([_gram_unit(c) if c is not None else torch.zeros(n * n, dtype=torch.float64) for c in cs])

        out = (stack(ca) @ stack(cb).T).numpy()
    else:
        self_a = [None if c is None else torch.linalg.matrix_norm(c.T @ c) for c in ca]
        self_b = [None if c is None else torch.linalg.matrix_norm(c.T @ c) for c in cb]
        for i, c in enumerate(ca):
            for j, e in enumerate(cb):
                if c is not None and e is not None:
                    out[i, j] = float(torch.linalg.matrix_norm(e.T @ c) ** 2 / (self_a[i] * self_b[j]))
    return np.clip(out, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Collecting layer representations


class CKAProbe(Probe):
    """Collects, for every layer run, two ``[N, d]`` float32 CPU matrices over the rows of a run.

    Attributes:
        hidden: dense layer id -> ``[N, d]`` the layer output averaged over each row's real tokens.
        decision: dense layer id -> ``[N, d]`` the layer output at each row's last real token.

    Args:
        n_rows: ``N``, the number of sequences of the run (rows are filled at ``batch.index``).
    """

    def __init__(self, n_rows: int):
        self.n_rows = n_rows
        self.hidden: dict[int, Tensor] = {}
        self.decision: dict[int, Tensor] = {}

    def start(self, batch: Batch) -> None:
        dev = batch.input_ids.device
        T = batch.input_ids.shape[1]
        self.weights = (torch.arange(T, device=dev)[None, :] < batch.lengths[:, None]).float()
        self.weights = self.weights / batch.lengths[:, None].float()  # [B, T]: 1/len at real tokens
        self.pick = (torch.arange(batch.size, device=dev), batch.lengths - 1)
        self.index = batch.index

    def layer(self, pos: int, layer_id: int, inputs: Tensor, output: Tensor) -> Tensor | None:
        if layer_id not in self.hidden:
            d = output.shape[-1]
            self.hidden[layer_id] = torch.zeros(self.n_rows, d, dtype=torch.float32)
            self.decision[layer_id] = torch.zeros(self.n_rows, d, dtype=torch.float32)
        h = output.float()
        self.hidden[layer_id][self.index] = torch.einsum("bt,btd->bd", self.weights, h).cpu()
        self.decision[layer_id][self.index] = h[self.pick].cpu()
        return None

    def merge_ranks(self, rows: Sequence[int]) -> None:
        """Under ``torchrun``: add the rows the other ranks collected (this rank collected ``rows``), so that
        every rank holds all ``N`` rows of every layer. Exact: the values are copied, not summed. A no-op in
        a single process."""
        if not distributed.active():
            return
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        mine = {name: {lid: t[idx] for lid, t in getattr(self, name).items()} for name in ("hidden", "decision")}
        with torch.inference_mode():  # the stores are inference tensors (filled during the forward passes)
            for their_rows, part in distributed.gather_objects((idx, mine)):
                for name, feats in part.items():
                    store = getattr(self, name)
                    for lid, vals in feats.items():
                        if lid not in store:  # this rank ran no batch
                            store[lid] = torch.zeros(self.n_rows, vals.shape[-1], dtype=torch.float32)
                        store[lid][their_rows] = vals


def cka_rows(req: Requests) -> list[list[int]]:
    """One token sequence per item, whose last token is the decision token.

    Letter format: the prompt (the decision is read at its last token). Cloze format: the context of
    the item's first option (the question; the answer would follow its last token). WinoGrande's
    partial scoring has one context per option, and the first is used (``req.decision_rows()``).
    """
    return req.decision_rows()


def collect_states(lm: LoadedModel, rows: Sequence[Sequence[int]], layers: Sequence[int] | None = None,
                   max_tokens: int | None = None) -> CKAProbe:
    """Token-averaged and decision-token states of every layer run, by one plain pass (no reuse).

    Args:
        lm: the model.
        rows: token sequences.
        layers: positions of the layers to run (a pruned view); None: all.
        max_tokens: padded tokens per batch.

    Returns:
        The filled :class:`CKAProbe` (``hidden`` / ``decision``: dense id -> ``[N, d]``).
    """
    from .decision import encoder_for

    pad = encoder_for(lm).pad_id
    probe = CKAProbe(len(rows))
    lengths = [len(r) for r in rows]
    for idx in plan_batches(lengths, max_tokens or default_max_tokens(lm.parts), batch_cost=lm.options.batch_cost):
        split_on_oom(lambda ix: forward(lm.parts, collate(rows, ix, pad, lm.device), [probe], layers=layers), idx, lengths)
    return probe


# ------------------------------------------------------------------------------------------------
# The study


@register_result("cka", CKA_FILE, "cka")
@dataclass
class CKAResult:
    """CKA alignment of a pruned view with the dense model.

    Attributes:
        config: what was asked for (model, task, format, rows, remove, kept ids ...).
        provenance: versions, model and data fingerprints, timings.
        pruned_ids: dense ids of the pruned view's layers (rows of the matrices), in running order.
        dense_ids: dense ids of the dense model's layers (columns).
        hidden: ``[L_pruned, L_dense]`` CKA of token-averaged hidden states.
        decision: ``[L_pruned, L_dense]`` CKA of decision-token states.
    """

    config: dict
    provenance: dict
    pruned_ids: list[int]
    dense_ids: list[int]
    hidden: np.ndarray
    decision: np.ndarray
    extra: dict = field(default_factory=dict)
    #: the prune run this pruned view comes from (see :func:`from_prune_run`): then :func:`declens.plots.plot_cka` also
    #: draws ``accuracy_cka.png`` (the paper's Figure 2); not saved itself (``extra["prune_run"]`` says which)
    prune: Any = field(default=None, repr=False, compare=False)
    SCHEMA_VERSION = 1  #: of ``cka.json`` (see :func:`declens.results.register_result`)

    def matrix(self, signal: str) -> np.ndarray:
        """``[L_pruned, L_dense]`` CKA of ``signal`` (``hidden`` or ``decision``)."""
        if signal not in SIGNALS:
            raise CKAError(f"unknown CKA signal {signal!r}; use one of {', '.join(SIGNALS)}")
        return self.hidden if signal == "hidden" else self.decision

    def best_match(self, signal: str) -> list[int]:
        """For each pruned layer, the dense id of its most similar dense layer (first on ties)."""
        m = self.matrix(signal)
        return [self.dense_ids[int(j)] for j in np.argmax(m, axis=1)]

    @property
    def best_hidden(self) -> list[int]:
        return self.best_match("hidden")

    @property
    def best_decision(self) -> list[int]:
        return self.best_match("decision")

    def summary(self) -> dict:
        """Headline numbers: where the final pruned layer aligns, and how many layers fall below the identity
        (over the decoder layers only: an embedding row, when included, is not counted)."""
        rows = [r for r, i in enumerate(self.pruned_ids) if i != EMBEDDING_ID]
        out: dict = {"num_pruned_layers": len(rows),
                     "num_dense_layers": sum(i != EMBEDDING_ID for i in self.dense_ids)}
        for s in SIGNALS:
            m, best = self.matrix(s), self.best_match(s)
            out[s] = {
                "final_layer_best_match": best[-1],
                "final_layer_best_cka": float(m[-1].max()),
                "below_identity": int(sum(best[r] < self.pruned_ids[r] for r in rows)),
                "mean_own_layer_cka": float(np.mean([m[r, self.dense_ids.index(self.pruned_ids[r])] for r in rows])),
            }
        return out

    def layer_rows(self) -> list[dict]:
        """One dict per pruned layer: its dense id, position, best matches and CKA with its own dense layer."""
        rows = []
        bh, bd = self.best_hidden, self.best_decision
        for r, lid in enumerate(self.pruned_ids):
            c = self.dense_ids.index(lid)
            rows.append({"layer": lid, "position": r, "best_hidden": bh[r], "best_hidden_cka": float(self.hidden[r].max()),
                         "best_decision": bd[r], "best_decision_cka": float(self.decision[r].max()),
                         "own_hidden_cka": float(self.hidden[r, c]), "own_decision_cka": float(self.decision[r, c])})
        return rows

    def to_dict(self) -> dict:
        return {
            "kind": "cka",
            "config": self.config,
            "provenance": self.provenance,
            "summary": self.summary(),
            "pruned_layer_ids": self.pruned_ids,
            "dense_layer_ids": self.dense_ids,
            "best_match": {"hidden": self.best_hidden, "decision": self.best_decision},
            "layers": self.layer_rows(),
            "cka": {"hidden": self.hidden, "decision": self.decision},
            **self.extra,
        }

    @classmethod
    def load(cls, path: Path | str) -> "CKAResult":
        """Read a folder written by :meth:`save` (verified against its manifest)."""
        from ..results import read_result_file

        p, d = read_result_file(path, CKA_FILE, "cka", also=(CKA_NPZ,))
        with np.load(p.parent / CKA_NPZ) as z:
            hidden, decision = z["hidden"], z["decision"]
            pruned, dense = [int(i) for i in z["pruned_layer_ids"]], [int(i) for i in z["dense_layer_ids"]]
        known = {"kind", "schema_version", "config", "provenance", "summary", "pruned_layer_ids", "dense_layer_ids",
                 "best_match", "layers", "cka"}
        return cls(config=d["config"], provenance=d["provenance"], pruned_ids=pruned, dense_ids=dense, hidden=hidden,
                   decision=decision, extra={k: v for k, v in d.items() if k not in known})

    def save(self, out_dir: Path | str, plots: bool = True) -> Path:
        """Write ``cka.json``, ``cka.npz`` and (with ``plots``) ``cka_hidden.png``, ``cka_decision.png``,
        ``cka_best_match.png`` into ``out_dir`` as one run folder (the manifest last, see
        :class:`~declens.results.RunWriter`)."""
        out = Path(out_dir)
        with RunWriter(out, "cka") as run:
            run.npz(CKA_NPZ, hidden=self.hidden, decision=self.decision,
                    pruned_layer_ids=np.array(self.pruned_ids), dense_layer_ids=np.array(self.dense_ids),
                    best_hidden=np.array(self.best_hidden), best_decision=np.array(self.best_decision))
            run.json(CKA_FILE, self.to_dict())
            if plots:
                run.draw_figures(self, out)
        return out


def state_from_prune(prune_res, method: str | None = None, ratio: float = 0.5):
    """The state of a prune run to compare: ``method``'s best state at the largest evaluated ratio not
    above ``ratio`` (the paper's Figure 2 compares the 50% model).

    Args:
        prune_res: a :class:`~declens.pruning.run.PruneResult`.
        method: one of its methods (default: its first).
        ratio: the pruning ratio wanted, in (0, 1).

    Returns:
        The :class:`~declens.pruning.methods.PruneRecord`.

    Raises:
        CKAError: unknown method, or a ratio outside (0, 1) or below the run's first step.
    """
    methods = list(prune_res.runs)
    method = method or methods[0]
    if method not in prune_res.runs:
        raise CKAError(f"the prune run has no method {method!r}; use --prune-method {' or '.join(methods)}")
    if not 0 < ratio < 1:
        raise CKAError(f"--ratio must lie strictly between 0 and 1, got {ratio}")
    best = prune_res.runs[method].best_by_k()
    ok = [r for k, r in best.items() if k > 0 and r.ratio <= ratio + 1e-9]
    if not ok:
        first = min(r.ratio for k, r in best.items() if k > 0)
        raise CKAError(f"the prune run's {method} states start at ratio {first:.3f}; use --ratio {first:.3f} or more")
    return ok[-1]


def from_prune_run(res: "CKAResult", prune_res, method: str | None = None) -> "CKAResult":
    """Link a CKA result to the prune run its pruned view comes from, so :func:`declens.plots.plot_cka` also draws the
    paper's Figure 2 (``accuracy_cka.png``); the link is recorded in ``extra["prune_run"]``."""
    res.prune = prune_res
    res.extra["prune_run"] = {"method": method or next(iter(prune_res.runs)), "config": {
        k: prune_res.config.get(k) for k in ("model", "task", "format", "max_ratio", "num_layers")}}
    return res


def _select(data: TaskData, n_samples: int | None, seed: int) -> TaskData:
    if n_samples is None or n_samples >= len(data.items):
        return data
    if n_samples <= 0:
        raise CKAError(f"n_samples must be positive, got {n_samples}")
    idx = subsample(len(data.items), n_samples, seed)
    return dataclasses.replace(data, items=[data.items[i] for i in idx],
                               selection={**data.selection, "cka_samples": n_samples, "cka_seed": seed})


@dataclass(frozen=True)
class CKAConfig:
    """Knobs of :func:`cka_study` (recorded in ``cka.json``'s ``config`` under the same keys as before).

    Attributes:
        n_samples: rows to compare (the paper: 500 ARC-Challenge questions); ``None``: all of the data.
            When the data hold more, ``n_samples`` rows are drawn with ``seed`` (deterministically, order kept).
        seed: seed of the row draw.
        max_tokens: padded tokens per batch (``None``: sized to the device).
        num_fewshot: solved examples prepended to each prompt.
        include_embeddings: also compare the embedding output (the first layer's input, the same in
            both models) as layer ``EMBEDDING_ID`` (-1, shown ``emb``): first row and first column.
    """

    n_samples: int | None = 500
    seed: int = 0
    max_tokens: int | None = None
    num_fewshot: int = 0
    include_embeddings: bool = False


def cka_study(
    lm: LoadedModel,
    data: TaskData,
    remove: Sequence[int],
    fmt: str = "letter",
    config: CKAConfig | None = None,
    progress: bool = True,
    *,
    requests: Requests | None = None,
) -> CKAResult:
    """CKA of every layer of the pruned view (without dense ids ``remove``) with every dense layer.

    Args:
        lm: the (dense) model.
        data: the task rows; when it holds more than ``config.n_samples`` items, that many of them are
            drawn with ``config.seed`` (deterministically, order kept).
        remove: dense ids of the layers to remove (empty: the dense model against itself).
        fmt: ``letter`` (rows are the lettered prompts; the decision token is the last prompt token)
            or ``cloze`` (rows are the items' contexts, see :func:`cka_rows`).
        config: rows, seed, batch budget, few-shot and embeddings (:class:`CKAConfig`; ``None``: the defaults).
        progress: show a progress bar.
        requests: prebuilt requests for exactly the selected rows (skips tokenization).

    Returns:
        The :class:`CKAResult` with ``[L_pruned, L_dense]`` matrices for both signals.

    Raises:
        LayerSpecError: bad ``remove`` (out of range, repeated, every layer).
        CKAError: bad ``n_samples``; DeclensError: unknown format.
    """
    from tqdm.auto import tqdm

    from .decision import encoder_for, prepare

    cfg = config if config is not None else CKAConfig()
    n_samples, seed, max_tokens = cfg.n_samples, cfg.seed, cfg.max_tokens
    num_fewshot, include_embeddings = cfg.num_fewshot, cfg.include_embeddings
    format_named(fmt)  # an unknown format fails here, before any work
    remove = [int(i) for i in remove]
    parts = lm.parts
    # Prefix reuse: positions before the first removed one are the dense layers themselves (nothing
    # removed: the dense model against itself, nothing runs twice).
    suffix = suffix_to_run(parts, remove)
    keep, m, run = suffix.keep, suffix.start, (suffix.run if remove else [])
    dense_ids = dense_layer_ids(parts)
    pruned_ids = [dense_ids[p] for p in keep]
    data = _select(data, n_samples, seed)
    check_rows(len(data.items), f"select at least {MIN_ROWS} rows (n_samples, the task's rows)")
    t0 = time.perf_counter()
    req = requests if requests is not None else prepare(lm, data, fmt, num_fewshot=num_fewshot)
    rows = cka_rows(req)
    if len(rows) != len(data.items):
        raise CKAError(f"the requests hold {len(rows)} rows but {len(data.items)} items are selected")
    pad = encoder_for(lm).pad_id
    budget = max_tokens or default_max_tokens(parts)
    dense = CKAProbe(len(rows))
    pruned = CKAProbe(len(rows))
    lengths = [len(r) for r in rows]
    plan = plan_batches(lengths, budget, batch_cost=parts.options.batch_cost)
    mine = [i for j in distributed.my_batches(plan) for i in plan[j]]  # this rank's rows (all in one process)
    talk = progress and distributed.is_main()
    bar = tqdm(total=len(mine), desc=f"cka {data.name}/{fmt}", unit="seq", disable=not talk, leave=False)

    def run_batch(idx: list[int]) -> None:  # the probes write row by row: a batch may run as two halves
        b = collate(rows, idx, pad, lm.device)
        cap = LayerStates("input", [m]) if run else None  # the dense state entering the first removed layer
        forward(parts, b, [dense] + ([InputRead(dense)] if include_embeddings else []) + ([cap] if cap else []))
        if run:
            run_from(parts, b, [pruned], cap.states[m], run)

    try:
        for idx in (plan[j] for j in distributed.my_batches(plan)):
            split_on_oom(run_batch, idx, lengths)
            bar.update(len(idx))
    finally:
        bar.close()
    for probe in (dense, pruned):  # under torchrun: every rank gets all rows, then computes the same CKA
        probe.merge_ranks(mine)
    t_run = time.perf_counter() - t0

    def pruned_states(signal: str) -> list[Tensor]:
        src_p, src_d = (pruned.hidden, dense.hidden) if signal == "hidden" else (pruned.decision, dense.decision)
        return [src_p[i] if i in src_p else src_d[i] for i in pruned_ids]

    if include_embeddings:  # the embedding output: the same in the pruned view and the dense model
        pruned_ids = [EMBEDDING_ID] + pruned_ids
        dense_ids = [EMBEDDING_ID] + list(dense_ids)
    t1 = time.perf_counter()
    hidden = cka_matrix(pruned_states("hidden"), [dense.hidden[i] for i in dense_ids])
    decision = cka_matrix(pruned_states("decision"), [dense.decision[i] for i in dense_ids])
    t_cka = time.perf_counter() - t1
    config = {
        "model": lm.spec, "task": data.name, "format": fmt, **data.selection, "num_fewshot": num_fewshot,
        "n_samples": len(rows), "seed": seed, "remove": remove, "kept_layer_ids": pruned_ids,
        "num_layers": len(dense_ids) - int(include_embeddings), "include_embeddings": include_embeddings, "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
        "max_tokens": budget, "signals": {"hidden": "layer output averaged over each row's real tokens",
                                          "decision": "layer output at each row's last real token"},
    }
    prov = provenance(lm, data, timing={"forward_s": round(t_run, 3), "cka_s": round(t_cka, 3),
                                        "layers_reused": len(keep) - len(run) if remove else len(keep),
                                        "ranks": distributed.world()})
    return CKAResult(config=config, provenance=prov, pruned_ids=pruned_ids, dense_ids=list(dense_ids),
                     hidden=hidden, decision=decision)
