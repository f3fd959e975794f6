"""``declens prune``: run pruning methods on one model and task, evaluate every step, write the
trajectory, the per-ratio tables and the figures. A killed run resumes from its last evaluation.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from .. import distributed
from ..errors import DeclensError, LayerSpecError
from ..formats import format_named, prepare
from ..models import LoadedModel
from ..results import (RunWriter, atomic_write_json, check_run_folder_kind, config_key, provenance, read_result_file,
                       load_result, register_result, rename_keys, ACCURACY_V1_NAMES)
from ..tasks import TaskData, load_task, subsample
from .engine import PruningEngine, calibration_sequences
from .merging import MERGE_METHODS, MergeConfig
from .methods import Memo, MethodRun, PruneRecord, SkipPrun, check_method_names, critical_ratio, run_method

PRUNE_FILE = "prune.json"
STATE_FILE = ".prune-state.json"
#: config entries that steer the search but do not change any evaluation (left out of the resume key)
_SEARCH_ONLY = ("methods", "max_ratio", "max_removed", "skip_prun", "collapse_keep", "order")
#: a line per pruning step (INFO, with ``progress``); the CLI shows them on standard output
logger = logging.getLogger(__name__)


def check_ratio(ratio: float) -> None:
    """A pruning ratio lies strictly between 0 and 1."""
    try:
        ok = 0 < ratio < 1
    except TypeError:  # not a number
        ok = False
    if not ok:
        raise DeclensError(f"pruning ratio must lie strictly between 0 and 1, got {ratio}")


def max_removed_for(ratio: float, num_layers: int) -> int:
    """Number of layers removed at pruning ratio ``ratio`` (floor), validated."""
    check_ratio(ratio)
    k = math.floor(ratio * num_layers + 1e-9)
    if k < 1:
        raise DeclensError(f"ratio {ratio} removes no layer of a {num_layers}-layer model; use at least {1 / num_layers:.3f}")
    return min(k, num_layers - 1)


def _prune_v1_to_v2(d: dict) -> dict:
    """``prune.json`` schema 1 -> 2: :data:`~declens.results.ACCURACY_V1_NAMES` in every record (per-layer
    ``acc_layers`` -> ``accuracy``, final ``accuracy`` / ``accuracy_norm`` -> ``final_accuracy`` /
    ``final_accuracy_norm``) and the table rows' ``accuracy`` -> ``final_accuracy``."""
    d["methods"] = {m: {**body, "table": [rename_keys(row, ACCURACY_V1_NAMES) for row in body.get("table", [])],
                        "records": [rename_keys(x, ACCURACY_V1_NAMES) for x in body.get("records", [])]}
                    for m, body in d.get("methods", {}).items()}
    return d


