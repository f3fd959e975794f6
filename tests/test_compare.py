"""``declens compare`` (the paper's Table 5): end to end on a tiny model folder, the table's layout,
and resuming a killed run cell by cell."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from declens.analyses.compare import CompareConfig, CompareResult, compare, compare_averages
from declens.cli import app
from declens.errors import DeclensError
from declens.finetune import FinetuneConfig, TrainData
from declens.models import load_model

runner = CliRunner()
TASKS = ("arc_easy", "piqa")
#: the CLI flags and the Python config below describe the same comparison
FLAGS = ["--tasks", "arc_easy,piqa", "--limit", "6", "--calib-samples", "4", "--train-tasks", "arc_easy",
         "--train-samples", "12", "--ft-method", "lora", "--epochs", "1", "--lr", "3e-3", "--batch-size", "4",
         "--max-length", "96", "--dtype", "float32"]


def _cfg(methods, ratios) -> CompareConfig:
    return CompareConfig(methods=methods, ratios=ratios, tasks=TASKS, limit=6, calib_samples=4,
                         train=TrainData(tasks=("arc_easy",), samples=12, seed=0),
                         finetune=FinetuneConfig(method="lora", epochs=1, lr=3e-3, batch_size=4, max_length=96))


class Interrupted(Exception):
    pass


def test_compare_end_to_end_and_resume(model_dir, tmp_path):
    out = tmp_path / "cmp"
    # 1. the command: one method, one ratio
    r = runner.invoke(app, ["compare", "--model", str(model_dir), "--methods", "last", "--ratios", "0.25", *FLAGS,
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    first = out / "cells" / "last_k1.json"
    stamp = first.stat().st_mtime_ns
    d = json.loads((out / "compare.json").read_text())
    assert d["config"]["finetune"]["lr"] == 3e-3 and d["config"]["finetune"]["epochs"] == 1
    assert d["config"]["train_data"]["tasks"]["arc_easy"]["rows"] == 12 and d["cells"][0]["removed"] == [2]
    assert compare_averages(out) == ({0.25: {"last": d["cells"][0]["average"]}}, True)  # what findings reads
    # 2. killed after its first new cell: two methods, two ratios
    lm = load_model(str(model_dir), dtype="float32", device="cpu", progress=False)
    seen = []

    def stop_after_first_new(cell):
        seen.append((cell["method"], cell["k"], cell.get("reused")))
        if cell["method"] != "dense" and not cell.get("reused"):
            raise Interrupted

    with pytest.raises(Interrupted):
        compare(lm, _cfg(("last", "shortgpt"), (0.25, 0.5)), out, progress=False, on_cell=stop_after_first_new)
    assert seen == [("dense", 0, True), ("last", 1, True), ("last", 2, False)]  # the command's cell was reused
    assert first.stat().st_mtime_ns == stamp and (out / "cells" / "last_k2.json").is_file()
    # 3. the rerun computes only what is missing
    seen.clear()
    res = compare(lm, _cfg(("last", "shortgpt"), (0.25, 0.5)), out, progress=False,
                  on_cell=lambda c: seen.append((c["method"], c["k"], c.get("reused"))))
    assert seen == [("dense", 0, True), ("last", 1, True), ("last", 2, True), ("shortgpt", 1, False),
                    ("shortgpt", 2, False)]
    assert res.provenance["reused_cells"] == ["last_k1", "last_k2"] and first.stat().st_mtime_ns == stamp
    # the table: dense row first, then by ratio and method, averages of the task columns
    rows = res.rows()
    assert [(x["method"], x["k"]) for x in rows] == [("dense", 0), ("last", 1), ("shortgpt", 1), ("last", 2),
                                                     ("shortgpt", 2)]
    for x in rows:
        assert x["avg"] == pytest.approx(sum(x[t] for t in TASKS) / 2)
    for c in res.cells:
        assert c["status"] == "done" and set(c["accuracy"]) == set(TASKS) and c["train"]["steps"] == 3
    # every cell, reused or new, on disk too, names the one comparison it belongs to
    runs = {c["run"] for c in res.cells} | {json.loads(f.read_text())["run"] for f in (out / "cells").glob("*_k*.json")}
    assert len(runs) == 1
    md = (out / "table5.md").read_text()
    assert md.startswith("| Model | Method | Ratio | Arc-E | PIQA | Avg |") and "| dense | 0.00% (0) |" in md
    table = list(csv.DictReader((out / "table5.csv").open()))
    assert [t["method"] for t in table] == ["dense", "last", "shortgpt", "last", "shortgpt"]
    assert float(table[0]["avg"]) == pytest.approx(rows[0]["avg"], abs=0.01)
    assert (out / "table5.png").stat().st_size > 1000 and (out / "manifest.json").is_file()
    want: dict = {}
    for c in res.cells:
        want.setdefault(c["ratio"], {})[c["method"]] = c["average"]
    assert compare_averages(out) == (want, True)
    assert CompareResult.load(out).rows() == rows
    # 4. another recipe is another comparison: nothing is reused
    seen.clear()
    other = _cfg(("last",), (0.25,))
    other.finetune = FinetuneConfig(method="lora", epochs=1, lr=1e-3, batch_size=4, max_length=96)
    compare(lm, other, out, progress=False, plots=False, on_cell=lambda c: seen.append(c.get("reused")))
    assert seen == [True, False]  # the dense row does not depend on the recipe; the cell does


@pytest.mark.parametrize("kw, msg", [
    (dict(methods=("nope",)), "unknown pruning method"),
    (dict(ratios=(1.5,)), "strictly between 0 and 1"),
    (dict(fmt="essay"), "unknown format"),
    (dict(methods=("last", "last")), "listed twice"),
    (dict(methods=("replay",)), "replay"),
])
def test_bad_comparisons_are_refused(kw, msg):
    with pytest.raises(DeclensError, match=msg):
        CompareConfig(**{"methods": ("last",), "ratios": (0.25,), **kw})


def test_cli_refuses_bad_input(model_dir):
    r = runner.invoke(app, ["compare", "--model", str(model_dir), "--methods", "last", "--ratios", "0.25,0.3",
                            *FLAGS])
    assert r.exit_code == 2 and "both remove 1 of 4 layers" in r.output, r.output
    r = runner.invoke(app, ["compare", "--model", str(model_dir), "--ratios", "a,b"])
    assert r.exit_code == 2 and "bad --ratios" in r.output
    r = runner.invoke(app, ["compare", "--model", str(model_dir), "--lr", "1e-3", "--lr-candidates", "1e-3,2e-3"])
    assert r.exit_code == 2 and "not both" in r.output


def test_compare_takes_a_merging_baseline(model_dir, tmp_path):
    """MKA merges layers (new weights): its state is rebuilt, fine-tuned and evaluated like a dropped-layer state."""
    out = tmp_path / "cmp_mka"
    r = runner.invoke(app, ["compare", "--model", str(model_dir), "--methods", "mka", "--ratios", "0.25", *FLAGS,
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads((out / "compare.json").read_text())
    cell = next(c for c in d["cells"] if c["method"] == "mka")
    assert cell["k"] == 1 and len(cell["removed"]) == 1 and isinstance(cell["merges"], list), cell
    assert set(cell["accuracy"]) == set(TASKS) and 0 <= cell["average"] <= 1
