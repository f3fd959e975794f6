"""Result files: provenance, round trip, determinism, and resume after a killed run."""

from __future__ import annotations

import json

import numpy as np
import pytest

import declens.runner
import declens.scoring
from conftest import make_tiny
from declens.analyses.decision import AnalyzeConfig, analyze
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
    full = analyze(lm, data, fmt, AnalyzeConfig(max_tokens=200), progress=False)

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
        analyze(lm, data, fmt, AnalyzeConfig(max_tokens=200), progress=False, out_dir=tmp_path)
    assert not (tmp_path / "result.json").exists()
    assert list((tmp_path / ".checkpoint").glob("*.npz"))

    done_before = calls["n"]
    monkeypatch.setattr(declens.runner, "forward", real_forward)
    counted = {"n": 0}

    def counting_forward(*args, **kwargs):
        counted["n"] += 1
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(declens.runner, "forward", counting_forward)
    resumed = analyze(lm, data, fmt, AnalyzeConfig(max_tokens=200), progress=False, out_dir=tmp_path)
    assert done_before == 4 and counted["n"] > 0
    total_batches = 3 + counted["n"]  # three batches survived the kill
    assert counted["n"] < total_batches
    np.testing.assert_array_equal(resumed.scores.scores, full.scores.scores)
    assert not (tmp_path / ".checkpoint").exists()


# ------------------------------------------------------------------------------------------------
# Run folders as a whole: manifest written last, verified by every reader


def _manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _refused(r, what: str = "incomplete or was modified") -> None:
    """A CLI run refused with exit 2 and one clear line, no traceback."""
    text = " ".join(r.output.split())  # the console wraps long lines
    assert r.exit_code == 2, r.output
    assert text.startswith("error: ") and text.count("error:") == 1, r.output
    assert what in text and "rerun the command that wrote it" in text, r.output
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Real analysis runs on 8 and on 6 rows (4 figures each) and a prune run, from the tiny model."""
    from declens.pruning.run import PruneConfig, prune

    root = tmp_path_factory.mktemp("folders")
    lm = make_tiny("qwen3")
    analyze(lm, load_task("arc_easy", limit=8, seed=0), "cloze", out_dir=root / "a8", progress=False)
    analyze(lm, load_task("arc_easy", limit=6, seed=0), "cloze", out_dir=root / "a6", progress=False)
    prune(lm, load_task("arc_easy", limit=6, seed=0), "cloze", PruneConfig(["last"], max_ratio=0.5, calib_samples=4),
          out_dir=root / "p", progress=False)
    return root


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_manifest_lists_every_file_and_resume_state_is_gone(folders):
    from declens.results import file_digest

    for name, expect in (("a8", {"result.json", "layers.csv", "scores.npz", "dm.png", "accuracy.png",
                                 "option_frequency.png", "overview.png"}),
                         ("p", {"prune.json", "table.csv", "steps.csv", "accuracy_vs_ratio.png", "pruning_last.png"})):
        folder = folders / name
        m = _manifest(folder)
        assert m["kind"] == ("analysis" if name == "a8" else "prune") and len(m["run_id"]) == 32 and m["complete"]
        listed = {f["path"] for f in m["files"]}
        assert m["declens"] and listed >= expect and all(n.endswith(".png") for n in listed - expect)
        for f in m["files"]:
            assert (f["size"], f["sha256"]) == file_digest(folder / f["path"])
        on_disk = {q.name for q in folder.iterdir()}
        assert on_disk == listed | {"manifest.json"}  # no .checkpoint, .prune-state.json, .*.tmp or previous manifest


def test_a_file_of_an_earlier_run_is_refused_by_every_reader(folders, tmp_path, model_dir):
    """scores.npz, a figure or a prune table replaced by another run's: the loaders, report, correlate and
    recover --from-prune all refuse the folder with one line, exit 2, no traceback."""
    import shutil

    from declens.analyses.correlation import correlate
    from declens.cli import app
    from declens.errors import DeclensError
    from declens.pruning.run import PruneResult
    from declens.report import build_report
    from typer.testing import CliRunner

    runner = CliRunner()
    stale_npz = _copy(folders / "a6", tmp_path / "stale_npz")
    shutil.copyfile(folders / "a8" / "scores.npz", stale_npz / "scores.npz")
    stale_fig = _copy(folders / "a6", tmp_path / "stale_fig")
    shutil.copyfile(folders / "a8" / "dm.png", stale_fig / "dm.png")
    stale_prune = _copy(folders / "p", tmp_path / "stale_prune")
    with open(stale_prune / "steps.csv", "a") as f:
        f.write("last,99,1,0.2500,3,0.1,0.1,,True,False,,,,[3],\n")
    for bad, name in ((stale_npz, "scores.npz"), (stale_fig, "dm.png")):
        with pytest.raises(DeclensError, match=f"incomplete or was modified.*{name}"):
            AnalysisResult.load(bad)
        with pytest.raises(DeclensError, match=name):
            build_report([bad], tmp_path / "r.html")
        with pytest.raises(DeclensError, match=name):
            correlate([bad, folders / "a8", folders / "p"])
        _refused(runner.invoke(app, ["report", str(bad), "--out", str(tmp_path / "r.html")]))
        _refused(runner.invoke(app, ["correlate", str(bad), str(folders / "a8"), str(folders / "p"),
                                     "--out", str(tmp_path / "c")]))
    with pytest.raises(DeclensError, match="steps.csv has .* bytes, the run wrote"):
        PruneResult.load(stale_prune)
    _refused(runner.invoke(app, ["recover", "--model", str(model_dir), "--from-prune", str(stale_prune),
                                 "--dtype", "float32", "--out", str(tmp_path / "rec")]))
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "c").exists() and not (tmp_path / "rec").exists()


def test_a_folder_without_manifest_is_refused_with_the_fix(folders, tmp_path, model_dir):
    """An older declens's folder, or one whose run died before its last write: no manifest."""
    from declens.analyses.recovery import RecoveryResult
    from declens.cli import app
    from declens.errors import DeclensError
    from declens.pruning.run import PruneResult
    from typer.testing import CliRunner

    runner = CliRunner()
    a = _copy(folders / "a8", tmp_path / "a")
    p = _copy(folders / "p", tmp_path / "p")
    rec = tmp_path / "rec"
    RecoveryResult(config={"model": "m"}, provenance={}, runs=[], dense=None).save(rec, plots=False)
    assert RecoveryResult.load(rec).config == {"model": "m"}
    for folder in (a, p, rec):
        (folder / "manifest.json").unlink()
    for load, folder in ((AnalysisResult.load, a), (PruneResult.load, p), (RecoveryResult.load, rec)):
        with pytest.raises(DeclensError, match="has no manifest.json.*older declens.*rerun the command that wrote it"):
            load(folder)
    _refused(runner.invoke(app, ["report", str(a), str(p), "--out", str(tmp_path / "r.html")]), "no manifest.json")
    _refused(runner.invoke(app, ["correlate", str(a), str(p), str(folders / "a6"), "--out", str(tmp_path / "c")]),
             "no manifest.json")
    _refused(runner.invoke(app, ["recover", "--model", str(model_dir), "--from-prune", str(p), "--dtype", "float32",
                                 "--out", str(tmp_path / "r")]), "no manifest.json")
    # an intermediate save of a recover run (finished configurations kept while it works) reads as partial
    RecoveryResult(config={}, provenance={"partial": True}, runs=[], dense=None).save(tmp_path / "part", plots=False)
    with pytest.raises(DeclensError, match="holds a partial recover result.*rerun"):
        RecoveryResult.load(tmp_path / "part")


