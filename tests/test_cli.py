"""The command line, as a user runs it: a model directory on disk, real task rows, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from declens.cli import app

runner = CliRunner()


def test_analyze_writes_results(model_dir, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["analyze", "--model", str(model_dir), "--task", "arc_easy", "--limit", "6",
                            "--format", "cloze", "--dtype", "float32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "transition point" in r.output and "final accuracy" in r.output
    d = json.loads((out / "result.json").read_text())
    assert d["config"]["format"] == "cloze" and len(d["samples"]) == 6
    assert (out / "overview.png").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="--device-map shards over GPUs; without one it is refused "
                    "(tests/test_bad_input.py::test_device_map_without_gpus_is_refused)")
def test_device_map_auto_gives_the_same_numbers(model_dir, tmp_path):
    """``--device-map auto`` (accelerate placement over the GPUs) loads through transformers' device_map path
    and scores as the plain load on one GPU does."""
    outs = []
    for extra in (["--device", "cuda:0"], ["--device-map", "auto"]):
        out = tmp_path / f"run{len(outs)}"
        r = runner.invoke(app, ["analyze", "--model", str(model_dir), "--task", "arc_easy", "--limit", "5",
                                "--dtype", "float32", "--lens-layers", "last", "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        outs.append(json.loads((out / "result.json").read_text()))
    assert outs[0]["samples"] == outs[1]["samples"] and outs[0]["layers"] == outs[1]["layers"]


def test_analyze_pruned_view_reports_original_ids(model_dir, tmp_path):
    r = runner.invoke(app, ["analyze", "--model", str(model_dir), "--task", "piqa", "--limit", "4",
                            "--remove", "1,2", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "result.json").read_text())
    assert [row["layer"] for row in d["layers"]] == [0, 3] and d["config"]["remove"] == [1, 2]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "arc_hard"], "unknown task 'arc_hard'"),
        (["--task", "arc_easy", "--format", "essay"], "unknown format 'essay'"),
        (["--task", "arc_easy", "--remove", "0,1,2,3"], "removing all 4 layers"),
        (["--task", "arc_easy", "--remove", "9"], "out of range"),
        (["--task", "arc_easy", "--labels", "Qzx,Wvj,Kpf,Yqu"], "not one"),
        (["--task", "./missing.jsonl", "--fields", "question=q,choices=c,gold=g"], "does not exist"),
        (["--task", "arc_easy", "--max-memory", "2GiB"], "only applies with device_map"),
    ],
)
def test_bad_input_gives_clear_error(model_dir, tmp_path, args, message):
    r = runner.invoke(app, ["analyze", "--model", str(model_dir), "--limit", "3", "--out", str(tmp_path), *args])
    assert r.exit_code == 2
    assert "error:" in r.output and message in r.output.replace("\n", " ")
    assert "Traceback" not in r.output


def test_bad_model_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = runner.invoke(app, ["analyze", "--model", "./no/such/dir", "--task", "arc_easy"])
    assert r.exit_code == 2 and "does not exist" in r.output
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["analyze", "--model", str(tmp_path / "empty"), "--task", "arc_easy"])
    assert r.exit_code == 2 and "no config.json" in r.output
    r = runner.invoke(app, ["analyze", "--model", "someone/not-a-model", "--task", "arc_easy"])
    assert r.exit_code == 2 and "hub" in r.output


def test_unknown_preset_and_listings():
    r = runner.invoke(app, ["presets", "--fetch", "smollm3"])
    assert r.exit_code == 2 and "unknown preset 'smollm3'" in r.output and "smollm2-135m" in r.output
    r = runner.invoke(app, ["tasks"])
    assert r.exit_code == 0 and "winogrande" in r.output and "mmlu" in r.output
    r = runner.invoke(app, ["presets"])
    assert r.exit_code == 0 and "qwen2.5-coder-1.5b" in r.output


def test_prune_eval_ablate_export_commands(model_dir, tmp_path):
    r = runner.invoke(app, ["prune", "--model", str(model_dir), "--task", "arc_easy", "--limit", "8", "--calib-samples", "4",
                            "--method", "ip,last", "--skip-prun", "--max-ratio", "0.5", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "Remain" in r.output and "#Removed" in r.output and "critical" in r.output
    assert "ip #1: removed 1 [" in r.output and "#-1" not in r.output  # one progress line per step
    d = json.loads((tmp_path / "p" / "prune.json").read_text())
    assert set(d["methods"]) == {"ip", "last"} and d["config"]["skip_prun"]["enabled"]
    assert (tmp_path / "p" / "accuracy_vs_ratio.png").exists() and (tmp_path / "p" / "pruning_ip.png").exists()

    r = runner.invoke(app, ["eval", "--model", str(model_dir), "--remove", "1", "--remove", "1,2", "--tasks", "piqa,boolq",
                            "--limit", "4", "--formats", "letter,cloze", "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert "Avg" in r.output and "1,2" in r.output
    assert "| piqa |" in (tmp_path / "e" / "eval.md").read_text()

    r = runner.invoke(app, ["ablate", "--model", str(model_dir), "--task", "arc_easy", "--tp", "2", "--window", "1",
                            "--tasks", "piqa", "--limit", "4", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "a" / "ablate.json").read_text())
    assert d["kind"] == "ablate" and d["config"]["configs"] == ["dense", "1", "2", "3", "1,2", "2,3"]

    r = runner.invoke(app, ["export", "--model", str(model_dir), "--remove", "0,3", "--dtype", "float32",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 0, r.output
    assert "max |logit difference|" in r.output
    assert json.loads((tmp_path / "x" / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "--max-ratio", "1.2"], "strictly between 0 and 1"),
        (["prune", "--method", "magic"], "unknown pruning method"),
        (["eval", "--remove", "0,1,2,3"], "removing all 4 layers"),
        (["eval", "--remove", "2,2"], "more than once"),
        (["export", "--remove", "5", "--out", "never"], "out of range"),
        (["ablate", "--tp", "9"], "out of range"),
    ],
)
def test_pruning_commands_reject_bad_input(model_dir, args, message):
    r = runner.invoke(app, [args[0], "--model", str(model_dir), "--limit", "2", *args[1:]] if args[0] != "export"
                      else [args[0], "--model", str(model_dir), *args[1:]])
    assert r.exit_code == 2, r.output
    assert message in r.output.replace("\n", " ")
