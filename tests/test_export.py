"""Exporting pruned models: layer ids are dense ids on dense and already-pruned models alike,
re-exporting over several rounds equals a one-shot export, and the self-check is enforced.
Every command that accepts a model is run on an already-pruned one and must report dense ids."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PRUNED_REMOVED, make_tiny, save_tiny
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from declens.cli import app
from declens.errors import DeclensError, LayerSpecError
from declens.models import load_model
from declens.pruning import export_pruned
from declens.pruning.export import EXPORT_TOLERANCE, compare_logits
from declens.surgery import REMOVED_ATTR

runner = CliRunner()
IDS = torch.tensor([[5, 17, 33, 101, 7, 250, 64, 12, 9, 300, 41, 2]])
#: removal rounds on a 7-layer model: middle layers, each round's ids next to earlier removals (where
#: positions and dense ids differ), ending without dense layers 2..5
ROUNDS = [[3], [4, 2], [5]]
PRUNED_KEPT = [0, 2, 4, 5]  # dense ids of ``pruned_model_dir``


def _layer_idx(model) -> list[int]:
    return [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def _saved(folder) -> tuple[dict, torch.Tensor, list[int]]:
    """Config, logits on IDS and attention ``layer_idx`` values of a saved model, loaded the plain way."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(IDS).logits
    return json.loads((folder / "config.json").read_text()), logits, _layer_idx(model)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3"])
def test_reexport_over_rounds_equals_one_shot(arch, tmp_path):
    dense_dir = save_tiny(tmp_path / "dense", arch, layers=7)
    src = dense_dir
    for r, remove in enumerate(ROUNDS):
        lm = load_model(str(src), dtype="float32", device="cpu", progress=False)
        info = export_pruned(lm, remove, tmp_path / f"round{r}")
        assert info["removed"] == remove and info["rel_logit_diff"] <= EXPORT_TOLERANCE[torch.float32]
        src = tmp_path / f"round{r}"
    assert info["removed_total"] == [3, 4, 2, 5] and info["kept_ids"] == [0, 1, 6]
    one = export_pruned(load_model(str(dense_dir), dtype="float32", device="cpu", progress=False), [3, 4, 2, 5],
                        tmp_path / "one")
    assert one["kept_ids"] == [0, 1, 6]
    cfg_r, logits_r, idx_r = _saved(src)
    cfg_1, logits_1, idx_1 = _saved(tmp_path / "one")
    torch.testing.assert_close(logits_r, logits_1, rtol=0, atol=1e-5)
    assert cfg_r["num_hidden_layers"] == cfg_1["num_hidden_layers"] == 3
    assert cfg_r.get("layer_types") == cfg_1.get("layer_types")
    if arch in ("qwen2", "gemma2"):  # per-layer attention types follow the kept dense layers
        dense_types = json.loads((dense_dir / "config.json").read_text())["layer_types"]
        assert cfg_r["layer_types"] == [dense_types[i] for i in (0, 1, 6)] and len(set(dense_types)) == 2
    assert set(cfg_r[REMOVED_ATTR]) == set(cfg_1[REMOVED_ATTR]) == {2, 3, 4, 5}
    assert cfg_r["declens_original_num_layers"] == cfg_1["declens_original_num_layers"] == 7
    assert idx_r == idx_1 and sorted(set(idx_r)) == [0, 1, 2]
    # and both equal the dense model run without those layers (a layer view of the dense model)
    from declens.surgery import keep_positions, layer_view

    dense = load_model(str(dense_dir), dtype="float32", device="cpu", progress=False)
    with torch.inference_mode(), layer_view(dense.parts, keep_positions(dense.parts, [2, 3, 4, 5])):
        torch.testing.assert_close(dense.model(IDS).logits, logits_1, rtol=0, atol=1e-5)


def test_ids_on_a_pruned_model_are_dense_ids(pruned_model_dir, tmp_path):
    lm = load_model(str(pruned_model_dir), dtype="float32", device="cpu", progress=False)
    with pytest.raises(LayerSpecError, match=r"\[3\] are already removed from this model \(it lacks dense layers \[1, 3\]\)"):
        export_pruned(lm, [3], tmp_path / "x")
    with pytest.raises(LayerSpecError, match="out of range: the dense model has 6 layers"):
        export_pruned(lm, [6], tmp_path / "x")
    with pytest.raises(LayerSpecError, match="all 4 remaining layers"):
        export_pruned(lm, PRUNED_KEPT, tmp_path / "x")
    assert not (tmp_path / "x").exists() and lm.num_layers == 4
    info = export_pruned(lm, [5], tmp_path / "y")  # dense id 5 > the 4 layers it has: still accepted
    assert info["kept_ids"] == [0, 2, 4] and info["removed_total"] == PRUNED_REMOVED + [5]


