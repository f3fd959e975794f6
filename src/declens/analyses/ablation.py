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
from ..results import RunWriter, provenance, register_result
from ..surgery import dense_layer_ids
from ..tasks import load_task
from .decision import analyze
from .evaluate import EvalResult, cells_v1_to_v2, config_label, evaluate_configs


def window_configs(tp: int, window: int, layer_ids: int | Sequence[int], pairs: bool = True) -> list[list[int]]:
    """Single layers within ``window`` layers of ``tp`` and adjacent pairs inside that window (dense ids).

    ``layer_ids``: the model's dense layer ids in running order (an int ``L``: a dense model,
    ``0..L-1``). On an already-pruned model the window and the pairs follow the layers it still has:
    ``window`` counts present layers and a pair is two layers that run one after the other.
    """
    if window < 0:
        raise DeclensError(f"--window must be >= 0, got {window}")
    ids = list(range(layer_ids)) if isinstance(layer_ids, int) else [int(i) for i in layer_ids]
    c = ids.index(tp)
    inside = ids[max(0, c - window):c + window + 1]
    singles = [[i] for i in inside]
    doubles = [[a, b] for a, b in zip(inside, inside[1:])] if pairs else []
    return singles + doubles


@register_result("ablate", "ablate.json", "ablate", converters={1: cells_v1_to_v2})
@dataclass
class AblationResult:
    """Ablation around the Transition Point."""

    config: dict
    provenance: dict
    transition_layer: int
    dense_dm: list[float]
    eval: EvalResult
    #: of ``ablate.json`` (see :func:`declens.results.register_result`); 1 -> 2: the cells' renames of
    #: ``eval.json`` 2 (:func:`~declens.analyses.evaluate.cells_v1_to_v2`)
    SCHEMA_VERSION = 2

    def to_dict(self) -> dict:
        d = self.eval.to_dict()
        d.update(kind="ablate", config=self.config, provenance=self.provenance, transition_layer=self.transition_layer,
                 dense_dm=self.dense_dm)
        return d

    @classmethod
    def load(cls, path: str | Path) -> "AblationResult":
        """Read a folder written by :meth:`save` (verified against its manifest)."""
        from ..results import read_result_file
        from .evaluate import EvalResult

        d = read_result_file(path, "ablate.json", "ablate")[1]
        return cls(config=d["config"], provenance=d["provenance"], transition_layer=d["transition_layer"],
                   dense_dm=d["dense_dm"], eval=EvalResult.from_dict(d))

    def save(self, out_dir: str | Path, plots: bool = False) -> Path:
        """Write ``ablate.json``, ``ablate.md`` and (with ``plots``) ``ablate.png`` as one run folder (the manifest last)."""
        out = Path(out_dir)
        with RunWriter(out, "ablate") as run:
            run.json("ablate.json", self.to_dict())
            run.text("ablate.md", "\n\n".join(
                f"### {f} format (Transition Point: layer {self.transition_layer})\n\n{self.eval.markdown(f)}"
                for f in self.eval.formats) + "\n")
            if plots:
                run.draw_figures(self, out, self.config["tp_task"])
        return out


@dataclass(frozen=True)
class AblateConfig:
    """Knobs of :func:`ablate` (recorded in ``ablate.json``'s ``config`` under the same keys as before).

    Attributes:
        window: layers on each side of the Transition Point (>= 0).
        tp: the Transition Point (dense layer id) to centre the window on instead of measuring it; ``None``: measure.
        limit: rows per task (``None``: all); ``seed``: the row sample.
        seed: seed of the row sample.
        pairs: also remove adjacent pairs inside the window.
        max_tokens: truncate prompts to this many tokens (``None``: the model's limit).
    """

    window: int = 2
    tp: int | None = None
    limit: int | None = None
    seed: int = 0
    pairs: bool = True
    max_tokens: int | None = None


def ablate(lm: LoadedModel, task: str, tasks: Sequence[str], fmt: str = "letter", config: AblateConfig | None = None,
           out_dir: str | Path | None = None, progress: bool = True) -> AblationResult:
    """Remove single layers and adjacent pairs around the Transition Point; evaluate on ``tasks``.

    Args:
        lm: the dense model.
        task: the task whose dense analysis locates the Transition Point (ignored with ``config.tp``).
        tasks: tasks to evaluate every configuration on.
        fmt: scoring format.
        config: window, Transition Point, rows and seed (:class:`AblateConfig`; ``None``: the defaults).
        out_dir: write the run folder there (``None``: don't write).
        progress: show progress bars.
    """
    cfg = config if config is not None else AblateConfig()
    window, tp, limit, seed, pairs, max_tokens = cfg.window, cfg.tp, cfg.limit, cfg.seed, cfg.pairs, cfg.max_tokens
    t0 = time.perf_counter()
    dense = analyze(lm, load_task(task, limit=limit, seed=seed), fmt, progress=progress, plots=False)
    if tp is None:
        tp = dense.metrics.transition_layer
        if tp is None:
            raise DeclensError(
                f"the dense model has no Transition Point on {task} ({fmt} format): its Decision Margin never stays "
                "positive. Pass --tp to choose the centre of the window, or use a task/format the model can answer."
            )
    layer_ids = dense_layer_ids(lm.parts)
    if tp not in layer_ids:
        raise DeclensError(f"--tp {tp} is out of range: give a dense layer id the model has "
                           f"({layer_ids[0]}..{layer_ids[-1]}{'' if layer_ids == list(range(len(layer_ids))) else f': {list(layer_ids)}'})")
    configs = [[]] + window_configs(tp, window, layer_ids, pairs)
    ev = evaluate_configs(lm, tasks, configs, [fmt], limit=limit, seed=seed, max_tokens=max_tokens, progress=progress)
    res = AblationResult(
        config={"model": lm.spec, "tp_task": task, "tasks": list(tasks), "format": fmt, "window": window, "pairs": pairs,
                "tp_given": tp if dense.metrics.transition_layer != tp else None, "limit": limit, "seed": seed,
                "configs": [config_label(c) for c in configs]},
        provenance=provenance(lm, None, timing={"ablate_s": round(time.perf_counter() - t0, 2)}),
        transition_layer=tp, dense_dm=[float(x) for x in dense.metrics.dm], eval=ev)
    if out_dir is not None:
        res.save(out_dir, plots=True)
    return res
