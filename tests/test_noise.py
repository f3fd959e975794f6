"""Noise sensitivity: exact clean baseline, repeatable draws, prefix reuse against full forward passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from declens.analyses.decision import analyze, encoder_for, prepare
import declens.scoring
from declens.analyses.noise import (NoiseConfig, NoiseProbe, NoiseSpecError, add_noise, noise_checkpoint, noise_seed,
                                    noise_study, parse_scales, validate_scales)
from declens.errors import LayerSpecError
from declens.metrics import margins
from declens.results import Checkpoint, to_jsonable
from declens.runner import collate, forward, plan_batches
from declens.scoring import ScoringPlan, option_mask
from declens.tasks import load_task


def full_forward_study(lm, req, scales, sigma, seed=0, repeats=1, max_tokens=64):
    """The straightforward implementation: a noise probe on a full forward pass, per layer and scale.

    Returns ``[R, L, S, N, K]`` final-layer scores (letter format)."""
    plan = ScoringPlan(lm.parts, req)
    pad = encoder_for(lm).pad_id
    L = lm.num_layers
    out = np.full((repeats, L, len(scales), 1, len(req.prompts), len(req.option_ids)), np.nan, dtype=np.float32)
    for idx in plan_batches([len(r) for r in plan.rows], max_tokens):
        b = collate(plan.rows, idx, pad, lm.device)
        for lid in range(L):
            for r in range(repeats):
                for s, a in enumerate(scales):
                    noise = NoiseProbe(lid, a, sigma[lid], seed=seed, repeat=r)
                    forward(lm.parts, b, [noise, plan.probe(out[r, lid, s], {L - 1: 0})])
    scores = out[:, :, :, 0]  # [R, L, S, N, K]
    scores[..., ~option_mask(req.n_options, scores.shape[-1])] = np.nan
    return scores


def test_validation_errors():
    from conftest import make_tiny

    assert validate_scales([0, 0.5, 2]) == [0.0, 0.5, 2.0]
    assert parse_scales("0, 0.1,1") == [0.0, 0.1, 1.0]
    for bad in ("0,x", "", "0,-1"):
        with pytest.raises(NoiseSpecError):
            parse_scales(bad)
    for bad in ([-0.1], [float("nan")], [float("inf")], [], [0.1, 0.1], ["x"]):
        with pytest.raises(NoiseSpecError):
            validate_scales(bad)
    lm = make_tiny("llama")
    data = load_task("arc_easy", limit=2)
    with pytest.raises(NoiseSpecError, match=">= 0"):
        noise_study(lm, data, config=NoiseConfig(scales=(0, -1)), progress=False)
    with pytest.raises(NoiseSpecError, match="repeats"):
        noise_study(lm, data, config=NoiseConfig(scales=(0,), repeats=0), progress=False)
    with pytest.raises(LayerSpecError):
        noise_study(lm, data, config=NoiseConfig(scales=(0,), layers=[4]), progress=False)
    with pytest.raises(LayerSpecError):
        noise_study(lm, data, config=NoiseConfig(scales=(0,), layers=[1, 1]), progress=False)


def test_add_noise_statistics_padding_and_batch_independence():
    from declens.runner import Batch

    torch.manual_seed(0)
    h = torch.randn(2, 50, 64)
    batch = Batch(input_ids=torch.zeros(2, 50, dtype=torch.long), attention_mask=None,
                  lengths=torch.tensor([50, 30]), index=torch.tensor([7, 3]))
    out = add_noise(h, batch, scale=0.5, sigma=2.0, seed=11, layer_id=4)
    diff = out - h
    assert torch.equal(out[1, 30:], h[1, 30:])  # padding untouched
    assert float(diff[0].std()) == pytest.approx(1.0, rel=0.05)  # a * sigma
    assert float(diff[1, :30].std()) == pytest.approx(1.0, rel=0.06)
    # row 7's noise does not depend on its batch mates or its place in the batch
    alone = Batch(input_ids=torch.zeros(1, 50, dtype=torch.long), attention_mask=None,
                  lengths=torch.tensor([50]), index=torch.tensor([7]))
    assert torch.equal(add_noise(h[:1], alone, 0.5, 2.0, 11, 4), out[:1])
    assert add_noise(h, batch, 0.0, 2.0, 11, 4) is h  # scale 0: nothing drawn, nothing changed
    # each part of the seed matters
    base = noise_seed(0, 1, 0.5, 0, 3)
    assert len({base, noise_seed(1, 1, 0.5, 0, 3), noise_seed(0, 2, 0.5, 0, 3), noise_seed(0, 1, 0.2, 0, 3),
                noise_seed(0, 1, 0.5, 1, 3), noise_seed(0, 1, 0.5, 0, 4)}) == 6


def test_scale_zero_exact_and_prefix_reuse_equals_full_forward(tiny):
    """Scale 0 reproduces the clean final DM bit for bit at every layer; at other scales, starting
    from the cached dense output of layer l plus noise (and, at the last layer, reading the lens on the
    noised state without a forward pass) equals a full forward pass with a noise probe. The full passes
    batch the rows differently, which the per-row draws make irrelevant."""
    data = load_task("arc_easy", limit=3, seed=0)
    res = noise_study(tiny, data, config=NoiseConfig(scales=(0.0, 0.5), seed=3, repeats=2), progress=False)
    L = tiny.num_layers
    assert res.dm.shape == (L, 2) and res.dm_runs.shape == (2, L, 2) and res.layer_ids == list(range(L))
    clean = res.dense["final_dm"]
    assert np.array_equal(res.dm_runs[:, :, 0], np.full((2, L), clean))  # bit-identical, last layer included
    assert (res.dm[:, 1] != clean).all()  # noise does something at every layer
    assert not np.array_equal(res.scores[0, :, 1], res.scores[1, :, 1])  # repeats draw anew
    req = prepare(tiny, data, "letter")
    ref = full_forward_study(tiny, req, (0.5,), res.sigma, seed=3, repeats=2, max_tokens=128)
    np.testing.assert_allclose(res.scores[:, :, 1:], ref, atol=2e-4, rtol=1e-4)
    dm_ref = margins(ref.reshape(-1, *ref.shape[-2:]), req.gold).mean(axis=1).reshape(2, L).mean(axis=0)
    np.testing.assert_allclose(res.dm[:, 1], dm_ref, atol=1e-4)


def test_dense_pass_equals_the_decision_analysis():
    from conftest import make_tiny

    lm = make_tiny("gemma3")
    data = load_task("arc_challenge", limit=4, seed=3)
    res = noise_study(lm, data, config=NoiseConfig(scales=(0.0,), layers=[3]), progress=False)
    ref = analyze(lm, data, "letter", progress=False)
    np.testing.assert_allclose(res.dense["dm"], ref.metrics.dm, atol=1e-5)
    np.testing.assert_allclose(res.dense["accuracy"], ref.metrics.acc)
    assert res.dense["transition_layer"] == ref.metrics.transition_layer
    assert res.dm[0, 0] == pytest.approx(ref.metrics.final_dm, abs=1e-5)


def test_cloze_packed_prefix_reuse_matches_full_forward():
    from conftest import make_tiny

    lm = make_tiny("mistral")
    data = load_task("piqa", limit=4, seed=0)
    res = noise_study(lm, data, fmt="cloze", config=NoiseConfig(scales=(0.0, 0.5), layers=[0, 3], seed=1),
                      progress=False)
    assert res.config["packed_rows"] is True
    plan = ScoringPlan(lm.parts, prepare(lm, data, "cloze"))
    pad = encoder_for(lm).pad_id
    for pi, lid in enumerate([0, 3]):
        for si, a in enumerate((0.0, 0.5)):
            out = plan.new_out(1)
            for idx in plan_batches([len(r) for r in plan.rows], 4096):
                b = collate(plan.rows, idx, pad, lm.device)
                forward(lm.parts, b, [NoiseProbe(lid, a, res.sigma[lid], seed=1), plan.probe(out, {3: 0})])
            np.testing.assert_allclose(res.scores[0, pi, si], plan.assemble(out, [3]).scores[0], atol=2e-4, rtol=1e-4)


def test_same_seed_same_heatmap_other_seed_differs():
    from conftest import make_tiny

    lm = make_tiny("gemma2")
    data = load_task("arc_easy", limit=3, seed=0)
    kw = dict(scales=(0.0, 0.5))
    a = noise_study(lm, data, config=NoiseConfig(seed=0, **kw), progress=False)
    # another batching (one row per batch): the same draws
    b = noise_study(lm, data, config=NoiseConfig(seed=0, max_tokens=100, **kw), progress=False)
    c = noise_study(lm, data, config=NoiseConfig(seed=1, **kw), progress=False)
    again = noise_study(lm, data, config=NoiseConfig(seed=0, **kw), progress=False)
    assert np.array_equal(a.dm, again.dm)  # bit-identical
    np.testing.assert_allclose(a.dm, b.dm, atol=1e-4)
    assert np.array_equal(a.dm[:, 0], c.dm[:, 0])
    assert not np.allclose(a.dm[:, 1:], c.dm[:, 1:])


def test_phase_summary_and_save(tmp_path):
    from conftest import make_tiny

    lm = make_tiny("qwen3")
    data = load_task("arc_easy", limit=4, seed=2)
    res = noise_study(lm, data, config=NoiseConfig(scales=(0.0, 1.0), layers=[0, 2, 3]), progress=False)
    # force known phases to check the summary arithmetic
    res.dense["decisive_layers"], res.dense["silent_layers"] = [2, 3], [0, 1]
    ps = res.phase_summary()
    assert ps["silent"]["layers"] == [0] and ps["decisive"]["layers"] == [2, 3]
    np.testing.assert_allclose(ps["decisive"]["dm"], res.dm[1:].mean(axis=0))
    np.testing.assert_allclose(ps["silent"]["dm_drop"], res.dense["final_dm"] - res.dm[0])
    assert ps["silent"]["dm_drop"][0] == 0.0
    res.save(tmp_path)
    d = json.loads((tmp_path / "noise.json").read_text())
    assert d["kind"] == "noise" and d["config"]["scales"] == [0.0, 1.0] and d["config"]["layers"] == [0, 2, 3]
    assert d["provenance"]["model"]["fingerprint"] and d["phase_summary"]["decisive"]["layers"] == [2, 3]
    assert [r["phase"] for r in d["layers"]] == ["silent", "decisive", "decisive"]
    with np.load(tmp_path / "noise.npz") as z:
        np.testing.assert_array_equal(z["dm"], res.dm)
        assert z["scores"].shape == (1, 3, 2, 4, 4)
    for f in ("noise_heatmap.png", "noise_phases.png"):
        assert (tmp_path / f).stat().st_size > 1000


@pytest.mark.slow
def test_smollm2_noise(smollm2, tmp_path):
    data = load_task("arc_easy", limit=16, seed=0)
    res = noise_study(smollm2, data, fmt="letter", config=NoiseConfig(scales=(0.0, 1.0), layers=[15, 29]),
                      progress=False)
    ref = analyze(smollm2, data, "letter", progress=False)
    assert res.dense["final_dm"] == pytest.approx(ref.metrics.final_dm, abs=1e-4)
    assert res.dense["transition_layer"] == ref.metrics.transition_layer
    assert np.array_equal(res.dm[:, 0], np.full(2, res.dense["final_dm"]))
    assert np.isfinite(res.dm).all() and (res.dm[:, 1] != res.dm[:, 0]).all()
    assert all(s > 0 for s in res.sigma.values()) and len(res.sigma) == smollm2.num_layers
    res.save(tmp_path)
    assert (tmp_path / "noise_heatmap.png").exists() and json.loads((tmp_path / "noise.json").read_text())["kind"] == "noise"


def test_sigma_rules_on_tensors_with_a_massive_first_token():
    """The three scale rules on a known tensor: the first token inflates ``all`` only; ``no-first`` is the
    std without position 0 (padding never counted); ``per-token`` averages each token's own std."""
    from declens.analyses.noise import SigmaProbe, token_sigma
    from declens.runner import Batch

    torch.manual_seed(0)
    h = torch.randn(2, 12, 64)
    h[:, 0] *= 300.0  # the massive first token
    h[1, 8:] = 1e6  # padding of row 2: must be ignored by every rule
    batch = Batch(input_ids=torch.zeros(2, 12, dtype=torch.long), attention_mask=None,
                  lengths=torch.tensor([12, 8]), index=torch.tensor([0, 1]))
    probe = SigmaProbe()
    probe.start(batch)
    probe.layer(0, 5, h, h)
    real = torch.cat([h[0], h[1, :8]])
    rest = torch.cat([h[0, 1:], h[1, 1:8]])
    assert probe.sigma("all")[5] == pytest.approx(float(real.double().std(correction=0)), rel=1e-6)
    assert probe.sigma("no-first")[5] == pytest.approx(float(rest.double().std(correction=0)), rel=1e-6)
    assert probe.sigma("no-first")[5] == pytest.approx(1.0, rel=0.1)
    assert probe.sigma("all")[5] > 50 * probe.sigma("no-first")[5]
    assert probe.sigma("per-token")[5] == pytest.approx(float(token_sigma(real).mean()), rel=1e-6)
    # per-token noise follows each token's own size
    out = add_noise(h, batch, 1.0, token_sigma(h), seed=0, layer_id=5)
    d = out - h
    assert float(d[0, 0].std()) > 100 * float(d[0, 1:].std())