def test_self_check_failure_leaves_no_folder(tmp_path):
    """A real in-memory change that save_pretrained does not persist (the final norm's epsilon is a
    module attribute; the saved config keeps rms_norm_eps) makes the reload differ: refused, no folder."""
    lm = make_tiny("llama", layers=4)
    lm.model.model.norm.variance_epsilon = 5.0
    out = tmp_path / "sub" / "pruned"
    with pytest.raises(DeclensError, match="export self-check failed.*nothing was written"):
        export_pruned(lm, [1], out)
    assert not out.exists() and list((tmp_path / "sub").iterdir()) == []
    # an empty --out folder that exists is fine, and stays (empty) when the check fails
    out.mkdir()
    with pytest.raises(DeclensError, match="self-check failed"):
        export_pruned(make_tiny("llama", layers=4), [1], out, tolerance=-1.0)
    assert out.is_dir() and list(out.iterdir()) == [] and [p.name for p in (tmp_path / "sub").iterdir()] == ["pruned"]
    info = export_pruned(make_tiny("llama", layers=4), [1], out)
    assert (out / "config.json").is_file() and info["max_abs_logit_diff"] <= 1e-4 * info["logit_scale"]


def test_compare_logits_tolerance_by_dtype():
    ref = torch.linspace(-20, 20, 60).reshape(1, 3, 20)
    assert compare_logits(ref, ref.clone(), torch.float32).ok
    near = ref + 1e-3  # 5e-5 of the logit scale 20
    assert compare_logits(ref, near, torch.float32).ok
    far = ref + 1e-2  # 5e-4 of the scale
    chk = compare_logits(ref, far, torch.float32)
    assert not chk.ok and chk.logit_scale == 20 and chk.rel_logit_diff == pytest.approx(5e-4, rel=1e-3)
    assert compare_logits(ref, far, torch.bfloat16).ok and compare_logits(ref, far, torch.float16).ok
    assert not compare_logits(ref, ref + 2.0, torch.bfloat16).ok
    assert not compare_logits(ref, ref, torch.float32, tolerance=-1).ok
    bad = ref.clone()
    bad[0, 0, 0] = float("nan")
    assert not compare_logits(ref, bad, torch.float32).ok
    assert not compare_logits(ref, ref[:, :2], torch.float32).ok


