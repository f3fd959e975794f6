"""The pruning engine, Block Influence, Iterative Pruning with SKIP-Prun, baselines, resume and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny
from declens.analyses.decision import AnalyzeConfig, analyze, encoder_for, prepare
from declens.errors import DeclensError, LayerSpecError
from declens.metrics import compute_metrics
from declens.pruning import PruneConfig, PruningEngine, SkipPrun, export_pruned, prune
from declens.pruning.engine import Evaluation, calibration_sequences
from declens.pruning.methods import Memo, critical_ratio, run_ip
from declens.pruning.run import PruneResult, max_removed_for
from declens.tasks import load_task


def _engine(lm, fmt="letter", n=12, calib=6, reuse=True):
    data = load_task("arc_easy", limit=n, seed=0)
    calib_rows = calibration_sequences(lm, prepare(lm, load_task("arc_easy", split="train", limit=calib), fmt))
    return PruningEngine(lm, prepare(lm, data, fmt), calib_rows, reuse=reuse, progress=False), data


@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_prefix_reuse_equals_full_recompute_and_analyze(tiny, fmt):
    eng, data = _engine(tiny, fmt)
    plain, _ = _engine(tiny, fmt, reuse=False)
    for removed in ([2], [3, 1], [0], [3]):
        a = eng.evaluate(removed)
        b = plain.evaluate(removed)
        c = analyze(tiny, data, fmt, AnalyzeConfig(remove=removed), progress=False)
        assert a.layer_ids == b.layer_ids == c.scores.layer_ids
        np.testing.assert_allclose(a.scores.scores, b.scores.scores, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(a.scores.scores, c.scores.scores, rtol=1e-5, atol=1e-4)
        for lid in a.layer_ids:
            assert a.bi[lid] == pytest.approx(b.bi[lid], abs=1e-5)
    assert eng.work_saved() > 0.1 and plain.work_saved() == 0.0


def test_sleb_reuses_the_current_states_prefix_with_identical_choices():
    """SLEB's candidates start from the current pruned state's prefix (``PruningEngine.hold``): the
    same removed layers and perplexities as full recomputation, with less layer work, recorded."""
    lm = make_tiny("llama", layers=8)
    data = load_task("arc_easy", limit=6)
    held, full = (prune(lm, data, "letter", PruneConfig(["sleb"], max_ratio=0.5, calib_samples=6, reuse=r), progress=False,
                         plots=False)
                  for r in (True, False))
    a, b = held.runs["sleb"].records, full.runs["sleb"].records
    assert [r.removed for r in a] == [r.removed for r in b] and len(a) == 5
    for ra, rb in zip(a[1:], b[1:]):
        assert ra.candidates.keys() == rb.candidates.keys()
        np.testing.assert_allclose(list(ra.candidates.values()), list(rb.candidates.values()), rtol=1e-5)
        assert ra.final_accuracy == rb.final_accuracy
    wh, wf = held.work["methods"]["sleb"], full.work["methods"]["sleb"]
    assert wf["share_saved"] == 0.0 and wf["layer_tokens_run"] == wf["layer_tokens_full"] == wh["layer_tokens_full"]
    assert held.work["share_saved"] == wh["share_saved"] > 0.3

    # a state that removed an early layer: its candidates after it reuse its prefix, not just the dense one
    engs = {name: _engine(lm, n=6, calib=6, reuse=name != "full")[0] for name in ("held", "dense", "full")}
    engs["held"].hold([1])
    nll = {name: [e.evaluate([1, l], scores=False, bi=False, nll=True).nll for l in (0, 2, 3, 4, 5, 6, 7)]
           for name, e in engs.items()}
    np.testing.assert_allclose(nll["held"], nll["full"], rtol=1e-5)
    np.testing.assert_allclose(nll["dense"], nll["full"], rtol=1e-5)
    run = {name: e.work["run"] for name, e in engs.items()}
    assert run["held"] < run["dense"] < run["full"]


def test_block_influence_of_an_identity_layer_is_zero():
    lm = make_tiny("llama", layers=4)
    layer = lm.parts.layers[1]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    eng, _ = _engine(lm)
    bi = eng.run_dense().bi
    assert bi[1] == pytest.approx(0.0, abs=1e-6)
    assert all(bi[i] > 1e-4 for i in (0, 2, 3))


def test_bi_is_recomputed_on_the_pruned_model(tmp_path):
    lm = make_tiny("qwen2", layers=4)
    eng, _ = _engine(lm)
    dense_bi = eng.run_dense().bi
    pruned_bi = eng.evaluate([0]).bi
    assert set(pruned_bi) == {1, 2, 3}
    assert abs(pruned_bi[2] - dense_bi[2]) > 1e-4  # the input of layer 2 changed
    # reference: a model rebuilt without layer 0 (exported, reloaded) measured from scratch
    export_pruned(make_tiny("qwen2", layers=4), [0], tmp_path / "m")
    from declens.models import LoadedModel

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ref_lm = LoadedModel(model=back, tokenizer=lm.tokenizer, spec="rebuilt")
    ref, _ = _engine(ref_lm)
    ref_bi = ref.run_dense().bi
    assert sorted(ref_bi) == [1, 2, 3]  # dense ids kept by the exported model
    for lid in (1, 2, 3):
        assert pruned_bi[lid] == pytest.approx(ref_bi[lid], abs=1e-5)


def test_ip_is_deterministic_and_records_every_step():
    lm = make_tiny("llama", layers=6)
    data = load_task("arc_easy", limit=10)
    a = prune(lm, data, "letter", PruneConfig(["ip"], max_ratio=0.5, calib_samples=6), progress=False)
    b = prune(lm, data, "letter", PruneConfig(["ip"], max_ratio=0.5, calib_samples=6), progress=False)
    ra, rb = a.runs["ip"], b.runs["ip"]
    assert [r.to_dict() for r in ra.records] == [r.to_dict() for r in rb.records]
    assert [len(r.removed) for r in ra.records] == [0, 1, 2, 3]
    for prev, rec in zip(ra.records, ra.records[1:]):
        # the removed layer is the lowest-BI layer of the previous (already pruned) model
        assert rec.layer == min(prev.bi, key=lambda l: (prev.bi[l], l))
        assert rec.removed == prev.removed + [rec.layer]
        assert set(rec.bi) == set(rec.layer_ids) and rec.layer not in rec.layer_ids
    table = ra.table()
    assert [row["removed_count"] for row in table] == [1, 2, 3] and table[-1]["ratio"] == 0.5


def test_every_baseline_runs_and_is_consistent():
    lm = make_tiny("gemma3", layers=6)
    data = load_task("piqa", limit=8)
    res = prune(lm, data, "letter", PruneConfig(["shortgpt", "last", "random", "angular", "sleb", "phase"], max_ratio=0.34,
                                            calib_samples=4), progress=False)
    last = res.runs["last"].table()
    assert [r["removed"] for r in last] == [[4], [4, 3]]
    sg = res.runs["shortgpt"]
    dense_bi = sg.records[0].bi
    assert sg.table()[1]["removed"] == sorted(dense_bi, key=lambda l: (dense_bi[l], l))[:2]
    for row in res.runs["angular"].table():  # contiguous blocks
        ids = sorted(row["removed"])
        assert ids == list(range(ids[0], ids[0] + len(ids)))
    sleb = res.runs["sleb"].records[1]
    assert sleb.layer == min(sleb.candidates, key=lambda l: (sleb.candidates[l], l))
    assert res.runs["random"].table()[1]["removed"] == [int(i) for i in np.random.default_rng(0).permutation(6)[:2]]


class ScriptedEngine:
    """An evaluator with designed accuracies, to check SKIP-Prun's control flow exactly.

    Accuracy of a state = 0.8 - 0.02 * k, except states containing layer 7, which collapse to 0.25.
    Block Influence always ranks layer 7 lowest, then 6, 5, ...
    """

    def __init__(self, L=8, n=100):
        self.num_layers = L
        self.dense_ids = list(range(L))
        self.n = n
        self.calls = 0

    def evaluate(self, removed, scores=True, bi=True, nll=False):
        self.calls += 1
        kept = [l for l in self.dense_ids if l not in removed]
        acc = 0.25 if 7 in removed else 0.8 - 0.02 * len(removed)
        correct = int(round(acc * self.n))
        s = np.zeros((len(kept), self.n, 4))
        gold = np.zeros(self.n, dtype=int)
        s[:, :correct, 0] = 1.0  # right answers
        s[:, correct:, 1] = 1.0  # wrong answers
        m = compute_metrics(s, gold, kept, np.full(self.n, 4))
        return Evaluation(removed=list(removed), layer_ids=kept, scores=None, metrics=m,
                          bi={l: 0.01 * (10 - l) if l != 7 else 0.0 for l in kept})


def test_skip_prun_restarts_from_best_state_and_skips_the_collapsing_choice():
    eng = ScriptedEngine()
    plain = run_ip(Memo(eng), 4)
    assert [r.removed for r in plain.records[1:]] == [[7], [7, 6], [7, 6, 5], [7, 6, 5, 4]]
    assert plain.best_by_k()[1].final_accuracy == 0.25

    eng = ScriptedEngine()
    run = run_ip(Memo(eng), 4, SkipPrun(enabled=True, drop=0.1, restart="parent_ratio"))
    first = run.records[1]
    assert first.removed == [7] and first.collapsed and not first.accepted
    accepted = [r.removed for r in run.records if r.accepted]
    assert accepted == [[], [6], [6, 5], [6, 5, 4], [6, 5, 4, 3]]  # layer 7 skipped after the collapse
    best = run.best_by_k()
    assert best[1].removed == [6] and best[1].final_accuracy == pytest.approx(0.78)
    assert all(7 not in r["removed"] for r in run.table())


def test_skip_prun_accepts_best_collapse_when_every_choice_collapses():
    class AllCollapse(ScriptedEngine):
        def evaluate(self, removed, **kw):
            ev = super().evaluate(removed, **kw)
            if removed:
                ev = super().evaluate([7] + [l for l in removed if l != 7], **kw)
                ev.removed = list(removed)
            return ev

    run = run_ip(Memo(AllCollapse()), 2, SkipPrun(enabled=True, drop=0.1, max_skips=2))
    collapsed = [r for r in run.records if r.collapsed]
    assert len(collapsed) >= 2
    assert any("accepted after all alternatives collapsed" in r.note for r in run.records)
    assert max(run.best_by_k()) == 2


def test_critical_ratio():
    eng = ScriptedEngine()
    run = run_ip(Memo(eng), 3)
    assert critical_ratio(run, keep=0.25) == pytest.approx(1 / 8)  # 0.25 is chance
    run = run_ip(Memo(ScriptedEngine()), 3, SkipPrun(enabled=True))
    assert critical_ratio(run) is None


def test_killed_prune_resumes_to_identical_result(tmp_path, monkeypatch):
    lm = make_tiny("mistral", layers=6)
    data = load_task("arc_challenge", limit=10)
    cfg = PruneConfig(["ip", "last"], max_ratio=0.5, calib_samples=6)
    kw = dict(progress=False, plots=False)
    full = prune(lm, data, "letter", cfg, **kw)

    real = PruningEngine.evaluate
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)

    monkeypatch.setattr(PruningEngine, "evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        prune(lm, data, "letter", cfg, out_dir=tmp_path, **kw)
    assert (tmp_path / ".prune-state.json").exists() and not (tmp_path / "prune.json").exists()
    monkeypatch.setattr(PruningEngine, "evaluate", real)
    resumed = prune(lm, data, "letter", cfg, out_dir=tmp_path, **kw)
    assert resumed.work["resumed_evaluations"] >= 3
    for m in ("ip", "last"):
        assert [r.to_dict() for r in resumed.runs[m].records] == [r.to_dict() for r in full.runs[m].records]
    back = PruneResult.load(tmp_path)
    assert back.runs["ip"].table() == full.runs["ip"].table()
    d = json.loads((tmp_path / "prune.json").read_text())
    assert d["config"]["max_removed"] == 3 and d["provenance"]["model"]["fingerprint"] == lm.fingerprint()
    assert (tmp_path / "table.csv").read_text().startswith("method,remain,removed_count,pruning_ratio")


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_ratio_outside_open_interval(ratio):
    with pytest.raises(DeclensError, match="strictly between 0 and 1"):
        max_removed_for(ratio, 32)


def test_ratio_too_small_and_unknown_method():
    with pytest.raises(DeclensError, match="removes no layer"):
        max_removed_for(0.01, 32)
    assert max_removed_for(0.5, 32) == 16 and max_removed_for(0.5, 36) == 18
    with pytest.raises(DeclensError, match="unknown pruning method"):
        PruneConfig(["magic"])


def test_engine_rejects_invalid_removals():
    eng, _ = _engine(make_tiny("phi3"))
    with pytest.raises(LayerSpecError, match="removing all 4 layers"):
        eng.evaluate([0, 1, 2, 3])
    with pytest.raises(LayerSpecError, match="more than once"):
        eng.evaluate([1, 1])
    with pytest.raises(LayerSpecError, match="out of range"):
        eng.evaluate([7])


def test_export_reproduces_the_pruned_view(tiny, tmp_path):
    from declens.surgery import keep_positions, layer_view

    ids = torch.tensor([encoder_for(tiny).prompt("Question: Which is a mammal?\nAnswer: A")])
    with torch.inference_mode(), layer_view(tiny.parts, keep_positions(tiny.parts, [2, 1])):
        ref = tiny.model(ids).logits
    info = export_pruned(tiny, [2, 1], tmp_path / "out")
    assert info["max_abs_logit_diff"] < 1e-4 and info["kept"] == 2
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    cfg = back.config
    assert cfg.num_hidden_layers == 2 and cfg.declens_removed_layers == [2, 1]
    if getattr(cfg, "layer_types", None) is not None:
        assert len(cfg.layer_types) == 2
    with torch.inference_mode():
        torch.testing.assert_close(back(ids).logits, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(DeclensError, match="not empty"):
        export_pruned(make_tiny("llama"), [1], tmp_path / "out")


def test_analyze_on_exported_model_reports_dense_ids(tmp_path):
    lm = make_tiny("qwen3", layers=5)
    export_pruned(lm, [1, 3], tmp_path / "m")
    from declens.models import load_model

    back = load_model(str(tmp_path / "m"), dtype="float32", device="cpu")
    res = analyze(back, load_task("piqa", limit=4), "letter", progress=False)
    assert res.metrics.layer_ids == [0, 2, 4]
    with pytest.raises(LayerSpecError, match="already removed"):
        analyze(back, load_task("piqa", limit=4), "letter", AnalyzeConfig(remove=[1]), progress=False)
    res2 = analyze(back, load_task("piqa", limit=4), "letter", AnalyzeConfig(remove=[2]), progress=False)
    assert res2.metrics.layer_ids == [0, 4]


def test_calibration_rows_inside_the_evaluation_rows_share_its_pass():
    lm = make_tiny("qwen3", layers=5)
    data = load_task("arc_challenge", limit=12, seed=0)
    req = prepare(lm, data, "letter")
    calib = [req.prompts[i] for i in (0, 3, 5, 8)]
    shared = PruningEngine(lm, req, calib, progress=False)
    assert shared.calib_in_eval is not None and int(shared.calib_in_eval.sum()) == 4
    separate = PruningEngine(lm, req, calib, progress=False)
    separate.calib_in_eval = None
    for removed in ([], [3], [4, 1]):
        a, b = shared.evaluate(removed), separate.evaluate(removed)
        assert a.bi.keys() == b.bi.keys()
        for lid in a.bi:
            assert a.bi[lid] == pytest.approx(b.bi[lid], abs=1e-5)
        np.testing.assert_allclose(a.scores.scores, b.scores.scores, rtol=1e-5, atol=1e-5)
    assert shared.work["run"] < separate.work["run"]  # the calibration rows never ran on their own
    nll = shared.evaluate([2], scores=False, bi=False, nll=True).nll
    assert nll == pytest.approx(separate.evaluate([2], scores=False, bi=False, nll=True).nll, rel=1e-5)


def test_methods_are_a_registry_known_to_prune_the_checks_and_the_cli_help():
    import re

    from typer.testing import CliRunner

    from declens.checks import check_methods
    from declens.cli import app
    from declens.pruning import METHODS, register_method
    from declens.pruning.methods import run_order

    assert list(METHODS) == ["ip", "shortgpt", "sleb", "angular", "last", "random", "phase", "replay", "laco", "mka"]
    with pytest.raises(DeclensError, match="already registered"):
        register_method("ip", METHODS["ip"].run, "again")
    with pytest.raises(DeclensError, match="lower-case"):
        register_method("My,Method", METHODS["ip"].run, "a name --method cannot take")
    helptext = " ".join(re.sub("[│╭╮╰╯─]", " ", CliRunner().invoke(app, ["prune", "--help"]).output).split())
    assert ", ".join(METHODS) in helptext
    lm = make_tiny("llama", layers=6)
    data = load_task("piqa", limit=6)
    register_method("first", lambda memo, k, opts: run_order(memo, "first", list(memo.engine.dense_ids[1:]), k),
                    "the shallowest layers after the first")
    try:
        check_methods(["first", "last"], None)
        res = prune(lm, data, "letter", PruneConfig(["first", "last"], max_ratio=0.5, calib_samples=4), progress=False,
                    plots=False)
    finally:
        del METHODS["first"]
    assert [r.removed for r in res.runs["first"].records] == [[], [1], [1, 2], [1, 2, 3]]
    assert [r.removed for r in res.runs["last"].records] == [[], [4], [4, 3], [4, 3, 2]]
    assert res.runs["first"].records[0].final_accuracy == res.runs["last"].records[0].final_accuracy  # one dense state
    with pytest.raises(DeclensError, match="unknown pruning method"):
        check_methods(["first"], None)
