"""The result contract (issue 9): every command's folder loads back as its typed result through
``declens.load_result``, older schema versions are converted or refused with the fix, unknown kinds are
refused, and ``find_runs`` finds exactly the run folders.

One real run of each command on the tiny model (a few rows each), through the CLI, in a module fixture.
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

import declens
from conftest import make_analysis, make_prune
from declens.cli import app
from declens.errors import DeclensError
from declens.results import RESULT_KINDS, file_digest, find_runs, load_result

runner = CliRunner()

#: folder name -> (CLI arguments after --model, kind)
COMMANDS = {
    "analysis": (["analyze", "--task", "arc_easy", "--limit", "6"], "analysis"),
    "prune": (["prune", "--task", "arc_easy", "--method", "last", "--limit", "6", "--max-ratio", "0.5",
               "--calib-samples", "4"], "prune"),
    "eval": (["eval", "--remove", "1", "--tasks", "piqa", "--limit", "4", "--formats", "letter"], "eval"),
    "ablate": (["ablate", "--task", "arc_easy", "--tp", "2", "--window", "1", "--tasks", "piqa", "--limit", "4"],
               "ablate"),
    "cka": (["cka", "--task", "arc_easy", "--limit", "6", "--prune-run", "{root}/prune", "--prune-method", "last",
             "--ratio", "0.5"], "cka"),
    "noise": (["noise", "--task", "arc_easy", "--limit", "3", "--layers", "1", "--scales", "0,0.5"], "noise"),
    "recover": (["recover", "--from-prune", "{root}/prune", "--prune-method", "last", "--ratios", "0.5", "--ft-method",
                 "full", "--train-samples", "8", "--max-steps", "1", "--max-length", "96"], "recover"),
    "compare": (["compare", "--methods", "last", "--ratios", "0.25", "--tasks", "arc_easy", "--limit", "4",
                 "--calib-samples", "4", "--train-tasks", "arc_easy", "--train-samples", "8", "--ft-method", "lora",
                 "--epochs", "1", "--lr", "3e-3", "--batch-size", "4", "--max-length", "96"], "compare"),
    "study": (["study", "--tasks", "arc_easy", "--formats", "letter", "--limit", "6", "--ip-max-ratio", "0.5",
               "--calib-samples", "4", "--recover-ratios", "", "--stages", "analysis,prune"], "study"),
}
#: synthetic analysis / prune folders (three models with a Transition Point and a critical ratio) for correlate
SYNTHETIC = (("syn-a", 10, 3, 5), ("syn-b", 12, 8, 2), ("syn-c", 16, 6, 7))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir):
    """``{name: folder}`` of one real run of every command (plus the synthetic inputs of correlate)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (args, _) in COMMANDS.items():
        args = [a.replace("{root}", str(root)) for a in args]
        r = runner.invoke(app, [args[0], "--model", str(model_dir), *args[1:], "--dtype", "float32",
                                "--out", str(root / name)])
        assert r.exit_code == 0, (name, r.output)
        out[name] = root / name
    syn = []
    for m, L, tp, kc in SYNTHETIC:
        syn += [make_analysis(root / "syn" / f"a-{m}", m, "arc_easy", L, tp),
                make_prune(root / "syn" / f"p-{m}", m, "arc_easy", L, tp, kc, max_k=kc + 1)]
    r = runner.invoke(app, ["correlate", *map(str, syn), "--out", str(root / "correlate")])
    assert r.exit_code == 0, r.output
    out["correlate"] = root / "correlate"
    r = runner.invoke(app, ["findings", str(root / "study"), "--out", str(root / "findings"), "--bootstrap", "10"])
    assert r.exit_code == 0, r.output
    out["findings"] = root / "findings"
    out["syn"] = syn
    out["root"] = root
    return out


def _typed(kind: str) -> type:
    from declens.analyses.ablation import AblationResult
    from declens.analyses.cka import CKAResult
    from declens.analyses.compare import CompareResult
    from declens.analyses.correlation import CorrelationResult
    from declens.analyses.evaluate import EvalResult
    from declens.analyses.findings import Findings
    from declens.analyses.noise import NoiseResult
    from declens.analyses.recovery import RecoveryResult
    from declens.analyses.study import Study
    from declens.pruning.run import PruneResult

    return {"analysis": declens.AnalysisResult, "prune": PruneResult, "eval": EvalResult, "ablate": AblationResult,
            "cka": CKAResult, "noise": NoiseResult, "recover": RecoveryResult, "compare": CompareResult,
            "correlate": CorrelationResult, "study": Study, "findings": Findings}[kind]


