"""Layer-wise option scores: every option of every item, read through the lens at every layer.

``score_letter`` gives the option-token logits at the decision position; ``score_cloze`` the
log-likelihood of each option's continuation. Both return a :class:`LayerScores` with an
``[L, N, K]`` array (layers x items x options, NaN for options an item does not have), the input
of every metric in :mod:`declens.metrics`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .formats import ClozeRequests, LetterRequests, Requests
from .lens import EMBEDDING_ID, Lens
from .models import DecoderParts
from . import distributed
from .runner import Batch, BatchHooks, Probe, pack_sequences, run_batches, to_device
from .errors import DeclensError, LayerSpecError
from .surgery import dense_ids_of, dense_layer_ids

#: Largest number of vocabulary logits the cloze lens materialises at once: 64 M on the CPU (with
#: vocabularies under 65,536 a float32 copy is made there: 256 MB), 256 M on a GPU (kept in the head's dtype and reduced by one
#: fused kernel: 512 MB in bf16; large chunks keep the vocabulary product at the matmul peak).
LOGIT_BUDGET = {"cpu": 64 * 1024 * 1024, "cuda": 256 * 1024 * 1024}

#: Seconds between checkpoint writes of partial scores (the model's ``ExecutionOptions.checkpoint_every``,
#: the ``--checkpoint-every`` option, overrides it).
CHECKPOINT_EVERY_S = 30.0


@dataclass
class LayerScores:
    """Per-layer option scores.

    Attributes:
        layer_ids: original (dense) ids of the scored layers, in running order.
        scores: ``[L, N, K]`` float32 decision scores: option logits (letter) or continuation
            log-likelihoods (cloze); NaN where item ``n`` has fewer than ``K`` options.
        gold: ``[N]`` gold option index.
        n_options: ``[N]`` options per item.
        kind: ``logit`` or ``loglik``.
        norm_scores: cloze only: ``[L, N, K]`` log-likelihood per character (``acc_norm``).
        embedding: the embedding output read through the lens (``layer_ids == [EMBEDDING_ID]``, one row),
            when asked for; never a row of ``scores``.
    """

    layer_ids: list[int]
    scores: np.ndarray
    gold: np.ndarray
    n_options: np.ndarray
    kind: str
    norm_scores: np.ndarray | None = None
    embedding: "LayerScores | None" = None

    @property
    def num_layers(self) -> int:
        return self.scores.shape[0]

    def final(self) -> np.ndarray:
        """``[N, K]`` scores at the last layer (the model's own output)."""
        return self.scores[-1]


class _HostCopy:
    """A device-to-host copy in flight; ``numpy()`` waits for it (on the source device's stream)."""

    def __init__(self, t: Tensor):
        if t.device.type != "cuda":
            self.host, self.event = t.detach().cpu(), None
            return
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with torch.cuda.device(t.device):
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(t.device))

    @property
    def shape(self):
        return self.host.shape

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


def _to_host(t: Tensor) -> _HostCopy:
    """Start copying a device tensor to (pinned) host memory without waiting for it."""
    return _HostCopy(t)


def run_layer_ids(parts: DecoderParts, layers: Sequence[int] | None) -> list[int]:
    """Dense ids of the layers at ``layers`` (positions; None: all)."""
    return list(dense_layer_ids(parts) if layers is None else dense_ids_of(parts, layers))


def option_mask(n_options: np.ndarray, k: int) -> np.ndarray:
    """``[N, K]`` True where the option exists."""
    return np.arange(k)[None, :] < np.asarray(n_options)[:, None]