def test_sigma_choice_changes_the_study_on_a_model_with_a_massive_first_token():
    """A real tiny model whose first prompt token has a huge embedding (so the residual stream at
    position 0 carries a massive activation through every layer): ``all`` inflates sigma, the rules
    give different noised DMs, the choice and all three scales are recorded, and the per-token rule
    through prefix reuse equals a full forward pass with a per-token noise probe."""
    from conftest import make_tiny

    lm = make_tiny("llama")
    data = load_task("arc_easy", limit=3, seed=0)
    req = prepare(lm, data, "letter")
    first = {p[0] for p in req.prompts}
    assert len(first) == 1  # every prompt starts with the same token
    with torch.no_grad():
        emb = lm.model.get_input_embeddings().weight
        emb[first.pop()] *= 5000.0  # ~1000 per unit against layer outputs of std ~5
    kw = dict(scales=(0.0, 0.5), layers=[1], seed=2)
    res = {m: noise_study(lm, data, config=NoiseConfig(sigma=m, **kw), progress=False, requests=req)
           for m in ("all", "no-first", "per-token")}
    for m, r in res.items():
        assert r.config["sigma"] == m and set(r.extra["sigma_by_mode"]) == {"all", "no-first", "per-token"}
    by = res["all"].extra["sigma_by_mode"]
    assert by["all"]["1"] > 10 * by["no-first"]["1"]
    assert res["all"].sigma[1] == pytest.approx(by["all"]["1"]) and res["no-first"].sigma[1] == pytest.approx(by["no-first"]["1"])
    assert res["all"].dm[0, 0] == res["no-first"].dm[0, 0] == res["per-token"].dm[0, 0]  # clean: the same
    noised = [r.scores[0, 0, 1] for r in res.values()]
    assert not np.allclose(noised[0], noised[1]) and not np.allclose(noised[1], noised[2])
    ref = np.full((1, len(req.prompts), len(req.option_ids)), np.nan, dtype=np.float32)
    plan = ScoringPlan(lm.parts, req)
    for idx in plan_batches([len(r) for r in plan.rows], 64):
        b = collate(plan.rows, idx, encoder_for(lm).pad_id, lm.device)
        forward(lm.parts, b, [NoiseProbe(1, 0.5, "per-token", seed=2), plan.probe(ref, {3: 0})])
    np.testing.assert_allclose(res["per-token"].scores[0, 0, 1], plan.assemble(ref, [3]).scores[0], atol=2e-4, rtol=1e-4)
    with pytest.raises(NoiseSpecError, match="--sigma"):
        noise_study(lm, data, config=NoiseConfig(sigma="first", **kw), progress=False, requests=req)