def _json(obj) -> object:
    from declens.results import to_jsonable

    return json.loads(json.dumps(to_jsonable(obj)))


KINDS = {**{name: kind for name, (_, kind) in COMMANDS.items()}, "correlate": "correlate", "findings": "findings"}


@pytest.mark.parametrize("name", list(KINDS))
def test_load_result_returns_the_typed_result_of_every_command(runs, name):
    kind = KINDS[name]
    folder = runs[name]
    rk = RESULT_KINDS[kind]
    manifest = json.loads((folder / "manifest.json").read_text())
    main = json.loads((folder / rk.main_file).read_text())
    assert manifest["kind"] == main["kind"] == kind
    assert manifest["schema_version"] == main["schema_version"] == rk.schema_version == _typed(kind).SCHEMA_VERSION
    res = declens.load_result(folder)
    assert type(res) is _typed(kind) and type(res).KIND == kind
    assert type(load_result(folder / rk.main_file, kind=kind)) is _typed(kind)  # a file of the folder names it too
    if kind == "study":
        assert res.config.stages == ["analysis", "prune"]
        assert type(res.get("analysis", "arc_easy_letter")) is declens.AnalysisResult
        assert type(res.get("prune", "arc_easy_letter")) is _typed("prune")
        return
    # the typed object gives back the file it came from (schema_version is stamped by the writer)
    assert _json({k: v for k, v in res.to_dict().items() if k != "schema_version"}) == \
        {k: v for k, v in main.items() if k != "schema_version"}


def test_load_result_refuses_another_kind_than_asked(runs):
    with pytest.raises(DeclensError, match="holds a result of kind 'analysis'.*not 'prune'.*'declens prune'"):
        load_result(runs["analysis"], kind="prune")


def _rewrite(folder, name: str, edit) -> None:
    """Edit a file of a run folder and re-record it in the manifest (as a folder written so would be)."""
    p = folder / name
    p.write_text(json.dumps(edit(json.loads(p.read_text()))))
    mp = folder / "manifest.json"
    m = json.loads(mp.read_text())
    for e in m["files"]:
        if e["path"] == name:
            e["size"], e["sha256"] = file_digest(p)
    mp.write_text(json.dumps(m))


def test_a_recover_folder_of_schema_1_loads_through_the_converter(runs, tmp_path):
    """recover.json schema 1 (written before versions were recorded) named the layer blocks' accuracy ``acc``."""
    new = load_result(runs["recover"])
    old = shutil.copytree(runs["recover"], tmp_path / "old")

    def to_v1(d):
        d.pop("schema_version")
        back = {"accuracy": "acc", "accuracy_norm": "acc_norm", "accuracy_before": "acc_before",
                "accuracy_after": "acc_after"}
        d["dense"] = {back.get(k, k): v for k, v in d["dense"].items()}
        for r in d["runs"]:
            for b in ("layers_before", "layers_after"):
                r[b] = {back.get(k, k): v for k, v in r[b].items()}
        d["table"] = [{back.get(k, k): v for k, v in row.items()} for row in d["table"]]
        return d

    _rewrite(old, "recover.json", to_v1)
    m = json.loads((old / "manifest.json").read_text())
    m.pop("schema_version")
    (old / "manifest.json").write_text(json.dumps(m))
    raw = json.loads((old / "recover.json").read_text())
    assert "acc" in raw["runs"][0]["layers_before"] and "accuracy" not in raw["runs"][0]["layers_before"]
    res = load_result(old)
    assert res.runs[0].layers_before["accuracy"] == new.runs[0].layers_before["accuracy"]
    assert res.runs[0].layers_after == new.runs[0].layers_after and res.dense == new.dense
    (run,) = find_runs(old)
    assert run.data["schema_version"] == 2 and "accuracy" in run.data["runs"][0]["layers_after"]
    assert run.data["table"] == json.loads((runs["recover"] / "recover.json").read_text())["table"]


