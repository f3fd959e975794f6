"""Data parallelism under ``torchrun`` (gloo, 2 CPU ranks): the same numbers as one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from conftest import save_tiny
from declens.cli import app

pytestmark = pytest.mark.slow
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", layers=6)


def _torchrun(args, tmp_path, entry=("-m", "declens")):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", *entry, *args]
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
    assert [r["final_accuracy"] for r in p1] == [r["final_accuracy"] for r in p2]


def _one_thread(args) -> None:
    """Run a command in this process with one intra-op thread, as each torchrun rank runs (``OMP_NUM_THREADS=1``),
    so that every batch rounds as it does on a rank and results can be compared bit for bit."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = CliRunner().invoke(app, args)
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output


def _one_result_folder(tmp_path, out, kind: str, others: tuple[str, ...] = ()) -> None:
    """The torchrun run wrote one complete folder (rank 0): exactly the files its manifest lists, plus the
    recorded invocation, and nothing else anywhere under the working folder (no checkpoint, no default folder)
    but the ``others`` named there."""
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted(["one", "two", *others])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == kind and manifest["complete"]
    listed = {f["path"] for f in manifest["files"]}
    assert {q.name for q in out.iterdir()} == listed | {"manifest.json", "config.json"}
    assert json.loads((out / "config.json").read_text())["run_id"] == manifest["run_id"]


def test_torchrun_noise_equals_one_process(llama_dir, tmp_path):
    """Pass 1 (dense scores, sigma statistics) and pass 2 (the noised runs) split over two ranks give one
    process's result bit for bit: rows are gathered (copied), the sigma statistics gathered per batch and
    folded in plan order, and every batch runs alone on a rank as in one process with one thread."""
    import numpy as np

    args = ["noise", "--model", str(llama_dir), "--task", "arc_easy", "--limit", "16", "--dtype", "float32",
            "--max-tokens", "256", "--scales", "0,0.5", "--seed", "3"]  # small batches: each rank gets several
    _one_thread([*args, "--out", str(tmp_path / "one")])
    _torchrun([*args, "--out", str(tmp_path / "two")], tmp_path)
    a = json.loads((tmp_path / "one" / "noise.json").read_text())
    b = json.loads((tmp_path / "two" / "noise.json").read_text())
    assert b["provenance"]["timing"]["ranks"] == 2 and a["provenance"]["timing"]["ranks"] == 1
    # >= 4 batches x 6 layers x 2 scales: each rank runs several batches (11 here)
    assert a["provenance"]["timing"]["noise_runs"] == b["provenance"]["timing"]["noise_runs"] >= 4 * 6 * 2
    assert "sigma_by_mode" in a and a.keys() == b.keys()
    for k in a.keys() - {"provenance"}:  # the map, the dense pass, every sigma rule
        assert a[k] == b[k], k
    with np.load(tmp_path / "one" / "noise.npz") as za, np.load(tmp_path / "two" / "noise.npz") as zb:
        assert sorted(za.files) == sorted(zb.files)
        for k in za.files:
            np.testing.assert_array_equal(za[k], zb[k], err_msg=k)
        assert np.isfinite(za["scores"][:, :, :, :, :2]).all()  # every row was scored (arc_easy: >= 2 options)
    _one_result_folder(tmp_path, tmp_path / "two", "noise")


def test_torchrun_cka_equals_one_process(llama_dir, tmp_path):
    """The rows' features collected over two ranks and gathered (copied) give one process's CKA bit for bit;
    the pruned view reuses the dense prefix on each rank."""
    import numpy as np

    args = ["cka", "--model", str(llama_dir), "--task", "arc_easy", "--limit", "16", "--dtype", "float32",
            "--max-tokens", "256", "--remove", "3,4", "--include-embeddings"]
    _one_thread([*args, "--out", str(tmp_path / "one")])
    _torchrun([*args, "--out", str(tmp_path / "two")], tmp_path)
    a = json.loads((tmp_path / "one" / "cka.json").read_text())
    b = json.loads((tmp_path / "two" / "cka.json").read_text())
    assert b["provenance"]["timing"]["ranks"] == 2
    assert a["config"] == b["config"] and a["summary"] == b["summary"] and a["layers"] == b["layers"]
    with np.load(tmp_path / "one" / "cka.npz") as za, np.load(tmp_path / "two" / "cka.npz") as zb:
        for k in za.files:
            np.testing.assert_array_equal(za[k], zb[k], err_msg=k)
        assert za["hidden"].shape == (5, 7) and 0 < za["hidden"].min() < 1  # emb + 4 kept rows, emb + 6 columns
    _one_result_folder(tmp_path, tmp_path / "two", "cka")



