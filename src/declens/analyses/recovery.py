"""Bounded recovery: fine-tune pruned models and compare their decision lens before and after.

The paper's Section 4.3.3 fine-tunes heavily pruned models (LoRA or full, 3 epochs, AdamW,
effective batch 8, sequences up to 512 tokens) and compares the Decision Margin curves before and
after: fine-tuning lifts DM but cannot restore the Transition Point beyond about 40% pruning.
:func:`recover_study` reproduces that experiment for any model, task and set of pruned
configurations (explicit removal lists, or the per-ratio best states of a ``declens prune`` run).

The fine-tuning itself (recipe, training rows, LoRA / full set-up, the ``transformers.Trainer``
loop, the learning-rate selection, merge and export) is :mod:`declens.finetune`; this module is the
study around it: which configurations, the lens before and after, the results and figures.

Under ``torchrun`` every rank runs the whole study: the analyses shard their rows (:func:`analyze`), the
training is data-parallel (DDP through ``Trainer``, see :mod:`declens.finetune.train`), and rank 0 alone
writes the run folder and the exported models.

Restoration
    ``restored`` is True when the pruned model has **no** Transition Point before fine-tuning and
    has one after. A Transition Point exists exactly when the last layer's mean DM is positive
    (:func:`declens.metrics.transition_point`), so ``restored`` means that fine-tuning moved the final
    mean Decision Margin from <= 0 to > 0. ``tp_before`` / ``tp_after`` (dense ids, or None) and the
    dense model's TP are reported alongside.

Example:
    >>> lm = load_model("smollm2-135m", dtype="float32")
    >>> data = load_task("arc_easy", limit=100)
    >>> cfg = RecoveryStudyConfig(fmt="cloze", finetune=FinetuneConfig(method="lora", epochs=1), train_samples=256)
    >>> res = recover_study(lm, data, "arc_easy", [[20, 21, 22]], cfg, out_dir="runs/recover")
    >>> res.runs[0].restored, res.runs[0].after["final_dm"]
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from .. import distributed
from ..errors import DeclensError
from ..finetune import (FinetuneConfig, answer_loss, export_model, load_training_data, original_num_layers,
                        run_finetune, sequence_stats, state_copy, training_sequences)
from ..formats import format_named
from ..models import LoadedModel
from ..results import AnalysisResult, RunWriter, load_result, provenance, read_result_file, register_result
from ..surgery import check_removal
from ..tasks import LETTERS, TaskData, TaskSpec
from .decision import AnalyzeConfig, analyze, prepare

#: a line per configuration (INFO, with ``progress``); the CLI shows them on standard output
logger = logging.getLogger(__name__)
RECOVER_FILE = "recover.json"
RECOVER_CSV = "recover.csv"


# ------------------------------------------------------------------------------------------------
# Configurations to recover


@dataclass(frozen=True)
class PrunedConfig:
    """A pruned configuration to fine-tune: removed dense ids, where they came from, and for a
    layer-merging state (``laco`` / ``mka``) its merges (``PruneRecord.merges``)."""

    removed: tuple[int, ...]
    source: str = "remove"
    merges: tuple | None = None


def configs_from_prune(prune: Any, ratios: Sequence[float] | None = None, method: str = "ip",
                       num_layers: int | None = None) -> list[PrunedConfig]:
    """The best removed set per pruning ratio of a ``declens prune`` run.

    Args:
        prune: a folder or ``prune.json`` written by ``declens prune``, or a loaded ``PruneResult``.
        ratios: pruning ratios to take (each mapped to ``floor(ratio x L)`` removed layers); None: every
            ratio of the run.
        method: which method's states (``ip``, ``shortgpt``, ...).
        num_layers: the model's dense layer count, checked against the run's.
    """
    from ..pruning.run import best_states

    _, best = best_states(prune, method, num_layers, ratios)
    ks = list(best)
    return [PrunedConfig(tuple(int(i) for i in best[k].removed), f"prune:{method}",
                         tuple(getattr(best[k], "merges", None) or ()) or None) for k in ks]


# ------------------------------------------------------------------------------------------------
# The study


def _layer_block(res: AnalysisResult) -> dict:
    """Per-layer metrics, each a list over ``layer_ids`` (``[L]``; ``option_frequency`` ``[L, K]``), under the
    names every result uses for them (``dm``, ``accuracy``, ``accuracy_norm``, ``kl``, ``option_frequency``)."""
    m = res.metrics
    out = {"layer_ids": list(m.layer_ids), "dm": [float(x) for x in m.dm], "accuracy": [float(x) for x in m.acc],
           "kl": [float(x) for x in m.kl], "dm_q25": [float(x) for x in m.dm_q25], "dm_q75": [float(x) for x in m.dm_q75],
           "option_frequency": [[float(v) for v in row] for row in m.option_frequency]}
    if m.acc_norm is not None:
        out["accuracy_norm"] = [float(x) for x in m.acc_norm]
    return out


#: schema 1 named accuracy ``acc`` (layer blocks: ``acc`` / ``acc_norm``; table rows: ``acc_before`` /
#: ``acc_after``); schema 2 uses the names of every other result (``accuracy``, ``accuracy_norm``,
#: ``accuracy_before`` / ``accuracy_after`` as in ``compare.json``)
_V1_NAMES = {"acc": "accuracy", "acc_norm": "accuracy_norm", "acc_before": "accuracy_before",
             "acc_after": "accuracy_after"}


def _recover_v1_to_v2(d: dict) -> dict:
    """``recover.json`` schema 1 -> 2: the renames of :data:`_V1_NAMES` in the dense block, every run's layer
    blocks and the table rows."""

    def rename(block):
        return block if not isinstance(block, dict) else {_V1_NAMES.get(k, k): v for k, v in block.items()}

    d["dense"] = rename(d.get("dense"))
    d["runs"] = [{**r, "layers_before": rename(r.get("layers_before")), "layers_after": rename(r.get("layers_after"))}
                 for r in d.get("runs", [])]
    d["table"] = [rename(row) for row in d.get("table", [])]
    return d


@dataclass
class RecoveryRun:
    """One pruned configuration, before and after fine-tuning.

    Attributes:
        removed: dense ids of the removed layers; k: how many; ratio: ``k / L`` (dense L).
        source: ``remove`` (given explicitly) or ``prune:<method>`` (from a prune run).
        before, after: headline numbers (``LayerMetrics.summary()``: final accuracy, final DM, TP ...).
        layers_before, layers_after: per-layer ``layer_ids``, ``dm``, ``accuracy`` (``accuracy_norm``), ``kl``,
            DM quartiles, ``option_frequency``.
        tp_before, tp_after: dense id of the Transition Point (None: no TP).
        restored: no TP before and a TP after (see the module docstring).
        train: the :class:`TrainLog` as a dict.
        train_loss_before, train_loss_after: answer-token loss on the training rows (when measured).
        export: what :func:`export_model` returned, when the model was saved.
        timing: seconds for evaluating before, training, evaluating after.
    """

    removed: list[int]
    k: int
    ratio: float
    source: str
    before: dict
    after: dict
    layers_before: dict
    layers_after: dict
    tp_before: int | None
    tp_after: int | None
    restored: bool
    train: dict
    train_loss_before: float | None = None
    train_loss_after: float | None = None
    export: dict | None = None
    timing: dict = field(default_factory=dict)
    analyses: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def dm_gain(self) -> float:
        """Change of the final mean Decision Margin."""
        return float(self.after["final_dm"] - self.before["final_dm"])

    @property
    def acc_gain(self) -> float:
        return float(self.after["final_accuracy"] - self.before["final_accuracy"])

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "analyses"}
        d["dm_gain"] = self.dm_gain
        d["accuracy_gain"] = self.acc_gain
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RecoveryRun":
        names = {f.name for f in fields(cls)} - {"analyses"}
        return cls(**{k: v for k, v in d.items() if k in names})


@register_result("recover", RECOVER_FILE, "recover", converters={1: _recover_v1_to_v2})
@dataclass
class RecoveryResult:
    """A recovery study: the dense reference and every pruned configuration before / after fine-tuning."""

    config: dict
    provenance: dict
    runs: list[RecoveryRun]
    dense: dict | None = None
    SCHEMA_VERSION = 2  #: of ``recover.json``; 1 -> 2: ``acc*`` -> ``accuracy*`` (converted on load)

    def table(self) -> list[dict]:
        """One row per configuration (the CSV rows)."""
        rows = []
        for r in self.runs:
            rows.append({"k": r.k, "ratio": r.ratio, "removed": r.removed, "source": r.source,
                         "accuracy_before": r.before["final_accuracy"], "accuracy_after": r.after["final_accuracy"],
                         "dm_before": r.before["final_dm"], "dm_after": r.after["final_dm"],
                         "tp_before": r.tp_before, "tp_after": r.tp_after, "restored": r.restored,
                         "first_loss": r.train.get("first_loss"), "last_loss": r.train.get("last_loss"),
                         "steps": r.train.get("steps"), "train_s": r.train.get("seconds")})
        return rows

    def to_dict(self) -> dict:
        return {"kind": "recover", "config": self.config, "provenance": self.provenance, "dense": self.dense,
                "table": self.table(), "runs": [r.to_dict() for r in self.runs]}

    def save(self, out_dir: str | Path, plots: bool = True) -> Path:
        """Write ``recover.json``, ``recover.csv`` and (with ``plots``) ``recover_dm.png``, ``recover_loss.png``
        as one run folder (the manifest last, see :class:`~declens.results.RunWriter`); an intermediate save
        (``provenance["partial"]``) is marked partial, which readers refuse."""
        out = Path(out_dir)
        rows = self.table()
        buf = io.StringIO()
        if rows:
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            for row in rows:
                w.writerow({k: (json.dumps(v) if isinstance(v, list) else f"{v:.6g}" if isinstance(v, float) else v)
                            for k, v in row.items()})
        with RunWriter(out, "recover", partial=bool(self.provenance.get("partial"))) as run:
            run.json(RECOVER_FILE, self.to_dict())
            run.text(RECOVER_CSV, buf.getvalue())
            if plots:
                run.draw_figures(self, out)
        return out

    @classmethod
    def load(cls, path: str | Path) -> "RecoveryResult":
        """Read a folder (or ``recover.json``) written by :meth:`save`."""
        p, d = read_result_file(path, RECOVER_FILE, "recover")
        if d.get("kind") != "recover":
            raise DeclensError(f"{str(p)!r} is not a recovery result (kind={d.get('kind')!r})")
        return cls(config=d["config"], provenance=d["provenance"], runs=[RecoveryRun.from_dict(r) for r in d["runs"]],
                   dense=d.get("dense"))


@dataclass(frozen=True)
class RecoveryStudyConfig:
    """Knobs of :func:`recover_study` (recorded in ``recover.json``'s ``config`` under the same keys as before:
    ``finetune`` as its :meth:`FinetuneConfig.to_dict`, ``ratios`` / ``prune_method`` in ``prune``, the training
    rows in ``train``).

    Attributes:
        fmt: ``letter`` or ``cloze``, for evaluation and for the training sequences alike.
        finetune: the fine-tuning recipe (:class:`~declens.finetune.FinetuneConfig`: method, epochs, lr, ...).
        ratios: with a prune run, the pruning ratios whose best state is fine-tuned (``None``: every ratio).
        prune_method: with a prune run, which method's states (``ip``, ``shortgpt``, ...).
        train_split, train_samples, train_seed: which training rows (default: the whole training split).
        measure_train_loss: also measure the answer loss on the training rows before and after.
        dense: also analyse the dense model (the reference DM curve).
        labels, label_prefix: letter-format option labels.
        max_tokens: padded tokens per batch for the analyses (``None``: sized to the device).

    Raises:
        DeclensError: a bad value (one line naming it and the fix), when the config is built.
    """

    fmt: str = "letter"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ratios: Sequence[float] | None = None
    prune_method: str = "ip"
    train_split: str | None = None
    train_samples: int | None = None
    train_seed: int = 0
    measure_train_loss: bool = False
    dense: bool = True
    labels: str | Sequence[str] = LETTERS
    label_prefix: str = " "
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        from ..checks import check_methods, check_options
        from ..tasks import check_seed

        check_options(fmt=self.fmt, train_samples=self.train_samples, max_tokens=self.max_tokens)
        check_seed(self.train_seed, "train_seed")
        if not isinstance(self.finetune, FinetuneConfig):
            raise DeclensError(f"finetune must be a FinetuneConfig (FinetuneConfig.make(**hparams)), "
                               f"not {type(self.finetune).__name__}")
        check_methods([self.prune_method], None)
        if self.ratios is not None:
            object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
            for r in self.ratios:
                check_options(ratio=r)
        labs = list(self.labels)
        if not labs or len(set(labs)) != len(labs):
            raise DeclensError(f"labels {self.labels!r} must be distinct, non-empty labels like ABCD or A,B,C,D")

    def to_dict(self) -> dict:
        """The fields, JSON-ready (``finetune`` as its :meth:`FinetuneConfig.to_dict`)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["finetune"] = self.finetune.to_dict()
        d["ratios"] = None if self.ratios is None else list(self.ratios)
        d["labels"] = self.labels if isinstance(self.labels, str) else list(self.labels)
        return d