#: ``prune`` / ``eval`` / ``ablate`` schema 2 -> 1 (the inverse of ``declens.results.ACCURACY_V1_NAMES``)
_TO_V1 = {"accuracy": "acc_layers", "final_accuracy": "accuracy", "final_accuracy_norm": "accuracy_norm"}


def _accuracy_to_v1(kind: str, d: dict) -> dict:
    """A schema-2 ``prune`` / ``eval`` / ``ablate`` main JSON written back in the schema-1 layout (the layout
    a declens before schema 2 wrote: no ``schema_version``, per-layer ``acc_layers``, final ``accuracy``)."""
    d.pop("schema_version")
    if kind == "prune":
        for body in d["methods"].values():
            body["records"] = [{_TO_V1.get(k, k): v for k, v in r.items()} for r in body["records"]]
            body["table"] = [{_TO_V1.get(k, k): v for k, v in r.items()} for r in body["table"]]
    else:
        d["cells"] = [{_TO_V1.get(k, k): v for k, v in c.items()} for c in d["cells"]]
    return d


@pytest.mark.parametrize("kind", ["prune", "eval", "ablate"])
def test_a_folder_with_per_layer_acc_layers_of_schema_1_loads_under_the_new_names(runs, tmp_path, kind):
    """prune / eval / ablate schema 1 named the per-layer accuracy ``acc_layers`` (and the final one
    ``accuracy``); the converter gives the same numbers under the analysis result's names."""
    main = RESULT_KINDS[kind].main_file
    new_raw = json.loads((runs[kind] / main).read_text())
    old = shutil.copytree(runs[kind], tmp_path / "old")
    _rewrite(old, main, lambda d: _accuracy_to_v1(kind, d))
    m = json.loads((old / "manifest.json").read_text())
    m.pop("schema_version")
    (old / "manifest.json").write_text(json.dumps(m))
    raw = json.loads((old / main).read_text())
    assert "acc_layers" in json.dumps(raw) and "final_accuracy" not in json.dumps(raw)
    res, new = load_result(old), load_result(runs[kind])
    assert _json(res.to_dict()) == _json(new.to_dict())  # every number, under the new names
    (run,) = find_runs(old)
    assert run.data == new_raw
    if kind == "prune":
        recs_old, recs_new = raw["methods"]["last"]["records"], new_raw["methods"]["last"]["records"]
        assert [r["acc_layers"] for r in recs_old] == [r["accuracy"] for r in recs_new]
        assert [r["accuracy"] for r in recs_old] == [r.final_accuracy for r in res.runs["last"].records]
        assert all(isinstance(r.accuracy, list) and r.accuracy[-1] == r.final_accuracy for r in res.runs["last"].records)
    else:
        cells = res.eval.cells if kind == "ablate" else res.cells
        assert [c["acc_layers"] for c in raw["cells"]] == [v["accuracy"] for v in cells.values()]
        assert [c["accuracy"] for c in raw["cells"]] == [v["final_accuracy"] for v in cells.values()]


@pytest.mark.parametrize("kind", ["prune", "eval", "ablate"])
def test_a_fresh_run_writes_the_per_layer_accuracy_under_the_analysis_name(runs, kind):
    """Schema 2: per-layer ``dm`` / ``accuracy`` (as in ``result.json``'s layers), final ``final_dm`` /
    ``final_accuracy``; ``acc_layers`` appears in no file of the folder."""
    main = RESULT_KINDS[kind].main_file
    d = json.loads((runs[kind] / main).read_text())
    assert d["schema_version"] == 2 == json.loads((runs[kind] / "manifest.json").read_text())["schema_version"]
    blocks = [r for b in d["methods"].values() for r in b["records"]] if kind == "prune" else d["cells"]
    for b in blocks:
        assert len(b["accuracy"]) == len(b["dm"]) == len(b["layer_ids"]) > 0
        assert all(0.0 <= a <= 1.0 for a in b["accuracy"])
        assert b["accuracy"][-1] == pytest.approx(b["final_accuracy"]) and b["dm"][-1] == pytest.approx(b["final_dm"])
        assert "acc_layers" not in b and "accuracy_norm" not in b
    if kind == "prune":
        assert all("final_accuracy" in row and "accuracy" not in row for b in d["methods"].values() for row in b["table"])
    for f in runs[kind].rglob("*"):
        if f.is_file() and f.suffix in (".json", ".csv", ".md"):
            assert "acc_layers" not in f.read_text(), f


