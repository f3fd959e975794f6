"""SKIP-Prun's restart and collapse rules (docs/METHOD.md, "SKIP-Prun restart and collapse rules").

The search logic is checked with a scripted evaluator: removed set -> (accuracy, Block Influence), with
designed numbers shaped like the paper's Table 2 (Llama3-8B, ARC-Challenge); the real-model path is
checked end to end through ``declens prune --skip-prun`` on a tiny random model.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import save_tiny
from declens.cli import app
from declens.errors import DeclensError
from declens.metrics import compute_metrics
from declens.pruning import PruneResult, SkipPrun
from declens.pruning.engine import Evaluation
from declens.pruning.methods import Memo, run_ip

PATH1 = [24, 23, 22, 21, 19, 20, 18]  # Table 2 up to 21.875%
PATH2 = [24, 23, 25, 26, 27, 28, 22, 21]  # Table 2 at 25%


class Table2Evaluator:
    """Scripted evaluator of removed sets, shaped like the paper's Table 2 (32 layers).

    Block Influence (recomputed per state, as IP does) ranks layers by one of three orders: the trunk
    (``{}``, ``{24}``, ``{24, 23}``) ranks 24, 23, 22, 25, ...; once 22 is removed (path 1) 21, 19, 20, 18,
    17 come next; once 25 is removed (path 2) 26, 27, 28, 22, 21, ... Accuracy: ``{24, 23}`` is the best
    pruned state (0.62); path 1 declines slowly to 0.56 at seven removed layers and collapses to 0.30 when
    it removes 17; path 2 declines slowly below path 1 and overtakes it from eight removed layers.
    """

    TRUNK = [24, 23, 22, 25, 26, 27, 28, 21, 19, 20, 18, 17, 10, 2, 11, 9]
    P1 = [24, 23, 22, 21, 19, 20, 18, 17, 25, 26, 27, 28, 10, 2, 11, 9]
    P2 = [24, 23, 25, 26, 27, 28, 22, 21, 19, 20, 18, 17, 10, 2, 11, 9]

    def __init__(self, n: int = 200):
        self.num_layers = 32
        self.dense_ids = list(range(32))
        self.n = n
        self.evaluated: list[list[int]] = []

    def accuracy(self, removed: list[int]) -> float:
        s, k = set(removed), len(removed)
        if s <= {24, 23}:
            return 0.60 + 0.01 * k  # removing 24, then 23, helps a little
        if 17 in s:
            return 0.30  # removing 17 after the others: collapse
        if 22 in s and not s & {25, 26, 27, 28}:
            return 0.63 - 0.01 * k  # path 1: 0.60 at k=3 ... 0.56 at k=7
        return 0.625 - 0.015 * k  # path 2 and anything else: below path 1 at every k <= 7

    def order(self, removed: list[int]) -> list[int]:
        s = set(removed)
        base = self.P2 if 25 in s else self.P1 if 22 in s else self.TRUNK
        return base + [l for l in self.dense_ids if l not in base]

    def evaluate(self, removed, scores=True, bi=True, nll=False) -> Evaluation:
        self.evaluated.append(list(removed))
        kept = [l for l in self.dense_ids if l not in removed]
        correct = int(round(self.accuracy(list(removed)) * self.n))
        s = np.zeros((len(kept), self.n, 4))
        s[:, :correct, 0] = 1.0  # the gold option leads on the correct rows at every layer
        s[:, correct:, 1] = 1.0
        m = compute_metrics(s, np.zeros(self.n, dtype=int), kept, np.full(self.n, 4))
        rank = {l: i for i, l in enumerate(self.order(list(removed)))}
        return Evaluation(removed=list(removed), layer_ids=kept, metrics=m,
                          bi={l: 0.01 * (1 + rank[l]) for l in kept})


def test_late_collapse_restarts_from_the_best_early_state_as_in_table_2():
    run = run_ip(Memo(Table2Evaluator()), 10, SkipPrun(enabled=True))  # restart="best_any", criterion="abs"
    table = {row["removed_count"]: row["removed"] for row in run.table()}
    assert table[7] == PATH1  # the paper's 21.875% row
    assert table[8] == PATH2  # the paper's 25% row: not a superset of the 21.875% set
    assert table[9] == PATH2 + [19] and table[10] == PATH2 + [19, 20]
    assert table[3] == [24, 23, 22]  # path 2's [24, 23, 25] is worse at three removed layers

    collapsed = [r for r in run.records if r.collapsed]
    assert len(collapsed) == 1 and collapsed[0].removed == PATH1 + [17] and not collapsed[0].accepted
    assert "restart 1: path 1 from #2 [24, 23]" in collapsed[0].note
    first2 = next(r for r in run.records if r.path == 1)
    assert first2.removed == [24, 23, 25] and first2.restart_from == 2 and first2.excluded == [22]

    paths = run.paths()
    assert [p["path"] for p in paths] == [0, 1]
    assert paths[0]["start_removed"] == [] and paths[0]["collapsed"] == [collapsed[0].index]
    assert paths[1]["start_index"] == 2 and paths[1]["start_removed"] == [24, 23]
    assert paths[1]["excluded_at_start"] == [22] and paths[1]["collapsed"] == []


def test_parent_ratio_rule_restarts_at_the_collapse_and_keeps_sets_nested():
    run = run_ip(Memo(Table2Evaluator()), 8, SkipPrun(enabled=True, restart="parent_ratio"))
    table = {row["removed_count"]: row["removed"] for row in run.table()}
    assert table[8] == PATH1 + [25]  # 17 banned at the 21.875% state; the next-lowest BI layer instead
    first = next(r for r in run.records if r.path == 1)
    assert first.restart_from == 7 and first.excluded == [17]


def test_collapse_rules_rel_and_tp():
    # rel: 0.56 -> 0.30 loses 0.26 of the parent's 0.31 above chance (> 0.5 of it): collapse
    run = run_ip(Memo(Table2Evaluator()), 8, SkipPrun(enabled=True, criterion="rel", rel_drop=0.5))
    assert {r["removed_count"]: r["removed"] for r in run.table()}[8] == PATH2
    # ... but not when 0.9 of the margin may go
    run = run_ip(Memo(Table2Evaluator()), 8, SkipPrun(enabled=True, criterion="rel", rel_drop=0.9))
    assert not any(r.collapsed for r in run.records)
    # tp: every scripted state keeps a Transition Point (DM > 0 at every layer while accuracy > 0.5 ...
    # and at 0.30 the mean DM is negative: the Transition Point is lost exactly at the collapse)
    run = run_ip(Memo(Table2Evaluator()), 8, SkipPrun(enabled=True, criterion="tp"))
    (c,) = [r for r in run.records if r.collapsed]
    assert c.removed == PATH1 + [17] and c.transition_layer is None and "tp: Transition Point lost" in c.note


def test_skip_prun_rules_are_checked():
    with pytest.raises(DeclensError, match="--restart-from"):
        SkipPrun(restart="best")
    with pytest.raises(DeclensError, match="--collapse-rule"):
        SkipPrun(criterion="accuracy")
    with pytest.raises(DeclensError, match="--collapse-rel-drop"):
        SkipPrun(rel_drop=0)


def test_restart_bookkeeping_in_prune_json_and_steps_csv(tmp_path):
    from declens.pruning.methods import critical_ratio

    run = run_ip(Memo(Table2Evaluator()), 8, SkipPrun(enabled=True))
    res = PruneResult(config={"num_layers": 32, "skip_prun": {"enabled": True}}, provenance={}, runs={"ip": run},
                      critical={"ip": critical_ratio(run)})
    res.save(tmp_path)
    d = json.loads((tmp_path / "prune.json").read_text())["methods"]["ip"]
    assert d["paths"][1]["start_removed"] == [24, 23] and d["paths"][1]["excluded_at_start"] == [22]
    recs = {r["index"]: r for r in d["records"]}
    first2 = next(r for r in d["records"] if r["path"] == 1)
    assert first2["restart_from"] == 2 and first2["excluded"] == [22] and recs[2]["removed"] == [24, 23]
    rows = list(csv.DictReader((tmp_path / "steps.csv").open()))
    bad = [r for r in rows if r["collapsed"] == "True"]
    assert len(bad) == 1 and "restart 1: path 1 from #2 [24, 23]" in bad[0]["note"]
    start = [r for r in rows if r["path"] == "1"][0]
    assert json.loads(start["removed"]) == [24, 23, 25] and "starts from #2 [24, 23]" in start["note"]
    assert "excluding [22]" in start["note"]
    # the same bookkeeping as columns: the state each path started from and the choices barred there
    assert start["restart_from"] == "2" and 22 in json.loads(start["excluded"])
    assert all(r["restart_from"] == "" for r in rows if r["path"] == "0")


def test_cli_skip_prun_end_to_end_on_a_tiny_model(tmp_path):
    model = save_tiny(tmp_path / "tiny", "llama", layers=6)
    args = ["prune", "--model", str(model), "--task", "arc_easy", "--limit", "16", "--dtype", "float32",
            "--calib-samples", "6", "--max-ratio", "0.5", "--skip-prun", "--collapse-rule", "abs",
            "--collapse-drop", "0", "--max-restarts", "2", "--restart-from", "best_any"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "run" / "prune.json").read_text())
    assert d["config"]["skip_prun"] == {"enabled": True, "restart": "best_any", "criterion": "abs", "drop": 0.0,
                                        "rel_drop": 0.5, "max_skips": 3, "max_restarts": 2}
    ip = d["methods"]["ip"]
    recs = ip["records"]
    # any accuracy drop counts as a collapse: every flagged step dropped below its parent, each restart
    # is a new path that starts from a kept state, and the table holds the best state at each ratio
    by_set = {json.dumps(sorted(r["removed"])): r for r in recs}  # a state's numbers depend on its set only
    for r in recs:
        if r["collapsed"]:
            parent = by_set[json.dumps(sorted(r["removed"][:-1]))]
            assert r["final_accuracy"] < parent["final_accuracy"] and "collapse (abs" in r["note"]
    assert any(r["collapsed"] for r in recs) and len(ip["paths"]) == 1 + sum(r["collapsed"] for r in recs)
    for p in ip["paths"][1:]:
        assert not recs[p["start_index"]]["collapsed"]
    for row in ip["table"]:
        assert row["final_accuracy"] == max(r["final_accuracy"] for r in recs if r["k"] == row["removed_count"])
    assert [row["removed_count"] for row in ip["table"]] == [1, 2, 3]
    bad = CliRunner().invoke(app, [*args[:-2], "--restart-from", "best", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "--restart-from" in bad.output and not (tmp_path / "bad").exists()
