import json

import pytest
from typer.testing import CliRunner
from declens.cli import app

runner = CliRunner()


def test_recover_command(model_dir, tmp_path):
    r = runner.invoke(app, ["recover", "--model", str(model_dir), "--task", "arc_easy", "--remove", "1,2", "--remove", "3",
                            "--ft-method", "lora", "--train-samples", "8", "--max-steps", "2", "--lr", "1e-3", "--limit", "6",
                            "--dtype", "float32", "--max-length", "96", "--out", str(tmp_path / "run"),
                            "--export-dir", str(tmp_path / "models")])
    assert r.exit_code == 0, r.output
    assert "restored" in r.output
    d = json.loads((tmp_path / "run" / "recover.json").read_text())
    assert [x["removed"] for x in d["runs"]] == [[1, 2], [3]] and d["config"]["finetune"]["lr"] == 1e-3
    assert d["config"]["finetune"]["max_steps"] == 2 and d["runs"][0]["train"]["steps"] == 2
    assert (tmp_path / "models" / "00_k2" / "config.json").is_file()


def test_recover_from_prune_command(model_dir, tmp_path):
    r = runner.invoke(app, ["prune", "--model", str(model_dir), "--task", "arc_easy", "--method", "last", "--limit", "6",
                            "--max-ratio", "0.5", "--calib-samples", "4", "--dtype", "float32", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["recover", "--model", str(model_dir), "--from-prune", str(tmp_path / "p"), "--prune-method", "last",
                            "--ratios", "0.5", "--ft-method", "full", "--train-samples", "8", "--max-steps", "1",
                            "--dtype", "float32", "--max-length", "96", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "run" / "recover.json").read_text())
    p = json.loads((tmp_path / "p" / "prune.json").read_text())
    assert d["config"]["task"] == "arc_easy" and d["config"]["limit"] == 6 and d["config"]["format"] == "letter"
    assert d["runs"][0]["k"] == 2 and d["config"]["prune"]["method"] == "last"
    best = [row for row in p["methods"]["last"]["table"] if row["removed_count"] == 2][0]
    assert d["runs"][0]["removed"] == best["removed"]
    assert d["runs"][0]["before"]["final_accuracy"] == pytest.approx(best["final_accuracy"])


@pytest.mark.parametrize("args, msg", [
    ([], "--remove"),
    (["--remove", "1", "--from-prune", "x"], "one of the two"),
    (["--remove", "1", "--ratios", "0.5"], "--from-prune"),
    (["--remove", "1", "--ft-method", "qlora"], "unknown fine-tuning method"),
    # the deprecated name still reaches the same check, and says it is deprecated
    (["--remove", "1", "--method", "qlora"], "recover --method is deprecated: it is --ft-method now"),
    (["--remove", "9"], "out of range"),
    (["--remove", "1", "--task", "hellaswag"], "no training split"),
    (["--remove", "1", "--epochs", "0"], "epochs=0"),
    (["--from-prune", "nope", "--ratios", "abc"], "bad --ratios"),
    (["--from-prune", "nope"], "holds no prune.json"),
])
def test_recover_bad_input(model_dir, args, msg):
    r = runner.invoke(app, ["recover", "--model", str(model_dir), "--limit", "4", "--dtype", "float32", *args])
    assert r.exit_code == 2 and msg in r.output, r.output