def test_torchrun_ablate_equals_one_process(llama_dir, tmp_path):
    """The ablation (a dense analysis locating the window, then every single and paired removal evaluated on
    each task) over two ranks: rows sharded and gathered, each batch run alone on a rank as one process with
    one thread runs it, so every accuracy and DM is one process's, bit for bit."""
    args = ["ablate", "--model", str(llama_dir), "--task", "arc_easy", "--tasks", "arc_easy,piqa", "--tp", "3",
            "--window", "1", "--limit", "16", "--dtype", "float32", "--max-tokens", "256"]
    _one_thread([*args, "--out", str(tmp_path / "one")])
    _torchrun([*args, "--out", str(tmp_path / "two")], tmp_path)
    a = json.loads((tmp_path / "one" / "ablate.json").read_text())
    b = json.loads((tmp_path / "two" / "ablate.json").read_text())
    assert (a["provenance"]["ranks"], b["provenance"]["ranks"]) == (1, 2)
    for k in a.keys() - {"provenance"}:
        assert a[k] == b[k], k
    _one_result_folder(tmp_path, tmp_path / "two", "ablate")


def test_torchrun_recover_trains_data_parallel_like_one_process(llama_dir, tmp_path):
    """LoRA fine-tuning over two ranks (DDP, 1 row per rank and micro-batch, 2 micro-batches per step) takes the
    steps of one process with 2 rows per micro-batch (the same effective batch, 4, and the same rows per step:
    24 rows, where the length grouping of the per-rank batch would draw another order); the analyses before and
    after are sharded; rank 0 alone writes the run folder, its config.json and the exported model.

    Not bit for bit: DDP adds the two ranks' gradients (all-reduce) where one process sums all rows in one
    product, so float32 rounding differs (measured: losses 1e-7, gradient norms 1e-6, final DM 2e-6 relative);
    the tolerances below are ten times that, far below the change a different row order makes (losses 10%).
    LoRA dropout is 0: ranks draw their dropout masks for their own rows, unlike one process."""
    import numpy as np
    from safetensors.numpy import load_file

    args = ["recover", "--model", str(llama_dir), "--task", "arc_easy", "--remove", "1,2", "--ft-method", "lora",
            "--lora-dropout", "0", "--train-samples", "24", "--max-steps", "3", "--grad-accum", "2", "--lr", "1e-3",
            "--limit", "8", "--dtype", "float32", "--max-length", "96", "--max-tokens", "256"]
    _one_thread([*args, "--batch-size", "2", "--out", str(tmp_path / "one"), "--export-dir", str(tmp_path / "m1")])
    _torchrun([*args, "--batch-size", "1", "--out", str(tmp_path / "two"), "--export-dir", str(tmp_path / "m2")],
              tmp_path)
    a = json.loads((tmp_path / "one" / "recover.json").read_text())
    b = json.loads((tmp_path / "two" / "recover.json").read_text())
    ta, tb = a["runs"][0]["train"], b["runs"][0]["train"]
    assert (ta["world_size"], tb["world_size"]) == (1, 2) and ta["effective_batch"] == tb["effective_batch"] == 4
    assert (a["provenance"]["timing"]["ranks"], b["provenance"]["timing"]["ranks"]) == (1, 2)
    assert ta["steps"] == tb["steps"] == 3 and ta["epochs"] == tb["epochs"] == 0.5
    assert tb["losses"] == pytest.approx(ta["losses"], rel=1e-6) and tb["grad_norms"] == pytest.approx(ta["grad_norms"], rel=1e-5)
    assert ta["losses"][0] != pytest.approx(ta["losses"][1], rel=1e-2)  # it trains (the step losses move)
    assert a["dense"] == b["dense"]  # the analyses shard rows like analyze: same numbers (one thread each)
    ra, rb = a["runs"][0], b["runs"][0]
    assert ra["layers_before"] == rb["layers_before"] and ra["before"] == rb["before"]
    assert ra["layers_after"]["accuracy"] == rb["layers_after"]["accuracy"]
    assert rb["layers_after"]["dm"] == pytest.approx(ra["layers_after"]["dm"], rel=1e-5, abs=1e-6)
    assert ra["after"]["final_dm"] != pytest.approx(ra["before"]["final_dm"], abs=1e-3)  # training changed the lens
    # the exported models (rank 0 only): one folder each, the same merged weights up to that rounding
    assert [q.name for q in (tmp_path / "m2").iterdir()] == ["00_k2"]
    assert sorted(q.name for q in (tmp_path / "m2" / "00_k2").iterdir()) == sorted(q.name for q in (tmp_path / "m1" / "00_k2").iterdir())
    wa, wb = load_file(tmp_path / "m1" / "00_k2" / "model.safetensors"), load_file(tmp_path / "m2" / "00_k2" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-5, atol=1e-6, err_msg=k)
    _one_result_folder(tmp_path, tmp_path / "two", "recover", others=("m1", "m2"))


