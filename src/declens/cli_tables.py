"""The CLI's tables on the console (rich): the compute modules return results, the CLI prints them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from .analyses.compare import CompareResult
    from .analyses.evaluate import EvalResult
    from .analyses.recovery import RecoveryResult


def print_eval(res: "EvalResult", console: Console) -> None:
    """One accuracy table (%) per format: tasks x configurations, and their average."""
    for f in res.formats:
        t = Table(title=f"accuracy (%), {f} format", header_style="bold")
        t.add_column("Task")
        for lab in res.labels:
            t.add_column(lab, justify="right")
        for task in res.tasks:
            t.add_row(task, *[f"{100 * res.cells[(task, f, lab)]['final_accuracy']:.2f}" for lab in res.labels])
        t.add_row("Avg", *[f"{100 * res.average(f, lab):.2f}" for lab in res.labels], style="bold")
        console.print(t)


def print_compare(res: "CompareResult", console: Console) -> None:
    """The table, as the paper prints it."""
    from .analyses.compare import TABLE_COLUMNS

    t = Table(title="accuracy (%) after fine-tuning (Table 5)", header_style="bold")
    for col in ("Method", "Ratio", *[TABLE_COLUMNS.get(x, x) for x in res.tasks], "Avg"):
        t.add_column(col, justify="left" if col == "Method" else "right")
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    for r in res.rows():
        t.add_row(r["method"], f"{100 * r['ratio']:.1f}%", *[fmt(r[x]) for x in res.tasks], fmt(r["avg"]),
                  style="bold" if r["method"] == "dense" else None)
    console.print(t)


def print_recovery(res: "RecoveryResult", console: Console | None = None) -> None:
    """A table: per configuration, accuracy / final DM / TP before -> after, ``restored`` and the loss."""
    console = console or Console()
    hp = res.config["finetune"]
    t = Table(title=f"{hp['method']} fine-tuning on {res.config['train']['task']} ({res.config['train']['sequences']} rows, "
                    f"{hp['epochs']} epoch(s), lr {hp['lr']:g}, batch {hp['effective_batch']}): before → after",
              header_style="bold", box=box.SIMPLE_HEAD)
    wide = console.width >= 100  # else the layer ids are listed below the table
    for col in ("ratio (k)", "accuracy", "final DM", "TP", "restored", "train loss"):
        t.add_column(col, justify="right", no_wrap=True)
    if wide:
        t.add_column("removed layer ids", overflow="fold")
    tp = lambda x: "none" if x is None else str(x)  # noqa: E731
    if res.dense:
        s = res.dense["summary"]
        t.add_row("dense", f"{s['final_accuracy']:.3f}", f"{s['final_dm']:+.2f}", tp(s["transition_layer"]), "", "",
                  *([""] if wide else []))
    for r in res.runs:
        ids = ",".join(map(str, r.removed))
        t.add_row(f"{r.ratio:.1%} ({r.k})", f"{r.before['final_accuracy']:.3f}→{r.after['final_accuracy']:.3f}",
                  f"{r.before['final_dm']:+.2f}→{r.after['final_dm']:+.2f}", f"{tp(r.tp_before)}→{tp(r.tp_after)}",
                  "yes" if r.restored else "no", f"{r.train['first_loss']:.2f}→{r.train['last_loss']:.2f}",
                  *([ids] if wide else []))
    console.print(t)
    if not wide:
        for r in res.runs:
            console.print(f"  {r.ratio:.1%} ({r.k}) removed layers: {','.join(map(str, r.removed))}")
    console.print("TP: Transition Point (dense layer id); restored: no TP before fine-tuning, a TP after")
