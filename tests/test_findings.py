"""Findings: each criterion on scores built to meet it or to miss it (the criteria's own logic)."""

import numpy as np
import pytest

from declens.analyses.findings import (FAILS, HOLDS, UNTESTABLE, FindingsConfig, Findings, claim_option_dynamics,
                                       claim_sharp_transition, interval, rise_width)
from declens.results import AnalysisResult
from declens.scoring import LayerScores


def analysis_with(dm_profile, n=400, k=4, seed=0, collapse_until=None):
    """An analysis whose per-layer option scores give, per layer, a gold lead of ``dm_profile[l]`` on average
    (noisy per item); before ``collapse_until`` every item's best rival is option 0 (OF collapsed)."""
    rng = np.random.default_rng(seed)
    L = len(dm_profile)
    gold = rng.integers(0, k, n)
    gold[gold == 0] = 1  # option 0 is never gold, so a collapse onto it is wrong everywhere
    scores = rng.normal(0, 0.1, (L, n, k)).astype(np.float32)
    for l, d in enumerate(dm_profile):
        lead = d + rng.normal(0, 0.3, n)
        scores[l, np.arange(n), gold] = lead
        if collapse_until is not None and l < collapse_until:
            scores[l, :, 0] = np.maximum(lead, 0) + 1.0  # option 0 leads every item
    s = LayerScores(layer_ids=list(range(L)), scores=scores, gold=gold, n_options=np.full(n, k), kind="logit")
    return AnalysisResult.from_scores(s, {"model": "synthetic"}, {}, [str(i) for i in range(n)], list("ABCD"))


CFG = FindingsConfig(bootstrap=200)


def test_sharp_transition_holds_for_a_step_and_not_for_a_ramp():
    step = [-1.0] * 12 + [2.0] * 8
    f = claim_sharp_transition(analysis_with(step), CFG)
    assert f.verdict == HOLDS and f.numbers["transition_layer"] == 12 and f.numbers["rise_width_layers"] == 1
    assert f.ci["transition_layer"] == [12.0, 12.0] and f.support == 1.0
    ramp = list(np.linspace(-1.0, 2.0, 20))  # crosses zero at layer 7, reaches half its top only at layer 13
    g = claim_sharp_transition(analysis_with(ramp), CFG)
    assert g.verdict == FAILS and g.numbers["rise_width_layers"] > g.numbers["width_limit"]


def test_no_transition_point_cannot_be_tested():
    f = claim_sharp_transition(analysis_with([-1.0] * 10), CFG)
    assert f.verdict == UNTESTABLE and "no Transition Point" in f.note


def test_option_collapse_then_diversification():
    dm = [-1.0] * 10 + [3.0] * 6
    collapsed = claim_option_dynamics(analysis_with(dm, collapse_until=6), CFG)
    assert collapsed.numbers["silent_max_top_share"] == pytest.approx(1.0)
    assert collapsed.verdict == HOLDS, collapsed.numbers
    flat = claim_option_dynamics(analysis_with(dm), CFG)  # no layer puts 80% on one option
    assert flat.verdict == FAILS and flat.numbers["silent_max_top_share"] < 0.8


def test_rise_width_and_interval_helpers():
    assert rise_width(np.array([-1, -1, 0.1, 0.2, 2.0]), CFG) == 3  # from layer 1 to layer 4 (>= 1.0)
    assert rise_width(np.array([-1.0, -0.5]), CFG) is None
    assert interval([1, 2, 3, None, float("nan")]) == [pytest.approx(1.05), pytest.approx(2.95)]


def test_findings_markdown_lists_every_claim():
    fs = Findings({}, [claim_sharp_transition(analysis_with([-1.0] * 5 + [1.0] * 5), CFG),
                       claim_option_dynamics(analysis_with([-1.0] * 10), CFG)])
    fs.findings[0].source = "study_a:arc_easy_cloze"
    md = fs.markdown()
    assert md.count("### Claim") == 2 and "**holds**" in md and UNTESTABLE in md
    # which study and task each verdict comes from is in the table and the heading
    assert "| study_a:arc_easy_cloze |" in md and "### Claim 1 (study_a:arc_easy_cloze)" in md
    assert "| all studies |" in md