def _first_seen(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of ``keys`` ``[R]`` in order of first appearance, and each key's index among them ``[R]``."""
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[order] = np.arange(len(uniq))
    return uniq[order], rank[inverse.reshape(-1)]


class ScoreState:
    """Partial results of a scoring run, for checkpoint and resume.

    Attributes:
        arrays: named float arrays being filled (``scores`` ``[L, S, ...]``).
        done: ``[S]`` True for sequences already scored.
    """

    def __init__(self, arrays: dict[str, np.ndarray], done: np.ndarray):
        self.arrays = arrays
        self.done = done

    @classmethod
    def empty(cls, shapes: dict[str, tuple[int, ...]], n_seqs: int) -> "ScoreState":
        return cls({k: np.full(s, np.nan, dtype=np.float32) for k, s in shapes.items()}, np.zeros(n_seqs, dtype=bool))

    def compatible(self, shapes: dict[str, tuple[int, ...]], n_seqs: int) -> bool:
        return self.done.shape == (n_seqs,) and all(k in self.arrays and self.arrays[k].shape == s for k, s in shapes.items())


class LetterProbe(Probe):
    """Option-token logits at the last real position of each row, at every layer."""

    last_position_only = True  # reads nothing else, so the fast path may skip the rest at the final layer

    def __init__(self, lens: Lens, option_ids: Sequence[int], out: np.ndarray, row_of: dict[int, int] | None = None):
        self.lens = lens
        self.rows = torch.as_tensor(list(option_ids), dtype=torch.long)
        self.out = out  # [L, N, K]
        self.row_of = row_of  # dense layer id -> row of ``out`` (default: position in the running stack)
        self.buf: dict[int, Tensor] = {}
        self.pending: list = []

    def start(self, batch: Batch) -> None:
        self.buf = {}
        self.pick = (torch.arange(batch.size, device=batch.input_ids.device), batch.lengths - 1)

    def layer(self, pos, layer_id, inputs, output):
        row = self.row_of.get(layer_id) if self.row_of is not None else pos
        if row is not None:  # layers not in ``row_of`` are not read
            pick = tuple(t.to(output.device) for t in self.pick)
            self.buf[row] = self.lens.logits(output[pick], self.rows)
        return None

    def finish(self, batch: Batch) -> None:
        if self.buf:
            rows = list(self.buf)
            z = torch.stack([self.buf[r].to(self.buf[rows[0]].device) for r in rows])
            self.pending.append((rows, batch.index.numpy(), _to_host(z)))  # copied while the device works on
        self.buf = {}

    def flush(self) -> None:
        for rows, idx, z in self.pending:
            self.out[np.ix_(rows, idx, np.arange(z.shape[-1]))] = z.numpy()
        self.pending = []


class ClozeProbe(Probe):
    """Sum of lens log-probabilities of continuation tokens, at every layer.

    Each row carries reads ``[R, 3]`` ``(slot, position, target)``: the token ``target`` is predicted at
    ``position``; a slot (one option of one item) sums its reads. The full-vocabulary lens runs
    once per distinct (row, position), however many options read it.
    """

    def __init__(self, lens: Lens, reads: Sequence[np.ndarray], out: np.ndarray,
                 row_of: dict[int, int] | None = None):
        self.lens = lens
        self.reads = reads
        self.out = out  # [L, slots]
        self.row_of = row_of
        self.buf: dict[int, Tensor] = {}
        self.pending: list = []

    def start(self, batch: Batch) -> None:
        self.buf = {}
        index = batch.index.tolist()
        reads = [self.reads[s] for s in index]  # each [R_s, 3] (slot, position, target)
        r = np.concatenate(reads) if reads else np.zeros((0, 3), dtype=np.int64)
        b = np.repeat(np.arange(len(index), dtype=np.int64), [len(x) for x in reads])
        # distinct (row, position) pairs, numbered in order of first appearance; slots likewise
        span = int(r[:, 1].max(initial=0)) + 1
        pair, ridx = _first_seen(b * span + r[:, 1])
        slot_ids, rslot = _first_seen(r[:, 0])
        order = np.argsort(ridx, kind="stable")  # reads grouped by the position they read
        ridx_sorted = ridx[order]
        dev = batch.input_ids.device
        put = lambda xs: to_device(torch.from_numpy(np.ascontiguousarray(xs, dtype=np.int64)), dev)  # noqa: E731
        self.urow, self.upos = put(pair // span), put(pair % span)
        self.ridx, self.rtgt, self.rslot = put(ridx_sorted), put(r[order, 2]), put(rslot[order])
        w = self.lens.head.weight
        chunk = max(1, LOGIT_BUDGET["cuda" if w.is_cuda else "cpu"] // w.shape[0])
        firsts = np.arange(0, len(pair), chunk)
        bounds = np.searchsorted(ridx_sorted, np.concatenate([firsts, firsts + chunk]))
        self.chunks = [(int(a), int(r0), int(r1)) for a, r0, r1 in
                       zip(firsts, bounds[: len(firsts)], bounds[len(firsts):])]  # (first position, first read, end read)
        self.chunk = chunk
        self.slots = slot_ids

    def layer(self, pos, layer_id, inputs, output):
        row = self.row_of.get(layer_id) if self.row_of is not None else pos
        if row is None:  # layers not in ``row_of`` are not read
            return None
        h = output[self.urow.to(output.device), self.upos.to(output.device)]  # [U, d]
        parts = []
        for a, r0, r1 in self.chunks:
            z = self.lens.vocab_logits(h[a : a + self.chunk])  # [u, V] in the head's dtype
            lse = self.lens.log_normalizer(z)  # [u] float32 (output transform applied)
            loc = self.ridx[r0:r1].to(z.device) - a
            parts.append(self.lens.finish(z[loc, self.rtgt[r0:r1].to(z.device)]) - lse[loc])
        lp = torch.cat(parts)
        self.buf[row] = torch.zeros(len(self.slots), dtype=torch.float32, device=lp.device).index_add_(
            0, self.rslot.to(lp.device), lp)
        return None

    def finish(self, batch: Batch) -> None:
        if self.buf:
            rows = list(self.buf)
            vals = torch.stack([self.buf[r].to(self.buf[rows[0]].device) for r in rows])
            self.pending.append((rows, self.slots, _to_host(vals)))
        self.buf = {}

    def flush(self) -> None:
        for rows, slots, vals in self.pending:
            self.out[np.ix_(rows, slots)] = vals.numpy()
        self.pending = []


class InputRead(Probe):
    """Reads the *input* of the first layer run (the embedding output) through another lens probe, as
    layer :data:`~declens.lens.EMBEDDING_ID` (give the inner probe ``row_of={EMBEDDING_ID: 0}``). Not for
    runs that start from injected hidden states (``start_hidden``)."""

    last_position_only = True  # reads layer 0's input only: never the final layer's other positions

    def __init__(self, inner: Probe):
        self.inner = inner

    def start(self, batch: Batch) -> None:
        self.inner.start(batch)

    def layer(self, pos, layer_id, inputs, output):
        if pos == 0:
            self.inner.layer(0, EMBEDDING_ID, inputs, inputs)
        return None

    def finish(self, batch: Batch) -> None:
        self.inner.finish(batch)

    def flush(self) -> None:
        self.inner.flush()


class Checkpointer:
    """Calls ``save(state)`` at most every ``every`` seconds while batches finish (and at the end)."""

    def __init__(self, state: ScoreState, save: Callable[[ScoreState], None] | None, every: float | None = None):
        self.state, self.save = state, save
        self.every = CHECKPOINT_EVERY_S if every is None else every
        self.last = time.monotonic()

    def __call__(self, idx: list[int], sync: Callable[[], None] | None = None) -> None:
        """Mark ``idx`` done; when a save is due, first ``sync()`` (results still in flight reach the state)."""
        self.state.done[idx] = True
        if self.save and time.monotonic() - self.last >= self.every:
            if sync is not None:
                sync()
            self.save(self.state)
            self.last = time.monotonic()


def _reads(parts: Sequence[tuple[int, Sequence[int], Sequence[int]]]) -> np.ndarray:
    """``[R, 3]`` int64 reads (slot, position, target) of one row from (slot, positions, targets) per option
    (the positions of an option's continuation tokens: as many as targets, or more, then cut)."""
    out = [np.stack([np.full(len(tg), slot, dtype=np.int64), np.asarray(pos[: len(tg)], dtype=np.int64),
                     np.asarray(tg, dtype=np.int64)], axis=1) for slot, pos, tg in parts]
    return np.concatenate(out) if out else np.zeros((0, 3), dtype=np.int64)


def cloze_rows(req: ClozeRequests, pack: bool = True) -> tuple[list, list[np.ndarray], list[tuple[int, int]]]:
    """Rows to run for cloze scoring, the reads of each row, and the (item, option) of each slot.

    Each option is the sequence ``context + continuation[:-1]`` whose positions
    ``len(context) - 1 ...`` predict the continuation. With ``pack`` the options of one item go
    into one :class:`~declens.runner.PackedRow`, so a shared context (and any shared prefix, such as
    few-shot examples) runs once; without it every option is its own row (as lm-evaluation-harness does).
    """
    rows: list = []
    reads: list[np.ndarray] = []
    owner: list[tuple[int, int]] = []
    for i, (ctxs, cs) in enumerate(zip(req.contexts, req.continuations)):
        seqs = [ctx + c[:-1] for ctx, c in zip(ctxs, cs)]
        first_slot = len(owner)
        owner += [(i, k) for k in range(len(seqs))]
        if pack:
            row, where = pack_sequences(seqs)
            rows.append(row)
            reads.append(_reads([(first_slot + k, where[k][len(ctx) - 1:], c) for k, (ctx, c) in enumerate(zip(ctxs, cs))]))
        else:
            for k, (ctx, c) in enumerate(zip(ctxs, cs)):
                rows.append(seqs[k])
                reads.append(_reads([(first_slot + k, range(len(ctx) - 1, len(ctx) - 1 + len(c)), c)]))
    return rows, reads, owner


def can_pack(parts: DecoderParts, longest: int) -> bool:
    """Packed rows need an attention kernel that takes an explicit mask and rows within any sliding window."""
    cfg = parts.config
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    window = getattr(cfg, "sliding_window", None)
    return not (window and longest > window)


#: requests class -> the :class:`ScoringPlan` subclass that scores it (:func:`register_plan`)
PLANS: dict[type, type["ScoringPlan"]] = {}


def register_plan(requests: type) -> Callable[[type["ScoringPlan"]], type["ScoringPlan"]]:
    """Class decorator: ``cls`` scores requests of the class ``requests`` (and of its subclasses)."""

    def deco(cls: type["ScoringPlan"]) -> type["ScoringPlan"]:
        PLANS[requests] = cls
        return cls

    return deco


def plan_class(requests: type) -> type["ScoringPlan"]:
    """The plan registered for a requests class (or its nearest registered base class)."""
    for base in requests.__mro__:
        if base in PLANS:
            return PLANS[base]
    raise DeclensError(f"no scoring plan is registered for {requests.__name__}; register one with "
                       "declens.scoring.register_plan")


class ScoringPlan:
    """How one set of requests is scored: the rows to run, the probe that fills an output array,
    and the assembly of that array into :class:`LayerScores`.

    ``ScoringPlan(parts, req)`` builds the plan registered for ``type(req)`` (:data:`PLANS`):
    :class:`LetterPlan` for letter prompts, :class:`ClozePlan` for cloze requests.

    Args:
        parts: model parts.
        req: tokenized requests (:mod:`declens.formats`).
        pack: cloze only: pack each item's options into one prefix-shared row (default: when the
            attention kernel allows it).

    Attributes:
        rows: the token sequences (or packed rows) to run.
        pack: whether rows are packed (always False where each item is one plain row).
        rows_are_items: row ``n`` is item ``n``'s plain token list (so rows of two plans can be matched).
    """

    rows_are_items: bool = False

    def __new__(cls, parts: DecoderParts, req, pack: bool | None = None):
        return super().__new__(plan_class(type(req)) if cls is ScoringPlan else cls)

    def __init__(self, parts: DecoderParts, req, pack: bool | None = None):
        self.parts, self.req = parts, req
        self.lens = Lens(parts)
        self.rows: list = []
        self.pack = False

    def out_shape(self, n_layers: int) -> tuple[int, ...]:
        """Shape of the output array the probe fills (layers first, then rows' outputs)."""
        raise NotImplementedError

    def out_rows(self, rows: Sequence[int]) -> list[int]:
        """Indices along axis 1 of the output array that the given rows fill (items, or option slots)."""
        raise NotImplementedError

    def items_done(self, done: np.ndarray) -> np.ndarray:
        """``[N]`` True for items all of whose rows are marked in ``done`` (``[rows]``)."""
        raise NotImplementedError

    def new_out(self, n_layers: int) -> np.ndarray:
        return np.full(self.out_shape(n_layers), np.nan, dtype=np.float32)

    def probe(self, out: np.ndarray, row_of: dict[int, int] | None = None) -> Probe:
        """A probe writing this plan's scores into ``out`` (rows by ``row_of[dense id]``, else running position)."""
        raise NotImplementedError

    def assemble(self, out: np.ndarray, layer_ids: list[int]) -> LayerScores:
        """``[L, N, K]`` scores (NaN for absent options) from a filled output array."""
        raise NotImplementedError


@register_plan(LetterRequests)
class LetterPlan(ScoringPlan):
    """Letter prompts: one row per item, option-token logits at its last position into ``[L, N, K]``."""

    rows_are_items = True

    def __init__(self, parts: DecoderParts, req: LetterRequests, pack: bool | None = None):
        super().__init__(parts, req, pack)
        self.rows = req.prompts

    def out_shape(self, n_layers: int) -> tuple[int, ...]:
        return (n_layers, len(self.req.prompts), len(self.req.option_ids))

    def out_rows(self, rows: Sequence[int]) -> list[int]:
        return list(rows)

    def items_done(self, done: np.ndarray) -> np.ndarray:
        return done.astype(bool).copy()

    def probe(self, out: np.ndarray, row_of: dict[int, int] | None = None) -> Probe:
        return LetterProbe(self.lens, self.req.option_ids, out, row_of)

    def assemble(self, out: np.ndarray, layer_ids: list[int]) -> LayerScores:
        req = self.req
        scores = out.copy()
        scores[:, ~option_mask(req.n_options, scores.shape[-1])] = np.nan
        return LayerScores(layer_ids=list(layer_ids), scores=scores, gold=req.gold, n_options=req.n_options,
                           kind=req.score_kind)


@register_plan(ClozeRequests)
class ClozePlan(ScoringPlan):
    """Cloze requests: one (packed) row per item or per option, continuation log-likelihoods per option slot
    into ``[L, slots]``, assembled into ``[L, N, K]`` scores and per-character ``norm_scores``."""

    def __init__(self, parts: DecoderParts, req: ClozeRequests, pack: bool | None = None):
        super().__init__(parts, req, pack)
        if pack is None:
            longest = max(len(c) + len(x) for ctxs, cs in zip(req.contexts, req.continuations) for c, x in zip(ctxs, cs))
            pack = can_pack(parts, longest)
        self.rows, self.reads, self.owner = cloze_rows(req, pack=pack)
        self.pack = pack

    def out_shape(self, n_layers: int) -> tuple[int, ...]:
        return (n_layers, len(self.owner))

    def out_rows(self, rows: Sequence[int]) -> list[int]:
        return np.unique(np.concatenate([self.reads[r][:, 0] for r in rows] or [np.zeros(0, np.int64)])).tolist()

    def items_done(self, done: np.ndarray) -> np.ndarray:
        out = np.ones(len(self.req.contexts), dtype=bool)
        item_of = np.array([o[0] for o in self.owner], dtype=np.int64)
        for r in np.flatnonzero(~done.astype(bool)):
            out[item_of[self.reads[r][:, 0]]] = False
        return out

    def probe(self, out: np.ndarray, row_of: dict[int, int] | None = None) -> Probe:
        return ClozeProbe(self.lens, self.reads, out, row_of)

    def assemble(self, out: np.ndarray, layer_ids: list[int]) -> LayerScores:
        req = self.req
        N, K = len(req.contexts), req.cont_chars.shape[1]
        scores = np.full((out.shape[0], N, K), np.nan, dtype=np.float32)
        ii = np.array([o[0] for o in self.owner])
        kk = np.array([o[1] for o in self.owner])
        scores[:, ii, kk] = out
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = scores / np.where(req.cont_chars > 0, req.cont_chars, np.nan)[None]
        return LayerScores(layer_ids=list(layer_ids), scores=scores, gold=req.gold, n_options=req.n_options,
                           kind=req.score_kind, norm_scores=norm.astype(np.float32))


@dataclass
class Resume:
    """Checkpoint and resume of one :func:`score_requests` call.

    Attributes:
        state: partial results to resume from (from a checkpoint; None: start afresh).
        save: called with the partial state now and then, and at the end (None: no checkpoint).
        stats: if given, filled with ``items`` (all) and ``items_restored`` (items whose every row came
            from ``state``, so were not scored by this call).
    """

    state: ScoreState | None = None
    save: Callable[[ScoreState], None] | None = None
    stats: dict | None = None


def score_requests(
    parts: DecoderParts,
    req: Requests,
    pad_id: int,
    layers: Sequence[int] | None = None,
    max_tokens: int | None = None,
    progress: str | None = None,
    resume: Resume | None = None,
    pack: bool | None = None,
    read_layers: Sequence[int] | None = None,
    embeddings: bool = False,
) -> LayerScores:
    """Per-layer option scores through the lens: option-token logits at the decision position
    (letter) or continuation log-likelihoods (cloze).

    Args:
        parts: model parts.
        req: tokenized requests.
        pad_id: padding token id.
        layers: positions of the layers to run (a pruned view, see :func:`~declens.surgery.keep_positions`); None: all.
        max_tokens: padded tokens per batch.
        progress: progress-bar label, or None.
        resume: partial results to start from, where to save them, and resume statistics (:class:`Resume`).
        pack: cloze: pack each item's options into one prefix-shared row (default: when possible).
        read_layers: dense ids of the layers to read through the lens (default: every layer run);
            ``[last id]`` reads only the model's own output, the cheapest way to get accuracy.
        embeddings: also read the embedding output (the first layer's input) through the lens, into
            ``LayerScores.embedding``.
    """
    ids = run_layer_ids(parts, layers)
    row_of = None
    if read_layers is not None:
        missing = [i for i in read_layers if i not in ids]
        if missing:
            raise LayerSpecError(f"cannot read layer(s) {missing}: the model runs layers {ids}")
        ids = [i for i in ids if i in set(read_layers)]
        row_of = {lid: r for r, lid in enumerate(ids)}
    plan = ScoringPlan(parts, req, pack)
    resume = resume or Resume()
    state, save, stats = resume.state, resume.save, resume.stats
    shapes = {"scores": plan.out_shape(len(ids))}
    if embeddings:
        shapes["embedding"] = plan.out_shape(1)
    if state is None or not state.compatible(shapes, len(plan.rows)):
        state = ScoreState.empty(shapes, len(plan.rows))
    if stats is not None:
        restored = plan.items_done(state.done)
        stats.update(items=len(restored), items_restored=int(restored.sum()))
    if distributed.active():
        save = None  # ranks score disjoint batches; a checkpoint would hold one rank's share only
    ck = Checkpointer(state, save, every=parts.options.checkpoint_every)
    probes = [plan.probe(state.arrays["scores"], row_of)]
    if embeddings:
        probes.append(InputRead(plan.probe(state.arrays["embedding"], {EMBEDDING_ID: 0})))
    used = run_batches(parts, plan.rows, probes, pad_id, max_tokens=max_tokens,
                       layers=layers, progress=progress, hooks=BatchHooks(skip=lambda idx: bool(state.done[idx].all()), after=ck))
    if save:
        save(state)
    outs = {k: state.arrays[k] for k in shapes}
    if distributed.active():
        mine = [i for j in distributed.my_batches(used) for i in used[j]]
        outs = {k: distributed.merge_rows(v, plan.out_rows(mine), axis=1) for k, v in outs.items()}
    res = plan.assemble(outs["scores"], ids)
    if embeddings:
        res.embedding = plan.assemble(outs["embedding"], [EMBEDDING_ID])
    return res


def score_letter(parts: DecoderParts, req: LetterRequests, pad_id: int, **kwargs) -> LayerScores:
    """Option-token logits at the decision position at every layer (see :func:`score_requests`)."""
    return score_requests(parts, req, pad_id, **kwargs)


def score_cloze(parts: DecoderParts, req: ClozeRequests, pad_id: int, **kwargs) -> LayerScores:
    """Continuation log-likelihood of every option at every layer (see :func:`score_requests`)."""
    return score_requests(parts, req, pad_id, **kwargs)
