"""Data parallelism under ``torchrun`` (gloo, 2 CPU ranks): the same numbers as one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import save_tiny
from declens.cli import app

pytestmark = pytest.mark.slow
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", layers=6)


def _torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "declens", *args]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_torchrun_analyze_and_prune_equal_one_process(llama_dir, tmp_path):
    common = ["--model", str(llama_dir), "--task", "arc_easy", "--limit", "24", "--dtype", "float32",
              "--max-tokens", "256"]  # small batches, so both ranks get several
    one = CliRunner().invoke(app, ["analyze", *common, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    _torchrun(["analyze", *common, "--out", str(tmp_path / "two")], tmp_path)
    a = json.loads((tmp_path / "one" / "result.json").read_text())
    b = json.loads((tmp_path / "two" / "result.json").read_text())
    # same predictions row by row; scores equal to float tolerance (the ranks run one thread each,
    # this process two, so matrix products may sum in another order)
    assert [(x["id"], x["pred"]) for x in a["samples"]] == [(x["id"], x["pred"]) for x in b["samples"]]
    for x, y in zip(a["samples"], b["samples"]):
        assert x["scores"] == pytest.approx(y["scores"], abs=1e-5) and x["margin"] == pytest.approx(y["margin"], abs=1e-5)
    for la, lb in zip(a["layers"], b["layers"]):
        assert la["dm"] == pytest.approx(lb["dm"], abs=1e-6) and la["accuracy"] == lb["accuracy"]

    prune_args = ["prune", *common, "--method", "ip", "--max-ratio", "0.5", "--calib-samples", "12"]
    one = CliRunner().invoke(app, [*prune_args, "--out", str(tmp_path / "p1")])
    assert one.exit_code == 0, one.output
    _torchrun([*prune_args, "--out", str(tmp_path / "p2")], tmp_path)
    p1 = json.loads((tmp_path / "p1" / "prune.json").read_text())["methods"]["ip"]["table"]
    p2 = json.loads((tmp_path / "p2" / "prune.json").read_text())["methods"]["ip"]["table"]
    assert [r["removed"] for r in p1] == [r["removed"] for r in p2] and len(p1) == 3
    assert [r["accuracy"] for r in p1] == [r["accuracy"] for r in p2]
