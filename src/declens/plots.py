"""Figures of a layer-wise decision analysis (matplotlib, PNG).

- ``dm.png``: mean Decision Margin per layer with its interquartile band, the zero line, the
  Transition Point and the Silent / Decisive phases shaded;
- ``accuracy.png``: lens accuracy per layer (and ``acc_norm`` for cloze) against chance;
- ``option_frequency.png``: Option Frequency per layer as a heatmap, with KL(OF || gold) beside;
- ``overview.png``: the three in one figure.

Of a prune run (:func:`plot_prune`): ``accuracy_vs_ratio.png``, ``final_dm_vs_ratio.png`` (the paper's
Figure 12) and per method ``pruning_<m>.png``, ``option_dynamics_<m>.png`` (Figures 13-14: KL per layer
at every step, Option Frequency bars of selected steps) and ``option_radar_<m>.png`` (Figures 15-17).
With a CKA result, :func:`plot_accuracy_cka` draws the paper's Figure 2.

The figures of the other commands (``cka``, ``noise``, ``correlate``, ``compare``, ``recover``,
``ablate``) live here too: compute modules never draw. :data:`FIGURES` maps each result kind to its drawer.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from .metrics import LayerMetrics  # noqa: E402

if TYPE_CHECKING:
    from .analyses.cka import CKAResult
    from .analyses.compare import CompareResult
    from .analyses.correlation import CorrelationResult
    from .analyses.noise import NoiseResult
    from .analyses.recovery import RecoveryResult

SILENT = "#d9d9d9"
DECISIVE = "#c7e9c0"
TP_COLOR = "#d62728"


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG (120 dpi, tight box) atomically (temp file + rename), close it, return ``path``."""
    from .results import atomic_write_bytes

    atomic_write_bytes(path, png_bytes(fig, dpi=120))
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


EMB_X = -1.5  # where the embedding read-out sits on a layer axis (left of layer position 0, apart)


def _add_embedding(ax, emb: dict | None, key: str, color: str, marker: str = "D") -> None:
    """Draw the embedding read-out (``emb[key]``) left of the layers, as a separate hollow point labelled ``emb``."""
    if not emb or emb.get(key) is None:
        return
    ax.plot([EMB_X], [emb[key]], ls="none", marker=marker, ms=6, mfc="none", mec=color, mew=1.5,
            label=f"embedding output ({key})")
    ticks, labels = list(ax.get_xticks()), [t.get_text() for t in ax.get_xticklabels()]
    ax.set_xticks([EMB_X] + ticks)
    ax.set_xticklabels(["emb"] + labels)
    ax.set_xlim(EMB_X - 0.7, ax.get_xlim()[1])


def plot_dm(ax, m: LayerMetrics, title: str = "", emb: dict | None = None) -> None:
    """Mean DM per layer with its interquartile band and the phases; ``emb``: the embedding read-out
    (``AnalysisResult.extra["embedding"]``), drawn apart."""
    x = _layer_axis(ax, m)
    shade_phases(ax, m, x)
    ax.fill_between(x, m.dm_q25, m.dm_q75, color="#1f77b4", alpha=0.2, lw=0, label="interquartile range")
    ax.plot(x, m.dm, "-o", color="#1f77b4", ms=3, lw=1.5, label="mean DM")
    _add_embedding(ax, emb, "dm", "#1f77b4")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("Decision Margin")
    ax.set_title(title or "Decision Margin per layer")
    ax.legend(fontsize=7, loc="best")


def plot_accuracy(ax, m: LayerMetrics, title: str = "", emb: dict | None = None) -> None:
    x = _layer_axis(ax, m)
    shade_phases(ax, m, x)
    ax.plot(x, m.acc, "-o", ms=3, color="#2ca02c", label="accuracy")
    _add_embedding(ax, emb, "accuracy", "#2ca02c")
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


def plot_kl(ax, m: LayerMetrics, emb: dict | None = None) -> None:
    x = _layer_axis(ax, m)
    shade_phases(ax, m, x)
    ax.plot(x, m.kl, "-o", ms=3, color="#ff7f0e")
    _add_embedding(ax, emb, "kl", "#ff7f0e")
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

    emb = res.extra.get("embedding")
    fig, ax = plt.subplots(figsize=(8, 4))
    plot_dm(ax, m, f"Decision Margin — {name}", emb)
    save(fig, "dm.png")
    fig, ax = plt.subplots(figsize=(8, 4))
    plot_accuracy(ax, m, f"Accuracy — {name}", emb)
    save(fig, "accuracy.png")
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=False)
    plot_option_frequency(a1, m, res.option_labels)
    plot_kl(a2, m, emb)
    fig.tight_layout()
    save(fig, "option_frequency.png")
    fig, axes = plt.subplots(2, 2, figsize=(14, 8))
    plot_dm(axes[0, 0], m, emb=emb)
    plot_accuracy(axes[0, 1], m, emb=emb)
    plot_option_frequency(axes[1, 0], m, res.option_labels)
    plot_kl(axes[1, 1], m, emb)
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
        ax.plot(ratios, [r.final_accuracy for r in best.values()], "-o", ms=3, color=colors[m], label=m)
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