def test_phase_aware_compares_methods_only_on_the_same_task(tmp_path):
    """Phase-aware pruning on one task is never compared with a baseline run on another task."""
    from conftest import make_prune

    from declens.analyses.findings import idea_phase_aware
    from declens.pruning.run import PruneResult

    # phase-aware keeps accuracy on task A; the baseline collapses on task B: different rows, no comparison
    a = PruneResult.load(make_prune(tmp_path / "a", "m", "arc_easy", 8, 4, None, 3, methods=("ip", "phase")))
    b = PruneResult.load(make_prune(tmp_path / "b", "m", "piqa", 8, 4, 1, 3, methods=("shortgpt",)))
    f = idea_phase_aware([a, b], CFG)
    assert set(f.numbers) == {"ip"} and f.numbers["ip"]["ratios"] == 3
    # the same baseline on task A's rows is compared
    c = PruneResult.load(make_prune(tmp_path / "c", "m", "arc_easy", 8, 4, 1, 3, methods=("shortgpt",)))
    f = idea_phase_aware([a, b, c], CFG)
    assert set(f.numbers) == {"ip", "shortgpt"} and f.numbers["shortgpt"]["mean_difference"] > 0


def _table5(avg: dict, complete: bool = True):
    from declens.analyses.findings import claim_table5

    return claim_table5(avg, FindingsConfig(), complete)


def test_table5_claim_needs_every_named_baseline_and_a_strict_lead():
    full = {0.125: {"ip": 0.50, "shortgpt": 0.45, "sleb": 0.44, "mka": 0.40},
            0.25: {"ip": 0.41, "shortgpt": 0.40, "sleb": 0.39, "mka": 0.38}}
    assert _table5(full).verdict == HOLDS
    lost = {**full, 0.25: {**full[0.25], "sleb": 0.42}}
    f = _table5(lost)
    assert f.verdict == FAILS and f.numbers["ip_beaten_by"] == {0.125: [], 0.25: ["sleb"]}
    assert _table5({0.125: {**full[0.125], "mka": 0.50}}).verdict == FAILS  # a tie is no win
    # MKA never compared: IP leading the others proves nothing about the claim
    no_mka = {r: {k: v for k, v in m.items() if k != "mka"} for r, m in full.items()}
    f = _table5(no_mka)
    assert f.verdict == UNTESTABLE and "mka at 0.125" in f.note and f.numbers["missing"] == {0.125: ["mka"], 0.25: ["mka"]}
    # a stopped comparison: losing still fails it (the finished cells already show it), leading does not prove it
    f = _table5(lost, complete=False)
    assert f.verdict == FAILS and "partial" in f.note
    assert _table5(full, complete=False).verdict == UNTESTABLE
    assert _table5({0.3: {"ip": 0.4}}).verdict == UNTESTABLE  # nothing to compare IP with


def test_compare_averages_reads_the_finished_cells_of_a_stopped_run(tmp_path):
    import json

    from declens.analyses.compare import compare_averages
    from declens.errors import DeclensError

    cells = tmp_path / "cmp" / "cells"
    cells.mkdir(parents=True)
    with pytest.raises(DeclensError, match="no finished comparison cell"):
        compare_averages(tmp_path / "cmp")
    rows = {"dense": {"method": "dense", "k": 0, "average": 0.43},
            "ip_k3": {"method": "ip", "ratio": 0.125, "k": 3, "status": "done", "average": 0.45},
            "sleb_k3": {"method": "sleb", "ratio": 0.125, "k": 3, "status": "done", "average": 0.47},
            "sleb_k9": {"method": "sleb", "ratio": 0.3, "k": 9, "status": "unreached", "average": None}}
    for name, c in rows.items():
        (cells / f"{name}.json").write_text(json.dumps(c))
    (cells / "mka_k3.json").write_text('{"method": "mka", "rat')  # cut off while being written
    assert compare_averages(tmp_path / "cmp") == ({0.125: {"ip": 0.45, "sleb": 0.47}}, False)


def test_compare_averages_never_pools_cells_of_two_stopped_comparisons(tmp_path):
    import json

    from declens.analyses.compare import compare_averages
    from declens.errors import DeclensError

    cells = tmp_path / "cmp" / "cells"
    cells.mkdir(parents=True)
    cell = {"ratio": 0.125, "k": 3, "status": "done"}
    (cells / "ip_k3.json").write_text(json.dumps({**cell, "method": "ip", "average": 0.45, "run": "aaa"}))
    (cells / "sleb_k3.json").write_text(json.dumps({**cell, "method": "sleb", "average": 0.47, "run": "aaa"}))
    assert compare_averages(tmp_path / "cmp") == ({0.125: {"ip": 0.45, "sleb": 0.47}}, False)
    # a stopped run with other settings (say, other rows) left a cell beside them
    (cells / "shortgpt_k3.json").write_text(json.dumps({**cell, "method": "shortgpt", "average": 0.50, "run": "bbb"}))
    with pytest.raises(DeclensError, match="2 different comparisons"):
        compare_averages(tmp_path / "cmp")


