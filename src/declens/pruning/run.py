"""``declens prune``: run pruning methods on one model and task, evaluate every step, write the
trajectory, the per-ratio tables and the figures. A killed run resumes from its last evaluation.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from .. import distributed
from ..analyses.decision import prepare
from ..errors import DeclensError
from ..formats import FORMATS
from ..models import LoadedModel
from ..results import atomic_write_json, atomic_write_text, config_key, provenance, read_result_file
from ..tasks import TaskData, load_task, subsample
from .engine import PruningEngine, calibration_sequences
from .methods import METHODS, Memo, MethodRun, PruneRecord, SkipPrun, critical_ratio, run_method

PRUNE_FILE = "prune.json"
STATE_FILE = ".prune-state.json"


def max_removed_for(ratio: float, num_layers: int) -> int:
    """Number of layers removed at pruning ratio ``ratio`` (floor), validated."""
    if not 0 < ratio < 1:
        raise DeclensError(f"pruning ratio must lie strictly between 0 and 1, got {ratio}")
    k = math.floor(ratio * num_layers + 1e-9)
    if k < 1:
        raise DeclensError(f"ratio {ratio} removes no layer of a {num_layers}-layer model; use at least {1 / num_layers:.3f}")
    return min(k, num_layers - 1)


@dataclass
class PruneResult:
    """Everything a ``prune`` run produced."""

    config: dict
    provenance: dict
    runs: dict[str, MethodRun]
    critical: dict[str, float | None]
    work: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "kind": "prune",
            "config": self.config,
            "provenance": self.provenance,
            "critical_ratio": self.critical,
            "work": self.work,
            "methods": {m: {"table": r.table(), "records": [x.to_dict() for x in r.records]} for m, r in self.runs.items()},
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

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / PRUNE_FILE, self.to_dict())
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["method", "remain", "removed_count", "pruning_ratio", "accuracy", "final_dm", "transition_layer",
                    "removed_layer_ids"])
        for m, r in self.runs.items():
            for row in r.table():
                w.writerow([m, row["remain"], row["removed_count"], f"{row['ratio']:.4f}", f"{row['accuracy']:.4f}",
                            f"{row['final_dm']:.4f}", row["transition_layer"], json.dumps(row["removed"])])
        atomic_write_text(out / "table.csv", buf.getvalue())
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["method", "index", "k", "ratio", "layer", "accuracy", "final_dm", "transition_layer", "accepted",
                    "collapsed", "path", "removed", "note"])
        for m, r in self.runs.items():
            for x in r.records:
                w.writerow([m, x.index, x.k, f"{x.ratio:.4f}", x.layer, f"{x.accuracy:.4f}", f"{x.final_dm:.4f}",
                            x.transition_layer, x.accepted, x.collapsed, x.path, json.dumps(x.removed), x.note])
        atomic_write_text(out / "steps.csv", buf.getvalue())
        return out


def calibration_data(data: TaskData, calib_task: str | None, calib_split: str | None, n: int, seed: int) -> TaskData:
    """Calibration rows: ``n`` rows of ``calib_task`` (default: the evaluated task) from ``calib_split``
    (default: the task's training / few-shot split when it has one, else the evaluated split)."""
    if n <= 0:
        raise DeclensError(f"--calib-samples must be positive, got {n}")
    spec = data.spec if calib_task is None else calib_task
    if calib_split is None:
        base = data.spec if calib_task is None else load_task(calib_task, limit=1).spec
        calib_split = base.fewshot_split or base.default_split
    return load_task(spec, split=calib_split, limit=n, seed=seed)


def prune(
    lm: LoadedModel,
    data: TaskData,
    fmt: str = "letter",
    methods: Sequence[str] = ("ip",),
    *,
    max_ratio: float = 0.5,
    calib_samples: int = 256,
    calib_task: str | None = None,
    calib_split: str | None = None,
    skip: SkipPrun | None = None,
    seed: int = 0,
    reuse: bool = True,
    collapse_keep: float = 0.25,
    decision_score: str = "raw",
    max_tokens: int | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    plots: bool = True,
    order: Sequence[int] | None = None,
    calib_from_eval: bool = False,
) -> PruneResult:
    """Run pruning methods and evaluate every pruned state.

    Args:
        lm: the dense model.
        data: evaluation rows.
        fmt: ``letter`` or ``cloze``.
        methods: any of ``ip``, ``shortgpt``, ``sleb``, ``angular``, ``last``, ``random``, ``phase``.
        max_ratio: prune up to this share of the layers (strictly between 0 and 1).
        calib_samples: calibration rows for Block Influence / perplexity / angular distance.
        calib_task, calib_split: where calibration rows come from (see :func:`calibration_data`).
        skip: SKIP-Prun policy for ``ip`` and ``phase``.
        seed: seed of the calibration draw and of ``random``.
        reuse: reuse the dense prefix across steps (False recomputes everything, for comparison).
        collapse_keep: critical-ratio criterion (see :func:`~declens.pruning.methods.critical_ratio`).
        decision_score: cloze: ``raw`` or ``norm`` scores for DM / OF.
        max_tokens: padded tokens per batch.
        out_dir: write results here; a killed run with the same config resumes from its state file.
        progress: progress bars.
        plots: draw the figures into ``out_dir``.
        order: removal order for the ``replay`` method (dense ids).
        calib_from_eval: draw the calibration rows from the evaluated rows themselves (then Block
            Influence comes from the evaluation pass at no extra cost), as the paper's 256 ARC-Challenge samples.
    """
    if fmt not in FORMATS:
        raise DeclensError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise DeclensError(f"unknown pruning method(s) {bad}; use any of {', '.join(METHODS)}")
    skip = skip or SkipPrun()
    L = lm.num_layers
    K = max_removed_for(max_ratio, L)
    req = prepare(lm, data, fmt)
    if calib_from_eval:
        if calib_task or calib_split:
            raise DeclensError("--calib-from-eval takes the calibration rows from the evaluated rows; drop --calib-task/--calib-split")
        idx = subsample(len(data.items), calib_samples, seed)
        calib = replace(data, items=[data.items[i] for i in idx],
                        selection={**data.selection, "calibration": "from evaluated rows", "rows_selected": len(idx)})
    else:
        calib = calibration_data(data, calib_task, calib_split, calib_samples, seed)
    calib_seqs = calibration_sequences(lm, prepare(lm, calib, fmt))
    config = {
        "model": lm.spec, "task": data.name, "format": fmt, **data.selection, "methods": list(methods),
        "max_ratio": max_ratio, "max_removed": K, "num_layers": L,
        "calibration": {"task": calib.name, **calib.selection, "fingerprint": calib.fingerprint()},
        "skip_prun": asdict(skip), "seed": seed, "order": list(order) if order else None, "collapse_keep": collapse_keep, "decision_score": decision_score,
        "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
    }
    key = config_key({k: v for k, v in config.items() if k != "methods"}, lm.fingerprint(), data.fingerprint())
    stored: dict = {}
    if not distributed.is_main():
        out_dir = None  # every rank computes the same numbers; rank 0 writes them
    state_path = Path(out_dir) / STATE_FILE if out_dir is not None else None
    if state_path is not None and state_path.is_file():
        try:
            st = json.loads(state_path.read_text())
            if st.get("key") == key:
                stored = st["evaluations"]
        except (json.JSONDecodeError, KeyError):
            stored = {}
    engine = PruningEngine(lm, req, calib_seqs, max_tokens=max_tokens, reuse=reuse, decision_score=decision_score,
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
            print(f"  {rec.method} #{rec.index}: removed {len(rec.removed)} {rec.removed} -> accuracy {rec.accuracy:.3f}, "
                  f"final DM {rec.final_dm:+.3f}, Transition Point {tp} [{time.perf_counter() - t0:.0f} s]", flush=True)

        memo.on_record = report
    runs = {}
    for m in methods:
        if talk:
            print(f"pruning with {m} up to {K} of {L} layers ...", flush=True)
        runs[m] = run_method(memo, m, K, skip=skip, seed=seed, order=list(order) if order else None)
    elapsed = time.perf_counter() - t0
    total = engine.total_work()
    work = {"reuse": reuse, "layer_tokens_run": total["run"], "layer_tokens_full": total["full"],
            "share_saved": round(engine.work_saved(), 4), "evaluations": len(memo.data),
            "resumed_evaluations": len(stored), "ranks": distributed.world()}
    prov = provenance(lm, data, timing={"prune_s": round(elapsed, 2)})
    res = PruneResult(config=config, provenance=prov, runs=runs,
                      critical={m: critical_ratio(r, collapse_keep) for m, r in runs.items()}, work=work)
    if out_dir is not None:
        res.save(out_dir)
        if plots:
            from ..plots import plot_prune

            plot_prune(res, out_dir)
    return res