@register_result("prune", PRUNE_FILE, "prune", converters={1: _prune_v1_to_v2})
@dataclass
class PruneResult:
    """Everything a ``prune`` run produced."""

    config: dict
    provenance: dict
    runs: dict[str, MethodRun]
    critical: dict[str, float | None]
    work: dict = field(default_factory=dict)
    #: of ``prune.json`` (see :func:`declens.results.register_result`); 1 -> 2: per-layer ``acc_layers`` ->
    #: ``accuracy``, final ``accuracy`` -> ``final_accuracy`` (converted on load)
    SCHEMA_VERSION = 2

    def to_dict(self) -> dict:
        return {
            "kind": "prune",
            "config": self.config,
            "provenance": self.provenance,
            "critical_ratio": self.critical,
            "work": self.work,
            "methods": {m: {"table": r.table(), "paths": r.paths(), "records": [x.to_dict() for x in r.records]}
                        for m, r in self.runs.items()},
        }

    @classmethod
    def load(cls, path: str | Path) -> "PruneResult":
        _, d = read_result_file(path, PRUNE_FILE, "prune")
        runs = {}
        for m, body in d["methods"].items():
            recs = [PruneRecord.from_dict(x) for x in body["records"]]
            runs[m] = MethodRun(m, d["config"]["num_layers"], recs)
        return cls(config=d["config"], provenance=d["provenance"], runs=runs, critical=d["critical_ratio"],
                   work=d.get("work", {}))

    def save(self, out_dir: str | Path, plots: bool = False) -> Path:
        """Write ``prune.json``, ``table.csv``, ``steps.csv`` and (with ``plots``) the figures into ``out_dir``
        as one run folder (see :class:`~declens.results.RunWriter`: the manifest is written last)."""
        out = Path(out_dir)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["method", "remain", "removed_count", "pruning_ratio", "accuracy", "final_dm", "transition_layer",
                    "removed_layer_ids", "merges"])
        for m, r in self.runs.items():
            for row in r.table():
                w.writerow([m, row["remain"], row["removed_count"], f"{row['ratio']:.4f}", f"{row['final_accuracy']:.4f}",
                            f"{row['final_dm']:.4f}", row["transition_layer"], json.dumps(row["removed"]),
                            json.dumps(row["merges"]) if "merges" in row else ""])
        table = buf.getvalue()
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["method", "index", "k", "ratio", "layer", "accuracy", "final_dm", "transition_layer", "accepted",
                    "collapsed", "path", "restart_from", "excluded", "removed", "note"])
        for m, r in self.runs.items():
            for x in r.records:
                w.writerow([m, x.index, x.k, f"{x.ratio:.4f}", x.layer, f"{x.final_accuracy:.4f}", f"{x.final_dm:.4f}",
                            x.transition_layer, x.accepted, x.collapsed, x.path,
                            "" if x.restart_from is None else x.restart_from,
                            json.dumps(x.excluded) if x.excluded else "", json.dumps(x.removed), x.note])
        with RunWriter(out, "prune") as run:  # also removes the resume state (.prune-state.json)
            run.json(PRUNE_FILE, self.to_dict())
            run.text("table.csv", table)
            run.text("steps.csv", buf.getvalue())
            if plots:
                run.draw_figures(self, out)
        return out


def _work_entry(run: int, full: int) -> dict:
    """Layer-token work run, what full recomputation would have run, and the share saved by reuse."""
    return {"layer_tokens_run": run, "layer_tokens_full": full, "share_saved": round(0.0 if full == 0 else 1 - run / full, 4)}


def best_states(prune: "PruneResult | str | Path", method: str, num_layers: int | None = None,
                ratios: Sequence[float] | None = None) -> tuple[int, dict[int, PruneRecord]]:
    """The best pruned state per number of removed layers of one method of a ``declens prune`` run.

    Args:
        prune: a prune folder / ``prune.json`` or a loaded :class:`PruneResult`.
        method: the method whose states to take.
        num_layers: the model's dense layer count, checked against the run's.
        ratios: keep only these ratios (each mapped to ``floor(ratio x L)`` removed layers; each must exist);
            None keeps every ratio.

    Returns:
        ``(L, {k: record})`` with ``k > 0``, in order of ``k``.

    Raises:
        DeclensError: no such method, another model's run, a ratio the run lacks, or no pruned state.
    """
    res = prune if isinstance(prune, PruneResult) else load_result(prune, kind="prune")
    if method not in res.runs:
        raise DeclensError(f"the prune run has no method {method!r}; it ran: {', '.join(res.runs)}")
    L = int(res.config["num_layers"])
    if num_layers is not None and num_layers != L:
        raise DeclensError(f"the prune run is of a {L}-layer model but this model has {num_layers} layers; "
                           "use the model that was pruned")
    best = {k: r for k, r in res.runs[method].best_by_k().items() if k > 0}
    if not best:
        raise DeclensError(f"the prune run holds no pruned state of {method}; run 'declens prune' with a larger --max-ratio")
    if ratios is not None:
        keep: dict[int, PruneRecord] = {}
        for r in ratios:
            k = max_removed_for(float(r), L)
            if k not in best:
                avail = ", ".join(f"{kk / L:.3f} ({kk} layers)" for kk in best)
                raise DeclensError(f"{method} has no state with {k} of {L} layers removed (ratio {r}); its ratios: {avail}")
            keep[k] = best[k]
        best = dict(sorted(keep.items()))
    return L, best


#: the paper's Block Influence rows: "256 randomly sampled instances from ARC-Challenge", whatever the
#: evaluated task; declens draws them from ARC-Challenge's train split (never an evaluated row)
CALIB_TASK = "arc_challenge"