def dense_axis_width(run) -> int:
    """Columns of a dense-layer-id axis for a prune run: its layer count, or more when pruning started
    from an already-pruned (exported) model whose dense ids go beyond its layer count."""
    return max(run.num_layers, max(run.best_by_k()[0].layer_ids) + 1)


def plot_removal_strip(ax, run) -> None:
    """Which original layers are gone at each ratio (best state), with the dense phases beneath."""
    best = run.best_by_k()
    tp = best[0].transition_layer
    start_ids = list(best[0].layer_ids)  # dense ids of the model pruning started from (an exported model lacks some)
    L = dense_axis_width(run)
    grid = np.zeros((len(best), L))
    grid[:, [i for i in range(L) if i not in set(start_ids)]] = 0.5  # already missing before this run
    for row, (k, r) in enumerate(best.items()):
        grid[row, list(r.removed)] = 1
    ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1.4, origin="upper",
              extent=(-0.5, L - 0.5, len(best) - 0.5, -0.5))
    if tp is not None:
        ax.axvline(tp - 0.5, color=TP_COLOR, ls="--", lw=1.2, label=f"dense Transition Point (layer {tp})")
        ax.axvspan(tp - 0.5, L - 0.5, color=DECISIVE, alpha=0.35, lw=0, label="dense Decisive Phase")
        ax.legend(fontsize=7, loc="lower left")
    ax.set_yticks(range(len(best)))
    ax.set_yticklabels([f"{r.ratio:.0%} · acc {r.final_accuracy:.2f}" for r in best.values()], fontsize=7)
    step = max(1, -(-L // 32))
    ax.set_xticks(range(0, L, step))
    ax.set_xlabel("dense layer id (dark: removed; grey: already absent from the pruned model pruning started from)"
                  if len(start_ids) < L else "original layer id (dark: removed)")
    ax.set_title(f"Removed layers per pruning ratio ({run.method})")


def plot_final_dm_vs_ratio(ax, res) -> None:
    """Final-layer mean Decision Margin of the best state per ratio, one line per method (the paper's
    Figure 12), with the zero line (below it the model no longer decides for the gold option on
    average) and each method's critical ratio dotted."""
    colors = _method_colors(res.runs)
    for m, run in res.runs.items():
        best = run.best_by_k()
        ax.plot([r.ratio for r in best.values()], [r.final_dm for r in best.values()], "-o", ms=3,
                color=colors[m], label=m)
        crit = res.critical.get(m)
        if crit is not None:
            ax.axvline(crit, color=colors[m], ls=":", lw=1)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("pruning ratio (share of layers removed)")
    ax.set_ylabel("final-layer mean Decision Margin")
    ax.set_title("Final Decision Margin against pruning ratio (dotted: critical ratio)")
    ax.legend(fontsize=8)


def option_labels(k: int) -> list[str]:
    """Labels of ``k`` option slots: A, B, C, ..."""
    return [chr(ord("A") + i) if i < 26 else str(i) for i in range(k)]


def select_steps(run, n: int = 4) -> list[int]:
    """Up to ``n`` numbers of removed layers ``k`` of ``run``'s per-ratio states, evenly spaced from the
    dense model to the deepest pruning (both included)."""
    ks = list(run.best_by_k())
    if len(ks) <= n:
        return ks
    idx = np.unique(np.round(np.linspace(0, len(ks) - 1, n)).astype(int))
    return [ks[i] for i in idx]


def kl_grid(run) -> tuple[list[int], np.ndarray]:
    """KL(OF || gold) of every layer of every per-ratio state on the dense layer axis.

    Returns:
        ``ks`` (removed layers of each row) and ``[len(ks), L]`` KL, NaN at removed layers.
    """
    best = run.best_by_k()
    grid = np.full((len(best), dense_axis_width(run)), np.nan)
    for row, r in enumerate(best.values()):
        grid[row, list(r.layer_ids)] = r.kl
    return list(best), grid


def plot_kl_grid(ax, run, title: str = "") -> None:
    """Heatmap of KL(OF || gold): pruning steps (rows, best state per ratio) x dense layers (columns);
    removed layers blank, each state's Transition Point marked."""
    ks, grid = kl_grid(run)
    best = run.best_by_k()
    cmap = plt.get_cmap("magma_r").with_extremes(bad="#f0f0f0")
    finite = grid[np.isfinite(grid)]
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0,
                   vmax=float(finite.max()) if finite.size and finite.max() > 0 else 1.0, interpolation="nearest",
                   extent=(-0.5, grid.shape[1] - 0.5, len(ks) - 0.5, -0.5))
    tps = [(best[k].transition_layer, row) for row, k in enumerate(ks) if best[k].transition_layer is not None]
    if tps:
        ax.plot([t for t, _ in tps], [r for _, r in tps], ls="none", marker="|", ms=9, mew=2, color=TP_COLOR,
                label="Transition Point")
        ax.legend(fontsize=7, loc="lower left")
    ax.set_yticks(range(len(ks)))
    ax.set_yticklabels([f"{best[k].ratio:.0%}" for k in ks], fontsize=7)
    step = max(1, -(-grid.shape[1] // 32))
    ax.set_xticks(range(0, grid.shape[1], step))
    ax.set_xlabel("layer (original id; blank: removed)")
    ax.set_ylabel("pruning ratio")
    ax.set_title(title or f"KL(Option Frequency || gold) per layer at every pruning step ({run.method})")
    plt.colorbar(im, ax=ax, label="KL [nats]", fraction=0.03)


def plot_of_bars(ax, rec, title: str = "") -> None:
    """Option Frequency of every layer of one pruned state as stacked bars (one colour per option),
    with the gold-label distribution as the last bar when the record has it."""
    of = np.asarray(rec.option_frequency)  # [L, K]
    L, K = of.shape
    gold = getattr(rec, "gold_frequency", None)
    cols = of if gold is None else np.vstack([of, np.asarray(gold)[None]])
    x = np.arange(len(cols)) + (np.arange(len(cols)) == L) * 0.6  # a gap before the gold bar
    cmap = plt.get_cmap("tab10")
    bottom = np.zeros(len(cols))
    for k, lab in enumerate(option_labels(K)):
        ax.bar(x, cols[:, k], bottom=bottom, width=0.85, color=cmap(k % 10), label=lab)
        bottom += cols[:, k]
    if rec.transition_layer is not None:
        ax.axvline(rec.layer_ids.index(rec.transition_layer) - 0.5, color=TP_COLOR, ls="--", lw=1.2)
    step = max(1, -(-L // 12))
    ticks = list(range(0, L, step)) + ([L] if gold is not None else [])
    ax.set_xticks([x[t] for t in ticks])
    ax.set_xticklabels([str(rec.layer_ids[t]) if t < L else "gold" for t in ticks], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of items")
    ax.set_title(title or f"{rec.ratio:.0%} removed · acc {rec.final_accuracy:.2f}", fontsize=9)


def plot_option_dynamics(run, path: str | Path, n_steps: int = 6) -> Path:
    """The paper's Figures 13-14 for one method: KL(OF || gold) per layer at every pruning step (top)
    and the Option Frequency per layer of ``n_steps`` selected steps (stacked bars, gold bar last)."""
    ks = select_steps(run, n_steps)
    best = run.best_by_k()
    ncol = 2 if len(ks) > 1 else 1
    nrow = -(-len(ks) // ncol)
    top = max(2.5, 0.22 * len(best) + 1.2)
    fig = plt.figure(figsize=(14, top + 2.6 * nrow))
    gs = fig.add_gridspec(1 + nrow, ncol, height_ratios=[top] + [2.6] * nrow)
    plot_kl_grid(fig.add_subplot(gs[0, :]), run)
    for i, k in enumerate(ks):
        ax = fig.add_subplot(gs[1 + i // ncol, i % ncol])
        r = best[k]
        tp = "none" if r.transition_layer is None else r.transition_layer
        plot_of_bars(ax, r, f"Option Frequency per layer · {r.ratio:.0%} removed · acc {r.final_accuracy:.2f} · TP {tp}")
        if i == 0:
            ax.legend(fontsize=7, ncol=min(8, len(r.option_frequency[0])), loc="upper left", title="option",
                      title_fontsize=7)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def radar_values(rec, layer_id: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Option Frequency ``[K]`` of one layer of a pruned state (sums to 1) and the gold distribution
    ``[K]`` (None when the record does not carry it)."""
    of = np.asarray(rec.option_frequency[rec.layer_ids.index(layer_id)], dtype=float)
    gold = getattr(rec, "gold_frequency", None)
    return of, None if gold is None else np.asarray(gold, dtype=float)


def radar_layers(rec, n: int = 4) -> list[int]:
    """``n`` dense ids evenly spread over a state's own layers (its first and last included)."""
    ids = rec.layer_ids
    idx = np.unique(np.round(np.linspace(0, len(ids) - 1, min(n, len(ids)))).astype(int))
    return [ids[i] for i in idx]


def plot_radar(ax, of: np.ndarray, gold: np.ndarray | None, labels: Sequence[str], title: str = "",
               rmax: float | None = None) -> None:
    """One radar (a polar axis): the share of items predicting each option, against the gold frequency
    (``rmax``: the radius, shared by a grid of radars; default from the values)."""
    K = len(of)
    ang = np.linspace(0, 2 * np.pi, K, endpoint=False)
    close = lambda v: np.append(v, v[0])  # noqa: E731
    ax.plot(close(ang), close(of), "-", color="#1f77b4", lw=1.5, label="Option Frequency")
    ax.fill(close(ang), close(of), color="#1f77b4", alpha=0.25)
    top = float(of.max())
    if gold is not None:
        ax.plot(close(ang), close(gold), "--", color="k", lw=1, label="gold")
        top = max(top, float(gold.max()))
    ax.set_xticks(ang)
    ax.set_xticklabels(list(labels), fontsize=7)
    r = rmax if rmax is not None else min(1.0, max(0.3, 1.1 * top))
    ax.set_ylim(0, r)
    ax.set_yticks([r / 3, 2 * r / 3, r])
    ax.set_yticklabels([f"{v:.2f}" for v in (r / 3, 2 * r / 3, r)])
    ax.tick_params(axis="y", labelsize=5)
    ax.set_title(title, fontsize=8, pad=8)


def plot_option_radars(run, path: str | Path, n_steps: int = 4, n_layers: int = 4) -> Path:
    """The paper's Figures 15-17 for one method: a grid of radars, one row per selected pruning step,
    one column per selected layer (spread over that state's own layers), Option Frequency against gold."""
    ks = select_steps(run, n_steps)
    best = run.best_by_k()
    ncol = max(len(radar_layers(best[k], n_layers)) for k in ks)
    top = max(max(float(np.max(v)) for v in radar_values(best[k], lid) if v is not None)
              for k in ks for lid in radar_layers(best[k], n_layers))
    rmax = min(1.0, max(0.3, 1.1 * top))  # one radius for the whole grid, so shapes compare
    fig, axes = plt.subplots(len(ks), ncol, figsize=(2.6 * ncol, 2.6 * len(ks) + 0.6), subplot_kw={"projection": "polar"},
                             squeeze=False)
    for row, k in enumerate(ks):
        r = best[k]
        lids = radar_layers(r, n_layers)
        for col in range(ncol):
            ax = axes[row, col]
            if col >= len(lids):
                ax.set_visible(False)
                continue
            of, gold = radar_values(r, lids[col])
            plot_radar(ax, of, gold, option_labels(len(of)),
                       f"{r.ratio:.0%} removed · layer {lids[col]}" + (" (TP)" if lids[col] == r.transition_layer else ""),
                       rmax=rmax)
    axes[0, 0].legend(fontsize=7, loc="upper right", bbox_to_anchor=(0.0, 1.25))
    fig.suptitle(f"Option Frequency radars ({run.method}): rows = pruning ratio, columns = layers spread over "
                 "each pruned model", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def plot_prune(res, out_dir: str | Path) -> list[Path]:
    """Figures of a prune run: accuracy and final DM vs ratio (all methods), and per method the DM
    curves across ratios with the removal strips, the per-step Option Frequency / KL figure and the
    Option Frequency radars."""
    out = Path(out_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    plot_accuracy_vs_ratio(ax, res)
    paths.append(save_figure(fig, out / "accuracy_vs_ratio.png"))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    plot_final_dm_vs_ratio(ax, res)
    paths.append(save_figure(fig, out / "final_dm_vs_ratio.png"))
    for m, run in res.runs.items():
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(15, max(4.5, 0.22 * len(run.best_by_k()) + 1.5)))
        plot_dm_across_ratios(a1, run)
        plot_removal_strip(a2, run)
        fig.tight_layout()
        paths.append(save_figure(fig, out / f"pruning_{m}.png"))
        paths.append(plot_option_dynamics(run, out / f"option_dynamics_{m}.png"))
        paths.append(plot_option_radars(run, out / f"option_radar_{m}.png"))
    return paths


def plot_accuracy_cka(prune_res, cka_res, path: str | Path, method: str | None = None) -> Path:
    """The paper's Figure 2: accuracy against pruning ratio (top, every method of ``prune_res``, the
    CKA model's ratio marked) and the CKA of that pruned model with the dense model (bottom: token-
    averaged hidden states and decision-token states)."""
    removed = sorted(cka_res.config.get("remove") or [])
    ratio = len(removed) / int(cka_res.config.get("num_layers") or len(cka_res.dense_ids))
    fig = plt.figure(figsize=(13, 9.5))
    gs = fig.add_gridspec(2, 2, height_ratios=[1, 1.25])
    top = fig.add_subplot(gs[0, :])
    plot_accuracy_vs_ratio(top, prune_res)
    top.axvline(ratio, color="k", lw=1.5, alpha=0.6, label=f"CKA model ({ratio:.0%} removed)")
    top.legend(fontsize=8)
    top.set_title("Accuracy against pruning ratio" + (f" ({method} state compared below)" if method else ""))
    plot_cka_heatmap(fig.add_subplot(gs[1, 0]), cka_res, "hidden", f"CKA, token-averaged hidden states ({ratio:.0%} removed)")
    plot_cka_heatmap(fig.add_subplot(gs[1, 1]), cka_res, "decision", f"CKA, decision-token states ({ratio:.0%} removed)")
    cfg = prune_res.config
    fig.suptitle(f"{Path(str(cfg.get('model'))).name} · {cfg.get('task')} · {cfg.get('format')}", fontsize=12)
    fig.tight_layout()
    return save_figure(fig, Path(path))


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


# ------------------------------------------------------------------------------------------------
# CKA (``declens cka``)


def _ticks(ids: Sequence[int], max_ticks: int = 16) -> tuple[np.ndarray, list[str]]:
    from .lens import layer_label

    step = max(1, -(-len(ids) // max_ticks))
    pos = np.arange(len(ids))[::step]
    return pos, [layer_label(ids[p]) for p in pos]


def plot_cka_heatmap(ax, res: CKAResult, signal: str, title: str = "") -> None:
    """Heatmap of one CKA matrix: pruned layers (rows, dense ids) x dense layers (columns), with each
    pruned layer's own dense layer and its best match marked."""
    m = res.matrix(signal)
    im = ax.imshow(m, aspect="auto", cmap="magma", vmin=0, vmax=1, origin="lower", interpolation="nearest")
    own = [res.dense_ids.index(i) for i in res.pruned_ids]
    rows = np.arange(len(res.pruned_ids))
    ax.plot(own, rows, ls="none", marker="s", ms=5, mfc="none", mec="#4daf4a", mew=1.2, label="own dense layer")
    ax.plot(np.argmax(m, axis=1), rows, ls="none", marker="x", ms=5, color="#377eb8", mew=1.5, label="best match")
    xp, xl = _ticks(res.dense_ids)
    yp, yl = _ticks(res.pruned_ids)
    ax.set_xticks(xp)
    ax.set_xticklabels(xl)
    ax.set_yticks(yp)
    ax.set_yticklabels(yl)
    ax.set_xlabel("dense model layer (original id)")
    ax.set_ylabel("pruned model layer (original id)")
    ax.set_title(title or f"CKA of {signal} representations")
    ax.legend(fontsize=7, loc="upper left", framealpha=0.8)
    plt.colorbar(im, ax=ax, label="linear CKA", fraction=0.046)


def plot_best_match(ax, res: CKAResult, title: str = "") -> None:
    """For each pruned layer position, its best-matching dense layer for both signals, against the
    identity diagonal (the kept layer's own dense id)."""
    from .lens import EMBEDDING_ID, layer_label

    x = np.arange(len(res.pruned_ids))
    ax.plot(x, res.pruned_ids, ls="--", color="#888888", lw=1.2, label="identity (own dense layer)")
    ax.plot(x, res.best_hidden, "-o", color="#ff7f0e", ms=4, lw=1.5, label="hidden (token average)")
    ax.plot(x, res.best_decision, "-s", color="#1f77b4", ms=4, lw=1.5, label="decision token")
    xp, _ = _ticks(res.pruned_ids)
    ax.set_xticks(xp)
    ax.set_xticklabels([f"{p}\n({layer_label(res.pruned_ids[p])})" for p in xp], fontsize=7)
    ax.set_xlabel("pruned model layer position (original id)")
    ax.set_ylabel("best-matching dense layer (-1: embedding output)" if EMBEDDING_ID in res.dense_ids
                  else "best-matching dense layer")
    ax.set_ylim(min(res.dense_ids) - 0.5, max(res.dense_ids) + 0.5)
    ax.set_title(title or "Best-matching dense layer per pruned layer")
    ax.legend(fontsize=8, loc="upper left")


def plot_cka(res: CKAResult, out_dir: Path | str) -> list[Path]:
    """Draw ``cka_hidden.png``, ``cka_decision.png`` and ``cka_best_match.png`` into ``out_dir``, and
    ``accuracy_cka.png`` (the paper's Figure 2) when the result is linked to its prune run."""
    out = Path(out_dir)
    cfg = res.config
    removed = cfg.get("remove") or []
    name = (f"{Path(str(cfg.get('model'))).name} · {cfg.get('task')} · {cfg.get('format')} · "
            f"{cfg.get('n_samples')} rows · removed {sorted(removed) if removed else 'none'}")
    paths = []
    size = (max(6.0, 0.22 * len(res.dense_ids) + 3), max(4.5, 0.2 * len(res.pruned_ids) + 2))
    for signal, label in (("hidden", "token-averaged hidden states"), ("decision", "decision-token states")):
        fig, ax = plt.subplots(figsize=size)
        plot_cka_heatmap(ax, res, signal, f"CKA of {label}\n{name}")
        paths.append(save_figure(fig, out / f"cka_{signal}.png"))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(res.pruned_ids) + 3), 4.5))
    plot_best_match(ax, res, f"Best-matching dense layer\n{name}")
    paths.append(save_figure(fig, out / "cka_best_match.png"))
    if res.prune is not None:
        paths.append(plot_accuracy_cka(res.prune, res, out / "accuracy_cka.png",
                                       method=res.extra.get("prune_run", {}).get("method")))
    return paths

# ------------------------------------------------------------------------------------------------
# Noise injection (``declens noise``)


def _tp_x(res: NoiseResult) -> float | None:
    """x position of the dense Transition Point on an axis over the perturbed layers: the boundary
    before the first perturbed layer at or after it."""
    tp = res.dense["transition_layer"]
    if tp is None:
        return None
    before = [i for i, lid in enumerate(res.layer_ids) if lid < tp]
    return (before[-1] + 0.5) if before else -0.5


def plot_noise_heatmap(ax, res: NoiseResult, title: str = "") -> None:
    """Final DM per perturbed layer (x) and noise scale (y), diverging around 0, with the dense
    phases under the map and the Transition Point marked."""
    P, S = res.dm.shape
    lim = float(np.nanmax(np.abs(res.dm))) or 1.0
    im = ax.imshow(res.dm.T, aspect="auto", origin="lower", cmap="RdBu", norm=TwoSlopeNorm(0.0, -lim, lim),
                   extent=(-0.5, P - 0.5, -0.5, S - 0.5), interpolation="nearest")
    if P * S <= 160:
        for i in range(P):
            for j in range(S):
                v = res.dm[i, j]
                ax.text(i, j, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 * lim else "black")
    for i, lid in enumerate(res.layer_ids):  # phase strip below the map
        ax.add_patch(plt.Rectangle((i - 0.5, -0.5 - 0.06 * S), 1, 0.06 * S, clip_on=False, lw=0,
                                   color=DECISIVE if res.phase_of(lid) == "decisive" else SILENT))
    tp = _tp_x(res)
    if tp is not None:
        ax.axvline(tp, color=TP_COLOR, ls="--", lw=1.5, label=f"Transition Point (layer {res.dense['transition_layer']})")
        ax.legend(fontsize=7, loc="upper right")
    step = max(1, -(-P // 16))
    ax.set_xticks(range(0, P, step))
    ax.set_xticklabels([str(res.layer_ids[i]) for i in range(0, P, step)])
    ax.set_yticks(range(S))
    ax.set_yticklabels([f"{a:g}" for a in res.scales])
    ax.set_ylim(-0.5 - 0.06 * S, S - 0.5)
    ax.set_xlabel("noised layer (original id; strip: grey Silent, green Decisive Phase)")
    ax.set_ylabel("noise scale a (x sigma_l)")
    ax.set_title(title or "Final Decision Margin with noise at one layer")
    plt.colorbar(im, ax=ax, label="final-layer mean DM", fraction=0.046)


def plot_noise_phases(ax, res: NoiseResult, title: str = "") -> None:
    """Mean final DM against noise scale, one line per phase (band: range over the phase's layers)."""
    x = np.arange(len(res.scales))
    colors = {"silent": "#7f7f7f", "decisive": "#2ca02c"}
    for ph in ("silent", "decisive"):
        rows = [i for i, lid in enumerate(res.layer_ids) if res.phase_of(lid) == ph]
        if not rows:
            continue
        d = res.dm[rows]
        ax.fill_between(x, d.min(axis=0), d.max(axis=0), color=colors[ph], alpha=0.15, lw=0)
        ax.plot(x, d.mean(axis=0), "-o", ms=4, color=colors[ph],
                label=f"{ph.capitalize()} Phase ({len(rows)} layer{'s' if len(rows) > 1 else ''})")
    ax.axhline(res.dense["final_dm"], color="#1f77b4", ls="--", lw=1, label=f"clean final DM ({res.dense['final_dm']:+.2f})")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{a:g}" for a in res.scales])
    ax.set_xlabel("noise scale a (x sigma_l)")
    ax.set_ylabel("final-layer mean DM")
    ax.set_title(title or "Noise sensitivity by phase (band: min-max over layers)")
    ax.legend(fontsize=8)


def plot_noise(res: NoiseResult, out_dir: Path | str) -> list[Path]:
    """Draw ``noise_heatmap.png`` and ``noise_phases.png`` into ``out_dir``."""
    out = Path(out_dir)
    cfg = res.config
    tp = res.dense["transition_layer"]
    name = (f"{Path(str(cfg.get('model'))).name} · {cfg.get('task')} · {cfg.get('format')} · "
            f"transition point {'none' if tp is None else tp}")
    paths = []
    P = len(res.layer_ids)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.32 * P + 3), max(3.5, 0.45 * len(res.scales) + 1.8)))
    plot_noise_heatmap(ax, res, f"Final Decision Margin, noise at one layer\n{name}")
    paths.append(save_figure(fig, out / "noise_heatmap.png"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_noise_phases(ax, res, f"Noise sensitivity by phase\n{name}")
    paths.append(save_figure(fig, out / "noise_phases.png"))
    return paths

# ------------------------------------------------------------------------------------------------
# TP against critical ratio (``declens correlate``)


def _stat_text(s: dict) -> str:
    if s.get("r") is None:
        return f"r undefined ({s.get('undefined', 'n/a')}), n = {s['n']}"
    return f"r = {s['r']:+.3f}, p = {s['p']:.3g}, n = {s['n']}"


def _scatter(ax, x: Sequence[float], y: Sequence[float], labels: Sequence[str], stat: dict, fit: bool = True) -> None:
    ax.scatter(x, y, s=36, color="#1f77b4", zorder=3)
    for xi, yi, lab in zip(x, y, labels):
        ax.annotate(lab, (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if fit and stat.get("r") is not None:
        slope, icept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
        xs = np.linspace(min(x), max(x), 50)
        ax.plot(xs, slope * xs + icept, "--", color="#d62728", lw=1.2, label=f"least-squares fit (slope {slope:+.3g})")
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)


def plot_correlation(axes, res: "CorrelationResult") -> None:
    """Two panels: critical ratio against TP layer index, and against TP fraction of depth."""
    labels = res.labels()
    cr = [p.critical_ratio for p in res.pairs]
    a1, a2 = axes
    _scatter(a1, [p.transition_layer for p in res.pairs], cr, labels, res.stats["layer"])
    a1.set_xlabel("Transition Point (layer index)")
    a1.set_ylabel(f"critical pruning ratio ({res.method})")
    a1.set_title(f"TP layer vs critical ratio\n{_stat_text(res.stats['layer'])}", fontsize=10)
    _scatter(a2, [p.transition_fraction for p in res.pairs], cr, labels, res.stats["fraction"])
    a2.set_xlabel("Transition Point (fraction of depth)")
    a2.set_ylabel(f"critical pruning ratio ({res.method})")
    a2.set_title(f"TP fraction vs critical ratio\n{_stat_text(res.stats['fraction'])}", fontsize=10)


def plot_safe_margin(ax, res: "CorrelationResult") -> None:
    """Predicted safe pruning margin (Decisive Phase fraction) against the measured critical ratio."""
    x = [p.decisive_fraction for p in res.pairs]
    y = [p.critical_ratio for p in res.pairs]
    _scatter(ax, x, y, res.labels(), res.stats["safe_margin"], fit=False)
    hi = max(x + y) * 1.1 or 1.0
    ax.plot([0, hi], [0, hi], ":", color="k", lw=1, label="identity (prediction = measurement)")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="upper left")
    s = res.stats["safe_margin"]
    ax.set_xlabel("safe pruning margin estimate (Decisive Phase share of depth)")
    ax.set_ylabel(f"measured critical pruning ratio ({res.method})")
    ax.set_title(f"Safe pruning margin vs critical ratio\nMAE {s['mae']:.3f}, bias {s['bias']:+.3f}; "
                 f"{_stat_text(s)}", fontsize=10)


def correlation_figures(res: "CorrelationResult") -> dict[str, bytes]:
    """Render ``correlate.png`` and ``safe_margin.png`` to PNG bytes."""
    out = {}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    plot_correlation(axes, res)
    fig.suptitle(f"Transition Point vs critical pruning ratio ({res.method}), {len(res.pairs)} model-task pairs",
                 fontsize=11)
    fig.tight_layout()
    out["correlate.png"] = png_bytes(fig)
    fig, ax = plt.subplots(figsize=(6.5, 6.5))
    plot_safe_margin(ax, res)
    fig.tight_layout()
    out["safe_margin.png"] = png_bytes(fig)
    return out

# ------------------------------------------------------------------------------------------------
# Table 5 (``declens compare``)


def plot_compare(res: CompareResult, out_dir: str | Path) -> list[Path]:
    """``table5.png``: average accuracy against the pruning ratio per method (dense as a dashed line),
    then one panel per task."""
    from .analyses.compare import FIGURE, TABLE_COLUMNS
    tasks = res.tasks
    n = 1 + len(tasks)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    cmap = plt.get_cmap("tab10")
    panels = [("average", "avg")] + [(TABLE_COLUMNS.get(t, t), t) for t in tasks]
    table = res.rows()
    for ax, (title, col) in zip(axes.flat, panels):
        ax.axhline(table[0][col], color="0.4", ls="--", lw=1, label="dense")
        for i, m in enumerate(res.config["methods"]):
            pts = [(r["ratio"], r[col]) for r in table[1:] if r["method"] == m and r[col] is not None]
            if pts:
                ax.plot([100 * x for x, _ in pts], [y for _, y in pts], "-o", ms=4, color=cmap(i % 10), label=m)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("pruning ratio (%)")
        ax.set_ylabel("accuracy (%)")
    axes.flat[0].legend(fontsize=7)
    ft = res.config["finetune"]
    fig.suptitle(f"{Path(str(res.config.get('model'))).name}: accuracy after {ft['method']} fine-tuning "
                 f"({res.config['format']}, {res.config['limit'] or 'all'} rows per task)", fontsize=10)
    fig.tight_layout()
    return [save_figure(fig, Path(out_dir) / FIGURE)]

# ------------------------------------------------------------------------------------------------
# Recovery by fine-tuning (``declens recover``)


def plot_recovery(res: RecoveryResult, out_dir: str | Path) -> list[Path]:
    """``recover_dm.png`` (per configuration: DM per layer before vs after, dense for reference) and
    ``recover_loss.png`` (training loss per step of every configuration)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    n = max(1, len(res.runs))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, res.runs):
        if res.dense:
            ax.plot(res.dense["layer_ids"], res.dense["dm"], "-", color="0.6", lw=1.2, label="dense")
        lb, la = r.layers_before, r.layers_after
        ax.plot(lb["layer_ids"], lb["dm"], "-o", ms=2.5, color="#d62728", lw=1.3, label="pruned, before")
        ax.plot(la["layer_ids"], la["dm"], "-o", ms=2.5, color="#1f77b4", lw=1.3, label="pruned, after fine-tuning")
        for x in r.removed:
            ax.axvline(x, color="0.85", lw=2, zorder=0)
        if r.tp_before is not None:
            ax.axvline(r.tp_before, color="#d62728", ls=":", lw=1, label=f"TP before ({r.tp_before})")
        if r.tp_after is not None:
            ax.axvline(r.tp_after, color=TP_COLOR, ls="--", lw=1, label=f"TP after ({r.tp_after})")
        ax.axhline(0, color="k", lw=0.8)
        state = "restored" if r.restored else ("TP kept" if r.tp_before is not None else "not restored")
        ax.set_title(f"{r.k} removed ({r.ratio:.1%}): {state}", fontsize=9)
        ax.set_xlabel("layer (dense id; grey bars: removed)")
        ax.set_ylabel("mean Decision Margin")
        ax.legend(fontsize=6, loc="best")
    cfg = res.config
    fig.suptitle(f"{Path(str(cfg.get('model'))).name} · {cfg.get('task')} · {cfg.get('format')} · "
                 f"{cfg['finetune']['method']} fine-tuning on {cfg['train']['task']} ({cfg['train']['sequences']} rows)",
                 fontsize=10)
    fig.tight_layout()
    paths.append(save_figure(fig, out / "recover_dm.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(res.runs):
        losses = r.train.get("losses") or []
        ax.plot(range(1, len(losses) + 1), losses, "-", lw=1.2, color=cmap(i / max(1, n - 1)),
                label=f"{r.k} removed ({r.ratio:.1%})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token loss")
    ax.set_title("Fine-tuning loss")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "recover_loss.png"))
    return paths


# ------------------------------------------------------------------------------------------------
# The drawers by result kind


#: The figure drawer of each result kind: ``draw(result, out_dir, *extra) -> [paths written]``, except
#: ``correlate`` (``draw(result) -> {file name: PNG bytes}``, embedded by the report too). The package
#: installs this table in :mod:`declens.results` (:func:`~declens.results.set_figure_drawers`), so the
#: compute modules ask for their figures by kind and never import this module.
FIGURES = {
    "analysis": plot_analysis,
    "prune": plot_prune,
    "ablate": plot_ablation,
    "cka": plot_cka,
    "noise": plot_noise,
    "compare": plot_compare,
    "recover": plot_recovery,
    "correlate": correlation_figures,
}
