"""The paper's remaining figures (2, 12-17) drawn from real result objects of tiny models."""

from __future__ import annotations

import numpy as np
import pytest

from declens.tasks import load_task


@pytest.fixture(scope="module")
def pruned():
    """A real prune run (two methods, up to 60% of a 5-layer tiny model) and its dense model."""
    from conftest import make_tiny

    from declens.pruning import PruneConfig, prune

    lm = make_tiny("llama", layers=5)
    data = load_task("arc_easy", limit=8, seed=0)
    res = prune(lm, data, "letter", PruneConfig(["ip", "last"], max_ratio=0.6, calib_samples=4), progress=False,
                plots=False)
    return lm, data, res


def test_prune_reaches_sixty_percent(pruned):
    _, _, res = pruned
    assert res.config["max_ratio"] == 0.6 and res.config["max_removed"] == 3
    for run in res.runs.values():
        assert max(run.best_by_k()) == 3 and run.best_by_k()[3].ratio == pytest.approx(0.6)


def test_final_dm_vs_ratio_has_one_line_per_method(pruned):
    from declens.plots import plot_final_dm_vs_ratio, plt

    _, _, res = pruned
    fig, ax = plt.subplots()
    plot_final_dm_vs_ratio(ax, res)
    lines = {l.get_label(): l for l in ax.get_lines()}
    assert set(res.runs) <= set(lines)
    for m, run in res.runs.items():
        best = run.best_by_k()
        np.testing.assert_allclose(lines[m].get_xdata(), [r.ratio for r in best.values()])
        np.testing.assert_allclose(lines[m].get_ydata(), [r.final_dm for r in best.values()])
    assert "Decision Margin" in ax.get_ylabel() and "ratio" in ax.get_xlabel()
    plt.close(fig)


def test_kl_grid_and_option_frequency_bars(pruned):
    from declens.plots import kl_grid, plot_of_bars, plt

    _, _, res = pruned
    run = res.runs["ip"]
    ks, grid = kl_grid(run)
    best = run.best_by_k()
    assert ks == list(best) and grid.shape == (len(best), run.num_layers)
    for row, k in enumerate(ks):
        r = best[k]
        assert np.isnan(grid[row, r.removed]).all()  # removed layers blank
        np.testing.assert_allclose(grid[row, r.layer_ids], r.kl)
    r = best[ks[-1]]
    assert r.gold_frequency is not None and sum(r.gold_frequency) == pytest.approx(1.0)
    fig, ax = plt.subplots()
    plot_of_bars(ax, r)
    K = len(r.option_frequency[0])
    assert len(ax.containers) == K  # one stacked bar series per option
    heights = np.array([[b.get_height() for b in c] for c in ax.containers])  # [K, layers + gold]
    assert heights.shape == (K, len(r.layer_ids) + 1)
    np.testing.assert_allclose(heights.sum(axis=0), 1.0)  # every layer's bar (and the gold bar) sums to 1
    plt.close(fig)


def test_radar_values_sum_to_one_and_grid_shape(pruned):
    from declens.plots import plot_option_radars, radar_layers, radar_values, select_steps

    _, _, res = pruned
    run = res.runs["last"]
    ks = select_steps(run, 3)
    assert ks[0] == 0 and ks[-1] == max(run.best_by_k()) and len(ks) == 3
    for k in ks:
        r = run.best_by_k()[k]
        for lid in radar_layers(r, 4):
            of, gold = radar_values(r, lid)
            assert of.sum() == pytest.approx(1.0) and gold.sum() == pytest.approx(1.0)
            assert (of >= 0).all()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        fig_path = plot_option_radars(run, Path(d) / "r.png", n_steps=3, n_layers=3)
        assert fig_path.stat().st_size > 1000


def test_plot_prune_writes_every_figure(pruned, tmp_path):
    from PIL import Image

    from declens.plots import plot_prune

    _, _, res = pruned
    paths = plot_prune(res, tmp_path)
    names = {p.name for p in paths}
    assert {"accuracy_vs_ratio.png", "final_dm_vs_ratio.png"} <= names
    for m in res.runs:
        assert {f"pruning_{m}.png", f"option_dynamics_{m}.png", f"option_radar_{m}.png"} <= names
    for p in paths:
        with Image.open(p) as im:
            assert im.size[0] > 300 and im.size[1] > 200


def test_accuracy_cka_composite(pruned, tmp_path):
    """Figure 2: the 60% state of a prune run compared by CKA, drawn under the accuracy curve."""
    from PIL import Image

    from declens.analyses.cka import CKAConfig, cka_study
    from declens.plots import plot_accuracy_cka

    lm, data, res = pruned
    removed = res.runs["ip"].best_by_k()[3].removed
    cka = cka_study(lm, data, removed, config=CKAConfig(n_samples=None), progress=False)
    path = plot_accuracy_cka(res, cka, tmp_path / "accuracy_cka.png", method="ip")
    with Image.open(path) as im:
        assert im.size[0] > 800 and im.size[1] > 600


def test_cli_prune_to_sixty_percent_then_cka_from_the_prune_run(model_dir, tmp_path):
    """``declens prune --max-ratio 0.6`` is accepted and draws Figure 12-17 files; ``declens cka --prune-run``
    compares its 50% state and draws Figure 2 into the CKA folder (listed in its manifest)."""
    import json

    from typer.testing import CliRunner

    from declens.cli import app

    runner = CliRunner()
    p = tmp_path / "p"
    r = runner.invoke(app, ["prune", "--model", str(model_dir), "--task", "arc_easy", "--limit", "6", "--calib-samples", "4",
                            "--method", "ip,last", "--max-ratio", "0.6", "--dtype", "float32", "--out", str(p)])
    assert r.exit_code == 0, r.output
    d = json.loads((p / "prune.json").read_text())
    assert d["config"]["max_removed"] == 2  # 60% of 4 layers
    for f in ("final_dm_vs_ratio.png", "option_dynamics_ip.png", "option_radar_last.png"):
        assert (p / f).stat().st_size > 1000
    c = tmp_path / "c"
    r = runner.invoke(app, ["cka", "--model", str(model_dir), "--task", "arc_easy", "--limit", "6", "--dtype", "float32",
                            "--prune-run", str(p), "--prune-method", "ip", "--ratio", "0.5", "--out", str(c)])
    assert r.exit_code == 0, r.output
    cka = json.loads((c / "cka.json").read_text())
    ip = [x for x in d["methods"]["ip"]["table"] if x["removed_count"] == 2][0]
    assert sorted(cka["config"]["remove"]) == sorted(ip["removed"])
    assert cka["prune_run"]["method"] == "ip"
    assert (c / "accuracy_cka.png").stat().st_size > 1000
    manifest = (c / "manifest.json")
    if manifest.exists():
        assert "accuracy_cka.png" in {e["path"] for e in json.loads(manifest.read_text())["files"]}
    r = runner.invoke(app, ["cka", "--model", str(model_dir), "--task", "arc_easy", "--limit", "6",
                            "--prune-run", str(p), "--prune-method", "sleb", "--out", str(tmp_path / "c2")])
    assert r.exit_code == 2 and "--prune-method" in r.output