#: run under torchrun by the test below: every rank measures the answer loss (its share of the batches)
_ANSWER_LOSS = """
import json, sys
from declens import distributed, load_model
from declens.finetune import answer_loss, load_training_data, training_sequences
distributed.init_from_env()
lm = load_model(sys.argv[1], dtype="float32", device="cpu")
seqs = training_sequences(lm, load_training_data("arc_easy", limit=20, seed=0), "letter", 96)
losses = distributed.gather_objects(answer_loss(lm, seqs, 3))
if distributed.is_main():
    open(sys.argv[2], "w").write(json.dumps(losses))
"""


def test_torchrun_recover_answer_loss_equals_one_process(llama_dir, tmp_path):
    """The answer-token loss (training loss before/after, learning-rate selection) over two ranks: 7 batches
    dealt round-robin, per-batch sums gathered and added in batch order, so both ranks get one process's
    number bit for bit."""
    import torch

    from declens import load_model
    from declens.finetune import answer_loss, load_training_data, training_sequences

    script = tmp_path / "answer_loss.py"
    script.write_text(_ANSWER_LOSS)
    _torchrun([str(llama_dir), str(tmp_path / "losses.json")], tmp_path, entry=(str(script),))
    lm = load_model(str(llama_dir), dtype="float32", device="cpu")
    seqs = training_sequences(lm, load_training_data("arc_easy", limit=20, seed=0), "letter", 96)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        one = answer_loss(lm, seqs, 3)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "losses.json").read_text()) == [one, one] and one > 0

