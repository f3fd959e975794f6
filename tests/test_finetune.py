"""The fine-tuning package: the Trainer loop (LoRA and full), the training rows (never an evaluated
row), and the learning-rate selection rule."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from conftest import make_tiny

from declens.errors import DeclensError
from declens.finetune import (FinetuneConfig, TrainData, answer_loss, choose_lr, finetune, heldout_split,
                              load_training_data, pruned_copy, run_finetune, select_lr, training_mixture,
                              training_sequences)
from declens.tasks import load_task

MAXLEN = 96


@pytest.fixture(scope="module")
def seqs():
    lm = make_tiny("llama", layers=4)
    return training_sequences(lm, load_training_data("arc_easy", limit=16, seed=0), "letter", max_length=MAXLEN)


@pytest.mark.parametrize("method, lr", [("lora", 3e-3), ("full", 1e-3)])
def test_trainer_finetuning_lowers_the_training_loss(method, lr, seqs):
    lm = make_tiny("llama", layers=4)
    fp = lm.fingerprint()
    pm = pruned_copy(lm, [2])
    loss0 = answer_loss(pm, seqs)
    log = finetune(pm, seqs, method, epochs=2, batch_size=4, grad_accum=2, lr=lr, progress=False)
    assert log.backend == "transformers.Trainer" and log.steps == 4 and len(log.losses) == 4 and log.epochs == 2
    assert log.merged and not any("lora" in n for n, _ in pm.model.named_modules())
    assert (log.trainable_params < log.total_params) == (method == "lora")
    assert answer_loss(pm, seqs) < loss0 - 0.5, (loss0, log.losses)
    assert log.config["lr"] == lr and log.config["effective_batch"] == 8 and log.lr_search is None
    assert lm.fingerprint() == fp  # the dense model is untouched


def test_step_loss_is_the_mean_over_the_answer_tokens_of_the_effective_batch(seqs):
    """Trainer's gradient accumulation keeps our loss definition: one step of 2 x 4 rows logs the mean
    answer-token loss of all 8 rows (a negligible learning rate leaves the model as it was)."""
    lm = make_tiny("llama", layers=2)
    rows = seqs[:8]
    ref = answer_loss(lm, rows)
    log = finetune(lm, rows, "full", max_steps=1, batch_size=4, grad_accum=2, lr=1e-12, progress=False)
    assert log.steps == 1 and log.losses[0] == pytest.approx(ref, rel=1e-5)


def test_training_rows_never_include_evaluated_rows():
    evaluated = [load_task("arc_easy", limit=40, seed=0), load_task("piqa", limit=5, seed=0)]
    # an evaluated set that shares rows with a training split: by id, and by text under another id
    shared = load_training_data("arc_easy", limit=30, seed=0).items[:4]
    clone = replace(shared[3], id="renamed-row")
    rigged = replace(evaluated[0], items=evaluated[0].items + list(shared[:3]) + [clone])
    parts, record = training_mixture(TrainData(tasks=("arc_easy", "arc_challenge"), samples=30, seed=0),
                                     [rigged, evaluated[1]])
    assert [p.name for p in parts] == ["arc_easy", "arc_challenge"]
    assert record["tasks"]["arc_easy"]["dropped_as_evaluated"] == 4 and len(parts[0].items) == 26
    evaluated_ids = {(d.name, it.id) for d in (rigged, evaluated[1]) for it in d.items}
    for p in parts:
        assert p.split == "train"
        assert not {(p.name, it.id) for it in p.items} & evaluated_ids
    assert {it.question for it in shared}.isdisjoint(it.question for it in parts[0].items)
    assert record["evaluated_without_training_rows"] == ["piqa"]  # no training split of its own: nothing of it
    with pytest.raises(DeclensError, match="no training split"):
        TrainData(tasks=("hellaswag",))


def test_lr_rule():
    assert choose_lr({1e-4: 2.0, 2e-4: 1.5, 5e-4: float("nan")}) == 2e-4
    assert choose_lr({1e-4: 1.5, 2e-4: 1.5}) == 1e-4  # a tie goes to the smaller rate
    with pytest.raises(DeclensError, match="diverged"):
        choose_lr({1e-4: float("inf")})
    search, held = heldout_split(20, 0.1, seed=3)
    assert len(held) == 2 and not set(search) & set(held) and sorted(search + held) == list(range(20))
    assert heldout_split(20, 0.1, seed=3) == (search, held)
    with pytest.raises(DeclensError, match="not both"):
        FinetuneConfig(lr=1e-4, lr_candidates=(1e-4,))
    with pytest.raises(DeclensError, match="lr_candidates"):
        FinetuneConfig(lr_candidates=(1e-4, -1.0))


def test_lr_selection_picks_the_lowest_heldout_loss_and_records_every_candidate(seqs):
    lm = make_tiny("llama", layers=2)
    fp = lm.fingerprint()
    cfg = FinetuneConfig(method="lora", epochs=1, batch_size=4, lr_candidates=(1e-6, 3e-3), lr_heldout=0.25,
                         lr_search_steps=3)
    rec = select_lr(lm, seqs, cfg, progress=False)
    assert lm.fingerprint() == fp  # every candidate trains its own copy
    assert rec["candidates"] == [1e-6, 3e-3] and len(rec["losses"]) == 2 and rec["heldout_rows"] == 4
    assert all(math.isfinite(x) for x in rec["losses"])
    assert rec["chosen"] == rec["candidates"][rec["losses"].index(min(rec["losses"]))]
    assert rec["chosen"] == 3e-3  # a rate that barely moves the weights loses to one that learns
    assert rec["losses"][0] == pytest.approx(rec["heldout_loss_before"], abs=1e-2)
    log = run_finetune(lm, seqs, cfg, progress=False)  # selection, then training on every row with the choice
    assert log.lr_search["chosen"] == rec["chosen"] and log.lr_search["losses"] == rec["losses"]
    assert log.config["lr"] == 3e-3 and log.examples == len(seqs) and log.steps == 4


DDP_SCRIPT = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
from conftest import make_tiny
from declens import distributed
from declens.finetune import finetune, load_training_data, training_sequences

distributed.init_from_env()
lm = make_tiny("llama", layers=2)
if torch.cuda.is_available():
    lm.model.to(distributed.local_device())
seqs = training_sequences(lm, load_training_data("arc_easy", limit=16, seed=0), "letter", max_length=96)
log = finetune(lm, seqs, "full", epochs=1, batch_size=2, lr=1e-3, progress=False)
json.dump({"world": log.world_size, "steps": log.steps, "losses": log.losses, "device": log.device,
           "fingerprint": lm.fingerprint()}, open(f"rank{distributed.rank()}.json", "w"))
'''


@pytest.mark.slow
def test_trainer_spreads_over_torchrun_ranks(tmp_path):
    """Two data-parallel ranks (gloo on CPU, NCCL on GPUs): each optimizer step sees 2 x batch_size rows,
    so an epoch takes half the steps, and both ranks end with the same weights."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "ddp.py", tests], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert a["world"] == b["world"] == 2 and a["steps"] == 4  # 16 rows / (2 ranks x 2 rows)
    assert all(math.isfinite(x) for x in a["losses"]) and a["fingerprint"] == b["fingerprint"]


def test_state_copy_of_a_merged_state_equals_the_merged_view():
    """A layer-merging state (laco / mka records carry ``merges``) becomes a trainable model with the
    hosts' merged weights and the absorbed layers gone: the same logits as the pruning engine's view."""
    import torch

    from declens.finetune import state_copy
    from declens.pruning.merging import MergeSpec, merged_view
    from declens.surgery import keep_positions, layer_view

    lm = make_tiny("llama", layers=4)
    spec = MergeSpec(removed=[2], groups={1: {1: 0.5, 2: 0.5}})
    ids = torch.tensor([lm.tokenizer.encode("Question: Which gas do plants take in? Answer:")])
    with torch.inference_mode(), merged_view(lm.parts, spec), layer_view(lm.parts, keep_positions(lm.parts, [2])):
        ref = lm.model(ids).logits
    pm = state_copy(lm, [2], spec.to_list())
    with torch.inference_mode():
        got = pm.model(ids).logits
    torch.testing.assert_close(got, ref)
    assert pm.num_layers == 3 and pm.source["merges"] == spec.to_list()
    with torch.inference_mode():
        assert not torch.allclose(lm.model(ids).logits, ref)  # the dense model is untouched (and differs)
