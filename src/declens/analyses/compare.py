"""The paper's Table 5: pruning methods compared after fine-tuning, in one call.

For every pruning method and ratio: prune the dense model with the method (through
:func:`declens.pruning.prune`, any registered method: ``ip``, ``shortgpt``, ``sleb``, ``laco``,
``mka`` ...), take its best state at the ratio, fine-tune that pruned model with one recipe
(:mod:`declens.finetune`: the same training rows, hyper-parameters and learning-rate rule for every
cell), evaluate it on every task, and write the table (Markdown and CSV, the dense model's row and
the averages included) and a figure.

Resume: every finished (method, ratio) cell is written at once to ``cells/<method>_k<k>.json``
with a key of everything that determines it (model fingerprint, tasks and rows, format, pruning
settings, training rows, recipe); a rerun reuses every cell whose key matches and computes only the
others, so a killed run loses at most the cell in progress, and adding a method or a ratio
computes only the new cells. Each method's pruning run lives in ``prune/<method>/`` and is reused
the same way (and resumes from its own state when killed mid-way).

Example:
    >>> cfg = CompareConfig(methods=("ip", "shortgpt"), ratios=(0.125, 0.25), limit=100,
    ...                     finetune=FinetuneConfig(epochs=1, lr_candidates=(1e-4, 2e-4, 5e-4)))
    >>> res = compare(lm, cfg, "runs/compare")
    >>> print(res.markdown())
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .. import distributed
from ..errors import DeclensError
from ..finetune import (FinetuneConfig, TrainData, run_finetune, sequence_stats, state_copy, training_mixture,
                        training_sequences)
from ..formats import format_named
from ..models import LoadedModel
from ..results import RunWriter, atomic_write_json, config_key, provenance, read_result_file, register_result
from ..tasks import ALL_TASKS, get_spec, load_task
from .evaluate import evaluate_configs

COMPARE_FILE = "compare.json"
TABLE_MD = "table5.md"
TABLE_CSV = "table5.csv"
FIGURE = "table5.png"
CELLS_DIR = "cells"
PRUNE_DIR = "prune"
#: Table 5's task columns, in the paper's order, with its headers
TABLE_COLUMNS = {"mmlu": "MMLU", "boolq": "BoolQ", "arc_easy": "Arc-E", "arc_challenge": "Arc-C", "piqa": "PIQA",
                 "winogrande": "WinoG", "hellaswag": "HellaS"}


@dataclass
class CompareConfig:
    """Everything that defines a comparison (recorded in ``compare.json``).

    Attributes:
        methods: pruning methods (names of :data:`declens.pruning.METHODS`).
        ratios: pruning ratios; each removes ``floor(ratio x L)`` layers.
        tasks: evaluated tasks (default: the seven benchmarks), each on ``limit`` rows drawn with ``seed``.
        fmt: ``letter`` or ``cloze``, for evaluation and training sequences alike.
        limit, seed: evaluated rows per task (None: all) and the seed of their draw.
        prune_task, prune_limit: the task (and rows, default ``limit``) the pruning methods evaluate at
            every step (SKIP-Prun, the per-ratio best state); the paper prunes on ARC-Challenge.
        calib_samples: calibration rows of the pruning methods (Block Influence, perplexity, merging).
        skip_prun: SKIP-Prun restarts for ``ip`` (the package's default restart and collapse rules).
        train: where the fine-tuning rows come from (never an evaluated row).
        finetune: the one fine-tuning recipe of every cell.
        eval_before: also evaluate every pruned model before fine-tuning.
        max_tokens: padded tokens per evaluation batch.
    """

    methods: tuple[str, ...]
    ratios: tuple[float, ...]
    tasks: tuple[str, ...] = ALL_TASKS
    fmt: str = "letter"
    limit: int | None = None
    seed: int = 0
    prune_task: str = "arc_challenge"
    prune_limit: int | None = None
    calib_samples: int = 256
    skip_prun: bool = False
    train: TrainData = field(default_factory=TrainData)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval_before: bool = False
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        from ..pruning import METHODS

        self.methods, self.tasks = tuple(self.methods), tuple(get_spec(t).name for t in self.tasks)
        self.ratios = tuple(float(r) for r in self.ratios)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise DeclensError(f"unknown pruning method(s) {bad}; use any of {', '.join(METHODS)}")
        if "replay" in self.methods:
            raise DeclensError("replay needs a removal order and is not a method to compare; drop it from --methods")
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios):
            raise DeclensError(f"pruning ratios must lie strictly between 0 and 1, got {list(self.ratios)}")
        if len(set(self.methods)) != len(self.methods) or len(set(self.tasks)) != len(self.tasks):
            raise DeclensError("a method or task is listed twice; list each once")
        format_named(self.fmt)  # an unknown format: one line naming the registered ones
        if self.calib_samples < 1:
            raise DeclensError(f"--calib-samples must be positive, got {self.calib_samples}")
        get_spec(self.prune_task)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("train", "finetune")}
        d["methods"], d["ratios"], d["tasks"] = list(self.methods), list(self.ratios), list(self.tasks)
        d["format"] = d.pop("fmt")
        d["train"] = {**asdict(self.train), "tasks": list(self.train.tasks)}
        d["finetune"] = self.finetune.to_dict()
        return d


def ks_for(ratios: Sequence[float], num_layers: int) -> dict[float, int]:
    """Ratio -> removed layers; refuses two ratios that remove the same number of layers."""
    from ..pruning.run import max_removed_for

    ks = {r: max_removed_for(r, num_layers) for r in ratios}
    seen: dict[int, float] = {}
    for r, k in ks.items():
        if k in seen:
            raise DeclensError(f"ratios {seen[k]} and {r} both remove {k} of {num_layers} layers; keep one of them")
        seen[k] = r
    return ks


@register_result("compare", COMPARE_FILE, "compare")
@dataclass
class CompareResult:
    """A comparison: the dense row and one cell per (method, ratio).

    ``cells`` entries: ``method``, ``ratio``, ``k``, ``removed``, ``merges``, ``accuracy`` (task ->
    accuracy after fine-tuning), ``average``, ``accuracy_before`` (when measured), ``prune_accuracy``
    (the pruning run's own accuracy of the state), ``train`` (the fine-tuning log), ``timing``,
    ``status`` (``done`` or ``unreached``: the method has no state at that ratio), ``reused``, ``run`` (the
    key of the comparison's settings, shared by all its cells).
    """

    config: dict
    provenance: dict
    dense: dict
    cells: list[dict]
    SCHEMA_VERSION = 1  #: of ``compare.json`` (see :func:`declens.results.register_result`)

    @property
    def tasks(self) -> list[str]:
        return [t for t in TABLE_COLUMNS if t in self.config["tasks"]] + \
            [t for t in self.config["tasks"] if t not in TABLE_COLUMNS]

    def rows(self) -> list[dict]:
        """Table rows: the dense model, then every cell by ratio and method order; accuracies in %."""
        model = Path(str(self.config.get("model"))).name
        out = [{"model": model, "method": "dense", "ratio": 0.0, "k": 0,
                **{t: 100 * self.dense["accuracy"][t] for t in self.tasks},
                "avg": 100 * self.dense["average"]}]
        order = {m: i for i, m in enumerate(self.config["methods"])}
        for c in sorted(self.cells, key=lambda c: (c["ratio"], order.get(c["method"], 99))):
            done = c["status"] == "done"
            out.append({"model": model, "method": c["method"], "ratio": c["ratio"], "k": c["k"],
                        **{t: 100 * c["accuracy"][t] if done else None for t in self.tasks},
                        "avg": 100 * c["average"] if done else None})
        return out

    def markdown(self) -> str:
        """The paper's Table 5 layout: Model | Method | Ratio | one column per task | Avg."""
        head = ["Model", "Method", "Ratio", *[TABLE_COLUMNS.get(t, t) for t in self.tasks], "Avg"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
        for r in self.rows():
            lines.append("| " + " | ".join([r["model"], r["method"], f"{100 * r['ratio']:.2f}% ({r['k']})",
                                            *[fmt(r[t]) for t in self.tasks], fmt(r["avg"])]) + " |")
        cfg = self.config
        ft = cfg["finetune"]
        note = (f"Accuracy (%) after {ft['method']} fine-tuning ({ft['epochs']} epoch(s), AdamW, effective batch "
                f"{ft['effective_batch']}, max length {ft['max_length']}, "
                + (f"lr selected from {ft['lr_candidates']}" if ft.get("lr_candidates") else f"lr {ft['lr']:g}")
                + f"); {cfg['format']} format, {cfg['limit'] or 'all'} rows per task; the dense row is not fine-tuned.")
        return "\n".join(lines) + "\n\n" + note + "\n"

    def to_dict(self) -> dict:
        return {"kind": "compare", "config": self.config, "provenance": self.provenance, "dense": self.dense,
                "table": self.rows(), "cells": self.cells}

    def save(self, out_dir: str | Path, plots: bool = True) -> Path:
        """Write ``compare.json``, ``table5.md``, ``table5.csv`` and (with ``plots``) ``table5.png``."""
        out = Path(out_dir)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["model", "method", "ratio", "removed_count", *self.tasks, "avg"])
        for r in self.rows():
            w.writerow([r["model"], r["method"], f"{r['ratio']:.4f}", r["k"],
                        *["" if r[t] is None else f"{r[t]:.2f}" for t in self.tasks],
                        "" if r["avg"] is None else f"{r['avg']:.2f}"])
        with RunWriter(out, "compare") as run:
            run.json(COMPARE_FILE, self.to_dict())
            run.text(TABLE_MD, self.markdown())
            run.text(TABLE_CSV, buf.getvalue())
            if plots:
                run.draw_figures(self, out)
        return out

    @classmethod
    def load(cls, path: str | Path) -> "CompareResult":
        p, d = read_result_file(path, COMPARE_FILE, "compare")
        if d.get("kind") != "compare":
            raise DeclensError(f"{str(p)!r} is not a comparison result (kind={d.get('kind')!r})")
        return cls(config=d["config"], provenance=d["provenance"], dense=d["dense"], cells=d["cells"])


def compare_averages(folder: str | Path) -> tuple[dict[float, dict[str, float]], bool]:
    """``{ratio: {method: average accuracy after fine-tuning}}`` of a ``declens compare`` folder, and whether
    the run is complete.

    A complete folder is read through :meth:`CompareResult.load` (verified); a run that was stopped before
    its end has no ``compare.json`` but keeps one file per finished cell under ``cells/``: those cells are
    returned with ``complete=False``, so a reader can say the comparison is partial. Cells of stopped runs
    with different settings (their ``run`` keys differ) are never pooled.

    Raises:
        DeclensError: the folder has neither a complete comparison nor any finished cell, or only finished
            cells of more than one comparison.
    """
    folder = Path(folder)
    cells_dir = folder / CELLS_DIR
    if (folder / COMPARE_FILE).is_file() or not cells_dir.is_dir():
        cells, complete = CompareResult.load(folder).cells, True
    else:
        cells = [c for c in map(_load_cell, sorted(cells_dir.glob("*.json")))
                 if c is not None and c.get("status") == "done" and c.get("method") and c.get("average") is not None]
        complete = False
        if not cells:
            raise DeclensError(f"{str(folder)!r} holds no finished comparison cell (no {COMPARE_FILE}, nothing done "
                               f"under {CELLS_DIR}/); run 'declens compare' into it first")
        runs = {c.get("run") for c in cells}
        if len(runs) > 1:  # stopped runs of different settings left their cells side by side: never pooled
            raise DeclensError(f"{str(folder)!r} holds finished cells of {len(runs)} different comparisons (other "
                               "settings, model or rows) and no complete one; rerun 'declens compare' with the "
                               "settings you want to finish, or compare into a new folder")
    out: dict[float, dict[str, float]] = {}
    for c in cells:
        if c.get("average") is not None:
            out.setdefault(float(c["ratio"]), {})[c["method"]] = float(c["average"])
    return out, complete


# ------------------------------------------------------------------------------------------------
# The run


def _load_cell(path: Path, key: str | None = None) -> dict | None:
    """The cell in ``path`` if it is finished writing and (with ``key``) belongs to this comparison, else None."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(d, dict):
        return None
    return d if key is None or d.get("key") == key else None


def _evaluate(lm: LoadedModel, cfg: CompareConfig, progress: bool) -> dict:
    res = evaluate_configs(lm, list(cfg.tasks), [[]], [cfg.fmt], limit=cfg.limit, seed=cfg.seed,
                           max_tokens=cfg.max_tokens, progress=progress)
    acc = {t: float(res.cells[(t, cfg.fmt, "dense")]["final_accuracy"]) for t in cfg.tasks}
    norm = {t: res.cells[(t, cfg.fmt, "dense")]["final_accuracy_norm"] for t in cfg.tasks}
    return {"accuracy": acc, "accuracy_norm": norm, "average": sum(acc.values()) / len(acc)}


class _Pruner:
    """Each method's pruning run, computed once (``prune/<method>/``) and reused while its key matches."""

    def __init__(self, lm: LoadedModel, cfg: CompareConfig, out: Path | None, base_key: str, progress: bool):
        self.lm, self.cfg, self.out, self.progress = lm, cfg, out, progress
        self.data = load_task(cfg.prune_task, limit=cfg.prune_limit if cfg.prune_limit is not None else cfg.limit,
                              seed=cfg.seed)
        self.max_ratio = max(cfg.ratios)
        # what determines a method's states (not how far it ran: a longer run has the same earlier states)
        self.key = config_key(base_key, cfg.prune_task, self.data.fingerprint(), cfg.calib_samples, cfg.skip_prun)
        self.runs: dict = {}

    def best(self, method: str) -> dict:
        """dense-id state per number of removed layers (``best_by_k``) of ``method``."""
        from ..pruning import PruneConfig, PruneResult, SkipPrun, prune
        from ..pruning.run import max_removed_for

        if method in self.runs:
            return self.runs[method]
        folder = self.out / PRUNE_DIR / method if self.out is not None else None
        keyfile = self.out / PRUNE_DIR / f"{method}.key.json" if self.out is not None else None
        res = None
        try:
            stored = json.loads(keyfile.read_text()) if keyfile is not None and keyfile.is_file() else {}
            if stored.get("key") == self.key and stored.get("max_removed", 0) >= max_removed_for(self.max_ratio,
                                                                                                self.lm.num_layers):
                res = PruneResult.load(folder)
        except (DeclensError, OSError, KeyError, json.JSONDecodeError):
            res = None
        if res is None:
            pc = PruneConfig([method], max_ratio=self.max_ratio, calib_samples=self.cfg.calib_samples,
                             seed=self.cfg.seed, skip=SkipPrun(enabled=self.cfg.skip_prun),
                             max_tokens=self.cfg.max_tokens)
            res = prune(self.lm, self.data, self.cfg.fmt, pc, out_dir=folder, progress=self.progress, plots=False)
            if keyfile is not None and distributed.is_main():
                atomic_write_json(keyfile, {"key": self.key, "max_removed": res.config["max_removed"]})
        self.runs[method] = res.runs[method].best_by_k()
        return self.runs[method]


def compare(lm: LoadedModel, cfg: CompareConfig, out_dir: str | Path | None = None, *, progress: bool = True,
            plots: bool = True, on_cell: Callable[[dict], None] | None = None) -> CompareResult:
    """Prune with every method at every ratio, fine-tune each pruned model with one recipe, evaluate all tasks.

    Args:
        lm: the dense model (never modified: every cell trains its own pruned copy).
        cfg: the comparison (:class:`CompareConfig`).
        out_dir: the run folder (cells, pruning runs, table, figure); a rerun reuses finished cells.
        progress: progress bars and one line per cell.
        plots: draw ``table5.png``.
        on_cell: called with every cell (computed or reused) as soon as it is final.

    Returns:
        The :class:`CompareResult`.
    """
    t_all = time.perf_counter()
    n_layers = lm.num_layers
    ks = ks_for(cfg.ratios, n_layers)
    out = Path(out_dir) if out_dir is not None else None
    writes = out is not None and distributed.is_main()
    evaluated = [load_task(t, limit=cfg.limit, seed=cfg.seed) for t in cfg.tasks]
    parts, train_record = training_mixture(cfg.train, evaluated)
    seqs = [s for p in parts for s in training_sequences(lm, p, cfg.fmt, cfg.finetune.max_length)]
    train_record.update(sequence_stats(seqs), format=cfg.fmt,
                        loss="cross-entropy on the answer tokens only (prompt masked with -100)")
    config = {"model": lm.spec, "num_layers": n_layers, **cfg.to_dict(), "ks": {str(r): k for r, k in ks.items()},
              "train_data": train_record, "dense_row": "the dense model, not fine-tuned",
              "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device)}
    base = {k: v for k, v in cfg.to_dict().items() if k not in ("methods", "ratios")}
    base_key = config_key(base, lm.fingerprint(), [d.fingerprint() for d in evaluated], train_record)
    cells_dir = out / CELLS_DIR if out is not None else None

    def finish(cell: dict, name: str) -> dict:
        if writes:
            atomic_write_json(cells_dir / f"{name}.json", cell)
        if on_cell is not None:
            on_cell(cell)
        return cell

    # the dense row depends on the model and the evaluated rows only (not on pruning or the recipe)
    dense_key = config_key("dense", lm.fingerprint(), [d.fingerprint() for d in evaluated], cfg.fmt, cfg.max_tokens,
                           str(lm.dtype), str(lm.device))
    dense = _load_cell(cells_dir / "dense.json", dense_key) if cells_dir is not None else None
    if dense is not None:
        dense = {**dense, "reused": True}
        if on_cell is not None:
            on_cell(dense)
    else:
        t0 = time.perf_counter()
        dense = finish({"key": dense_key, "method": "dense", "k": 0, "reused": False, **_evaluate(lm, cfg, progress),
                        "timing": {"eval_s": round(time.perf_counter() - t0, 2)}}, "dense")
    pruner = _Pruner(lm, cfg, out, base_key, progress)
    cells = []
    for method in cfg.methods:
        for ratio in cfg.ratios:
            k = ks[ratio]
            name = f"{method}_k{k}"
            key = config_key(base_key, pruner.key, method, k)
            cell = _load_cell(cells_dir / f"{name}.json", key) if cells_dir is not None else None
            if cell is not None:
                if writes and cell.get("run") != base_key:  # a cell written before cells named their comparison
                    atomic_write_json(cells_dir / f"{name}.json", {**cell, "run": base_key})
                cells.append({**cell, "ratio": ratio, "reused": True, "run": base_key})
                if on_cell is not None:
                    on_cell(cells[-1])
                continue
            # "run": the comparison the cell belongs to, so a reader of a stopped run never pools two of them
            cells.append(finish({**_run_cell(lm, cfg, pruner, method, ratio, k, seqs, key, progress), "run": base_key},
                                name))
    prov = provenance(lm, None, data_fingerprints={d.name: d.fingerprint() for d in evaluated},
                      timing={"total_s": round(time.perf_counter() - t_all, 2)},
                      reused_cells=[f"{c['method']}_k{c['k']}" for c in cells if c.get("reused")])
    res = CompareResult(config=config, provenance=prov, dense={k: v for k, v in dense.items() if k != "key"},
                        cells=cells)
    if writes:
        res.save(out, plots=plots)
    return res


def _run_cell(lm: LoadedModel, cfg: CompareConfig, pruner: _Pruner, method: str, ratio: float, k: int,
              seqs: list, key: str, progress: bool) -> dict:
    """Prune (best state of ``method`` with ``k`` removed), fine-tune, evaluate: one cell of the table."""
    best = pruner.best(method)
    cell = {"key": key, "method": method, "ratio": ratio, "k": k, "reused": False}
    if k not in best:
        reached = max((kk for kk in best if kk > 0), default=0)
        return {**cell, "status": "unreached", "removed": None, "merges": None,
                "note": f"{method} stopped at {reached} removed layers (no state with {k})"}
    rec = best[k]
    t0 = time.perf_counter()
    pm = state_copy(lm, rec.removed, getattr(rec, "merges", None))
    before = _evaluate(pm, cfg, progress) if cfg.eval_before else None
    t1 = time.perf_counter()
    log = run_finetune(pm, seqs, cfg.finetune, progress=progress)
    t2 = time.perf_counter()
    after = _evaluate(pm, cfg, progress)
    t3 = time.perf_counter()
    del pm
    train = {k_: v for k_, v in log.to_dict().items() if k_ not in ("lrs", "grad_norms")}
    return {**cell, "status": "done", "removed": [int(i) for i in rec.removed], "merges": getattr(rec, "merges", None),
            "prune_accuracy": float(rec.final_accuracy), **after, "accuracy_before": before and before["accuracy"],
            "average_before": before and before["average"], "lr": log.config["lr"], "lr_search": log.lr_search,
            "train": train, "timing": {"before_s": round(t1 - t0, 2), "train_s": round(t2 - t1, 2),
                                       "eval_s": round(t3 - t2, 2)}}


__all__ = ["CompareConfig", "CompareResult", "TABLE_COLUMNS", "compare", "ks_for"]
