"""Evaluate pruned configurations on many tasks (the paper's Table 1 layout).

Each task and format is tokenized once; every configuration is evaluated with the pruning engine,
which runs the dense model once and then only the layers after each configuration's first removed
layer.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..models import LoadedModel
from ..results import ACCURACY_V1_NAMES, RunWriter, provenance, register_result, rename_keys
from ..tasks import load_task
from .decision import prepare


def config_label(removed: Sequence[int]) -> str:
    return "dense" if not removed else ",".join(map(str, removed))


def cells_v1_to_v2(d: dict) -> dict:
    """``eval.json`` / ``ablate.json`` schema 1 -> 2: :data:`~declens.results.ACCURACY_V1_NAMES` in every cell
    (per-layer ``acc_layers`` -> ``accuracy``, final ``accuracy`` / ``accuracy_norm`` -> ``final_accuracy`` /
    ``final_accuracy_norm``)."""
    d["cells"] = [rename_keys(c, ACCURACY_V1_NAMES) for c in d.get("cells", [])]
    return d


@register_result("eval", "eval.json", "eval", converters={1: cells_v1_to_v2})
@dataclass
class EvalResult:
    """Accuracy (and decision metrics) of configurations x tasks x formats.

    ``cells[(task, fmt, label)]`` holds the final-layer ``final_accuracy``, ``final_accuracy_norm`` (cloze),
    ``final_dm`` and ``transition_layer``, and per layer ``layer_ids``, ``dm`` and ``accuracy`` (the names of
    the analysis result).
    """

    config: dict
    provenance: dict
    tasks: list[str]
    formats: list[str]
    configs: list[list[int]]
    cells: dict[tuple[str, str, str], dict] = field(default_factory=dict)
    #: of ``eval.json`` (see :func:`declens.results.register_result`); 1 -> 2: per-layer ``acc_layers`` ->
    #: ``accuracy``, final ``accuracy`` -> ``final_accuracy`` (converted on load by :func:`cells_v1_to_v2`)
    SCHEMA_VERSION = 2

    @property
    def labels(self) -> list[str]:
        return [config_label(c) for c in self.configs]

    def average(self, fmt: str, label: str) -> float:
        vals = [self.cells[(t, fmt, label)]["final_accuracy"] for t in self.tasks]
        return sum(vals) / len(vals)

    def to_dict(self) -> dict:
        return {"kind": "eval", "config": self.config, "provenance": self.provenance, "tasks": self.tasks,
                "formats": self.formats, "configs": self.configs,
                "cells": [{"task": t, "format": f, "removed": lab, **v} for (t, f, lab), v in self.cells.items()]}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        """The inverse of :meth:`to_dict`."""
        cells = {(c["task"], c["format"], c["removed"]): {k: v for k, v in c.items() if k not in ("task", "format", "removed")}
                 for c in d["cells"]}
        return cls(config=d["config"], provenance=d["provenance"], tasks=list(d["tasks"]), formats=list(d["formats"]),
                   configs=[list(c) for c in d["configs"]], cells=cells)

    @classmethod
    def load(cls, path: str | Path) -> "EvalResult":
        """Read a folder written by :meth:`save` (verified against its manifest)."""
        from ..results import read_result_file

        return cls.from_dict(read_result_file(path, "eval.json", "eval")[1])

    def markdown(self, fmt: str) -> str:
        """Accuracy (%) per task (rows) and configuration (columns), with an average row."""
        head = "| Task | " + " | ".join(self.labels) + " |"
        lines = [head, "|" + "---|" * (len(self.labels) + 1)]
        for t in self.tasks:
            lines.append(f"| {t} | " + " | ".join(f"{100 * self.cells[(t, fmt, lab)]['final_accuracy']:.2f}" for lab in self.labels) + " |")
        lines.append("| Avg | " + " | ".join(f"{100 * self.average(fmt, lab):.2f}" for lab in self.labels) + " |")
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``eval.json``, ``eval.csv`` and ``eval.md`` as one run folder (the manifest last)."""
        out = Path(out_dir)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["task", "format", "removed", "accuracy", "accuracy_norm", "final_dm", "transition_layer"])
        for (t, f, lab), v in self.cells.items():
            w.writerow([t, f, lab, f"{v['final_accuracy']:.4f}", "" if v["final_accuracy_norm"] is None else f"{v['final_accuracy_norm']:.4f}",
                        f"{v['final_dm']:.4f}", v["transition_layer"]])
        with RunWriter(out, "eval") as run:
            run.json("eval.json", self.to_dict())
            run.text("eval.csv", buf.getvalue())
            run.text("eval.md", "\n\n".join(f"### {f} format\n\n{self.markdown(f)}" for f in self.formats) + "\n")
        return out


def evaluate_configs(lm: LoadedModel, tasks: Sequence[str], configs: Sequence[Sequence[int]],
                     formats: Sequence[str] = ("letter",), limit: int | None = None, seed: int = 0,
                     max_tokens: int | None = None, out_dir: str | Path | None = None,
                     progress: bool = True) -> EvalResult:
    """Evaluate every configuration (dense ids to remove; ``[]`` is the dense model) on every task and format."""
    from ..pruning.engine import PruningEngine
    from ..surgery import keep_positions

    for c in configs:
        keep_positions(lm.parts, c)  # validate every configuration before any work
    t0 = time.perf_counter()
    res = EvalResult(config={"model": lm.spec, "tasks": list(tasks), "formats": list(formats),
                             "configs": [list(c) for c in configs], "limit": limit, "seed": seed,
                             "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device)},
                     provenance={}, tasks=list(tasks), formats=list(formats), configs=[list(c) for c in configs])
    fingerprints = {}
    for t in tasks:
        data = load_task(t, limit=limit, seed=seed)
        fingerprints[data.name] = data.fingerprint()
        for f in formats:
            engine = PruningEngine(lm, prepare(lm, data, f), None, max_tokens=max_tokens, progress=progress)
            for c in configs:
                ev = engine.evaluate(list(c), bi=False)
                m = ev.metrics
                res.cells[(t, f, config_label(c))] = {
                    "final_accuracy": m.final_acc, "final_accuracy_norm": None if m.acc_norm is None else float(m.acc_norm[-1]),
                    "final_dm": m.final_dm, "transition_layer": m.transition_layer, "layer_ids": m.layer_ids,
                    "dm": [float(x) for x in m.dm], "accuracy": [float(x) for x in m.acc],
                }
            del engine
    res.provenance = provenance(lm, None, data_fingerprints=fingerprints,
                                timing={"eval_s": round(time.perf_counter() - t0, 2)})
    if out_dir is not None:
        res.save(out_dir)
    return res
