"""Pruning methods on equal terms: each produces, for every number of removed layers ``k``, a set of
removed layers, evaluated the same way (accuracy and the full per-layer decision metrics).

- ``ip``: Iterative Pruning (the paper's Eq. 4): at every step Block Influence is recomputed on the
  current, already pruned model and its lowest-BI layer is removed; optional SKIP-Prun restarts.
- ``shortgpt``: one shot: the ``k`` lowest-BI layers of the dense model.
- ``sleb``: SLEB: iteratively remove the layer whose removal raises calibration perplexity least.
- ``angular``: Gromov et al.: the contiguous block of ``k`` layers whose input and output are closest
  in angular distance (last token, calibration rows).
- ``last``: the deepest layers before the final one (``L-2, L-3, ...``).
- ``random``: a seeded random order.
- ``phase``: phase-aware pruning: like ``ip`` but only inside the current model's Decisive Phase.
- ``replay``: remove layers in a given order (e.g. a published trajectory), measuring everything
  Iterative Pruning measures at every step, Block Influence included.

SKIP-Prun (documented criterion, all thresholds configurable): a step *collapses* when the pruned
model's accuracy falls more than ``drop`` (absolute) below its parent's. On a collapse the step is
recorded, the greedy choice that caused it is banned at that state, and the search restarts from the
best state found so far with the parent's number of removed layers (the best-performing pruned
state at the last ratio that did not collapse), taking the next-lowest-BI layer. After ``max_skips``
banned choices at one state, or ``max_restarts`` restarts in all, the best collapsed child is accepted
and the search goes on. The record kept for every ratio is the best state found at it (highest
accuracy, then highest final DM), so the removed set at one ratio need not contain the set at the
ratio before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from ..errors import DeclensError
from .engine import Evaluation, PruningEngine

METHODS = ("ip", "shortgpt", "sleb", "angular", "last", "random", "phase", "replay")


@dataclass
class SkipPrun:
    """SKIP-Prun restart policy (see the module docstring)."""

    enabled: bool = False
    drop: float = 0.10
    max_skips: int = 3
    max_restarts: int = 20


@dataclass
class PruneRecord:
    """One evaluated pruned state.

    Attributes:
        method: the method that produced it.
        index: evaluation order within the method's run.
        removed: dense ids of removed layers, in removal order.
        layer: the layer removed by this step (None for the dense model or one-shot sets).
        k: number of removed layers; ratio: ``k / L``.
        accuracy: final-layer accuracy; accuracy_norm: cloze length-normalised accuracy.
        final_dm: final-layer mean Decision Margin; transition_layer: dense id of the Transition Point.
        layer_ids, dm, acc_layers, kl, option_frequency: per-layer metrics of the pruned model.
        bi: dense id -> Block Influence of every layer of this state's model (when measured).
        nll: calibration next-token NLL (SLEB) when measured.
        accepted: on the method's trajectory; collapsed: SKIP-Prun flagged this step; path: restart count.
        note: anything worth knowing (fallbacks, candidate scores).
    """

    method: str
    index: int
    removed: list[int]
    layer: int | None
    k: int
    ratio: float
    accuracy: float
    final_dm: float
    transition_layer: int | None
    chance: float
    layer_ids: list[int]
    dm: list[float]
    acc_layers: list[float]
    kl: list[float]
    option_frequency: list[list[float]]
    accuracy_norm: float | None = None
    bi: dict[int, float] | None = None
    nll: float | None = None
    accepted: bool = True
    collapsed: bool = False
    path: int = 0
    note: str = ""
    candidates: dict[int, float] | None = None

    @classmethod
    def from_eval(cls, method: str, index: int, ev: Evaluation, num_layers: int, layer: int | None, **kw) -> "PruneRecord":
        m = ev.metrics
        return cls(
            method=method, index=index, removed=list(ev.removed), layer=layer, k=len(ev.removed),
            ratio=len(ev.removed) / num_layers, accuracy=m.final_acc, final_dm=m.final_dm,
            transition_layer=m.transition_layer, chance=m.chance, layer_ids=list(m.layer_ids),
            dm=[float(x) for x in m.dm], acc_layers=[float(x) for x in m.acc], kl=[float(x) for x in m.kl],
            option_frequency=[[float(v) for v in row] for row in m.option_frequency],
            accuracy_norm=None if m.acc_norm is None else float(m.acc_norm[-1]),
            bi=None if ev.bi is None else {int(k): float(v) for k, v in ev.bi.items()}, nll=ev.nll, **kw,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["bi"] is not None:
            d["bi"] = {str(k): v for k, v in d["bi"].items()}
        if d["candidates"] is not None:
            d["candidates"] = {str(k): v for k, v in d["candidates"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PruneRecord":
        d = dict(d)
        for key in ("bi", "candidates"):
            if d.get(key) is not None:
                d[key] = {int(k): v for k, v in d[key].items()}
        return cls(**d)


def better(a: PruneRecord | None, b: PruneRecord) -> PruneRecord:
    """The better of two states at one ratio: higher accuracy, then higher final DM, then the earlier."""
    if a is None:
        return b
    return b if (b.accuracy, b.final_dm) > (a.accuracy, a.final_dm) else a


@dataclass
class MethodRun:
    """All states a method evaluated, and the best state per ratio."""

    method: str
    num_layers: int
    records: list[PruneRecord] = field(default_factory=list)

    def best_by_k(self) -> dict[int, PruneRecord]:
        best: dict[int, PruneRecord] = {}
        for r in self.records:
            best[r.k] = better(best.get(r.k), r)
        return dict(sorted(best.items()))

    def table(self) -> list[dict]:
        """The paper's per-ratio table: Remain, #Removed, Pruning Ratio, Removed Layer IDs (0-based)."""
        return [{"remain": self.num_layers - k, "removed_count": k, "ratio": r.ratio, "removed": r.removed,
                 "accuracy": r.accuracy, "final_dm": r.final_dm, "transition_layer": r.transition_layer}
                for k, r in self.best_by_k().items() if k > 0]