def test_a_save_killed_between_files_leaves_an_incomplete_folder_and_a_rerun_completes_it(tmp_path):
    """A real failed write: ``dm.png`` cannot be replaced (a directory took its name) after the new run's
    result.json and scores.npz were written, next to the old run's figures: exactly the folder of a kill
    during the final writes. Every reader refuses it; a rerun completes it and removes leftovers."""
    from declens.errors import DeclensError
    from declens.report import build_report
    from declens.results import find_runs, load_result

    lm = make_tiny("qwen3")
    folder = tmp_path / "run"
    analyze(lm, load_task("arc_easy", limit=8, seed=0), "cloze", out_dir=folder, progress=False)
    (folder / "dm.png").unlink()
    (folder / "dm.png").mkdir()
    data6 = load_task("arc_easy", limit=6, seed=0)
    with pytest.raises(IsADirectoryError):
        analyze(lm, data6, "cloze", out_dir=folder, progress=False)
    assert json.loads((folder / "result.json").read_text())["config"]["limit"] == 6  # new result, old figures
    assert (folder / "overview.png").exists() and not (folder / "manifest.json").exists()
    assert not list(folder.glob(".*.tmp"))  # the failed atomic write removed its temp file
    for read in (AnalysisResult.load, load_result, find_runs, lambda f: build_report([f], tmp_path / "r.html")):
        with pytest.raises(DeclensError, match="has no manifest.json"):
            read(folder)
    # a SIGKILL leaves temp files behind; the rerun removes them
    (folder / ".scores.npz.x1y2.tmp").write_bytes(b"half")
    (folder / "dm.png").rmdir()
    res = analyze(lm, data6, "cloze", out_dir=folder, progress=False)
    back = AnalysisResult.load(folder)
    assert back.item_ids == res.item_ids and len(back.item_ids) == 6
    figures = [f for f in _manifest(folder)["files"] if f["path"].endswith(".png")]
    assert not list(folder.glob(".*")) and len(figures) >= 4 and len(_manifest(folder)["files"]) == len(figures) + 3
    page = build_report([folder], tmp_path / "r.html").read_text()
    assert page.count("<img ") == len(figures) and "6 rows" in page


