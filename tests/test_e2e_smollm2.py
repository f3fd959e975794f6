"""End to end on a real pretrained model (SmolLM2-135M, fetched from PyPI) and real benchmark rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from declens.analyses.decision import analyze, encoder_for, prepare
from declens.cli import app
from declens.tasks import ALL_TASKS, load_task

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("task", ALL_TASKS)
def test_every_task_both_formats(smollm2, task):
    data = load_task(task, limit=4, seed=0)
    letter = analyze(smollm2, data, "letter", progress=False)
    cloze = analyze(smollm2, data, "cloze", progress=False)
    assert letter.scores.scores.shape[:2] == (30, 4) and cloze.scores.scores.shape[:2] == (30, 4)
    assert np.isfinite(letter.metrics.dm).all() and np.isfinite(cloze.metrics.dm).all()
    # the last layer of the lens is the model's own output
    req = prepare(smollm2, data, "letter")
    with torch.inference_mode():
        ref = np.stack([smollm2.model(torch.tensor([p])).logits[0, -1, req.option_ids].numpy() for p in req.prompts])
    np.testing.assert_allclose(letter.scores.final(), ref, rtol=1e-3, atol=1e-3)


def test_cloze_accuracy_well_above_chance(smollm2):
    """SmolLM2-135M knows something about ARC-Easy when answers are scored as continuations."""
    res = analyze(smollm2, load_task("arc_easy", limit=60, seed=0), "cloze", progress=False)
    assert res.metrics.final_acc > 0.30, res.metrics.final_acc  # chance is 0.25; about 0.45 expected
    assert res.metrics.acc[-1] > res.metrics.acc[:5].mean()  # the answer forms with depth


def test_gguf_file_loads_like_the_converted_preset(smollm2, tmp_path):
    from declens.models import load_model
    from declens.presets import assemble_gguf, get_preset

    gguf = assemble_gguf(get_preset("smollm2-135m"), tmp_path, progress=False)
    lm = load_model(str(gguf), dtype="float32", device="cpu")
    assert lm.source["kind"] == "gguf" and lm.source["gguf_sha256"] == get_preset("smollm2-135m").sha256
    ids = torch.tensor([encoder_for(lm).prompt("Question: What do plants need to make food?\nAnswer:")])
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(ids).logits, smollm2.model(ids).logits)
    assert lm.fingerprint() == smollm2.fingerprint()


def test_demo_command(tmp_path):
    r = CliRunner().invoke(app, ["demo", "--limit", "12", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "result.json").read_text())
    assert d["config"]["model"] == "smollm2-135m" and d["provenance"]["model"]["source"]["gguf_sha256"]
    assert (tmp_path / "overview.png").exists()


def test_iterative_pruning_and_export_on_real_model(tmp_path):
    from declens.models import load_model
    from declens.pruning import PruneConfig, export_pruned, prune

    lm = load_model("smollm2-135m", dtype="float32", device="cpu", progress=False)
    res = prune(lm, load_task("arc_easy", limit=16, seed=0), "cloze", PruneConfig(["ip"], max_ratio=0.1, calib_samples=8),
                out_dir=tmp_path / "prune", progress=False)
    recs = res.runs["ip"].records
    assert [r.k for r in recs] == [0, 1, 2, 3]
    for prev, rec in zip(recs, recs[1:]):
        assert rec.layer == min(prev.bi, key=lambda l: (prev.bi[l], l))
    assert res.work["share_saved"] > 0
    assert (tmp_path / "prune" / "pruning_ip.png").exists()
    removed = recs[-1].removed
    info = export_pruned(lm, removed, tmp_path / "pruned")
    assert info["kept"] == 27 and info["max_abs_logit_diff"] < 1e-3


def test_ablation_around_the_transition_point_on_real_model(smollm2, tmp_path):
    """Table 1 on the real model: the dense column equals a plain analysis of the same rows, and
    removing a layer near the Transition Point changes the decision scores."""
    from declens.analyses.ablation import AblateConfig, ablate

    res = ablate(smollm2, "arc_easy", ["arc_easy", "piqa"], "cloze", AblateConfig(window=1, tp=20, limit=6, seed=0),
                 out_dir=tmp_path, progress=False)
    assert res.eval.labels == ["dense", "19", "20", "21", "19,20", "20,21"]
    ref = analyze(smollm2, load_task("arc_easy", limit=6, seed=0), "cloze", progress=False)
    dense = res.eval.cells[("arc_easy", "cloze", "dense")]
    assert dense["final_accuracy"] == pytest.approx(ref.metrics.final_acc)
    assert dense["final_dm"] == pytest.approx(ref.metrics.final_dm, abs=1e-4)
    assert res.dense_dm == pytest.approx(list(ref.metrics.dm), abs=1e-4)
    assert res.eval.cells[("arc_easy", "cloze", "20")]["final_dm"] != pytest.approx(dense["final_dm"], abs=1e-4)
    assert res.eval.cells[("piqa", "cloze", "19,20")]["layer_ids"] == [i for i in range(30) if i not in (19, 20)]
    assert "| piqa |" in (tmp_path / "ablate.md").read_text() and (tmp_path / "ablate.png").is_file()
