"""Layer-merging baselines (LaCo, MKA): the merge equations on real tiny models, merged views against
exported models, and the prune / export / analyze commands end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny
from declens.cli import app
from declens.errors import DeclensError
from declens.pruning.merging import (MERGES_ATTR, MergeSpec, combine, diffusion_map, export_merged, lerp,
                                     merged_parameter_names, merged_view, npib, rdsc)
from declens.surgery import dense_layer_ids, keep_positions, layer_view

runner = CliRunner()
PROJ = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]


def _params(layer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in layer.named_parameters()}


def _view_logits(lm, spec: MergeSpec, ids: torch.Tensor) -> torch.Tensor:
    parts = lm.parts
    with merged_view(parts, spec):
        with torch.inference_mode(), layer_view(parts, keep_positions(parts, spec.removed)):
            return lm.model(ids).logits.float()


def _probe(lm) -> torch.Tensor:
    return torch.tensor([lm.tokenizer.encode("Which gas do plants take in? Answer: carbon dioxide")])


def test_rdsc_equals_hand_computation_on_weights():
    lm = make_tiny("llama", layers=6)
    parts = lm.parts
    w = [_params(parts.layers[i]) for i in range(6)]
    coeff = rdsc([{2: 1.0}, {3: 1.0}, {4: 1.0}])
    assert coeff == {2: -1.0, 3: 1.0, 4: 1.0}
    spec = MergeSpec(removed=[3, 4], groups={2: coeff})
    original = parts.layers[2]
    with merged_view(parts, spec):
        got = _params(parts.layers[2])
        assert parts.layers[2] is not original and parts.layers[3] is not None
    assert parts.layers[2] is original  # restored
    for n in PROJ:  # theta_l + sum_k (theta_{l+k} - theta_l), written out
        hand = w[2][n] + (w[3][n] - w[2][n]) + (w[4][n] - w[2][n])
        assert torch.allclose(got[n], hand, atol=1e-6), n
    for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):  # norms: the host's
        assert torch.equal(got[n], w[2][n])
    # LaCo's walk merges into a layer that already absorbed others: coefficients compose
    twice = rdsc([{1: 1.0}, coeff])
    assert twice == {2: -1.0, 3: 1.0, 4: 1.0}  # (1 - 1) theta_1 + theta*_2: layer 1's weights cancel
    with pytest.raises(DeclensError):
        MergeSpec(removed=[2], groups={2: coeff})


def test_merge_norms_rule_combines_the_norms_too():
    lm = make_tiny("qwen2", layers=4)
    layers = {i: lm.parts.layers[i] for i in range(4)}
    new = combine(layers, 1, {1: 0.25, 2: 0.75}, norms="merge")
    for n, p in new.named_parameters():
        want = 0.25 * dict(layers[1].named_parameters())[n] + 0.75 * dict(layers[2].named_parameters())[n]
        assert torch.allclose(p, want, atol=1e-6), n
    assert "self_attn.q_proj.bias" in merged_parameter_names(layers[1])  # Qwen2's attention biases merge


def test_merging_zero_layers_leaves_the_model_unchanged():
    lm = make_tiny("gemma2", layers=4)
    ids = _probe(lm)
    with torch.inference_mode():
        dense = lm.model(ids).logits.float()
    assert rdsc([{1: 1.0}]) == {1: 1.0}
    spec = MergeSpec(removed=[], groups={1: rdsc([{1: 1.0}])})
    assert spec.changed() == []
    assert torch.equal(_view_logits(lm, spec, ids), dense)
    same = combine({1: lm.parts.layers[1]}, 1, {1: 1.0})
    for (n, a), (_, b) in zip(same.named_parameters(), lm.parts.layers[1].named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_merged_view_equals_exported_model(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from declens.models import load_model

    lm = make_tiny(arch, layers=6)
    ids = _probe(lm)
    spec = MergeSpec(removed=[4, 5, 2], groups={3: rdsc([{3: 1.0}, {4: 1.0}, {5: 1.0}]), 1: lerp({1: 1.0}, {2: 1.0}, 0.3)})
    view = _view_logits(lm, spec, ids)
    with torch.inference_mode():
        dense = lm.model(ids).logits.float()
    assert (view - dense).abs().max() > 1e-3  # the merge changes the model
    info = export_merged(lm, spec, tmp_path / "m")
    assert info["max_abs_logit_diff"] <= 1e-5 and info["kept_ids"] == [0, 1, 3]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.inference_mode():
        got = back(ids).logits.float()
    assert torch.allclose(got, view, atol=1e-5)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and sorted(cfg["declens_removed_layers"]) == [2, 4, 5]
    merges = {m["layer"]: m for m in cfg[MERGES_ATTR]}
    assert merges[3]["absorbed"] == [4, 5] and merges[1]["absorbed"] == [2]
    assert merges[1]["coefficients"] == {"1": 0.3, "2": pytest.approx(0.7)}
    again = load_model(str(tmp_path / "m"), dtype="float32", device="cpu", progress=False)
    assert list(dense_layer_ids(again.parts)) == [0, 1, 3]


def test_npib_and_diffusion_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 16))
    e = diffusion_map(x, dims=2)
    assert e.shape == (60, 2) and np.isfinite(e).all()
    assert npib(e, e) == pytest.approx(1.0)
    other = diffusion_map(rng.normal(size=(60, 16)), dims=2)
    s = npib(e, other)
    assert 0.0 <= s < 0.5
    assert diffusion_map(x, dims=2).tolist() == e.tolist()  # deterministic


def _tiny_prune(methods, tmp_path, **kw):
    from declens.pruning import PruneConfig, prune
    from declens.pruning.merging import LacoConfig, MergeConfig
    from declens.tasks import load_task

    lm = make_tiny("llama", layers=6)
    data = load_task("arc_easy", limit=12)
    merge = MergeConfig(laco=LacoConfig(threshold=-1.0, layers=3, low=0))
    res = prune(lm, data, "cloze", PruneConfig(methods, max_ratio=0.5, calib_samples=12, merge=merge, **kw),
                progress=False, plots=False, out_dir=tmp_path)
    return lm, res


def test_mka_lambda_in_unit_interval_and_fused_weights_equal_the_formula(tmp_path):
    lm, res = _tiny_prune(["mka"], tmp_path)
    recs = res.runs["mka"].records
    assert [r.k for r in recs] == [0, 1, 2, 3]
    first = recs[1]
    (m,) = first.merges
    a, (b,) = m["layer"], m["absorbed"]
    lam = first.candidates[a]
    assert all(0.0 <= v <= 1.0 for r in recs[1:] for v in r.candidates.values())
    assert max(first.candidates.values()) == lam and first.removed == [b] and b == a + 1
    assert m["coefficients"] == {str(a): pytest.approx(lam), str(b): pytest.approx(1 - lam)}
    w = {i: _params(lm.parts.layers[i]) for i in (a, b)}
    spec = MergeSpec.from_list(first.merges, first.removed)
    with merged_view(lm.parts, spec):
        got = _params(lm.parts.layers[a])
    for n in PROJ:
        assert torch.allclose(got[n], lam * w[a][n] + (1 - lam) * w[b][n], atol=1e-6), n
    # later merges fold into coefficient sums that still add up to one (convex combinations)
    for r in recs[1:]:
        for g in r.merges:
            assert sum(g["coefficients"].values()) == pytest.approx(1.0)


def test_merged_state_evaluation_matches_a_full_recomputation(tmp_path):
    """The engine reuses the dense prefix only before the first changed layer: same numbers as no reuse."""
    _, res = _tiny_prune(["laco", "mka"], tmp_path / "a")
    _, full = _tiny_prune(["laco", "mka"], tmp_path / "b", reuse=False)
    assert res.work["share_saved"] > 0 and full.work["share_saved"] == 0
    for m in ("laco", "mka"):
        for r, f in zip(res.runs[m].records, full.runs[m].records, strict=True):
            assert r.removed == f.removed
            assert [(g["layer"], g["absorbed"]) for g in r.merges or []] == [(g["layer"], g["absorbed"]) for g in f.merges or []]
            for g, h in zip(r.merges or [], f.merges or []):
                assert g["coefficients"] == pytest.approx(h["coefficients"], abs=1e-5)
            assert r.final_accuracy == pytest.approx(f.final_accuracy) and np.allclose(r.dm, f.dm, atol=1e-4)
            assert (r.candidates is None) == (f.candidates is None)
            if r.candidates:
                assert r.candidates == pytest.approx(f.candidates, abs=1e-5)
    laco = res.runs["laco"].records
    assert [r.k for r in laco] == [0, 2, 3]  # C=3 folds two layers; the last merge stops at the target
    assert [(g["layer"], g["absorbed"]) for g in laco[1].merges] == [(2, [3, 4])]  # walk starts at l = H - C = 2
    assert laco[2].removed == [3, 4, 1] and [(g["layer"], g["absorbed"]) for g in laco[2].merges] == [(0, [1]), (2, [3, 4])]


def test_prune_laco_mka_export_analyze_commands(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    r = runner.invoke(app, ["prune", "--model", str(model_dir), "--task", "arc_easy", "--limit", "8", "--calib-samples", "8",
                            "--method", "laco,mka", "--laco-threshold", "-1", "--laco-layers", "2", "--laco-low", "0", "--laco-interval", "1",
                            "--max-ratio", "0.5", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "p" / "prune.json").read_text())
    assert set(d["methods"]) == {"laco", "mka"} and d["config"]["merging"]["laco"]["threshold"] == -1
    for m in ("laco", "mka"):
        rows = d["methods"][m]["table"]
        assert rows[-1]["removed_count"] == 2 and rows[-1]["merges"]
    assert "<-" in r.output
    table = (tmp_path / "p" / "table.csv").read_text()
    assert table.splitlines()[0].endswith("removed_layer_ids,merges") and "coefficients" in table
    r = runner.invoke(app, ["export", "--model", str(model_dir), "--from-prune", str(tmp_path / "p"), "--method", "mka",
                            "--ratio", "0.5", "--out", str(tmp_path / "x")])
    assert r.exit_code == 0, r.output
    assert "absorbed" in r.output
    AutoModelForCausalLM.from_pretrained(tmp_path / "x")
    r = runner.invoke(app, ["analyze", "--model", str(tmp_path / "x"), "--task", "arc_easy", "--limit", "4",
                            "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "a" / "result.json").read_text())
    kept = [i for i in range(4) if i not in d["methods"]["mka"]["table"][-1]["removed"]]
    assert [row["layer"] for row in res["layers"]] == kept  # the exported model reports its layers in dense ids
    # every other command takes the merged model as a model, in dense ids
    for cmd, extra, name, check in (
            ("eval", ["--tasks", "arc_easy", "--remove", str(kept[0])], "eval.json", None),
            ("cka", ["--task", "arc_easy", "--remove", str(kept[0])], "cka.json", "pruned_layer_ids"),
            ("noise", ["--task", "arc_easy", "--scales", "0,1"], "noise.json", "layer_ids")):
        r = runner.invoke(app, [cmd, "--model", str(tmp_path / "x"), "--limit", "4", *extra, "--out", str(tmp_path / cmd)])
        assert r.exit_code == 0, (cmd, r.output)
        got = json.loads((tmp_path / cmd / name).read_text())
        if check == "pruned_layer_ids":
            assert got[check] == kept[1:]
        elif check:
            assert got[check] == kept
    r = runner.invoke(app, ["export", "--model", str(model_dir), "--from-prune", str(tmp_path / "p"),
                            "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "--method" in r.output
    r = runner.invoke(app, ["export", "--model", str(model_dir), "--from-prune", str(tmp_path / "p"), "--method", "laco",
                            "--ratio", "0.75", "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "its ratios" in r.output and not (tmp_path / "y").exists()
