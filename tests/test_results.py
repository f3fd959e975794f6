"""Result files: provenance, round trip, determinism, and resume after a killed run."""

from __future__ import annotations

import json

import numpy as np
import pytest

import declens.runner
import declens.scoring
from conftest import make_tiny
from declens.analyses.decision import analyze
from declens.results import AnalysisResult
from declens.tasks import load_task


def test_result_files_record_config_versions_and_fingerprints(tmp_path):
    lm = make_tiny("qwen2")
    data = load_task("arc_easy", limit=8, seed=0)
    res = analyze(lm, data, "letter", out_dir=tmp_path, progress=False)
    d = json.loads((tmp_path / "result.json").read_text())
    assert d["config"]["task"] == "arc_easy" and d["config"]["format"] == "letter" and d["config"]["limit"] == 8
    assert d["provenance"]["versions"]["transformers"] and d["provenance"]["versions"]["torch"]
    assert d["provenance"]["model"]["fingerprint"] == lm.fingerprint()
    assert d["provenance"]["data"]["fingerprint"] == data.fingerprint()
    assert len(d["layers"]) == lm.num_layers and len(d["samples"]) == 8
    assert (tmp_path / "layers.csv").read_text().splitlines()[0].startswith("layer,position,phase,dm")
    for png in ("dm.png", "accuracy.png", "option_frequency.png", "overview.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    back = AnalysisResult.load(tmp_path)
    np.testing.assert_array_equal(back.scores.scores, res.scores.scores)
    np.testing.assert_array_equal(back.metrics.dm, res.metrics.dm)
    assert back.metrics.transition_layer == res.metrics.transition_layer
    assert not (tmp_path / ".checkpoint").exists()


def test_same_config_and_seed_give_same_numbers():
    data = load_task("hellaswag", limit=6, seed=3)
    a = analyze(make_tiny("llama", seed=5), data, "cloze", progress=False)
    b = analyze(make_tiny("llama", seed=5), data, "cloze", progress=False)
    np.testing.assert_array_equal(a.scores.scores, b.scores.scores)
    c = analyze(make_tiny("llama", seed=6), data, "cloze", progress=False)
    assert not np.allclose(a.scores.scores, c.scores.scores)


def test_fingerprint_tracks_weights():
    a, b = make_tiny("llama", seed=1), make_tiny("llama", seed=1)
    assert a.fingerprint() == b.fingerprint()
    assert make_tiny("llama", seed=2).fingerprint() != a.fingerprint()


@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_killed_run_resumes_to_identical_numbers(tmp_path, monkeypatch, fmt):
    lm = make_tiny("qwen3")
    data = load_task("arc_challenge", limit=24, seed=1)
    full = analyze(lm, data, fmt, progress=False, max_tokens=200)

    monkeypatch.setattr(declens.scoring, "CHECKPOINT_EVERY_S", 0.0)
    real_forward = declens.runner.forward
    calls = {"n": 0}

    def dying_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(declens.runner, "forward", dying_forward)
    with pytest.raises(KeyboardInterrupt):
        analyze(lm, data, fmt, progress=False, max_tokens=200, out_dir=tmp_path)
    assert not (tmp_path / "result.json").exists()
    assert list((tmp_path / ".checkpoint").glob("*.npz"))

    done_before = calls["n"]
    monkeypatch.setattr(declens.runner, "forward", real_forward)
    counted = {"n": 0}

    def counting_forward(*args, **kwargs):
        counted["n"] += 1
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(declens.runner, "forward", counting_forward)
    resumed = analyze(lm, data, fmt, progress=False, max_tokens=200, out_dir=tmp_path)
    assert done_before == 4 and counted["n"] > 0
    total_batches = 3 + counted["n"]  # three batches survived the kill
    assert counted["n"] < total_batches
    np.testing.assert_array_equal(resumed.scores.scores, full.scores.scores)
    assert not (tmp_path / ".checkpoint").exists()
