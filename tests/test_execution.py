"""Execution options (issue 9): explicit, typed, reaching the runner, and recorded in every result."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_tiny
from typer.testing import CliRunner

from declens import fastpath
from declens.analyses.decision import analyze, encoder_for, prepare
from declens.cli import app
from declens.errors import DeclensError
from declens.execution import ExecutionOptions
from declens.runner import BATCH_COST_DIVISOR, plan_batches, run_batches
from declens.scoring import Resume, ScoreState, ScoringPlan, score_letter
from declens.tasks import load_task


def test_options_are_validated_and_round_trip():
    o = ExecutionOptions(fastpath="compile", batch_cost=256, checkpoint_every=5.0, fused_lse="off")
    assert ExecutionOptions.from_dict(o.to_dict()) == o
    for bad in ({"fastpath": "on"}, {"fastpath": "fast"}, {"fused_lse": "yes"}, {"batch_cost": 0},
                {"batch_cost": 2.5}, {"checkpoint_every": -1.0}):
        with pytest.raises(DeclensError):
            ExecutionOptions(**bad)
    with pytest.raises(DeclensError, match="unknown execution option"):
        ExecutionOptions.from_dict({"fast_path": "off"})


def test_environment_is_a_deprecated_fallback_and_explicit_options_win(monkeypatch):
    monkeypatch.setenv("DECLENS_FASTPATH", "on")  # the old spelling of auto
    monkeypatch.setenv("DECLENS_BATCH_COST", "512")
    monkeypatch.delenv("DECLENS_CHECKPOINT_EVERY", raising=False)
    monkeypatch.delenv("DECLENS_FUSED_LSE", raising=False)
    with pytest.warns(DeprecationWarning, match="DECLENS_BATCH_COST"):
        o = ExecutionOptions.from_environment(fastpath="off")
    assert o == ExecutionOptions(fastpath="off", batch_cost=512)
    monkeypatch.setenv("DECLENS_BATCH_COST", "lots")
    with pytest.raises(DeclensError, match="DECLENS_BATCH_COST"):
        ExecutionOptions.from_environment()


def test_fastpath_option_reaches_the_runner_and_is_recorded():
    """``off`` and ``auto`` give the same numbers (within rounding), the lean loop runs only under ``auto``,
    and each result's provenance records the options it ran with."""
    lm = make_tiny("qwen3", layers=3)
    data = load_task("arc_easy", limit=6, seed=2)
    calls = []
    real = fastpath.run

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    results = {}
    for mode in ("off", "auto"):
        lm.options = ExecutionOptions(fastpath=mode)
        calls.clear()
        fastpath.run = counting
        try:
            results[mode] = analyze(lm, data, "cloze", progress=False, plots=False)
        finally:
            fastpath.run = real
        assert bool(calls) == (mode == "auto"), mode
        assert results[mode].provenance["execution"] == ExecutionOptions(fastpath=mode).to_dict()
    np.testing.assert_allclose(results["off"].scores.scores, results["auto"].scores.scores, rtol=1e-4, atol=1e-4)
    assert results["off"].metrics.final_acc == results["auto"].metrics.final_acc