def test_a_schema_1_prune_record_of_a_resume_state_reads_under_the_new_names(runs):
    """A ``.prune-state.json`` left by a declens before schema 2 holds records with ``acc_layers``: a resumed
    run reads them as the same records (``PruneRecord.from_dict`` renames them)."""
    from declens.pruning.methods import PruneRecord

    for d in json.loads((runs["prune"] / "prune.json").read_text())["methods"]["last"]["records"]:
        old = {_TO_V1.get(k, k): v for k, v in d.items()}
        assert PruneRecord.from_dict(old) == PruneRecord.from_dict(d)
        assert PruneRecord.from_dict(old).to_dict() == d


def test_no_written_result_file_names_acc_layers(runs):
    """The old per-layer name appears in no file any command wrote (every kind, the study's stages too)."""
    files = [f for f in runs["root"].rglob("*") if f.is_file() and f.suffix in (".json", ".csv", ".md", ".html")]
    assert len(files) > 20
    assert [f for f in files if "acc_layers" in f.read_text()] == []


@pytest.mark.parametrize("version, words", [
    (0, r"holds a prune result of schema version 0, but this declens reads version 2 .*rerun 'declens prune'"),
    (99, r"holds a prune result of schema version 99, but this declens reads version 2; upgrade declens"),
])
def test_a_schema_version_without_converter_is_refused_with_the_fix(runs, tmp_path, version, words):
    folder = shutil.copytree(runs["prune"], tmp_path / "p")
    _rewrite(folder, "prune.json", lambda d: {**d, "schema_version": version})
    with pytest.raises(DeclensError, match=words):
        load_result(folder)
    with pytest.raises(DeclensError, match=words):
        find_runs(folder)
    r = runner.invoke(app, ["report", str(folder), "--out", str(tmp_path / "r.html")])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and text.startswith("error: ") and f"schema version {version}" in text, r.output
    assert "Traceback" not in r.output and not (tmp_path / "r.html").exists()


def test_an_unknown_kind_is_refused(runs, tmp_path):
    folder = shutil.copytree(runs["eval"], tmp_path / "e")
    m = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**m, "kind": "mystery"}))
    for call in (load_result, find_runs):
        with pytest.raises(DeclensError, match=r"holds a result of unknown kind 'mystery' \(this declens knows "
                                               r"ablate, analysis, .*\); pass a folder written by a declens command"):
            call(folder)


def test_find_runs_finds_exactly_the_run_folders(runs, tmp_path):
    root = runs["root"]
    top = {name for name in KINDS} | {f"syn/{p.name}" for p in runs["syn"]}
    found = find_runs(root)
    assert sorted(str(r.folder.relative_to(root)) for r in found) == sorted(top)
    assert all(r.kind == KINDS.get(str(r.folder.relative_to(root)), r.kind) for r in found)
    assert {r.kind for r in found if str(r.folder.relative_to(root)).startswith("syn/")} == {"analysis", "prune"}
    # a run folder itself: just that run; with nested, also the runs inside it (a study's stages, compare's prunes)
    assert [r.folder for r in find_runs(runs["study"])] == [runs["study"]]
    nested = {str(r.folder.relative_to(root)) for r in find_runs(root, nested=True)}
    assert nested - top == {"study/analysis/arc_easy_letter", "study/prune/arc_easy_letter", "compare/prune/last"}
    # by kind
    prunes = find_runs(root, kind="prune")
    assert sorted(str(r.folder.relative_to(root)) for r in prunes) == ["prune"] + [f"syn/p-{m}" for m, *_ in SYNTHETIC]
    assert type(prunes[0].load()) is _typed("prune") and prunes[0].config["num_layers"] == 4
    # a run killed before its manifest, below the root: refused, or left out with skip_incomplete
    parent = tmp_path / "parent"
    shutil.copytree(runs["analysis"], parent / "ok")
    shutil.copytree(runs["eval"], parent / "deep" / "killed")
    (parent / "deep" / "killed" / "manifest.json").unlink()
    with pytest.raises(DeclensError, match="killed.*has no manifest.json"):
        find_runs(parent)
    assert [r.folder for r in find_runs(parent, skip_incomplete=True)] == [parent / "ok"]
    (parent / "empty").mkdir()
    with pytest.raises(DeclensError, match="holds no declens results"):
        find_runs(parent / "empty")
