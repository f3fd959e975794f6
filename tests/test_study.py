"""`declens study` end to end on a tiny model: every stage, the findings, the report; a rerun reuses every stage."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from declens.cli import app

runner = CliRunner()

ARGS = ["--tasks", "arc_easy,piqa,winogrande", "--formats", "letter", "--limit", "12", "--ip-max-ratio", "0.6",
        "--baselines", "shortgpt,last", "--baseline-ratio", "0.5", "--calib-samples", "8", "--cka-rows", "8",
        "--noise-scales", "0,1", "--noise-layers", "0,2,3", "--ablate-window", "1", "--recover-ratios", "0.25", "--epochs", "1",
        "--train-samples", "16", "--dtype", "float32"]


def test_study_runs_every_stage_and_resumes(tmp_path, model_dir):
    out = tmp_path / "study"
    r = runner.invoke(app, ["study", "--model", str(model_dir), *ARGS, "--out", str(out)])
    assert r.exit_code == 0, r.output
    for sub in ("analysis/arc_easy_letter", "prune/piqa_letter", "baselines/winogrande_letter", "cka", "noise",
                "recover"):
        assert (out / sub / "manifest.json").is_file(), sub
    assert json.loads((out / "noise" / "noise.json").read_text())["config"]["layers"] == [0, 2, 3]  # --noise-layers
    # a stage that cannot run on these results says why instead of failing the study
    for stage in ("ablate", "correlate"):
        assert (out / stage / "manifest.json").is_file() or f"{stage}: not run" in r.output, stage
    for name in ("study.json", "findings.json", "findings.md", "report.html", "manifest.json"):
        assert (out / name).is_file(), name
    f = json.loads((out / "findings.json").read_text())
    claims = [x["claim"] for x in f["findings"]]
    # claims 1-4 for each analysed task (the first task first), then 5-8 from the first task's stages
    assert claims[:16] == [1, 2, 3, 4] * 3 + [5, 6, 7, 8] and 9 in claims and "safe margin" in claims, claims
    sources = [x["source"] for x in f["findings"][:16]]
    assert sources == [f"study:{t}_letter" for t in ("arc_easy", "piqa", "winogrande") for _ in range(4)] + \
        ["study:arc_easy_letter"] * 4, sources
    assert all(x["verdict"] in ("holds", "does not hold", "cannot be tested here") for x in f["findings"])
    assert "Findings: the paper" in (out / "report.html").read_text()

    again = runner.invoke(app, ["study", "--model", str(model_dir), *ARGS, "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert again.output.count("already complete") >= 9 and " ...\n" not in again.output
    assert json.loads((out / "findings.json").read_text())["findings"] == f["findings"]

    # a rerun asking other settings never reuses a finished stage made otherwise: one line, before any stage runs
    for change, said in ((["--noise-scales", "0,2"], "noise main: the finished folder"),
                         (["--limit", "10"], "limit: recorded 12, asked 10"),
                         (["--calib-samples", "16"], "calibration.limit: recorded 8, asked 16"),
                         (["--epochs", "2"], "recover main: the finished folder"),
                         (["--train-samples", "12"], "train.limit: recorded 16, asked 12")):
        args = list(ARGS)
        i = args.index(change[0])
        args[i + 1] = change[1]
        bad = runner.invoke(app, ["study", "--model", str(model_dir), *args, "--out", str(out)])
        msg = " ".join(bad.output.split())
        assert bad.exit_code == 2 and said in msg and "delete that folder" in msg and "Traceback" not in msg, msg
        assert "already complete" not in msg and " ...\n" not in bad.output, msg
    assert json.loads((out / "findings.json").read_text())["findings"] == f["findings"]
    # the correlation is derived from the stage folders: made again (not refused) when they are another set
    from declens.analyses.study import finished_as_asked, recorded_differences

    if (out / "correlate" / "manifest.json").is_file():
        asked = {"config.run_dirs": [str(out / "analysis" / "arc_easy_letter")], "config.method": "ip"}
        assert recorded_differences(out / "correlate", asked)[0].startswith("run_dirs: recorded [")
        assert not finished_as_asked("correlate", "main", out / "correlate", asked, redo=True)

    # 'declens correlate STUDY' reads the study's stage runs (not the study's own summary alone)
    from declens.analyses.correlation import gather

    g = gather([out])
    assert {f.kind for f in g.files} >= {"analysis", "prune"} and "study" not in {f.kind for f in g.files}
    assert sorted(k[1] for k in g.decisions) == ["arc_easy", "piqa", "winogrande"]
    assert all("ip" in per for per in g.ratios.values()) and len(g.ratios) == 3

    fo = tmp_path / "findings"
    r2 = runner.invoke(app, ["findings", str(out), "--out", str(fo), "--bootstrap", "50"])
    assert r2.exit_code == 0, r2.output
    assert (fo / "findings.md").read_text().count("### Claim") == len(claims)


def test_study_refuses_bad_options_before_loading(tmp_path):
    for bad, word in ((["--tasks", "nope"], "nope"), (["--ip-max-ratio", "1.5"], "ip-max-ratio"),
                      (["--recover-ratios", "0.7"], "recover ratios"), (["--stages", "prune,zzz"], "zzz"),
                      (["--ip-order", "3,1,3"], "repeats layer(s) [3]"), (["--ip-order", "3,x"], "bad layer id")):
        r = runner.invoke(app, ["study", "--model", str(tmp_path / "no-model"), *bad, "--out", str(tmp_path / "s")])
        assert r.exit_code == 2 and word in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "s").exists()


def test_study_replays_a_given_ip_order(tmp_path, model_dir):
    """--ip-order: the prune stage replays the order (no Block Influence choice), study.json records it,
    later stages use the replayed states and the findings say IP was replayed."""
    out = tmp_path / "study"
    args = ["--tasks", "arc_easy", "--limit", "10", "--ip-max-ratio", "0.5", "--cka-ratio", "0.5", "--calib-samples", "8",
            "--cka-rows", "8", "--recover-ratios", "", "--stages", "analysis,prune,cka", "--dtype", "float32"]
    r = runner.invoke(app, ["study", "--model", str(model_dir), *args, "--ip-order", "2,1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "IP replayed from the given removal order" in " ".join(r.output.split())
    st = json.loads((out / "study.json").read_text())
    assert st["config"]["ip_order"] == [2, 1]
    pr = json.loads((out / "prune" / "arc_easy_letter" / "prune.json").read_text())
    assert list(pr["methods"]) == ["replay"] and pr["config"]["order"] == [2, 1]
    assert [x["removed"] for x in pr["methods"]["replay"]["records"]] == [[], [2], [2, 1]]
    cka = json.loads((out / "cka" / "cka.json").read_text())
    assert 1 not in cka["pruned_layer_ids"] and 2 not in cka["pruned_layer_ids"] and 3 in cka["pruned_layer_ids"]
    f = {x["claim"]: x for x in json.loads((out / "findings.json").read_text())["findings"]}
    assert f[3]["verdict"] == "cannot be tested here" and "replayed" in f[3]["note"]
    assert "replayed" in f[4]["note"] and "replayed" in f[5]["note"]

    # ids outside the model: one clear line after loading, before any stage ran
    bad = runner.invoke(app, ["study", "--model", str(model_dir), *args, "--ip-order", "2,9", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "outside 0..3" in bad.output and "Traceback" not in bad.output, bad.output
    assert not (tmp_path / "b" / "analysis").exists()
    bad = runner.invoke(app, ["study", "--model", str(model_dir), *args, "--stages", "analysis,noise", "--noise-layers",
                              "1,7", "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "[7] are not in the model" in bad.output and "Traceback" not in bad.output, bad.output
    assert not (tmp_path / "c" / "analysis").exists()


def test_a_study_run_in_pieces_lists_every_finished_stage(tmp_path, model_dir):
    """Tasks and stages added by later invocations (as a long study is run) accumulate in study.json and its
    findings; a killed stage's unfinished folder stays out."""
    out = tmp_path / "study"
    common = ["--model", str(model_dir), "--limit", "8", "--calib-samples", "8", "--ip-max-ratio", "0.5",
              "--recover-ratios", "", "--dtype", "float32", "--out", str(out)]
    r = runner.invoke(app, ["study", *common, "--tasks", "arc_easy", "--stages", "analysis,prune", "--no-phase"])
    assert r.exit_code == 0, r.output
    # --no-phase: IP alone (claims 3, 4 and 9 need no more); the phase-aware finding says it cannot be tested
    pr = json.loads((out / "prune" / "arc_easy_letter" / "prune.json").read_text())
    assert list(pr["methods"]) == ["ip"] and pr["config"]["methods"] == ["ip"]
    f = {x["claim"]: x for x in json.loads((out / "findings.json").read_text())["findings"]}
    assert f["phase-aware"]["verdict"] == "cannot be tested here", f["phase-aware"]
    # ... and a rerun asking for phase-aware pruning is refused rather than given the IP-only folder
    r = runner.invoke(app, ["study", *common, "--tasks", "arc_easy", "--stages", "analysis,prune"])
    assert r.exit_code == 2 and 'methods: recorded ["ip"], asked ["ip", "phase"]' in " ".join(r.output.split()), r.output
    (out / "analysis" / "hellaswag_letter").mkdir()  # a killed analysis: no manifest
    (out / "analysis" / "hellaswag_letter" / "scores.npz").write_bytes(b"partial")
    r = runner.invoke(app, ["study", *common, "--tasks", "piqa", "--stages", "analysis"])
    assert r.exit_code == 0, r.output
    st = json.loads((out / "study.json").read_text())
    assert st["config"]["tasks"] == ["arc_easy", "piqa"] and st["config"]["stages"] == ["analysis", "prune"]
    assert st["stages"] == {"analysis": ["arc_easy_letter", "piqa_letter"], "prune": ["arc_easy_letter"]}
    from declens.analyses.study import load_study

    study = load_study(out)
    assert sorted(study.results["analysis"]) == ["arc_easy_letter", "piqa_letter"] and study.get("prune", "arc_easy_letter")
    f = json.loads((out / "findings.json").read_text())["findings"]
    assert {x["source"] for x in f if x["claim"] == 1} == {"study:arc_easy_letter", "study:piqa_letter"}

    # the same folder given to another model: none of the first model's results join its study
    from conftest import save_tiny

    other = save_tiny(tmp_path / "other-llama", "llama")
    r = runner.invoke(app, ["study", "--model", str(other), *common[2:], "--tasks", "winogrande", "--stages", "analysis"])
    assert r.exit_code == 0, r.output
    st = json.loads((out / "study.json").read_text())
    assert st["stages"] == {"analysis": ["winogrande_letter"]} and st["config"]["tasks"] == ["winogrande"], st