def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc): torchrun may start its ranks in their own sessions."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank it started, and wait until none of them runs any more."""
    pids = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    def running(p: int) -> bool:
        try:
            with open(f"/proc/{p}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie no longer runs
        except (OSError, IndexError):
            return False

    deadline = time.monotonic() + 60
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_torchrun_prune_resumes_after_a_kill(llama_dir, tmp_path):
    """A torchrun prune killed midway resumes (every rank replays the stored evaluations: same collectives
    on all ranks, no hang) to the trajectory and accuracies of one uninterrupted process."""
    args = ["prune", "--model", str(llama_dir), "--task", "arc_easy", "--limit", "24", "--dtype", "float32",
            "--max-tokens", "256", "--method", "ip,sleb", "--max-ratio", "0.84", "--calib-samples", "12",
            "--skip-prun", "--collapse-drop", "0.02"]
    one = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output

    out = tmp_path / "two"
    state = out / ".prune-state.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "declens", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: torchrun and both ranks
    deadline = time.monotonic() + 300
    stored = 0
    try:
        while proc.poll() is None and time.monotonic() < deadline and stored < 4:
            time.sleep(0.05)
            try:
                stored = len(json.loads(state.read_text())["evaluations"])
            except (OSError, ValueError, KeyError):
                pass
    finally:
        if proc.poll() is None:
            _kill_tree(proc)  # a rank left running would finish the run and remove the resume state
        proc.wait(timeout=60)
    assert stored >= 4 and not (out / "prune.json").exists(), "the run ended before it could be killed"

    r = _torchrun([*args, "--out", str(out)], tmp_path)  # times out (fails) instead of hanging
    a = json.loads((tmp_path / "one" / "prune.json").read_text())
    b = json.loads((out / "prune.json").read_text())
    assert b["work"]["resumed_evaluations"] >= 4 and b["work"]["ranks"] == 2, r.stdout[-2000:]
    for m in ("ip", "sleb"):
        ra, rb = a["methods"][m]["records"], b["methods"][m]["records"]
        assert [(x["removed"], x["collapsed"], x["path"]) for x in ra] == [(x["removed"], x["collapsed"], x["path"]) for x in rb]
        assert [x["final_accuracy"] for x in ra] == [x["final_accuracy"] for x in rb]
        assert [x["final_dm"] for x in ra] == pytest.approx([x["final_dm"] for x in rb], abs=1e-5)
        assert [x["removed"] for x in a["methods"][m]["table"]] == [x["removed"] for x in b["methods"][m]["table"]]


def test_torchrun_compare_equals_one_process(llama_dir, tmp_path):
    """``compare`` over two ranks: the pruning methods evaluate sharded rows (the same layers removed), every
    pruned model is fine-tuned data parallel (DDP, 1 row per rank and micro-batch, against one process's 2:
    the same effective batch, see the recover test above for the rounding this allows) and evaluated sharded;
    rank 0 alone writes the folder and its cells."""
    args = ["compare", "--model", str(llama_dir), "--methods", "ip,last", "--ratios", "0.34", "--tasks", "arc_easy",
            "--prune-task", "arc_easy", "--limit", "8", "--calib-samples", "8", "--train-tasks", "arc_easy",
            "--train-samples", "24", "--ft-method", "lora", "--lora-dropout", "0", "--max-steps", "3",
            "--grad-accum", "2", "--lr", "1e-3", "--dtype", "float32", "--max-length", "96", "--max-tokens", "256"]
    _one_thread([*args, "--batch-size", "2", "--out", str(tmp_path / "one")])
    _torchrun([*args, "--batch-size", "1", "--out", str(tmp_path / "two")], tmp_path)
    a = json.loads((tmp_path / "one" / "compare.json").read_text())
    b = json.loads((tmp_path / "two" / "compare.json").read_text())
    ca = {(c["method"], c["k"]): c for c in a["cells"]}
    cb = {(c["method"], c["k"]): c for c in b["cells"]}
    assert sorted(ca) == sorted(cb) == [("ip", 2), ("last", 2)]
    for key in ca:
        ta, tb = ca[key]["train"], cb[key]["train"]
        assert (ta["world_size"], tb["world_size"]) == (1, 2) and ta["effective_batch"] == tb["effective_batch"] == 4
        assert ca[key]["removed"] == cb[key]["removed"] and ca[key]["prune_accuracy"] == cb[key]["prune_accuracy"], key
        assert tb["losses"] == pytest.approx(ta["losses"], rel=1e-6), key  # the same steps on the same rows
        assert ta["losses"][0] != pytest.approx(ta["losses"][1], rel=1e-2)  # it trains
        assert ca[key]["accuracy"] == cb[key]["accuracy"], key
    assert ca[("last", 2)]["removed"] == [4, 3]  # the layers before the last one
    # one folder, written by rank 0: the files of one process's (its cells and prune runs included), complete
    assert sorted(q.name for q in tmp_path.iterdir()) == ["one", "two"]
    files = [sorted(str(q.relative_to(tmp_path / d)) for q in (tmp_path / d).rglob("*")) for d in ("one", "two")]
    assert files[0] == files[1] and "cells/ip_k2.json" in files[1]
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["complete"]


#: run under torchrun by the test below: every rank runs out of (stand-in) device memory in the pruning engine's
#: dense pass, whose policy re-plans the whole pass with half the budget in one process
_REPLAN = """
import json, sys, torch
from declens import distributed, load_model
from declens.analyses.decision import prepare
from declens.errors import DeviceMemoryError
from declens.pruning.engine import PruningEngine
from declens.tasks import load_task
distributed.init_from_env()
lm = load_model(sys.argv[1], dtype="float32", device="cpu")
def limit(module, args):  # the stand-in device: no pass over more than 40 padded tokens
    if args[0].shape[0] * args[0].shape[1] > 40:
        raise torch.OutOfMemoryError("stand-in")
lm.parts.decoder.rotary_emb.register_forward_pre_hook(limit)
try:
    PruningEngine(lm, prepare(lm, load_task("arc_easy", limit=8), "letter"), None, max_tokens=512,
                  progress=False).run_dense()
    got = "no error"
except DeviceMemoryError as e:
    got = str(e)
got = distributed.gather_objects(got)
if distributed.is_main():
    open(sys.argv[2], "w").write(json.dumps(got))
"""


def test_torchrun_refuses_to_replan_one_rank_alone(llama_dir, tmp_path):
    """Out of memory in a pass whose ranks share one plan, a rank cannot halve its budget alone (the others
    would run another plan and the collectives would not match): every rank stops with one line naming the
    budget to rerun with, instead of hanging or re-planning."""
    script = tmp_path / "replan.py"
    script.write_text(_REPLAN)
    _torchrun([str(llama_dir), str(tmp_path / "errors.json")], tmp_path, entry=(str(script),))
    errors = json.loads((tmp_path / "errors.json").read_text())
    assert len(errors) == 2
    for msg in errors:
        assert "\n" not in msg and "under torchrun" in msg and "rerun with --max-tokens 256" in msg, msg