def test_cli_sigma_option(model_dir, tmp_path):
    from typer.testing import CliRunner

    from declens.cli import app

    runner = CliRunner()
    out = tmp_path / "n"
    r = runner.invoke(app, ["noise", "--model", str(model_dir), "--task", "arc_easy", "--limit", "3", "--layers", "1",
                            "--scales", "0,0.5", "--sigma", "per-token", "--dtype", "float32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads((out / "noise.json").read_text())
    assert d["config"]["sigma"] == "per-token" and "own std" in d["config"]["noise"]
    assert set(d["sigma_by_mode"]) == {"all", "no-first", "per-token"}
    r = runner.invoke(app, ["noise", "--model", str(model_dir), "--task", "arc_easy", "--sigma", "first-only",
                            "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "--sigma" in r.output and not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------
# Resume after a killed run


class _DyingCheckpoint(Checkpoint):
    """The study's checkpoint, with the process "killed" (KeyboardInterrupt) right after its ``die_at``-th save."""

    def __init__(self, base: Checkpoint, die_at: int):
        super().__init__(base.path.parent.parent, base.key, "noise")
        self.saves, self.die_at = 0, die_at

    def save(self, state) -> None:
        super().save(state)
        self.saves += 1
        if self.saves == self.die_at:
            raise KeyboardInterrupt("killed")


def _counting_forward(monkeypatch) -> dict:
    """Count the study's forward passes: full passes of the dense model (``forward``) and passes of the
    layers after a noised one (``run_from``)."""
    import declens.analyses.noise as noise_mod

    calls = {"n": 0}

    def counting(real):
        def run(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs)
        return run

    for name in ("forward", "run_from"):
        monkeypatch.setattr(noise_mod, name, counting(getattr(noise_mod, name)))
    return calls


@pytest.mark.parametrize("fmt,sigma,units", [("letter", "no-first", 1), ("letter", "no-first", 5),
                                             ("cloze", "per-token", 5)])
def test_killed_noise_study_resumes_to_identical_numbers(tmp_path, monkeypatch, fmt, sigma, units):
    """Killed after ``units`` (batch, layer) units (1: inside the first batch, whose layer outputs the resumed
    run recomputes; 5 = L + 1: after the first batch and one layer of the second), the study resumes from
    ``.checkpoint/``: no dense pass, none of the done units rerun (forward passes counted), and bit for
    bit the numbers of an uninterrupted run."""
    from conftest import make_tiny

    monkeypatch.setattr(declens.scoring, "CHECKPOINT_EVERY_S", 0.0)  # save after every unit
    lm = make_tiny("qwen3")
    data = load_task("arc_easy", limit=5, seed=1)
    cfg = NoiseConfig(scales=(0.0, 0.5), seed=2, repeats=2, max_tokens=100, sigma=sigma)
    L, S, R = lm.num_layers, 2, 2
    calls = _counting_forward(monkeypatch)
    full = noise_study(lm, data, fmt, cfg, progress=False)
    nb = full.provenance["timing"]["noise_runs"] // (L * S * R)
    assert nb >= 3 and calls["n"] == nb + (nb - 1) + nb * (L - 1) * S * R

    ck = noise_checkpoint(tmp_path, lm, data, fmt, cfg)
    with pytest.raises(KeyboardInterrupt):  # saves: the dense pass, then one per unit
        noise_study(lm, data, fmt, cfg, progress=False, checkpoint=_DyingCheckpoint(ck, die_at=1 + units))
    assert ck.path.is_file()

    calls["n"] = 0
    res = noise_study(lm, data, fmt, cfg, progress=False, checkpoint=noise_checkpoint(tmp_path, lm, data, fmt, cfg))
    t = res.provenance["timing"]
    assert t["dense_pass_restored"] is True and t["noise_runs_restored"] == units * S * R
    # no dense pass; a pass keeping the layer outputs per unfinished batch; then a pass per (scale, repeat) of
    # every unit not done but of the last layer (read without a pass; a finished batch holds one)
    finished = units // L
    assert calls["n"] == (nb - finished) + (nb * (L - 1) - (units - finished)) * S * R
    for name in ("dm", "acc", "dm_runs", "acc_runs", "scores"):
        np.testing.assert_array_equal(getattr(res, name), getattr(full, name), err_msg=name)
    assert res.sigma == full.sigma and res.extra == full.extra  # sigma statistics restored exactly
    assert json.dumps(to_jsonable(res.dense)) == json.dumps(to_jsonable(full.dense))  # the dense pass too
    assert ck.path.is_file()  # kept until the result is written ...
    res.save(tmp_path, plots=False)
    assert not (tmp_path / ".checkpoint").exists()  # ... which removes it


def test_a_noise_checkpoint_of_another_config_is_ignored(tmp_path, monkeypatch):
    """A checkpoint left by a killed run with other scales (same shapes) is not used: the study runs in full."""
    from conftest import make_tiny

    monkeypatch.setattr(declens.scoring, "CHECKPOINT_EVERY_S", 0.0)
    lm = make_tiny("qwen3")
    data = load_task("arc_easy", limit=4, seed=1)
    old = NoiseConfig(scales=(0.0, 0.5), max_tokens=100)
    new = NoiseConfig(scales=(0.0, 1.0), max_tokens=100)
    with pytest.raises(KeyboardInterrupt):
        noise_study(lm, data, "letter", old, progress=False,
                    checkpoint=_DyingCheckpoint(noise_checkpoint(tmp_path, lm, data, "letter", old), die_at=3))
    assert noise_checkpoint(tmp_path, lm, data, "letter", old).key == _DyingCheckpoint(
        noise_checkpoint(tmp_path, lm, data, "letter", old), 0).key  # the key is stable
    ck = noise_checkpoint(tmp_path, lm, data, "letter", new)
    assert ck.key != noise_checkpoint(tmp_path, lm, data, "letter", old).key and ck.load() is None
    calls = _counting_forward(monkeypatch)
    res = noise_study(lm, data, "letter", new, progress=False, checkpoint=ck)
    n_full = calls["n"]
    t = res.provenance["timing"]
    assert t["dense_pass_restored"] is False and t["noise_runs_restored"] == 0
    ref = noise_study(lm, data, "letter", new, progress=False)
    assert calls["n"] == 2 * n_full  # the run with the stale checkpoint did all the work a fresh one does
    for name in ("dm", "acc", "scores"):
        np.testing.assert_array_equal(getattr(res, name), getattr(ref, name), err_msg=name)


def test_cli_noise_resumes_a_killed_run_from_its_folder(model_dir, tmp_path, monkeypatch):
    """``declens noise`` keeps its checkpoint in ``<out>/.checkpoint/``: killed after a few units, the same command
    continues from it, writes the numbers of an uninterrupted run, and leaves no checkpoint behind."""
    from typer.testing import CliRunner

    from declens.cli import app

    monkeypatch.setattr(declens.scoring, "CHECKPOINT_EVERY_S", 0.0)
    runner = CliRunner()
    args = ["noise", "--model", str(model_dir), "--task", "arc_easy", "--limit", "4", "--scales", "0,0.5",
            "--max-tokens", "100", "--dtype", "float32"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "full")]).exit_code == 0
    real_save, saves = Checkpoint.save, {"n": 0}

    def dying_save(self, state):
        real_save(self, state)
        saves["n"] += 1
        if saves["n"] == 3:  # the dense pass and two units
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Checkpoint, "save", dying_save)
    out = tmp_path / "n"
    r = runner.invoke(app, [*args, "--out", str(out)])
    assert r.exit_code == 130 and list((out / ".checkpoint").glob("noise-*.npz"))  # killed (Ctrl-C's status)
    monkeypatch.setattr(Checkpoint, "save", real_save)
    r = runner.invoke(app, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    t = json.loads((out / "noise.json").read_text())["provenance"]["timing"]
    assert t["dense_pass_restored"] is True and t["noise_runs_restored"] == 2 * 2
    assert not (out / ".checkpoint").exists()
    with np.load(out / "noise.npz") as a, np.load(tmp_path / "full" / "noise.npz") as b:
        for k in ("dm", "accuracy", "scores", "sigma"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
