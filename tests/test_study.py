"""`declens study` end to end on a tiny model: every stage, the findings, the report; a rerun reuses every stage."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from declens.cli import app

runner = CliRunner()

ARGS = ["--tasks", "arc_easy,piqa,winogrande", "--formats", "letter", "--limit", "12", "--ip-max-ratio", "0.6",
        "--baselines", "shortgpt,last", "--baseline-ratio", "0.5", "--calib-samples", "8", "--cka-rows", "8",
        "--noise-scales", "0,1", "--ablate-window", "1", "--recover-ratios", "0.25", "--epochs", "1",
        "--train-samples", "16", "--dtype", "float32"]


def test_study_runs_every_stage_and_resumes(tmp_path, model_dir):
    out = tmp_path / "study"
    r = runner.invoke(app, ["study", "--model", str(model_dir), *ARGS, "--out", str(out)])
    assert r.exit_code == 0, r.output
    for sub in ("analysis/arc_easy_letter", "prune/piqa_letter", "baselines/winogrande_letter", "cka", "noise",
                "recover"):
        assert (out / sub / "manifest.json").is_file(), sub
    # a stage that cannot run on these results says why instead of failing the study
    for stage in ("ablate", "correlate"):
        assert (out / stage / "manifest.json").is_file() or f"{stage}: not run" in r.output, stage
    for name in ("study.json", "findings.json", "findings.md", "report.html", "manifest.json"):
        assert (out / name).is_file(), name
    f = json.loads((out / "findings.json").read_text())
    claims = [x["claim"] for x in f["findings"]]
    assert claims[:8] == [1, 2, 3, 4, 5, 6, 7, 8] and 9 in claims and "safe margin" in claims
    assert all(x["verdict"] in ("holds", "does not hold", "cannot be tested here") for x in f["findings"])
    assert "Findings: the paper" in (out / "report.html").read_text()

    again = runner.invoke(app, ["study", "--model", str(model_dir), *ARGS, "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert again.output.count("already complete") >= 9 and " ...\n" not in again.output
    assert json.loads((out / "findings.json").read_text())["findings"] == f["findings"]

    fo = tmp_path / "findings"
    r2 = runner.invoke(app, ["findings", str(out), "--out", str(fo), "--bootstrap", "50"])
    assert r2.exit_code == 0, r2.output
    assert (fo / "findings.md").read_text().count("### Claim") == len(claims)


def test_study_refuses_bad_options_before_loading(tmp_path):
    for bad, word in ((["--tasks", "nope"], "nope"), (["--ip-max-ratio", "1.5"], "ip-max-ratio"),
                      (["--recover-ratios", "0.7"], "recover ratios"), (["--stages", "prune,zzz"], "zzz")):
        r = runner.invoke(app, ["study", "--model", str(tmp_path / "no-model"), *bad, "--out", str(tmp_path / "s")])
        assert r.exit_code == 2 and word in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "s").exists()