class Memo:
    """Evaluations keyed by the removed *set* (their numbers do not depend on the removal order).

    ``on_new`` is called after every fresh evaluation (the run's checkpoint hook), ``on_record``
    with every step a method records (progress lines). Stored entries are reused on resume, so a
    killed run replays deterministically to where it stopped.
    """

    def __init__(self, engine: PruningEngine, stored: dict[str, dict] | None = None,
                 on_new: Callable[[], None] | None = None,
                 on_record: Callable[[PruneRecord], None] | None = None):
        self.engine = engine
        self.data: dict[str, dict] = dict(stored or {})
        self.on_new = on_new
        self.on_record = on_record

    @staticmethod
    def key(removed) -> str:
        return ",".join(map(str, sorted(removed)))

    def get(self, removed: list[int], scores: bool = True, bi: bool = False, nll: bool = False) -> dict:
        k = self.key(removed)
        have = self.data.get(k, {})
        need_scores = scores and "rec" not in have
        need_bi = bi and "bi" not in have
        need_nll = nll and "nll" not in have
        if need_scores or need_bi or need_nll:
            ev = self.engine.evaluate(removed, scores=need_scores, bi=need_bi, nll=need_nll)
            have = dict(have)
            if need_scores:
                have["rec"] = PruneRecord.from_eval("", 0, ev, self.engine.num_layers, None).to_dict()
            if need_bi:
                have["bi"] = {str(a): b for a, b in ev.bi.items()}
            if need_nll:
                have["nll"] = ev.nll
            self.data[k] = have
            if self.on_new:
                self.on_new()
        return have

    def record(self, method: str, index: int, removed: list[int], layer: int | None, bi: bool = False, **kw) -> PruneRecord:
        have = self.get(removed, scores=True, bi=bi)
        d = dict(have["rec"])
        d.update(method=method, index=index, removed=list(removed), layer=layer)
        if "bi" in have:
            d["bi"] = have["bi"]
        if "nll" in have:
            d["nll"] = have["nll"]
        rec = PruneRecord.from_dict(d)
        for key, v in kw.items():
            setattr(rec, key, v)
        if self.on_record:
            self.on_record(rec)
        return rec

    def bi(self, removed: list[int]) -> dict[int, float]:
        return {int(a): b for a, b in self.get(removed, scores=False, bi=True)["bi"].items()}


def _lowest(bi: dict[int, float], exclude=()) -> list[int]:
    return [l for l in sorted(bi, key=lambda l: (bi[l], l)) if l not in set(exclude)]


def run_ip(memo: Memo, max_removed: int, skip: SkipPrun | None = None, phase_only: bool = False,
           method: str = "ip") -> MethodRun:
    """Iterative Pruning (optionally SKIP-Prun; ``phase_only`` restricts choices to the Decisive Phase)."""
    skip = skip or SkipPrun()
    L = memo.engine.num_layers
    run = MethodRun(method, L)
    recs = run.records
    recs.append(memo.record(method, 0, [], None, bi=True))
    best: dict[int, PruneRecord] = {0: recs[0]}
    banned: dict[str, set[int]] = {}
    children: dict[str, list[PruneRecord]] = {}
    current: list[int] = []
    restarts = 0
    while len(current) < max_removed:
        key = Memo.key(current)
        bi = memo.bi(current)
        note = ""
        cands = _lowest(bi, banned.get(key, ()))
        if phase_only:
            here = memo.record(method, -1, current, None)
            decisive = set(here.layer_ids[here.layer_ids.index(here.transition_layer):]) if here.transition_layer is not None else set()
            decisive.discard(here.layer_ids[-1])  # never the final layer itself
            inside = [c for c in cands if c in decisive]
            if inside:
                cands = inside
            else:
                note = "decisive phase empty: lowest BI over all layers"
        if not cands or (skip.enabled and len(banned.get(key, ())) >= skip.max_skips):
            child = max(children[key], key=lambda r: (r.accuracy, r.final_dm))
            child.accepted = True
            child.note = (child.note + "; " if child.note else "") + "accepted after all alternatives collapsed"
            current = list(child.removed)
            continue
        layer = cands[0]
        new = current + [layer]
        rec = memo.record(method, len(recs), new, layer, bi=True, path=restarts, note=note)
        recs.append(rec)
        k = len(new)
        parent_acc = memo.record(method, -1, current, None).accuracy
        if skip.enabled and restarts < skip.max_restarts and rec.accuracy < parent_acc - skip.drop:
            rec.collapsed, rec.accepted = True, False
            banned.setdefault(key, set()).add(layer)
            children.setdefault(key, []).append(rec)
            restarts += 1
            best[k] = better(best.get(k), rec)
            current = list(best[len(current)].removed)  # restart from the best state at the parent's ratio
            continue
        best[k] = better(best.get(k), rec)
        current = new
    return run