def recover_study(
    lm: LoadedModel,
    eval_data: TaskData,
    train: str | TaskSpec | TaskData,
    removals: Sequence[Sequence[int]] | None = None,
    config: RecoveryStudyConfig | None = None,
    *,
    prune: Any = None,
    out_dir: str | Path | None = None,
    export_dir: str | Path | None = None,
    progress: bool = True,
    plots: bool = True,
) -> RecoveryResult:
    """Fine-tune pruned configurations of ``lm`` and compare the decision lens before and after.

    For each configuration: copy the model, remove the layers, analyse it on ``eval_data`` (per-layer
    DM, accuracy, TP), fine-tune it on the training rows, analyse it again, and (optionally) save it.
    ``lm`` itself is never modified.

    Args:
        lm: the dense model.
        eval_data: the evaluated rows (e.g. ``load_task("arc_challenge", limit=200)``).
        train: the training task (name or spec: rows from its training split, see :func:`training_split`),
            or a preloaded :class:`TaskData`, used as is (``config.train_split`` / ``train_samples`` ignored).
        removals: explicit configurations, each a list of dense layer ids to remove.
        config: format, fine-tuning recipe, prune-run selection, training rows, train-loss measurement, dense
            reference, labels and batch budget (:class:`RecoveryStudyConfig`; ``None``: the defaults).
        prune: a ``declens prune`` folder / ``prune.json`` / ``PruneResult``: take its best removed set
            per ratio (``config.ratios``, default all) of ``config.prune_method``. Exclusive with ``removals``.
        out_dir: write ``recover.json``, ``recover.csv`` and the figures here (``recover.json`` is also
            written after every finished configuration but the last, marked ``"partial": true``).
        export_dir: save every recovered model (``save_pretrained`` + tokenizer) in a subfolder here
            (``00_k12``: configuration index and number of removed layers).
        progress: progress bars, and a line per configuration on the ``declens`` logger (INFO; the CLI prints them).
        plots: with ``out_dir``, draw the figures.

    Returns:
        The :class:`RecoveryResult`.
    """
    cfg = config if config is not None else RecoveryStudyConfig()
    fmt, hp, ratios, prune_method = cfg.fmt, cfg.finetune, cfg.ratios, cfg.prune_method
    labels, label_prefix, max_tokens = cfg.labels, cfg.label_prefix, cfg.max_tokens
    n_dense = original_num_layers(lm)
    if (removals is None) == (prune is None):
        raise DeclensError("give the pruned configurations either as removal lists (--remove) or as a prune run "
                           "(--from-prune), not both and not neither")
    prune_info = None
    if prune is not None:
        pres = load_result(prune, kind="prune") if isinstance(prune, (str, Path)) else prune
        configs = configs_from_prune(pres, ratios, prune_method, num_layers=n_dense)
        if pres.config.get("model") != lm.spec:
            warnings.warn(f"the prune run was made with model {pres.config.get('model')!r}, this study uses "
                          f"{lm.spec!r}; make sure they are the same model", stacklevel=2)
        prune_info = {"path": str(prune) if isinstance(prune, (str, Path)) else None, "method": prune_method,
                      "ratios": None if ratios is None else [float(r) for r in ratios],
                      "model": pres.config.get("model"), "task": pres.config.get("task"),
                      "format": pres.config.get("format"),
                      "model_fingerprint": (pres.provenance.get("model") or {}).get("fingerprint")}
    else:
        if not removals:
            raise DeclensError("no configuration to recover; give at least one removal list, e.g. --remove 20,21,22")
        configs = []
        for rem in removals:
            rem = [int(i) for i in rem]
            if not rem:
                raise DeclensError("an empty removal list is the dense model; list the layers to remove")
            check_removal(lm.parts, rem)  # fail early on bad ids, before any training
            configs.append(PrunedConfig(tuple(rem), "remove"))
    train_data = load_training_data(train, cfg.train_split, cfg.train_samples, cfg.train_seed)
    if train_data.name == eval_data.name:
        overlap = {it.id for it in train_data.items} & {it.id for it in eval_data.items}
        if overlap:
            raise DeclensError(
                f"{len(overlap)} training row(s) are also evaluation rows ({train_data.name!r}, split "
                f"{train_data.split!r}); fine-tune on the training split, not the evaluated one")
    seqs = training_sequences(lm, train_data, fmt, hp.max_length, labels, label_prefix)
    req = prepare(lm, eval_data, fmt, labels=labels, label_prefix=label_prefix)
    config = {
        "model": lm.spec, "task": eval_data.name, "format": fmt, **eval_data.selection, "num_layers": n_dense,
        "train": {"task": train_data.name, **train_data.selection, "fingerprint": train_data.fingerprint(),
                  **sequence_stats(seqs), "loss": "cross-entropy on the answer tokens only (prompt masked with -100)"},
        "finetune": hp.to_dict(),
        "configurations": [{"removed": list(c.removed), "source": c.source,
                            **({"merges": list(c.merges)} if c.merges else {})} for c in configs],
        "prune": prune_info,
        "restored_definition": "no Transition Point before fine-tuning (final mean DM <= 0) and one after (final mean DM > 0)",
        "labels": format_named(fmt).recorded_labels(req),
        "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
    }
    t_all = time.perf_counter()
    talk = progress and distributed.is_main()  # under torchrun every rank works; rank 0 reports
    akw = dict(requests=req, progress=talk)
    acfg = AnalyzeConfig(labels=labels, label_prefix=label_prefix, max_tokens=max_tokens)
    dense_block = None
    if cfg.dense:
        if talk:
            logger.info("analysing the dense model ...")
        d = analyze(lm, eval_data, fmt, acfg, **akw)
        dense_block = {"summary": d.metrics.summary(), **_layer_block(d)}
    runs: list[RecoveryRun] = []
    export_root = Path(export_dir) if export_dir is not None else None
    if export_root is not None:  # refuse now, not after hours of training
        taken = [str(p) for p in (export_root / _export_name(n, c) for n, c in enumerate(configs))
                 if p.exists() and any(p.iterdir())]
        if taken:
            raise DeclensError(f"export folder(s) {taken} exist and are not empty; choose a new --export-dir")
    for n, c in enumerate(configs):
        removed = list(c.removed)
        k = len(removed)
        if talk:
            logger.info(f"[{n + 1}/{len(configs)}] removing {k} of {n_dense} layers ({k / n_dense:.1%}): {removed}")
        t0 = time.perf_counter()
        pm = state_copy(lm, removed, list(c.merges) if c.merges else None)
        before = analyze(pm, eval_data, fmt, acfg, **akw)
        loss_before = answer_loss(pm, seqs, hp.batch_size) if cfg.measure_train_loss else None
        t1 = time.perf_counter()
        log = run_finetune(pm, seqs, hp, progress=talk)
        t2 = time.perf_counter()
        after = analyze(pm, eval_data, fmt, acfg, **akw)
        loss_after = answer_loss(pm, seqs, hp.batch_size) if cfg.measure_train_loss else None
        t3 = time.perf_counter()
        tp_b, tp_a = before.metrics.transition_layer, after.metrics.transition_layer
        exp = None
        if export_root is not None and distributed.is_main():  # every rank holds the same weights (DDP)
            exp = export_model(pm, export_root / _export_name(n, c))
        runs.append(RecoveryRun(
            removed=removed, k=k, ratio=k / n_dense, source=c.source, before=before.metrics.summary(),
            after=after.metrics.summary(), layers_before=_layer_block(before), layers_after=_layer_block(after),
            tp_before=tp_b, tp_after=tp_a, restored=tp_b is None and tp_a is not None, train=log.to_dict(),
            train_loss_before=loss_before, train_loss_after=loss_after, export=exp,
            timing={"before_s": round(t1 - t0, 3), "train_s": round(t2 - t1, 3), "after_s": round(t3 - t2, 3)},
            analyses=(before, after)))
        del pm
        if out_dir is not None and n + 1 < len(configs):  # finished configurations survive a killed run
            RecoveryResult(config=config, provenance=provenance(lm, eval_data, partial=True), runs=runs,
                           dense=dense_block).save(out_dir, plots=False)
    prov = provenance(lm, eval_data, timing={"total_s": round(time.perf_counter() - t_all, 2), "ranks": distributed.world()})
    res = RecoveryResult(config=config, provenance=prov, runs=runs, dense=dense_block)
    if out_dir is not None:
        res.save(out_dir, plots=plots)
    return res


def _export_name(n: int, c: PrunedConfig) -> str:
    return f"{n:02d}_k{len(c.removed)}"


__all__ = ["PrunedConfig", "RecoveryResult", "RecoveryRun", "RecoveryStudyConfig", "configs_from_prune", "recover_study"]
