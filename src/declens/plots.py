"""Figures of a layer-wise decision analysis (matplotlib, PNG).

- ``dm.png``: mean Decision Margin per layer with its interquartile band, the zero line, the
  Transition Point and the Silent / Decisive phases shaded;
- ``accuracy.png``: lens accuracy per layer (and ``acc_norm`` for cloze) against chance;
- ``option_frequency.png``: Option Frequency per layer as a heatmap, with KL(OF || gold) beside;
- ``overview.png``: the three in one figure.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import LayerMetrics  # noqa: E402

SILENT = "#d9d9d9"
DECISIVE = "#c7e9c0"
TP_COLOR = "#d62728"


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG (120 dpi, tight box), close it, return ``path``."""
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def png_bytes(fig, dpi: int = 110) -> bytes:
    """``fig`` as PNG bytes (for embedding), closed afterwards."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def shade_phases(ax, m: LayerMetrics, x: Sequence[float] | None = None) -> None:
    """Shade the Silent and Decisive phases and mark the Transition Point on an axis over layers."""
    x = np.arange(len(m.layer_ids)) if x is None else np.asarray(x)
    t = m.transition_index
    end = len(x) if t is None else t
    if end > 0:
        ax.axvspan(x[0] - 0.5, x[end - 1] + 0.5, color=SILENT, alpha=0.5, lw=0, label="Silent Phase")
    if t is not None:
        ax.axvspan(x[t] - 0.5, x[-1] + 0.5, color=DECISIVE, alpha=0.5, lw=0, label="Decisive Phase")
        ax.axvline(x[t], color=TP_COLOR, ls="--", lw=1.2, label=f"Transition Point (layer {m.layer_ids[t]})")


def _layer_axis(ax, m: LayerMetrics) -> np.ndarray:
    x = np.arange(len(m.layer_ids))
    step = max(1, -(-len(x) // 16))
    ax.set_xticks(x[::step])
    ax.set_xticklabels([str(i) for i in m.layer_ids[::step]])
    ax.set_xlabel("layer (original id)")
    ax.set_xlim(-0.5, len(x) - 0.5)
    return x


def plot_dm(ax, m: LayerMetrics, title: str = "") -> None:
    x = _layer_axis(ax, m)
    shade_phases(ax, m, x)
    ax.fill_between(x, m.dm_q25, m.dm_q75, color="#1f77b4", alpha=0.2, lw=0, label="interquartile range")
    ax.plot(x, m.dm, "-o", color="#1f77b4", ms=3, lw=1.5, label="mean DM")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("Decision Margin")
    ax.set_title(title or "Decision Margin per layer")
    ax.legend(fontsize=7, loc="best")


def plot_accuracy(ax, m: LayerMetrics, title: str = "") -> None:
    x = _layer_axis(ax, m)
    shade_phases(ax, m, x)
    ax.plot(x, m.acc, "-o", ms=3, color="#2ca02c", label="accuracy")
    if m.acc_norm is not None:
        ax.plot(x, m.acc_norm, "-s", ms=3, color="#9467bd", label="accuracy (length-normalised)")
    ax.axhline(m.chance, color="k", ls=":", lw=1, label=f"chance ({m.chance:.2f})")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title or "Accuracy per layer (logit lens)")
    ax.legend(fontsize=7, loc="best")


def plot_option_frequency(ax, m: LayerMetrics, labels: Sequence[str], title: str = "") -> None:
    of = m.option_frequency.T  # [K, L]
    im = ax.imshow(of, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower",
                   extent=(-0.5, of.shape[1] - 0.5, -0.5, of.shape[0] - 0.5))
    _layer_axis(ax, m)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(list(labels))
    ax.set_ylabel("option")
    if m.transition_index is not None:
        ax.axvline(m.transition_index, color=TP_COLOR, ls="--", lw=1.2)
    ax.set_title(title or "Option Frequency per layer")
    plt.colorbar(im, ax=ax, label="share of items", fraction=0.04)


def plot_kl(ax, m: LayerMetrics) -> None:
    x = _layer_axis(ax, m)
    shade_phases(ax, m, x)
    ax.plot(x, m.kl, "-o", ms=3, color="#ff7f0e")
    ax.set_ylabel("KL(OF || gold) [nats]")
    ax.set_title("Option Frequency vs gold labels")


def plot_analysis(res, out_dir: str | Path) -> list[Path]:
    """Draw the analysis figures into ``out_dir``; return their paths."""
    out = Path(out_dir)
    m = res.metrics
    cfg = res.config
    name = f"{Path(str(cfg.get('model'))).name} · {cfg.get('task')} · {cfg.get('format')}"
    paths = []

    def save(fig, fname):
        paths.append(save_figure(fig, out / fname))

    fig, ax = plt.subplots(figsize=(8, 4))
    plot_dm(ax, m, f"Decision Margin — {name}")
    save(fig, "dm.png")
    fig, ax = plt.subplots(figsize=(8, 4))
    plot_accuracy(ax, m, f"Accuracy — {name}")
    save(fig, "accuracy.png")
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=False)
    plot_option_frequency(a1, m, res.option_labels)
    plot_kl(a2, m)
    fig.tight_layout()
    save(fig, "option_frequency.png")
    fig, axes = plt.subplots(2, 2, figsize=(14, 8))
    plot_dm(axes[0, 0], m)
    plot_accuracy(axes[0, 1], m)
    plot_option_frequency(axes[1, 0], m, res.option_labels)
    plot_kl(axes[1, 1], m)
    s = m.summary()
    tp = s["transition_layer"]
    fig.suptitle(f"{name}   |   final acc {s['final_accuracy']:.3f}, transition point "
                 f"{'none' if tp is None else tp} of {s['num_layers']} layers", fontsize=12)
    fig.tight_layout()
    save(fig, "overview.png")
    return paths


# ------------------------------------------------------------------------------------------------
# Pruning


def _method_colors(methods):
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def plot_accuracy_vs_ratio(ax, res) -> None:
    """Accuracy of the best state per ratio, one line per method, with chance and critical ratios."""
    colors = _method_colors(res.runs)
    chance = None
    for m, run in res.runs.items():
        best = run.best_by_k()
        ratios = [r.ratio for r in best.values()]
        ax.plot(ratios, [r.accuracy for r in best.values()], "-o", ms=3, color=colors[m], label=m)
        chance = next(iter(best.values())).chance
        crit = res.critical.get(m)
        if crit is not None:
            ax.axvline(crit, color=colors[m], ls=":", lw=1)
    if chance is not None:
        ax.axhline(chance, color="k", ls="--", lw=0.8, label=f"chance ({chance:.2f})")
    ax.set_xlabel("pruning ratio (share of layers removed)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy against pruning ratio (dotted: critical ratio)")
    ax.legend(fontsize=8)


def plot_dm_across_ratios(ax, run, title: str = "") -> None:
    """Per-layer DM curves of the best pruned state at every ratio (the paper's Figure 4 style)."""
    best = run.best_by_k()
    cmap = plt.get_cmap("viridis")
    kmax = max(best) or 1
    for k, r in best.items():
        x = np.arange(len(r.dm))
        ax.plot(x, r.dm, "-", lw=1.2, color=cmap(k / kmax), label=f"{r.ratio:.0%}" if k % max(1, kmax // 6) == 0 else None)
        if r.transition_layer is not None:
            t = r.layer_ids.index(r.transition_layer)
            ax.plot([t], [r.dm[t]], "o", ms=4, color=cmap(k / kmax))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("layer position in the pruned model (dots: Transition Point)")
    ax.set_ylabel("Decision Margin")
    ax.set_title(title or f"DM per layer across pruning ratios ({run.method})")
    ax.legend(title="ratio", fontsize=7, ncol=2)


def plot_removal_strip(ax, run) -> None:
    """Which original layers are gone at each ratio (best state), with the dense phases beneath."""
    best = run.best_by_k()
    tp = best[0].transition_layer
    L = run.num_layers
    grid = np.zeros((len(best), L))
    for row, (k, r) in enumerate(best.items()):
        grid[row, r.removed] = 1
    ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1.4, origin="upper",
              extent=(-0.5, L - 0.5, len(best) - 0.5, -0.5))
    if tp is not None:
        ax.axvline(tp - 0.5, color=TP_COLOR, ls="--", lw=1.2, label=f"dense Transition Point (layer {tp})")
        ax.axvspan(tp - 0.5, L - 0.5, color=DECISIVE, alpha=0.35, lw=0, label="dense Decisive Phase")
        ax.legend(fontsize=7, loc="lower left")
    ax.set_yticks(range(len(best)))
    ax.set_yticklabels([f"{r.ratio:.0%} · acc {r.accuracy:.2f}" for r in best.values()], fontsize=7)
    step = max(1, -(-L // 32))
    ax.set_xticks(range(0, L, step))
    ax.set_xlabel("original layer id (dark: removed)")
    ax.set_title(f"Removed layers per pruning ratio ({run.method})")


def plot_prune(res, out_dir: str | Path) -> list[Path]:
    """Figures of a prune run: accuracy vs ratio, DM curves across ratios and removal strips per method."""
    out = Path(out_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    plot_accuracy_vs_ratio(ax, res)
    paths.append(save_figure(fig, out / "accuracy_vs_ratio.png"))
    for m, run in res.runs.items():
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(15, max(4.5, 0.22 * len(run.best_by_k()) + 1.5)))
        plot_dm_across_ratios(a1, run)
        plot_removal_strip(a2, run)
        fig.tight_layout()
        paths.append(save_figure(fig, out / f"pruning_{m}.png"))
    return paths


def plot_ablation(res, out_dir: str | Path, task: str) -> list[Path]:
    """DM per layer of every ablated configuration on ``task`` (dense in black), and the accuracy table as bars."""
    out = Path(out_dir)
    ev = res.eval
    fmt = ev.formats[0]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(15, 5))
    cmap = plt.get_cmap("tab20")
    for i, lab in enumerate(ev.labels):
        cell = ev.cells[(task, fmt, lab)] if (task, fmt, lab) in ev.cells else None
        if cell is None:
            continue
        x = cell["layer_ids"]
        style = dict(color="k", lw=2.2, label="dense") if lab == "dense" else dict(color=cmap(i % 20), lw=1.2, label=f"-{lab}")
        a1.plot(x, cell["dm"], "-", **style)
    a1.axhline(0, color="k", lw=0.8)
    a1.axvline(res.transition_layer, color=TP_COLOR, ls="--", lw=1.2, label=f"dense Transition Point ({res.transition_layer})")
    a1.set_xlabel("layer (original id)")
    a1.set_ylabel("Decision Margin")
    a1.set_title(f"DM after removing layers around the Transition Point ({task})")
    a1.legend(fontsize=7, ncol=2)
    labels = ev.labels
    avg = [ev.average(fmt, lab) for lab in labels]
    a2.bar(range(len(labels)), avg, color=["k" if lab == "dense" else cmap(i % 20) for i, lab in enumerate(labels)])
    a2.set_xticks(range(len(labels)))
    a2.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    a2.set_ylabel(f"mean accuracy over {len(ev.tasks)} task(s)")
    a2.set_title("Accuracy by removed layer(s)")
    fig.tight_layout()
    return [save_figure(fig, out / "ablate.png")]
