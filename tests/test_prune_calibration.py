"""Block Influence calibration rows (docs/METHOD.md, "Block Influence calibration rows"): ARC-Challenge
train by default, as the paper; any task on request; never an evaluated row unless --calib-from-eval."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import make_tiny, save_tiny
from declens.cli import app
from declens.errors import DeclensError
from declens.pruning import PruneConfig, prune
from declens.pruning.run import CALIB_TASK, calibration_data
from declens.tasks import REGISTRY, load_task


def _ids(data) -> set[str]:
    return {json.dumps([it.id, it.question, list(it.choices)]) for it in data.items}


@pytest.mark.parametrize("task", sorted(REGISTRY))
def test_calibration_never_takes_evaluated_rows(task):
    data = load_task(task, limit=40)
    default = calibration_data(data, None, None, 16, 0)
    assert (default.name, default.split) == (CALIB_TASK, "train")  # the paper's ARC-Challenge, whatever the task
    assert "the paper's ARC-Challenge" in default.selection["calibration"]
    own = calibration_data(data, task, None, 16, 0)  # the evaluated task's own rows, when it has a split to spare
    assert own.split != data.split or own.name != data.name
    if own.name == task:
        assert own.split == REGISTRY[task].fewshot_split
    else:  # only the evaluated split exists: ARC-Challenge train, and the result says so
        assert (own.name, own.split) == (CALIB_TASK, "train") and "fallback" in own.selection["calibration"]
    full_eval = load_task(task, split=data.split)
    assert not (_ids(own) & _ids(full_eval)) or own.name != task


def test_calibrating_on_the_evaluated_split_needs_calib_from_eval():
    data = load_task("arc_challenge", split="train", limit=20)
    other = calibration_data(data, None, None, 8, 0)
    assert other.split == "validation"  # ARC-Challenge train is evaluated here: another split of it
    with pytest.raises(DeclensError, match="--calib-from-eval"):
        calibration_data(data, "arc_challenge", "train", 8, 0)


def test_prune_records_the_calibration_rule():
    lm = make_tiny("llama", layers=4)
    data = load_task("piqa", limit=8)
    kw = dict(methods=["last"], max_ratio=0.3, calib_samples=4)
    cal = prune(lm, data, "letter", PruneConfig(calib_task="piqa", **kw), progress=False, plots=False).config["calibration"]
    assert cal["task"] == CALIB_TASK and cal["split"] == "train" and "fallback" in cal["calibration"]
    cal = prune(lm, data, "letter", PruneConfig(calib_from_eval=True, **kw), progress=False, plots=False).config["calibration"]
    assert cal["task"] == "piqa" and cal["calibration"] == "from evaluated rows"


def test_cli_calibration_options(tmp_path):
    model = save_tiny(tmp_path / "tiny", "llama", layers=4)
    common = ["prune", "--model", str(model), "--task", "boolq", "--limit", "8", "--dtype", "float32",
              "--method", "ip", "--max-ratio", "0.3", "--calib-samples", "4"]
    r = CliRunner().invoke(app, [*common, "--calib-task", "boolq", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "fallback, boolq has no split besides the evaluated 'validation'" in " ".join(r.output.split())
    cal = json.loads((tmp_path / "a" / "prune.json").read_text())["config"]["calibration"]
    assert (cal["task"], cal["split"]) == (CALIB_TASK, "train")
    bad = CliRunner().invoke(app, [*common, "--calib-task", "boolq", "--calib-split", "validation",
                                   "--out", str(tmp_path / "b")])
    assert bad.exit_code != 0 and "--calib-from-eval" in bad.output and not (tmp_path / "b").exists()