def test_files_of_the_previous_run_that_a_rerun_does_not_write_are_deleted(tmp_path):
    lm = make_tiny("qwen3")
    data = load_task("arc_easy", limit=6, seed=0)
    analyze(lm, data, "letter", out_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.png"))) == 4
    analyze(lm, data, "letter", out_dir=tmp_path, progress=False, plots=False)
    assert not list(tmp_path.glob("*.png"))  # stale figures of the first run are gone, not shown next to new numbers
    assert {f["path"] for f in _manifest(tmp_path)["files"]} == {"result.json", "layers.csv", "scores.npz"}


def test_a_result_of_another_command_is_not_overwritten(tmp_path):
    from declens.errors import DeclensError
    from declens.pruning.run import PruneConfig, prune

    lm = make_tiny("qwen3")
    data = load_task("arc_easy", limit=6, seed=0)
    analyze(lm, data, "letter", out_dir=tmp_path, progress=False, plots=False)
    before = _manifest(tmp_path)
    with pytest.raises(DeclensError, match="holds the result of another command .kind analysis.*--out"):
        prune(lm, data, "letter", PruneConfig(["last"], max_ratio=0.5, calib_samples=4), out_dir=tmp_path, progress=False)
    assert _manifest(tmp_path) == before
    AnalysisResult.load(tmp_path)


def test_a_resumed_analysis_reports_the_rows_it_scored(model_dir, tmp_path, monkeypatch):
    """Killed after some batches, then resumed: the CLI line and the provenance count only the rows this
    process scored, and the rows restored from the checkpoint separately."""
    import re

    from declens.cli import app
    from typer.testing import CliRunner

    monkeypatch.setattr(declens.scoring, "CHECKPOINT_EVERY_S", 0.0)
    real_forward = declens.runner.forward
    calls = {"n": 0}

    def dying_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_forward(*args, **kwargs)

    args = ["analyze", "--model", str(model_dir), "--task", "arc_easy", "--limit", "20", "--format", "letter",
            "--dtype", "float32", "--max-tokens", "300", "--out", str(tmp_path)]
    monkeypatch.setattr(declens.runner, "forward", dying_forward)
    r = CliRunner().invoke(app, args)  # stopped as by Ctrl-C (exit status 130)
    assert r.exit_code == 130 and calls["n"] == 3 and not (tmp_path / "manifest.json").exists()
    (ck,) = (tmp_path / ".checkpoint").glob("*.npz")
    with np.load(ck) as z:
        restored = int(z["done"].sum())  # letter format: one row per item
    assert 0 < restored < 20
    monkeypatch.setattr(declens.runner, "forward", real_forward)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    t = json.loads((tmp_path / "result.json").read_text())["provenance"]["timing"]
    assert (t["items_scored"], t["items_restored"]) == (20 - restored, restored)
    line = " ".join(r.output.split())
    assert re.search(rf"scored {20 - restored} items in [0-9.]+ s \([0-9.]+ items/s; {restored} more restored from a "
                     r"checkpoint\)", line), line
    assert not (tmp_path / ".checkpoint").exists()


def test_a_resumed_prune_reports_the_states_it_evaluated(model_dir, tmp_path, monkeypatch):
    """The same for ``prune``: killed after a few evaluations, resumed from ``.prune-state.json``, which is
    removed once the folder is written."""
    import re

    from declens.cli import app
    from declens.pruning.engine import PruningEngine
    from typer.testing import CliRunner

    real = PruningEngine.evaluate
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)

    args = ["prune", "--model", str(model_dir), "--task", "arc_easy", "--method", "last", "--limit", "6",
            "--max-ratio", "0.75", "--calib-samples", "4", "--dtype", "float32", "--out", str(tmp_path)]
    monkeypatch.setattr(PruningEngine, "evaluate", dying)
    assert CliRunner().invoke(app, args).exit_code == 130
    stored = len(json.loads((tmp_path / ".prune-state.json").read_text())["evaluations"])
    monkeypatch.setattr(PruningEngine, "evaluate", real)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "prune.json").read_text())
    t, work = d["provenance"]["timing"], d["work"]
    assert t["evaluations_restored"] == stored == work["resumed_evaluations"] == 2
    assert t["evaluations_run"] + stored == work["evaluations"]
    line = " ".join(r.output.split())
    assert re.search(rf"{t['evaluations_run']} states evaluated in [0-9.]+ s \({stored} more restored from a "
                     r"checkpoint\)", line), line
    assert not (tmp_path / ".prune-state.json").exists() and not list(tmp_path.glob(".*"))