def test_bfloat16_export_passes_its_self_check(tmp_path):
    lm = make_tiny("qwen2", layers=4, dtype=torch.bfloat16)
    info = export_pruned(lm, [2], tmp_path / "bf16")
    assert info["tolerance"] == EXPORT_TOLERANCE[torch.bfloat16] and info["rel_logit_diff"] <= info["tolerance"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert back.dtype == torch.bfloat16 and back.config.num_hidden_layers == 3


# ------------------------------------------------------------------------------------------------
# The command line on an already-pruned model


def _invoke(*args: str):
    r = runner.invoke(app, [str(a) for a in args])
    return r, " ".join(r.output.split())


def test_cli_export_twice_equals_one_shot(tmp_path):
    """The issue's repro on a tiny model: remove 24,23 then 26 == remove 24,23,26 (here 3,2 then 4)."""
    dense = save_tiny(tmp_path / "dense", "qwen3", layers=6)
    r, out = _invoke("export", "--model", dense, "--remove", "3,2", "--dtype", "float32", "--out", tmp_path / "p1")
    assert r.exit_code == 0, out
    assert "removed dense layers [3, 2]" in out and "self-check passed" in out
    r, out = _invoke("export", "--model", tmp_path / "p1", "--remove", "4", "--dtype", "float32", "--out", tmp_path / "p4")
    assert r.exit_code == 0, out
    assert "it lacks dense layers [3, 2, 4]" in out
    r, out = _invoke("export", "--model", dense, "--remove", "3,2,4", "--dtype", "float32", "--out", tmp_path / "one")
    assert r.exit_code == 0, out
    cfg_2, logits_2, _ = _saved(tmp_path / "p4")
    cfg_1, logits_1, _ = _saved(tmp_path / "one")
    assert cfg_2[REMOVED_ATTR] == [3, 2, 4] and cfg_2 == cfg_1
    torch.testing.assert_close(logits_2, logits_1, rtol=0, atol=1e-5)
    # an already-removed id is refused with a clear message and nothing is written
    r, out = _invoke("export", "--model", tmp_path / "p1", "--remove", "2", "--dtype", "float32", "--out", tmp_path / "bad")
    assert r.exit_code == 2 and "Traceback" not in out
    assert "layer id(s) [2] are already removed from this model (it lacks dense layers [2, 3])" in out
    assert not (tmp_path / "bad").exists()
    # a dense id beyond the pruned model's layer count that it still has is accepted (p1 has 4 layers)
    r, out = _invoke("export", "--model", tmp_path / "p1", "--remove", "5", "--dtype", "float32", "--out", tmp_path / "p5")
    assert r.exit_code == 0, out
    assert json.loads((tmp_path / "p5" / "config.json").read_text())[REMOVED_ATTR] == [3, 2, 5]


def test_cli_export_refuses_bad_out_before_loading(tmp_path):
    (tmp_path / "file").write_text("x")
    r, out = _invoke("export", "--model", tmp_path / "nothing-here", "--remove", "1", "--out", tmp_path / "file")
    assert r.exit_code == 2 and "is a file" in out


def test_cli_analyze_on_pruned_model(pruned_model_dir, tmp_path):
    r, out = _invoke("analyze", "--model", pruned_model_dir, "--task", "piqa", "--limit", "4", "--dtype", "float32",
                     "--out", tmp_path / "a")
    assert r.exit_code == 0, out
    d = json.loads((tmp_path / "a" / "result.json").read_text())
    assert [row["layer"] for row in d["layers"]] == PRUNED_KEPT
    r, out = _invoke("analyze", "--model", pruned_model_dir, "--task", "piqa", "--limit", "4", "--dtype", "float32",
                     "--remove", "4", "--out", tmp_path / "b")
    assert r.exit_code == 0, out
    assert [row["layer"] for row in json.loads((tmp_path / "b" / "result.json").read_text())["layers"]] == [0, 2, 5]
    r, out = _invoke("analyze", "--model", pruned_model_dir, "--task", "piqa", "--limit", "4", "--remove", "1",
                     "--out", tmp_path / "c")
    assert r.exit_code == 2 and "already removed" in out


def test_cli_eval_on_pruned_model(pruned_model_dir, tmp_path):
    r, out = _invoke("eval", "--model", pruned_model_dir, "--remove", "5", "--remove", "4,2", "--tasks", "piqa",
                     "--limit", "4", "--dtype", "float32", "--out", tmp_path / "e")
    assert r.exit_code == 0, out
    cells = json.loads((tmp_path / "e" / "eval.json").read_text())["cells"]
    assert {c["removed"]: c["layer_ids"] for c in cells} == {"dense": PRUNED_KEPT, "5": [0, 2, 4], "4,2": [0, 5]}
    by = {c["removed"]: c for c in cells}
    assert by["5"]["dm"] == by["dense"]["dm"][:3]  # removing the last layer keeps the earlier layers' numbers


def test_cli_prune_on_pruned_model(pruned_model_dir, tmp_path):
    r, out = _invoke("prune", "--model", pruned_model_dir, "--task", "arc_easy", "--limit", "6", "--calib-samples", "4",
                     "--method", "ip,last", "--max-ratio", "0.5", "--dtype", "float32", "--out", tmp_path / "p")
    assert r.exit_code == 0, out
    d = json.loads((tmp_path / "p" / "prune.json").read_text())
    for method in ("ip", "last"):
        for row in d["methods"][method]["table"]:
            assert set(row["removed"]) <= set(PRUNED_KEPT)
    last = [row["removed"] for row in d["methods"]["last"]["table"]]
    assert [4] in last and [4, 2] in last  # 'last' removes the deepest layers but the final one, by dense id
    r, out = _invoke("prune", "--model", pruned_model_dir, "--task", "arc_easy", "--limit", "4", "--calib-samples", "4",
                     "--method", "replay", "--order", "5,4", "--max-ratio", "0.5", "--dtype", "float32",
                     "--out", tmp_path / "r")
    assert r.exit_code == 0, out
    d = json.loads((tmp_path / "r" / "prune.json").read_text())
    assert [row["removed"] for row in d["methods"]["replay"]["table"]][-1] == [5, 4]
    r, out = _invoke("prune", "--model", pruned_model_dir, "--task", "arc_easy", "--limit", "4", "--method", "replay",
                     "--order", "3,4", "--dtype", "float32", "--out", tmp_path / "bad")
    assert r.exit_code == 2 and "already removed" in out


def test_cli_cka_on_pruned_model(pruned_model_dir, tmp_path):
    r, out = _invoke("cka", "--model", pruned_model_dir, "--task", "piqa", "--limit", "8", "--remove", "4",
                     "--dtype", "float32", "--out", tmp_path / "c")
    assert r.exit_code == 0, out
    d = json.loads((tmp_path / "c" / "cka.json").read_text())
    assert d["pruned_layer_ids"] == [0, 2, 5] and d["dense_layer_ids"] == PRUNED_KEPT


def test_cli_noise_on_pruned_model(pruned_model_dir, tmp_path):
    r, out = _invoke("noise", "--model", pruned_model_dir, "--task", "piqa", "--limit", "4", "--scales", "0,1",
                     "--layers", "5,2", "--dtype", "float32", "--out", tmp_path / "n")
    assert r.exit_code == 0, out
    d = json.loads((tmp_path / "n" / "noise.json").read_text())
    assert d["dense"]["layer_ids"] == PRUNED_KEPT and d["layer_ids"] == [2, 5]
    assert [row["layer"] for row in d["layers"]] == [2, 5]
    assert [row["sigma"] for row in d["layers"]] == pytest.approx([d["sigma_by_mode"]["no-first"][k] for k in ("2", "5")])
    r, out = _invoke("noise", "--model", pruned_model_dir, "--task", "piqa", "--limit", "4", "--layers", "3",
                     "--out", tmp_path / "bad")
    assert r.exit_code == 2 and "[3]" in out


def test_cli_ablate_on_pruned_model(pruned_model_dir, tmp_path):
    r, out = _invoke("ablate", "--model", pruned_model_dir, "--task", "piqa", "--tp", "4", "--window", "1",
                     "--tasks", "piqa", "--limit", "4", "--dtype", "float32", "--out", tmp_path / "a")
    assert r.exit_code == 0, out
    d = json.loads((tmp_path / "a" / "ablate.json").read_text())
    # the window around dense layer 4 follows the layers the model has: 2, 4, 5 and the pairs that run adjacently
    assert d["config"]["configs"] == ["dense", "2", "4", "5", "2,4", "4,5"]
    r, out = _invoke("ablate", "--model", pruned_model_dir, "--task", "piqa", "--tp", "3", "--tasks", "piqa",
                     "--limit", "4", "--out", tmp_path / "bad")
    assert r.exit_code == 2 and "[0, 2, 4, 5]" in out


def test_cli_recover_on_pruned_model(pruned_model_dir, tmp_path):
    r, out = _invoke("recover", "--model", pruned_model_dir, "--task", "arc_easy", "--remove", "4", "--ft-method", "lora",
                     "--train-samples", "4", "--max-steps", "1", "--limit", "4", "--dtype", "float32",
                     "--max-length", "96", "--out", tmp_path / "run", "--export-dir", tmp_path / "models")
    assert r.exit_code == 0, out
    d = json.loads((tmp_path / "run" / "recover.json").read_text())
    assert d["runs"][0]["removed"] == [4]
    saved = [p for p in (tmp_path / "models").iterdir() if (p / "config.json").is_file()]
    assert len(saved) == 1
    cfg = json.loads((saved[0] / "config.json").read_text())
    assert set(cfg[REMOVED_ATTR]) == {1, 3, 4} and cfg["num_hidden_layers"] == 3
    r, out = _invoke("recover", "--model", pruned_model_dir, "--task", "arc_easy", "--remove", "1", "--limit", "4",
                     "--out", tmp_path / "bad")
    assert r.exit_code == 2 and "already removed" in out