def run_order(memo: Memo, method: str, order: list[int], max_removed: int, bi: bool = False) -> MethodRun:
    """A nested method: the first ``k`` layers of a fixed order, for every ``k`` (``bi``: also measure
    Block Influence of every state, as Iterative Pruning does)."""
    L = memo.engine.num_layers
    run = MethodRun(method, L)
    run.records.append(memo.record(method, 0, [], None, bi=bi))
    for k in range(1, max_removed + 1):
        run.records.append(memo.record(method, k, order[:k], order[k - 1], bi=bi))
    return run


def run_angular(memo: Memo, max_removed: int) -> MethodRun:
    """Gromov et al.: for each ``k``, the contiguous block of ``k`` layers with the smallest angular distance."""
    eng = memo.engine
    eng.run_dense()
    D = eng.angular
    if D is None:
        raise DeclensError("the angular method needs calibration rows")
    ids = eng.dense_ids
    run = MethodRun("angular", eng.num_layers)
    run.records.append(memo.record("angular", 0, [], None))
    for k in range(1, max_removed + 1):
        starts = [l for l in range(eng.num_layers - k + 1)]
        l_star = min(starts, key=lambda l: (D[l, k], l))
        removed = ids[l_star : l_star + k]
        run.records.append(memo.record("angular", k, removed, None, note=f"block start {ids[l_star]}, distance {D[l_star, k]:.4f}"))
    return run


def run_sleb(memo: Memo, max_removed: int) -> MethodRun:
    """SLEB: at each step remove the layer whose removal gives the lowest calibration perplexity."""
    L = memo.engine.num_layers
    run = MethodRun("sleb", L)
    run.records.append(memo.record("sleb", 0, [], None))
    current: list[int] = []
    while len(current) < max_removed:
        keep = [l for l in memo.engine.dense_ids if l not in current]
        cand = {l: memo.get(current + [l], scores=False, nll=True)["nll"] for l in keep}
        layer = min(cand, key=lambda l: (cand[l], l))
        current = current + [layer]
        run.records.append(memo.record("sleb", len(current), current, layer,
                                       candidates={l: float(np.exp(v)) for l, v in cand.items()},
                                       note="candidates: calibration perplexity after removing each layer"))
    return run


def run_method(memo: Memo, method: str, max_removed: int, skip: SkipPrun | None = None, seed: int = 0,
               order: list[int] | None = None) -> MethodRun:
    """Run one method up to ``max_removed`` removed layers (``order``: the removal order of ``replay``)."""
    ids = memo.engine.dense_ids
    if method == "replay":
        if not order:
            raise DeclensError("method 'replay' needs a removal order (--order 24,23,25,...)")
        from ..surgery import validate_removal

        validate_removal(order, len(ids))
        if len(order) < max_removed:
            raise DeclensError(f"the replay order has {len(order)} layers but {max_removed} removals were asked for")
        return run_order(memo, "replay", list(order), max_removed, bi=True)
    if method == "ip":
        return run_ip(memo, max_removed, skip)
    if method == "phase":
        return run_ip(memo, max_removed, skip, phase_only=True, method="phase")
    if method == "shortgpt":
        return run_order(memo, "shortgpt", _lowest(memo.bi([])), max_removed)
    if method == "last":
        return run_order(memo, "last", list(reversed(ids[:-1])), max_removed)
    if method == "random":
        order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
        return run_order(memo, "random", order, max_removed)
    if method == "angular":
        return run_angular(memo, max_removed)
    if method == "sleb":
        return run_sleb(memo, max_removed)
    raise DeclensError(f"unknown pruning method {method!r}; use one of {', '.join(METHODS)}")


def critical_ratio(run: MethodRun, keep: float = 0.25) -> float | None:
    """The smallest pruning ratio at which the model has collapsed.

    Collapsed: the best state's accuracy keeps at most ``keep`` of the dense model's accuracy above
    chance, i.e. ``acc - chance <= keep * (acc_dense - chance)``. None if it never collapses within
    the run (or the dense model is itself at chance).
    """
    best = run.best_by_k()
    dense = best[0]
    margin = dense.accuracy - dense.chance
    if margin <= 0:
        return None
    for k, r in best.items():
        if k > 0 and r.accuracy - r.chance <= keep * margin:
            return r.ratio
    return None