def _correlation(points):
    """A CorrelationResult over (model, TP of 28 layers, critical ratio) points."""
    from declens.analyses.correlation import CorrelationResult, Pair

    pairs = [Pair(m, "arc_easy", "letter", 28, tp, tp / 28, 1 - tp / 28, cr, 0.6, 0.25, "a", "analysis", "p")
             for m, tp, cr in points]
    return CorrelationResult(config={}, provenance={}, method="ip", pairs=pairs).compute()


def test_claim_9_needs_a_negative_r_that_no_single_pair_carries():
    from declens.analyses.findings import FindingsConfig, claim_correlation

    cfg = FindingsConfig()
    trend = _correlation([("a", 10, 0.50), ("b", 14, 0.42), ("c", 18, 0.33), ("d", 22, 0.25), ("e", 25, 0.20)])
    f = claim_correlation(trend, cfg)
    assert f.verdict == "holds" and f.numbers["pearson_r"] < -0.99 and f.numbers["pairs"] == 5
    assert all(v < -0.99 for v in f.numbers["r_leaving_out"].values())
    # declens' SmolLM2/Qwen case: one pair deciding at layer 0 carries r; without it the rest rise together
    carried = _correlation([("smol", 0, 0.50), ("q-boolq", 24, 0.29), ("q-arcc", 23, 0.21), ("q-arce", 22, 0.19),
                            ("q-mmlu", 23, 0.22)])
    f = claim_correlation(carried, cfg)
    assert f.numbers["pearson_r"] < 0 and f.numbers["p_value"] < 0.05  # the point estimate alone would pass
    assert f.verdict == "does not hold" and f.numbers["r_leaving_out"]["smol · arc_easy"] > 0
    assert "leaving out smol · arc_easy" in f.note


def test_claim_9_resamples_each_pairs_transition_point_over_its_rows(tmp_path):
    """The Transition Points come from analyses of sampled rows: r gets a bootstrap interval, and a trend that
    holds only for the TPs these rows happened to give (DM near zero over many layers) is not supported."""
    from declens.analyses.correlation import CorrelationResult, Pair
    from declens.analyses.findings import claim_correlation

    def pairs_from(profiles, ratios, n, tag):
        out = []
        for i, (dm, cr) in enumerate(zip(profiles, ratios)):
            a = analysis_with(dm, n=n, seed=i)
            folder = a.save(tmp_path / f"{tag}{i}")
            tp = a.metrics.transition_layer
            assert tp is not None
            out.append(Pair(f"{tag}{i}", "arc_easy", "letter", 28, tp, tp / 28, 1 - tp / 28, cr, 0.6, 0.25,
                            str(folder / "result.json"), "analysis", "p"))
        return CorrelationResult(config={}, provenance={}, method="ip", pairs=out).compute()

    cfg = FindingsConfig(bootstrap=200)
    tps, ratios = [10, 14, 18, 22, 25], [0.50, 0.42, 0.33, 0.25, 0.20]
    sharp = pairs_from([[-1.0] * t + [2.0] * (28 - t) for t in tps], ratios, 200, "sharp")
    f = claim_correlation(sharp, cfg)
    assert f.verdict == HOLDS and f.support == 1.0 and f.ci["pearson_r"][1] < -0.99, (f.numbers, f.ci)
    from declens.analyses.findings import idea_safe_margin

    m = idea_safe_margin(sharp, cfg)  # the Decisive Phase's share, from the same resampled TPs
    assert m.verdict == HOLDS and m.support == 1.0 and m.ci["pearson_r"][0] > 0.99, (m.numbers, m.ci)
    # DM within +-0.03 of zero over layers 2-25: the rows put the TP anywhere there, so no trend is supported
    flat = pairs_from([[-1.0] * 2 + [-0.03] * (t - 2) + [0.03] * (26 - t) + [2.0] * 2 for t in tps], ratios, 40, "flat")
    g = claim_correlation(flat, cfg)
    assert g.support is not None and g.support < 0.5 and g.verdict == FAILS, (g.numbers, g.support)
    assert g.ci["pearson_r"][1] - g.ci["pearson_r"][0] > 0.5
    assert idea_safe_margin(flat, cfg).support < 0.5
    # without the analyses (moved away) the TPs are held fixed and the note says so
    import shutil

    shutil.rmtree(tmp_path / "sharp0")
    h = claim_correlation(sharp, cfg)
    assert "held fixed" in h.note and "sharp0" in h.note and h.support == 1.0