def _other_split(spec, evaluated: tuple[str, str]) -> str | None:
    """A split of ``spec`` that holds no evaluated row: its few-shot split, then train, validation, dev,
    then any other; None when the task's only split is the evaluated one."""
    order = [spec.fewshot_split, "train", "validation", "dev", *spec.splits]
    for s in order:
        if s and s in spec.splits and (spec.name, s) != evaluated:
            return s
    return None


def calibration_data(data: TaskData, calib_task: str | None, calib_split: str | None, n: int, seed: int) -> TaskData:
    """Calibration rows for Block Influence / perplexity / angular distance; never the evaluated rows.

    ``n`` rows drawn with ``seed`` from ``calib_task`` (default :data:`CALIB_TASK`, the paper's choice)
    and ``calib_split`` (default: that task's few-shot/train split, else another split that is not the
    evaluated one). A task whose only split is the evaluated one falls back to ARC-Challenge train. The
    rule applied is recorded in ``selection["calibration"]`` (``prune`` writes it into its config).
    Evaluated rows are used only through ``PruneConfig(calib_from_eval=True)``.

    Raises:
        DeclensError: ``calib_split`` is the evaluated split of the evaluated task, or ``n`` is not positive.
    """
    if n <= 0:
        raise DeclensError(f"--calib-samples must be positive, got {n}")
    evaluated = (data.spec.name, data.split)
    name = calib_task or CALIB_TASK
    source = data.spec if name == data.spec.name else name  # a name keeps e.g. mmlu:astronomy's subjects
    spec = data.spec if name == data.spec.name else load_task(name, limit=1).spec
    if calib_split is not None:
        if (spec.name, calib_split) == evaluated:
            raise DeclensError(f"--calib-split {calib_split!r} is the evaluated split of {spec.name!r}; calibrate on "
                               f"another split or task, or pass --calib-from-eval to use the evaluated rows on purpose")
        rule = f"{spec.name} split {calib_split!r} (as asked)"
    else:
        calib_split = _other_split(spec, evaluated)
        rule = f"{spec.name} split {calib_split!r}" + (" (default: the paper's ARC-Challenge)" if calib_task is None else "")
        if calib_split is None:
            source = CALIB_TASK
            spec = load_task(CALIB_TASK, limit=1).spec
            calib_split = _other_split(spec, evaluated)
            rule = (f"{spec.name} split {calib_split!r}: fallback, {name} has no split besides the evaluated "
                    f"{evaluated[1]!r} (--calib-from-eval calibrates on evaluated rows)")
    calib = load_task(source, split=calib_split, limit=n, seed=seed)
    return replace(calib, selection={**calib.selection, "calibration": rule})


