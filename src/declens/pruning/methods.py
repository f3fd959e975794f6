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
- ``laco``, ``mka``: the layer-merging baselines (LaCo's RDSC, MKA's manifold-aligned fusion), which
  fold layers into a kept one with new weights (:mod:`declens.pruning.merging`).

Every method is registered by name in :data:`METHODS` (:func:`register_method`) with the one signature
:data:`MethodFn`; ``prune``, ``--method`` and the option checks know exactly the registered names.

SKIP-Prun (every rule explicit and configurable, see :class:`SkipPrun` and docs/METHOD.md, "SKIP-Prun
restart and collapse rules"): a step *collapses* when it meets the collapse criterion against its
parent (``abs``: accuracy falls more than ``drop``; ``rel``: it loses more than ``rel_drop`` of the
parent's accuracy above chance; ``tp``: the parent has a Transition Point and the step has none). The
collapsed step is recorded, its choice is banned at its parent, and a fresh Iterative Pruning path
starts from the restart point: by default (``restart="best_any"``, the paper's "best-performing
pruned state discovered so far") the kept pruned state of highest accuracy at *any* ratio (ties: more
removed layers, then higher final DM, then found earlier), with every choice already taken from it
excluded there, so the new path branches; ``restart="parent_ratio"`` restarts from the best kept state
at the collapsed step's parent ratio. ``max_skips`` bounds the collapsed choices banned at one state and
the restarts from one state; after ``max_restarts`` restarts collapses are no longer flagged. The
record kept for every ratio is the best state found at it (highest accuracy, then highest final DM),
so the removed set at one ratio need not contain the set at the ratio before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DeclensError
from ..results import ACCURACY_V1_NAMES, rename_keys
from .engine import Evaluation, PruningEngine


RESTART_RULES = ("best_any", "parent_ratio")
COLLAPSE_RULES = ("abs", "rel", "tp")


@dataclass
class SkipPrun:
    """SKIP-Prun restart policy (see the module docstring and docs/METHOD.md).

    Attributes:
        enabled: restart when a step collapses (False: plain Iterative Pruning).
        restart: ``best_any`` (default): restart from the best kept pruned state at any ratio (highest
            accuracy, then more removed layers, then higher final DM, then the earlier found), with every
            choice already taken from it excluded there; ``parent_ratio``: from the best kept state at the
            collapsed step's parent ratio (highest accuracy, then final DM, then the earlier).
        criterion: ``abs``: accuracy falls more than ``drop`` below the parent's; ``rel``: the step loses
            more than ``rel_drop`` of the parent's accuracy above chance; ``tp``: the parent has a
            Transition Point and the step has none.
        drop: threshold of ``abs`` (accuracy points, 0..1).
        rel_drop: threshold of ``rel`` (share of the parent's accuracy above chance, 0..1).
        max_skips: at most this many collapsed choices banned at one state (then its best collapsed child
            is accepted), and at most this many restarts from one state.
        max_restarts: restarts in all; later collapses are not flagged.
    """

    enabled: bool = False
    restart: str = "best_any"
    criterion: str = "abs"
    drop: float = 0.10
    rel_drop: float = 0.5
    max_skips: int = 3
    max_restarts: int = 20

    def __post_init__(self) -> None:
        if self.restart not in RESTART_RULES:
            raise DeclensError(f"unknown SKIP-Prun restart rule {self.restart!r}; use --restart-from {' or '.join(RESTART_RULES)}")
        if self.criterion not in COLLAPSE_RULES:
            raise DeclensError(f"unknown SKIP-Prun collapse rule {self.criterion!r}; use --collapse-rule {', '.join(COLLAPSE_RULES)}")
        if not 0 <= self.drop <= 1:
            raise DeclensError(f"--collapse-drop is an accuracy difference between 0 and 1, got {self.drop}")
        if not 0 < self.rel_drop <= 1:
            raise DeclensError(f"--collapse-rel-drop is a share in (0, 1], got {self.rel_drop}")
        if self.max_skips < 1 or self.max_restarts < 0:
            raise DeclensError(f"--max-skips must be >= 1 and --max-restarts >= 0, got {self.max_skips} and {self.max_restarts}")

    def collapse(self, parent: "PruneRecord", child: "PruneRecord") -> str:
        """Why ``child`` (one step below ``parent``) collapsed under this criterion; "" if it did not."""
        if self.criterion == "abs" and child.final_accuracy < parent.final_accuracy - self.drop:
            return f"abs: accuracy {child.final_accuracy:.3f} < parent {parent.final_accuracy:.3f} - {self.drop:g}"
        margin = parent.final_accuracy - parent.chance
        if self.criterion == "rel" and margin > 0 and parent.final_accuracy - child.final_accuracy > self.rel_drop * margin:
            return (f"rel: accuracy {child.final_accuracy:.3f} lost more than {self.rel_drop:g} of the parent's "
                    f"{margin:.3f} above chance")
        if self.criterion == "tp" and parent.transition_layer is not None and child.transition_layer is None:
            return f"tp: Transition Point lost (parent's: layer {parent.transition_layer})"
        return ""


@dataclass
class PruneRecord:
    """One evaluated pruned state.

    Attributes:
        method: the method that produced it.
        index: evaluation order within the method's run.
        removed: dense ids of removed layers, in removal order.
        layer: the layer removed by this step (None for the dense model or one-shot sets).
        k: number of removed layers; ratio: ``k / L``.
        final_accuracy: final-layer accuracy; final_accuracy_norm: cloze length-normalised final accuracy.
        final_dm: final-layer mean Decision Margin; transition_layer: dense id of the Transition Point.
        layer_ids, dm, accuracy, kl, option_frequency: per-layer metrics of the pruned model (the names of
            the analysis result; ``prune.json`` schema 1 called the per-layer accuracy ``acc_layers`` and the
            final one ``accuracy``: :data:`declens.results.ACCURACY_V1_NAMES`).
        bi: dense id -> Block Influence of every layer of this state's model (when measured).
        nll: calibration next-token NLL (SLEB) when measured.
        accepted: on the method's trajectory; collapsed: SKIP-Prun flagged this step; path: SKIP-Prun path
            number (0 = the first; each restart starts the next).
        restart_from: on the first step of a restarted path: ``index`` of the state the path started from.
        excluded: choices barred at the parent when this step was chosen (collapsed choices banned there,
            and on a restart the choices earlier paths took from it); None when none.
        note: anything worth knowing (fallbacks, candidate scores, collapse reasons and restarts).
    """

    method: str
    index: int
    removed: list[int]
    layer: int | None
    k: int
    ratio: float
    final_accuracy: float
    final_dm: float
    transition_layer: int | None
    chance: float
    layer_ids: list[int]
    dm: list[float]
    accuracy: list[float]
    kl: list[float]
    option_frequency: list[list[float]]
    final_accuracy_norm: float | None = None
    bi: dict[int, float] | None = None
    nll: float | None = None
    accepted: bool = True
    collapsed: bool = False
    path: int = 0
    note: str = ""
    candidates: dict[int, float] | None = None
    restart_from: int | None = None
    excluded: list[int] | None = None
    gold_frequency: list[float] | None = None  # [K] gold-label distribution of the evaluated rows
    merges: list[dict] | None = None  # laco / mka: host layer, absorbed ids, coefficients (pruning/merging.py)

    @classmethod
    def from_eval(cls, method: str, index: int, ev: Evaluation, num_layers: int, layer: int | None, **kw) -> "PruneRecord":
        m = ev.metrics
        return cls(
            method=method, index=index, removed=list(ev.removed), layer=layer, k=len(ev.removed),
            ratio=len(ev.removed) / num_layers, final_accuracy=m.final_acc, final_dm=m.final_dm,
            transition_layer=m.transition_layer, chance=m.chance, layer_ids=list(m.layer_ids),
            dm=[float(x) for x in m.dm], accuracy=[float(x) for x in m.acc], kl=[float(x) for x in m.kl],
            option_frequency=[[float(v) for v in row] for row in m.option_frequency],
            gold_frequency=[float(v) for v in m.gold_frequency],
            final_accuracy_norm=None if m.acc_norm is None else float(m.acc_norm[-1]),
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
        """From :meth:`to_dict`'s dict; a schema-1 record (``acc_layers``, e.g. from a resume state written by
        an earlier declens) is renamed first."""
        d = rename_keys(d, ACCURACY_V1_NAMES) if "acc_layers" in d else dict(d)
        for key in ("bi", "candidates"):
            if d.get(key) is not None:
                d[key] = {int(k): v for k, v in d[key].items()}
        return cls(**d)


def better(a: PruneRecord | None, b: PruneRecord) -> PruneRecord:
    """The better of two states at one ratio: higher accuracy, then higher final DM, then the earlier."""
    if a is None:
        return b
    return b if (b.final_accuracy, b.final_dm) > (a.final_accuracy, a.final_dm) else a


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

    def paths(self) -> list[dict]:
        """SKIP-Prun bookkeeping: every path, the state it started from, the choices excluded there, its
        steps (record indices) and its collapsed steps (the last of which, if any, ended it)."""
        out: list[dict] = []
        for r in self.records[1:]:
            if not out or r.path != out[-1]["path"]:
                start = self.records[r.restart_from if r.restart_from is not None else 0]
                out.append({"path": r.path, "start_index": start.index, "start_removed": list(start.removed),
                            "start_accuracy": start.final_accuracy, "excluded_at_start": list(r.excluded or []),
                            "steps": [], "collapsed": []})
            out[-1]["steps"].append(r.index)
            if r.collapsed:
                out[-1]["collapsed"].append(r.index)
        return out

    def table(self) -> list[dict]:
        """The paper's per-ratio table: Remain, #Removed, Pruning Ratio, Removed Layer IDs (0-based)."""
        return [{"remain": self.num_layers - k, "removed_count": k, "ratio": r.ratio, "removed": r.removed,
                 "final_accuracy": r.final_accuracy, "final_dm": r.final_dm, "transition_layer": r.transition_layer,
                 **({"merges": r.merges} if r.merges is not None else {})}
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


def _choices(memo: Memo, method: str, current: list[int], excluded: set[int], phase_only: bool) -> tuple[list[int], str]:
    """Layers IP may remove next from ``current``, lowest Block Influence first, and a note."""
    cands = _lowest(memo.bi(current), excluded)
    if not phase_only:
        return cands, ""
    here = memo.record(method, -1, current, None)
    decisive = set(here.layer_ids[here.layer_ids.index(here.transition_layer):]) if here.transition_layer is not None else set()
    decisive.discard(here.layer_ids[-1])  # never the final layer itself
    inside = [c for c in cands if c in decisive]
    return (inside, "") if inside else (cands, "decisive phase empty: lowest BI over all layers")


def _add_note(rec: PruneRecord, text: str) -> None:
    rec.note = (rec.note + "; " if rec.note else "") + text


@dataclass
class _Search:
    """SKIP-Prun bookkeeping of one ``run_ip`` (keys: :meth:`Memo.key` of a state)."""

    skip: SkipPrun
    num_layers: int
    max_removed: int
    kept: dict[str, PruneRecord] = field(default_factory=dict)  # kept states (first record of each set)
    banned: dict[str, set[int]] = field(default_factory=dict)  # collapsed choices banned at a state
    collapsed: dict[str, list[PruneRecord]] = field(default_factory=dict)  # collapsed children of a state
    taken: dict[str, list[int]] = field(default_factory=dict)  # kept choices taken from a state
    branched: dict[str, int] = field(default_factory=dict)  # restarts from a state

    def keep(self, key: str, rec: PruneRecord) -> None:
        if rec.layer is not None:
            self.taken.setdefault(key, []).append(rec.layer)
        self.kept.setdefault(Memo.key(rec.removed), rec)

    def restart_point(self, parent_k: int) -> tuple[PruneRecord, set[int]] | None:
        """The state a new path starts from and the choices excluded there (None: no state left)."""
        states = [r for r in self.kept.values() if not r.collapsed]
        if self.skip.restart == "parent_ratio":
            at = [r for r in states if r.k == parent_k]
            best = max(at, key=lambda r: (r.final_accuracy, r.final_dm, -r.index))
            return best, set()
        ok = []
        for r in states:
            key = Memo.key(r.removed)
            used = self.banned.get(key, set()) | set(self.taken.get(key, ()))
            if (r.k < self.max_removed and len(self.banned.get(key, ())) < self.skip.max_skips
                    and self.branched.get(key, 0) < self.skip.max_skips and self.num_layers - r.k - len(used) > 0):
                ok.append((r, set(self.taken.get(key, ()))))
        pool = [x for x in ok if x[0].k > 0] or ok  # a pruned state; the dense model only if none is left
        if not pool:
            return None
        return max(pool, key=lambda x: (x[0].final_accuracy, x[0].k, x[0].final_dm, -x[0].index))


def run_ip(memo: Memo, max_removed: int, skip: SkipPrun | None = None, phase_only: bool = False,
           method: str = "ip") -> MethodRun:
    """Iterative Pruning (optionally SKIP-Prun; ``phase_only`` restricts choices to the Decisive Phase).

    Every evaluated step is a record (collapsed ones included), with its path number, the choices excluded
    at its parent and, on a path's first step, the state the path started from (:meth:`MethodRun.paths`).
    """
    skip = skip or SkipPrun()
    L = memo.engine.num_layers
    run = MethodRun(method, L)
    recs = run.records
    recs.append(memo.record(method, 0, [], None, bi=True))
    search = _Search(skip, L, max_removed)
    search.keep("", recs[0])
    current: list[int] = []
    restarts = path = 0
    start: tuple[PruneRecord, set[int]] | None = None  # where a fresh path starts, and what it excludes there
    while len(current) < max_removed:
        key = Memo.key(current)
        excluded = set(search.banned.get(key, ()))
        origin, start = start, None
        if origin is not None:
            excluded |= origin[1]
        cands, note = _choices(memo, method, current, excluded, phase_only)
        stuck = skip.enabled and len(search.banned.get(key, ())) >= skip.max_skips
        if (not cands or stuck) and search.collapsed.get(key):
            child = max(search.collapsed[key], key=lambda r: (r.final_accuracy, r.final_dm))
            child.accepted = True
            _add_note(child, "accepted after all alternatives collapsed")
            search.keep(key, child)
            current = list(child.removed)
            continue
        if not cands:
            break  # nothing left to remove (cannot happen below L - 1 removed layers)
        layer = cands[0]
        new = current + [layer]
        rec = memo.record(method, len(recs), new, layer, bi=True, path=path, note=note,
                          excluded=sorted(excluded) or None,
                          restart_from=None if origin is None else origin[0].index)
        if origin is not None:
            _add_note(rec, f"path {path} starts from #{origin[0].index} {origin[0].removed} "
                           f"(accuracy {origin[0].final_accuracy:.3f}), excluding {sorted(excluded)} there")
        recs.append(rec)
        parent = memo.record(method, -1, current, None)
        reason = skip.collapse(parent, rec) if skip.enabled and restarts < skip.max_restarts else ""
        if not reason:
            search.keep(key, rec)
            current = new
            continue
        rec.collapsed, rec.accepted = True, False
        search.banned.setdefault(key, set()).add(layer)
        search.collapsed.setdefault(key, []).append(rec)
        restarts += 1
        start = search.restart_point(len(current))
        if start is None:
            _add_note(rec, f"collapse ({reason}); banned at its parent; no restart point left: the search stays there")
            continue
        path += 1
        skey = Memo.key(start[0].removed)
        search.branched[skey] = search.branched.get(skey, 0) + 1
        _add_note(rec, f"collapse ({reason}); banned at its parent; restart {restarts}: path {path} "
                       f"from #{start[0].index} {start[0].removed}")
        current = list(start[0].removed)
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
        removed = list(ids[l_star : l_star + k])  # positions l_star.. hold these dense ids
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
        memo.engine.hold(current)  # every candidate shares the current state's layers before it
        cand = {l: memo.get(current + [l], scores=False, nll=True)["nll"] for l in keep}
        layer = min(cand, key=lambda l: (cand[l], l))
        current = current + [layer]
        run.records.append(memo.record("sleb", len(current), current, layer,
                                       candidates={l: float(np.exp(v)) for l, v in cand.items()},
                                       note="candidates: calibration perplexity after removing each layer"))
    memo.engine.hold(None)
    return run


@dataclass(frozen=True)
class MethodOptions:
    """What a pruning method may read besides the memo and its budget (one object, so every method has
    the one signature :data:`MethodFn`).

    Attributes:
        skip: SKIP-Prun policy (``ip``, ``phase``).
        seed: seed of ``random``.
        order: removal order of ``replay`` (dense ids); None for the others.
        merge: a :class:`~declens.pruning.merging.MergeConfig` (``laco``, ``mka``); None: its defaults.
    """

    skip: SkipPrun = field(default_factory=SkipPrun)
    seed: int = 0
    order: list[int] | None = None
    merge: Any = None


#: a pruning method: ``(memo, max_removed, options) -> MethodRun`` holding the dense state (``k = 0``) and
#: one state per number of removed layers up to ``max_removed``, every one evaluated through ``memo``
MethodFn = Callable[[Memo, int, MethodOptions], MethodRun]


@dataclass(frozen=True)
class PruningMethod:
    """One registered pruning method (see :func:`register_method`).

    Attributes:
        name: what ``--method`` / ``prune(methods=...)`` call it.
        run: the method (:data:`MethodFn`).
        summary: one line on what it removes (docs, listings).
    """

    name: str
    run: MethodFn
    summary: str


#: name -> method, in registration order; ``--method`` accepts exactly these names
METHODS: dict[str, PruningMethod] = {}


def register_method(name: str, run: MethodFn, summary: str) -> PruningMethod:
    """Register a pruning method under ``name``; ``prune``, ``--method`` and every check of method names
    then know it. The built-in ones are registered below (``laco`` and ``mka`` in
    :mod:`declens.pruning.merging`).

    Raises:
        DeclensError: ``name`` is taken or not a plain lower-case word (it is a comma-separated CLI value).
    """
    if name in METHODS:
        raise DeclensError(f"a pruning method {name!r} is already registered; pick another name")
    if not name or not all(c.isalnum() or c in "_-" for c in name) or name != name.lower():
        raise DeclensError(f"pruning method name {name!r}: use lower-case letters, digits, '-' or '_'")
    METHODS[name] = PruningMethod(name, run, summary)
    return METHODS[name]


def check_method_names(methods: Sequence[str], order: Sequence[int] | str | None) -> None:
    """Pruning methods exist, each once; ``replay`` gets an ``--order`` and ``--order`` is only given with
    ``replay`` (one-line :class:`DeclensError` naming the fix)."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise DeclensError(f"unknown pruning method(s) {', '.join(bad) or '(none)'} (--method); use any of {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise DeclensError(f"--method {','.join(methods)} names a method more than once; list each once")
    if "replay" in methods and not order:
        raise DeclensError("--method replay replays a removal order; give it with --order 24,23,25,...")
    if order and "replay" not in methods:
        raise DeclensError("--order is the removal order of --method replay; add replay to --method or drop --order")


def run_method(memo: Memo, method: str, max_removed: int, skip: SkipPrun | None = None, seed: int = 0,
               order: list[int] | None = None, merge=None) -> MethodRun:
    """Run one registered method up to ``max_removed`` removed layers (``order``: the removal order of
    ``replay``; ``merge``: a :class:`~declens.pruning.merging.MergeConfig` for ``laco`` / ``mka``)."""
    if method not in METHODS:
        raise DeclensError(f"unknown pruning method {method!r}; use one of {', '.join(METHODS)}")
    opts = MethodOptions(skip=skip or SkipPrun(), seed=seed, order=order, merge=merge)
    return METHODS[method].run(memo, max_removed, opts)


def _run_replay(memo: Memo, max_removed: int, opts: MethodOptions) -> MethodRun:
    order = opts.order
    if not order:
        raise DeclensError("method 'replay' needs a removal order (--order 24,23,25,...)")
    from ..surgery import check_removal

    check_removal(memo.engine.parts, order)  # dense ids, also on an already-pruned model
    if len(order) < max_removed:
        raise DeclensError(f"the replay order has {len(order)} layers but {max_removed} removals were asked for")
    return run_order(memo, "replay", list(order), max_removed, bi=True)


def _run_random(memo: Memo, max_removed: int, opts: MethodOptions) -> MethodRun:
    ids = memo.engine.dense_ids
    order = [ids[i] for i in np.random.default_rng(opts.seed).permutation(len(ids))]
    return run_order(memo, "random", order, max_removed)


register_method("ip", lambda memo, k, o: run_ip(memo, k, o.skip),
                "Iterative Pruning: remove the lowest Block Influence layer of the current model, step by step "
                "(SKIP-Prun restarts with --skip-prun)")
register_method("shortgpt", lambda memo, k, o: run_order(memo, "shortgpt", _lowest(memo.bi([])), k),
                "one shot: the k lowest-BI layers of the dense model")
register_method("sleb", lambda memo, k, o: run_sleb(memo, k),
                "remove the layer whose removal raises calibration perplexity least, step by step")
register_method("angular", lambda memo, k, o: run_angular(memo, k),
                "the contiguous block of k layers whose input and output are closest in angular distance")
register_method("last", lambda memo, k, o: run_order(memo, "last", list(reversed(memo.engine.dense_ids[:-1])), k),
                "the deepest layers before the final one")
register_method("random", _run_random, "a seeded random order (--seed)")
register_method("phase", lambda memo, k, o: run_ip(memo, k, o.skip, phase_only=True, method="phase"),
                "Iterative Pruning restricted to the current model's Decisive Phase")
register_method("replay", _run_replay, "remove layers in a given order (--order), measuring what ip measures")


def critical_ratio(run: MethodRun, keep: float = 0.25) -> float | None:
    """The smallest pruning ratio at which the model has collapsed.

    Collapsed: the best state's accuracy keeps at most ``keep`` of the dense model's accuracy above
    chance, i.e. ``acc - chance <= keep * (acc_dense - chance)``. None if it never collapses within
    the run (or the dense model is itself at chance).
    """
    best = run.best_by_k()
    dense = best[0]
    margin = dense.final_accuracy - dense.chance
    if margin <= 0:
        return None
    for k, r in best.items():
        if k > 0 and r.final_accuracy - r.chance <= keep * margin:
            return r.ratio
    return None
