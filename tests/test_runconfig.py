"""Run configurations (issue 9, "one run configuration"): every command records how it was invoked in
``config.json``; ``declens rerun DIR`` replays it into a new folder with the same numbers; ``--config FILE``
gives a command its defaults (the command line wins); bad files and folders fail with one clear line."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
from typer.testing import CliRunner

import declens
from conftest import make_analysis
from declens.cli import app
from declens.runconfig import CONFIG_FILE

runner = CliRunner()


def _analyze(model_dir, out, *extra: str):
    return runner.invoke(app, ["analyze", "--model", str(model_dir), "--task", "arc_easy", "--limit", "4",
                               "--format", "cloze", "--dtype", "float32", "--seed", "3", "--out", str(out), *extra])


def _same_numbers(a, b) -> None:
    """Two analysis results hold the same scores and metrics, row by row."""
    assert a.item_ids == b.item_ids and a.scores.layer_ids == b.scores.layer_ids
    np.testing.assert_array_equal(a.scores.scores, b.scores.scores)
    np.testing.assert_array_equal(a.metrics.dm, b.metrics.dm)
    np.testing.assert_array_equal(a.metrics.acc, b.metrics.acc)
    assert a.summary == b.summary


def test_analyze_records_its_invocation(model_dir, tmp_path):
    out = tmp_path / "run"
    r = _analyze(model_dir, out)
    assert r.exit_code == 0, r.output
    d = json.loads((out / CONFIG_FILE).read_text())
    assert d["schema"] == 1 and d["command"] == "analyze" and d["declens"] == declens.__version__
    p = d["params"]
    assert p["model"] == str(model_dir) and p["task"] == "arc_easy" and p["limit"] == 4 and p["seed"] == 3
    assert p["fmt"] == "cloze" and p["out"] == str(out)  # the Python names; paths as strings
    assert p["num_fewshot"] == 0 and p["lens_layers"] == "all" and p["split"] is None  # defaults resolved
    rc = declens.load_run_config(out)
    assert isinstance(rc, declens.RunConfig) and rc.command == "analyze" and rc.params == p
    declens.load_result(out)  # config.json lies beside the manifest's files: the folder still verifies

    # a run that fails after its folder was checked (the model cannot be loaded) records nothing
    recorded = (out / CONFIG_FILE).read_bytes()
    r = _analyze(tmp_path / "no-such-model", out, "--limit", "2")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert (out / CONFIG_FILE).read_bytes() == recorded
    r = _analyze(tmp_path / "no-such-model", tmp_path / "failed")
    assert r.exit_code == 2 and not (tmp_path / "failed").exists()


def test_rerun_replays_a_run_into_a_new_folder_with_the_same_numbers(model_dir, tmp_path):
    out = tmp_path / "run"
    assert _analyze(model_dir, out).exit_code == 0
    manifest = (out / "manifest.json").read_bytes()
    r = runner.invoke(app, ["rerun", str(out), "--dry-run"])
    assert r.exit_code == 0, r.output
    line = shlex.split(r.output.strip())
    assert line[:2] == ["declens", "analyze"] and not (tmp_path / "run_rerun").exists()
    assert line[line.index("--limit") + 1] == "4" and line[line.index("--seed") + 1] == "3"
    assert line[line.index("--out") + 1] == str(tmp_path / "run_rerun")

    r = runner.invoke(app, ["rerun", str(out)])
    assert r.exit_code == 0, r.output
    again = tmp_path / "run_rerun"
    _same_numbers(declens.load_result(out), declens.load_result(again))
    assert (out / "manifest.json").read_bytes() == manifest  # the replayed run is untouched
    rc = declens.load_run_config(again)
    assert rc.command == "analyze" and rc.params["out"] == str(again)
    assert {k: v for k, v in rc.params.items() if k != "out"} == {
        k: v for k, v in declens.load_run_config(out).params.items() if k != "out"}

    r = runner.invoke(app, ["rerun", str(out), "--out", str(out)])
    assert r.exit_code == 2 and "rerun never overwrites it" in r.output.replace("\n", " ")


def test_config_file_gives_defaults_and_the_command_line_wins(model_dir, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"analyze": {"model": str(model_dir), "task": "arc_easy", "limit": 3, "format": "cloze",
                                           "dtype": "float32", "seed": 3}}))
    out = tmp_path / "a"
    r = runner.invoke(app, ["--config", str(cfg), "analyze", "--limit", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    p = declens.load_run_config(out).params
    assert p["limit"] == 4 and p["task"] == "arc_easy" and p["fmt"] == "cloze" and p["seed"] == 3
    assert len(declens.load_result(out).item_ids) == 4

    # a results folder's config.json as --config: its parameters, not its folder; the command line still wins
    b = tmp_path / "b"
    r = runner.invoke(app, ["--config", str(out / CONFIG_FILE), "analyze", "--out", str(b)])
    assert r.exit_code == 0, r.output
    _same_numbers(declens.load_result(out), declens.load_result(b))
    r = runner.invoke(app, ["--config", str(out / CONFIG_FILE), "prune", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "records a 'declens analyze' run, not 'prune'" in r.output.replace("\n", " ")


def test_config_file_with_an_unknown_name_fails_before_any_work(model_dir, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"analyze": {"model": str(model_dir), "task": "arc_easy", "modle": "x", "limt": 3}}))
    out = tmp_path / "never"
    r = runner.invoke(app, ["--config", str(cfg), "analyze", "--out", str(out)])
    text = r.output.replace("\n", " ")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "'declens analyze' has no parameter 'limt', 'modle'" in text
    assert "its parameters are " in text and " limit, " in text and " model, " in text
    assert not out.exists()


def test_rerun_of_a_folder_without_config_json_says_why(tmp_path):
    old = make_analysis(tmp_path / "old", "m", "t", L=4, tp=2)  # written through the Python API
    r = runner.invoke(app, ["rerun", str(old)])
    text = r.output.replace("\n", " ")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "holds no config.json" in text and "older than run configurations" in text and "rerun by hand" in text
    with pytest.raises(declens.DeclensError, match="holds no config.json"):
        declens.load_run_config(old)


@pytest.mark.parametrize("command, argv", [
    ("analyze", ["--model", "m", "--task", "t", "--label-prefix", " ", "--remove", "-1", "--include-embeddings"]),
    ("eval", ["--model", "m", "--remove", "1", "--remove", "1,2", "--no-dense", "--limit", "5"]),
    ("prune", ["--model", "m", "--skip-prun", "--collapse-drop", "0.125", "--order", "3,1"]),
    ("correlate", ["--out", "with space", "a", "--", "-b"]),
    ("demo", []),
    ("compare", ["--model", "m", "--lr", "1e-4", "--eval-before"]),
])
def test_recorded_parameters_give_back_the_same_parameters(command, argv):
    """What ``rerun`` (and ``--dry-run``) builds from a config.json parses back to exactly the recorded values:
    repeated options, switches with a negative form, arguments that look like options, floats."""
    import typer.main

    from declens.cli import _command_line
    from declens.runconfig import make_run_config

    group = typer.main.get_command(app)
    root = group.make_context("declens", ["tasks"])
    cmd = group.get_command(root, command)

    def recorded(args: list[str]) -> dict:
        return json.loads(json.dumps(make_run_config(command, cmd.make_context(command, args, parent=root).params).params))

    first = recorded(list(argv))
    assert recorded(_command_line(cmd, first)) == first
    with pytest.raises(declens.DeclensError, match="'declens .*' of this declens does not take"):
        _command_line(cmd, {**first, "no_such_option": 1})


def test_a_config_json_left_beside_a_newer_result_is_refused(model_dir, tmp_path):
    """The Python API writes results without recording an invocation: a folder the CLI wrote and the API
    rewrote keeps the CLI's config.json, which no longer describes the result there. Replaying it would
    give other numbers than the folder holds, so rerun and --config refuse it; a copied config.json (no
    result beside it) still works as a template."""
    from declens.analyses.decision import AnalyzeConfig, analyze
    from declens.models import load_model
    from declens.tasks import load_task

    out = tmp_path / "run"
    assert _analyze(model_dir, out).exit_code == 0
    rid = json.loads((out / "manifest.json").read_text())["run_id"]
    assert json.loads((out / CONFIG_FILE).read_text())["run_id"] == rid  # bound to the result it describes
    template = tmp_path / "template.json"
    template.write_text((out / CONFIG_FILE).read_text())

    lm = load_model(str(model_dir), dtype="float32", device="cpu", progress=False)
    analyze(lm, load_task("arc_easy", limit=2, seed=5), "letter", AnalyzeConfig(), out_dir=out, progress=False,
            plots=False)  # another run into the same folder, through the API
    with pytest.raises(declens.DeclensError, match="cannot be replayed"):
        declens.load_run_config(out)
    r = runner.invoke(app, ["rerun", str(out), "--dry-run"])
    assert r.exit_code == 2 and "cannot be replayed" in r.output and not (tmp_path / "run_rerun").exists()
    r = runner.invoke(app, ["--config", str(out / CONFIG_FILE), "analyze", "--model", str(model_dir), "--out",
                            str(tmp_path / "b")])
    assert r.exit_code == 2 and "cannot be replayed" in r.output
    r = runner.invoke(app, ["--config", str(template), "analyze", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