@dataclass(frozen=True)
class PruneConfig:
    """Knobs of :func:`prune` (recorded in ``prune.json``'s ``config`` under the same keys as before:
    ``skip`` as ``skip_prun``, ``merge`` as ``merging`` when a merging method runs).

    Attributes:
        methods: any of :data:`~declens.pruning.methods.METHODS` (``ip``, ``shortgpt``, ``sleb``, ``angular``,
            ``last``, ``random``, ``phase``, ``replay``, ``laco``, ``mka``, ...), each once.
        max_ratio: prune up to this share of the layers (strictly between 0 and 1).
        calib_samples: calibration rows for Block Influence / perplexity / angular distance.
        calib_task, calib_split: where calibration rows come from (see :func:`calibration_data`).
        calib_from_eval: draw the calibration rows from the evaluated rows themselves (then Block Influence
            comes from the evaluation pass at no extra cost), as the paper's 256 ARC-Challenge samples.
        skip: SKIP-Prun policy for ``ip`` and ``phase``.
        seed: seed of the calibration draw and of ``random``.
        reuse: reuse the dense prefix across steps (False recomputes everything, for comparison).
        collapse_keep: critical-ratio criterion (see :func:`~declens.pruning.methods.critical_ratio`).
        decision_score: cloze: ``raw`` or ``norm`` scores for DM / OF.
        max_tokens: padded tokens per batch (``None``: sized to the device).
        order: removal order for the ``replay`` method (dense ids); only with ``replay``.
        merge: settings of the layer-merging methods ``laco`` and ``mka`` (see :mod:`declens.pruning.merging`).

    Raises:
        DeclensError: a bad value (one line naming it and the fix), when the config is built.
    """

    methods: Sequence[str] = ("ip",)
    max_ratio: float = 0.5
    calib_samples: int = 256
    calib_task: str | None = None
    calib_split: str | None = None
    calib_from_eval: bool = False
    skip: SkipPrun = field(default_factory=SkipPrun)
    seed: int = 0
    reuse: bool = True
    collapse_keep: float = 0.25
    decision_score: str = "raw"
    max_tokens: int | None = None
    order: Sequence[int] | None = None
    merge: MergeConfig = field(default_factory=MergeConfig)

    def __post_init__(self) -> None:
        from ..surgery import parse_layer_ids
        from ..tasks import check_seed

        if isinstance(self.methods, str):
            raise DeclensError(f"methods is a list of method names, e.g. [{self.methods!r}], not the string {self.methods!r}")
        object.__setattr__(self, "methods", tuple(self.methods))
        if self.order is not None:
            order = parse_layer_ids(self.order)
            bad = sorted({i for i in order if i < 0 or order.count(i) > 1})
            if bad:
                raise LayerSpecError(f"order {order} has negative or repeated layer id(s) {bad}; name each dense id once")
            object.__setattr__(self, "order", tuple(order))
        check_method_names(self.methods, self.order)
        check_ratio(self.max_ratio)
        check_seed(self.seed, "seed")
        for name, lo in (("calib_samples", 1), ("max_tokens", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
                raise DeclensError(f"{name} must be a whole number >= {lo}, got {v!r}")
        if not (isinstance(self.collapse_keep, (int, float)) and 0 <= self.collapse_keep < 1):
            raise DeclensError(f"collapse_keep (the critical-ratio share) must lie in [0, 1), got {self.collapse_keep!r}")
        if self.decision_score not in ("raw", "norm"):
            raise DeclensError(f"decision_score must be 'raw' or 'norm', not {self.decision_score!r}")
        if self.calib_from_eval and (self.calib_task or self.calib_split):
            raise DeclensError("--calib-from-eval takes the calibration rows from the evaluated rows; "
                               "drop --calib-task/--calib-split")
        if not isinstance(self.skip, SkipPrun) or not isinstance(self.merge, MergeConfig):
            raise DeclensError("skip must be a SkipPrun and merge a MergeConfig (declens.pruning)")
        if any(m in MERGE_METHODS for m in self.methods):
            self.merge.validate()

    def to_dict(self) -> dict:
        """The fields, JSON-ready (``skip`` and ``merge`` as nested dicts)."""
        d = asdict(self)
        d["methods"] = list(self.methods)
        d["order"] = list(self.order) if self.order else None
        return d


def prune(
    lm: LoadedModel,
    data: TaskData,
    fmt: str = "letter",
    config: PruneConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
    plots: bool = True,
) -> PruneResult:
    """Run pruning methods and evaluate every pruned state.

    Args:
        lm: the dense model.
        data: evaluation rows.
        fmt: ``letter`` or ``cloze``.
        config: methods, ratio, calibration, SKIP-Prun, seed, prefix reuse, critical-ratio rule, scores,
            batch budget, replay order and merging (:class:`PruneConfig`; ``None``: the defaults, ``ip``).
        out_dir: write results here; a killed run with the same config resumes from its state file.
        progress: progress bars, and a line per step on the ``declens`` logger (INFO; the CLI prints them).
        plots: draw the figures into ``out_dir``.
    """
    format_named(fmt)  # an unknown format fails here, before any work
    cfg = config if config is not None else PruneConfig()
    methods, max_ratio, calib_samples, seed = cfg.methods, cfg.max_ratio, cfg.calib_samples, cfg.seed
    skip, merge, order, collapse_keep = cfg.skip, cfg.merge, cfg.order, cfg.collapse_keep
    decision_score = cfg.decision_score
    merging = [m for m in methods if m in MERGE_METHODS]
    L = lm.num_layers
    K = max_removed_for(max_ratio, L)
    req = prepare(lm, data, fmt)
    if cfg.calib_from_eval:
        idx = subsample(len(data.items), calib_samples, seed)
        calib = replace(data, items=[data.items[i] for i in idx],
                        selection={**data.selection, "calibration": "from evaluated rows", "rows_selected": len(idx)})
    else:
        calib = calibration_data(data, cfg.calib_task, cfg.calib_split, calib_samples, seed)
    calib_seqs = calibration_sequences(lm, prepare(lm, calib, fmt))
    config = {
        "model": lm.spec, "task": data.name, "format": fmt, **data.selection, "methods": list(methods),
        "max_ratio": max_ratio, "max_removed": K, "num_layers": L,
        "calibration": {"task": calib.name, **calib.selection, "fingerprint": calib.fingerprint()},
        "skip_prun": asdict(skip), "seed": seed, "order": list(order) if order else None, "collapse_keep": collapse_keep, "decision_score": decision_score,
        "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
        **({"merging": asdict(merge)} if merging else {}),
    }
    # the stored evaluations depend on the model, the rows and how they are scored, not on the search:
    # a run with other methods, SKIP-Prun rules or a larger --max-ratio reuses them
    key = config_key({k: v for k, v in config.items() if k not in _SEARCH_ONLY}, lm.fingerprint(), data.fingerprint())
    stored: dict = {}
    if not distributed.is_main():
        out_dir = None  # every rank computes the same numbers; rank 0 writes them
    if out_dir is not None:
        check_run_folder_kind(out_dir, "prune")  # before the work, not after it
    state_path = Path(out_dir) / STATE_FILE if out_dir is not None else None
    if state_path is not None and state_path.is_file():
        try:
            st = json.loads(state_path.read_text())
            if st.get("key") == key:
                stored = st["evaluations"]
        except (json.JSONDecodeError, KeyError):
            stored = {}
    if distributed.active():  # every rank replays the same stored evaluations, so all run the same collectives
        stored = distributed.gather_objects(stored if distributed.is_main() else None)[0]
    engine = PruningEngine(lm, req, calib_seqs, max_tokens=cfg.max_tokens, reuse=cfg.reuse, decision_score=decision_score,
                           progress=progress)
    memo = Memo(engine, stored)
    if state_path is not None:
        memo.on_new = lambda: atomic_write_json(state_path, {"key": key, "evaluations": memo.data})
    t0 = time.perf_counter()
    talk = progress and distributed.is_main()
    if talk:
        def report(rec: PruneRecord) -> None:
            if rec.index < 0:  # a look-up of a state already reported, not a step
                return
            tp = "none" if rec.transition_layer is None else rec.transition_layer
            logger.info(f"  {rec.method} #{rec.index}: removed {len(rec.removed)} {rec.removed} -> accuracy {rec.final_accuracy:.3f}, "
                     f"final DM {rec.final_dm:+.3f}, Transition Point {tp} [{time.perf_counter() - t0:.0f} s]")

        memo.on_record = report
    runs, per_method = {}, {}
    for m in methods:
        if talk:
            logger.info(f"pruning with {m} up to {K} of {L} layers ...")
        before, t_m = engine.total_work(), time.perf_counter()
        runs[m] = run_method(memo, m, K, skip=skip, seed=seed, order=list(order) if order else None, merge=merge)
        after = engine.total_work()
        per_method[m] = _work_entry(after["run"] - before["run"], after["full"] - before["full"])
        per_method[m]["seconds"] = round(time.perf_counter() - t_m, 3)
    elapsed = time.perf_counter() - t0
    total = engine.total_work()
    work = {"reuse": cfg.reuse, **_work_entry(total["run"], total["full"]), "evaluations": len(memo.data),
            "resumed_evaluations": len(stored), "ranks": distributed.world(), "methods": per_method,
            "max_tokens": engine.max_tokens}  # the batch budget used (lower than asked after an out-of-memory re-plan)
    prov = provenance(lm, data, timing={"prune_s": round(elapsed, 2), "evaluations_run": len(memo.data) - len(stored),
                                        "evaluations_restored": len(stored)})
    res = PruneResult(config=config, provenance=prov, runs=runs,
                      critical={m: critical_ratio(r, collapse_keep) for m, r in runs.items()}, work=work)
    if out_dir is not None:
        res.save(out_dir, plots=plots)
    return res
