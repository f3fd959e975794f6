"""Transition-point ablation: remove each single layer and each adjacent pair in a window around the
Transition Point and evaluate on many tasks (the paper's Table 1 and Figure 9).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import DeclensError
from ..models import LoadedModel
from ..results import atomic_write_json, atomic_write_text, provenance
from ..tasks import load_task
from .decision import analyze
from .evaluate import EvalResult, config_label, evaluate_configs


def window_configs(tp: int, window: int, num_layers: int, pairs: bool = True) -> list[list[int]]:
    """Single layers ``tp-window .. tp+window`` and adjacent pairs inside that window (dense ids)."""
    if window < 0:
        raise DeclensError(f"--window must be >= 0, got {window}")
    lo, hi = max(0, tp - window), min(num_layers - 1, tp + window)
    singles = [[i] for i in range(lo, hi + 1)]
    doubles = [[i, i + 1] for i in range(lo, hi)] if pairs else []
    return singles + doubles


@dataclass
class AblationResult:
    """Ablation around the Transition Point."""

    config: dict
    provenance: dict
    transition_layer: int
    dense_dm: list[float]
    eval: EvalResult

    def to_dict(self) -> dict:
        d = self.eval.to_dict()
        d.update(kind="ablate", config=self.config, provenance=self.provenance, transition_layer=self.transition_layer,
                 dense_dm=self.dense_dm)
        return d

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "ablate.json", self.to_dict())
        atomic_write_text(out / "ablate.md", "\n\n".join(
            f"### {f} format (Transition Point: layer {self.transition_layer})\n\n{self.eval.markdown(f)}"
            for f in self.eval.formats) + "\n")
        return out


def ablate(lm: LoadedModel, task: str, tasks: Sequence[str], fmt: str = "letter", window: int = 2,
           tp: int | None = None, limit: int | None = None, seed: int = 0, pairs: bool = True,
           max_tokens: int | None = None, out_dir: str | Path | None = None, progress: bool = True) -> AblationResult:
    """Remove single layers and adjacent pairs around the Transition Point; evaluate on ``tasks``.

    Args:
        lm: the dense model.
        task: the task whose dense analysis locates the Transition Point (ignored with ``tp``).
        tasks: tasks to evaluate every configuration on.
        fmt: scoring format.
        window: layers on each side of the Transition Point.
        tp: the Transition Point (dense id) to use instead of measuring it.
        limit, seed: rows per task.
        pairs: also remove adjacent pairs.
    """
    t0 = time.perf_counter()
    dense = analyze(lm, load_task(task, limit=limit, seed=seed), fmt, progress=progress, plots=False)
    if tp is None:
        tp = dense.metrics.transition_layer
        if tp is None:
            raise DeclensError(
                f"the dense model has no Transition Point on {task} ({fmt} format): its Decision Margin never stays "
                "positive. Pass --tp to choose the centre of the window, or use a task/format the model can answer."
            )
    if not 0 <= tp < lm.num_layers:
        raise DeclensError(f"--tp {tp} is out of range 0..{lm.num_layers - 1}")
    configs = [[]] + window_configs(tp, window, lm.num_layers, pairs)
    ev = evaluate_configs(lm, tasks, configs, [fmt], limit=limit, seed=seed, max_tokens=max_tokens, progress=progress)
    res = AblationResult(
        config={"model": lm.spec, "tp_task": task, "tasks": list(tasks), "format": fmt, "window": window, "pairs": pairs,
                "tp_given": tp if dense.metrics.transition_layer != tp else None, "limit": limit, "seed": seed,
                "configs": [config_label(c) for c in configs]},
        provenance=provenance(lm, None, timing={"ablate_s": round(time.perf_counter() - t0, 2)}),
        transition_layer=tp, dense_dm=[float(x) for x in dense.metrics.dm], eval=ev)
    if out_dir is not None:
        res.save(out_dir)
        from ..plots import plot_ablation

        plot_ablation(res, out_dir, task)
    return res