def test_batch_cost_option_reaches_the_planner():
    lm = make_tiny("llama", layers=2)
    seqs = [[5] * n for n in (40, 38, 30, 22, 12, 9, 7, 3)]
    plans = {}
    for cost in (1, 4096):
        lm.options = ExecutionOptions(batch_cost=cost)
        plans[cost] = run_batches(lm.parts, seqs, [], pad_id=0, max_tokens=256)
        assert plans[cost] == plan_batches([len(s) for s in seqs], 256, batch_cost=cost)
    assert len(plans[1]) > len(plans[4096])  # cheap batches: tight ones; costly batches: as few as fit
    lm.options = ExecutionOptions()
    assert run_batches(lm.parts, seqs, [], pad_id=0, max_tokens=256) == plan_batches(
        [len(s) for s in seqs], 256, batch_cost=256 // BATCH_COST_DIVISOR)


@pytest.mark.parametrize("every, saves_before_the_end", [(0.0, True), (3600.0, False)])
def test_checkpoint_interval_option_reaches_the_scorer(every, saves_before_the_end):
    lm = make_tiny("llama", layers=2)
    lm.options = ExecutionOptions(checkpoint_every=every)
    req = prepare(lm, load_task("arc_easy", limit=8, seed=1), "letter")
    saved: list[int] = []

    def save(state: ScoreState) -> None:
        saved.append(int(state.done.sum()))

    score_letter(lm.parts, req, encoder_for(lm).pad_id, max_tokens=64, resume=Resume(save=save))
    assert saved[-1] == len(req.prompts)
    assert (len(saved) > 1) == saves_before_the_end, saved


def test_cli_fastpath_option_is_recorded_and_checked(model_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, ["analyze", "--model", str(model_dir), "--task", "arc_easy", "--limit", "4",
                            "--dtype", "float32", "--lens-layers", "last", "--fastpath", "off", "--batch-cost", "64",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    prov = json.loads((out / "result.json").read_text())["provenance"]
    assert prov["execution"] == {"fastpath": "off", "batch_cost": 64, "checkpoint_every": None, "fused_lse": "auto"}
    r = runner.invoke(app, ["analyze", "--model", str(model_dir), "--task", "arc_easy", "--limit", "4",
                            "--fastpath", "fast", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "--fastpath 'fast' is not a mode" in r.output


def test_last_position_trim_is_declared_by_probes_and_switched_by_the_caller():
    """The fast path computes only the last positions at the final layer when every probe declares
    ``last_position_only`` and the caller allows it (``trim_final``); the base Probe declares False."""
    import torch

    from declens.runner import Probe, collate, forward

    class LastOnly(Probe):
        last_position_only = True

    assert Probe.last_position_only is False
    lm = make_tiny("llama", layers=3)
    assert fastpath.supported(lm.parts, 16)
    seqs = [[3, 5, 7, 9, 11, 13], [4, 6, 8, 10], [12, 14, 16, 18, 20]]
    b = collate(seqs, [0, 1, 2], 0, lm.device)
    trimmed = forward(lm.parts, b, [LastOnly()])
    full = forward(lm.parts, b, [LastOnly()], trim_final=False)
    plain = forward(lm.parts, b, [Probe()])
    assert torch.equal(full, plain)  # trim_final=False: every position computed, as without the declaration
    rows, last = torch.arange(3), b.lengths - 1
    torch.testing.assert_close(trimmed[rows, last], full[rows, last], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(trimmed[0, 0], full[0, 0])  # the trimmed pass skipped the other positions


def test_a_copied_model_keeps_its_execution_options():
    from declens.finetune import copy_model

    lm = make_tiny("llama", layers=2)
    lm.options = ExecutionOptions(fastpath="off", batch_cost=7)
    assert copy_model(lm).options == lm.options
    with pytest.raises(TypeError):
        lm.options = {"fastpath": "off"}


@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_a_checkpoint_holds_the_results_of_every_row_it_marks_done(fmt):
    """Batches are not synced one by one (the host plans the next batch while the device computes): a
    checkpoint must still hold finished results for every row it marks done, and none for the others."""
    from declens.scoring import score_requests

    lm = make_tiny("qwen2", layers=2)
    lm.options = ExecutionOptions(checkpoint_every=0.0)  # a save after every batch
    req = prepare(lm, load_task("arc_easy", limit=10, seed=3), fmt)
    snapshots: list[tuple[np.ndarray, np.ndarray]] = []

    def save(state: ScoreState) -> None:
        scores = state.arrays["scores"]
        filled = ~np.isnan(scores).reshape(scores.shape[0], scores.shape[1], -1).all(axis=(0, 2))
        snapshots.append((state.done.copy(), filled))

    score_requests(lm.parts, req, encoder_for(lm).pad_id, max_tokens=64, resume=Resume(save=save))
    plan = ScoringPlan(lm.parts, req)
    assert len(snapshots) > 2
    for done, filled in snapshots:
        expect = np.zeros_like(filled)
        expect[plan.out_rows(np.flatnonzero(done).tolist())] = True  # the questions / option slots of done rows
        assert np.array_equal(filled, expect), (done, filled)
