"""Transition Point vs critical pruning ratio across model-task pairs (paper Section 4.2.2).

Run folders are built by the library's own result classes (``AnalysisResult`` from constructed
scores, ``PruneResult`` from constructed records, saved with their ``save``), so every Transition
Point and critical ratio is known exactly; one test runs the real pipeline on a tiny model to check
that real files are read the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr

from conftest import CHANCE, make_analysis, make_prune, make_tiny
from declens.analyses.correlation import correlate, dense_decisions, gather
from declens.errors import DeclensError
from declens.results import find_runs

# (model, layers, Transition Point, layers removed at collapse)
CASES = [("m-a", 8, 3, 4), ("m-b", 10, 6, 2), ("m-c", 12, 5, 5), ("m-d", 16, 12, 3), ("m-e", 20, 9, 9)]


@pytest.fixture()
def five(tmp_path) -> list[Path]:
    """Five model/task pairs: three with an analysis + a prune folder, two with a prune folder only."""
    dirs = []
    for i, (m, L, tp, kc) in enumerate(CASES):
        if i < 3:
            dirs.append(make_analysis(tmp_path / f"a-{m}", m, "arc_easy", L, tp))
        dirs.append(make_prune(tmp_path / f"p-{m}", m, "arc_easy", L, tp, kc, max_k=min(L - 1, kc + 1)))
    return dirs


def test_correlation_matches_scipy_on_the_same_numbers(five, tmp_path):
    res = correlate(five, method="ip")
    assert [p.model for p in res.pairs] == [c[0] for c in CASES] and not res.incomplete
    tl = [tp for _, _, tp, _ in CASES]
    tf = [tp / L for _, L, tp, _ in CASES]
    cr = [kc / L for _, L, _, kc in CASES]
    df = [(L - tp) / L for _, L, tp, _ in CASES]
    assert [p.transition_layer for p in res.pairs] == tl
    assert [p.critical_ratio for p in res.pairs] == pytest.approx(cr)
    assert [p.tp_kind for p in res.pairs] == ["analysis"] * 3 + ["prune"] * 2
    for name, x in (("layer", tl), ("fraction", tf), ("safe_margin", df)):
        ref = pearsonr(x, cr)
        assert res.stats[name]["r"] == pytest.approx(ref.statistic, abs=1e-12), name
        assert res.stats[name]["p"] == pytest.approx(ref.pvalue, abs=1e-12), name
        assert res.stats[name]["n"] == 5
    errs = np.array(df) - np.array(cr)
    assert res.stats["safe_margin"]["mae"] == pytest.approx(np.abs(errs).mean())
    assert res.stats["safe_margin"]["bias"] == pytest.approx(errs.mean())

    out = res.save(tmp_path / "corr")
    d = json.loads((out / "correlate.json").read_text())
    assert d["kind"] == "correlate" and d["method"] == "ip" and d["num_pairs"] == 5
    assert d["provenance"]["versions"]["scipy"] and d["provenance"]["versions"]["declens"]
    assert len(d["provenance"]["inputs"]) == 8
    assert d["stats"]["layer"]["r"] == pytest.approx(pearsonr(tl, cr).statistic)
    lines = (out / "correlate.csv").read_text().splitlines()
    assert lines[0].startswith("model,task,format,num_layers,transition_layer") and len(lines) == 6
    import matplotlib.image as mpimg

    for png in ("correlate.png", "safe_margin.png"):
        img = mpimg.imread(out / png)
        assert img.shape[0] > 300 and img.shape[1] > 300 and img[..., :3].std() > 0.01  # a drawn figure
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic writes leave no temp files


def test_perfectly_linear_pairs_give_unit_r(tmp_path):
    # every model has 20 layers and collapses exactly when the Decisive Phase is gone:
    # critical ratio = 1 - TP / 20, a linear function of TP
    dirs = [make_prune(tmp_path / f"p{tp}", f"lin-{tp}", "piqa", 20, tp, 20 - tp, max_k=20 - tp) for tp in (8, 11, 13, 16)]
    res = correlate(dirs)
    assert res.stats["layer"]["r"] == pytest.approx(-1.0, abs=1e-12)
    assert res.stats["fraction"]["r"] == pytest.approx(-1.0, abs=1e-12)
    assert res.stats["safe_margin"]["r"] == pytest.approx(1.0, abs=1e-12)
    assert res.stats["safe_margin"]["mae"] == pytest.approx(0.0, abs=1e-12)


def test_fewer_than_three_pairs_is_a_clear_error(tmp_path):
    dirs = [make_prune(tmp_path / "p1", "m1", "arc_easy", 10, 4, 3, max_k=4),
            make_prune(tmp_path / "p2", "m2", "arc_easy", 10, 6, 2, max_k=3),
            make_prune(tmp_path / "p3", "m3", "arc_easy", 10, 5, None, max_k=2),      # never collapses
            make_analysis(tmp_path / "a4", "m4", "arc_easy", 10, None),                # never decides, no prune
            make_prune(tmp_path / "p5", "m5", "arc_easy", 10, 5, 3, max_k=4, methods=("last",)),
            make_prune(tmp_path / "p6", "m6", "arc_easy", 10, 5, None, max_k=2, dense_acc=CHANCE)]  # at chance
    with pytest.raises(DeclensError) as ei:
        correlate(dirs, method="ip")
    msg = str(ei.value)
    assert "at least 3" in msg and "found 2 (m1 · arc_easy · cloze, m2 · arc_easy · cloze)" in msg
    assert "m3 · arc_easy · cloze: critical ratio (ip) not reached within --max-ratio 0.2" in msg
    assert "m4 · arc_easy · cloze: the dense model never decides" in msg and "no prune result with method 'ip'" in msg
    assert "m5 · arc_easy · cloze: no prune result with method 'ip' (methods found: last)" in msg
    assert "m6 · arc_easy · cloze: the dense model is not above chance" in msg


def test_a_model_not_significantly_above_chance_is_left_out(tmp_path):
    """5 of 8 two-option rows right (0.625) is not above chance at 5% (one-sided binomial p = 0.36): no pair; the
    same pair counts when the test is switched off (--chance-alpha 1), and 7 of 8 (p = 0.035) counts either way."""
    from declens.analyses.correlation import above_chance_p

    assert above_chance_p(0.625, 0.5, 8) == pytest.approx(93 / 256) and above_chance_p(0.875, 0.5, 8) == pytest.approx(9 / 256)
    good = [make_prune(tmp_path / f"p{i}", f"m{i}", "piqa", 10, tp, kc, max_k=kc + 1, dense_acc=0.875)
            for i, (tp, kc) in enumerate(((3, 5), (6, 3), (8, 2)))]
    weak = make_prune(tmp_path / "weak", "m-weak", "piqa", 10, 5, 4, max_k=5, dense_acc=0.625)
    res = correlate([*good, weak])
    assert [p.model for p in res.pairs] == ["m0", "m1", "m2"] and res.config["chance_alpha"] == 0.05
    (left,) = res.incomplete
    assert left["model"] == "m-weak" and "not significantly above chance" in left["missing"]
    assert "0.625 on 8 rows" in left["missing"] and "p = 0.36" in left["missing"]
    assert [p.model for p in correlate([*good, weak], chance_alpha=1).pairs] == ["m-weak", "m0", "m1", "m2"]
    with pytest.raises(DeclensError, match="chance_alpha"):
        correlate(good, chance_alpha=0)


def test_undefined_r_is_reported_not_nan(tmp_path):
    dirs = [make_prune(tmp_path / f"p{i}", f"m{i}", "piqa", 10, tp, 3, max_k=4) for i, tp in enumerate((2, 5, 7))]
    res = correlate(dirs)  # every critical ratio is 0.3
    assert res.stats["layer"]["r"] is None and res.stats["layer"]["p"] is None
    assert "all y values are equal" in res.stats["layer"]["undefined"]
    assert any("undefined" in n for n in res.notes)
    d = res.to_dict()
    json.dumps(d, allow_nan=False)  # strict JSON


def test_sources_duplicates_and_unusable_results(tmp_path):
    # the analysis wins over the prune dense record; of two analyses the one on more rows wins;
    # an analysis of a pruned view is never a TP source
    small = make_analysis(tmp_path / "a-small", "m1", "arc_easy", 10, 4, rows=4)
    big = make_analysis(tmp_path / "a-big", "m1", "arc_easy", 10, 5, rows=16)
    pruned_view = make_analysis(tmp_path / "a-view", "m2", "arc_easy", 10, 2, remove=[8])
    p1 = make_prune(tmp_path / "p1", "m1", "arc_easy", 10, 6, 3, max_k=4)
    p2 = make_prune(tmp_path / "p2", "m2", "arc_easy", 10, 7, 2, max_k=3)
    g = gather([small, big, pruned_view, p1, p2, big])  # a folder given twice counts once
    assert len(g.files) == 5
    d1 = g.decisions[("m1", "arc_easy", "cloze")]
    assert d1.kind == "analysis" and d1.source == big / "result.json" and d1.transition_layer == 5
    assert d1.decisive_fraction == pytest.approx(0.5) and d1.silent_phase == [0, 4] and d1.decisive_phase == [5, 9]
    notes = " ".join(g.notes[("m1", "arc_easy", "cloze")])
    assert "duplicate analysis result" in notes and "a-small" in notes and "puts the dense Transition Point at layer 6" in notes
    d2 = g.decisions[("m2", "arc_easy", "cloze")]
    assert d2.kind == "prune" and d2.transition_layer == 7
    assert "pruned view" in g.unusable[("m2", "arc_easy", "cloze")][0]


def test_missing_or_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DeclensError, match="does not exist"):
        correlate([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.json").write_text('{"hello": 1}')
    with pytest.raises(DeclensError, match="holds no declens results"):
        correlate([tmp_path / "empty"])
    with pytest.raises(DeclensError, match="no run folders"):
        correlate([])


def test_real_result_files_are_read_like_the_objects(tmp_path):
    """The real analyze and prune code on a tiny model: the files give the TPs the objects hold."""
    from declens.analyses.decision import analyze
    from declens.pruning.run import PruneConfig, prune
    from declens.tasks import load_task

    lm = make_tiny("llama", layers=4)
    data = load_task("piqa", limit=6, seed=0)
    a = analyze(lm, data, "cloze", out_dir=tmp_path / "a", progress=False, plots=False)
    p = prune(lm, data, "cloze", PruneConfig(["ip", "last"], max_ratio=0.5, calib_samples=4), out_dir=tmp_path / "p",
              progress=False, plots=False)
    (da,) = dense_decisions(find_runs(tmp_path / "a")[0])
    (dp,) = dense_decisions(find_runs(tmp_path / "p")[0])
    assert da.transition_layer == a.metrics.transition_layer == dp.transition_layer
    assert dp.transition_layer == p.runs["ip"].best_by_k()[0].transition_layer
    assert da.decisive_fraction == pytest.approx(a.summary["decisive_fraction"]) == pytest.approx(dp.decisive_fraction)
    assert da.num_layers == dp.num_layers == 4 and da.final_accuracy == pytest.approx(dp.final_accuracy)
    g = gather([tmp_path / "a", tmp_path / "p"])
    key = (lm.spec, "piqa", "cloze")
    assert set(g.ratios[key]) == {"ip", "last"} and g.ratios[key]["ip"].critical_ratio == p.critical["ip"]
    with pytest.raises(DeclensError, match="found 0"):
        correlate([tmp_path / "a", tmp_path / "p"])
