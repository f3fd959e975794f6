"""Fine-tuning recovery (``declens recover``): training data, the fine-tuning loop, LoRA merge, export,
the before/after study, and one end-to-end run on the real SmolLM2-135M."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny

from declens.analyses.decision import analyze, prepare
from declens.analyses.recovery import (FinetuneConfig, RecoveryResult, answer_loss, configs_from_prune, export_model,
                                       finetune, load_training_data, merge_lora, pruned_copy, recover_study,
                                       training_sequences, training_split)
from declens.errors import DeclensError
from declens.models import LoadedModel
from declens.surgery import REMOVED_ATTR
from declens.tasks import get_spec, load_task

#: a short, fast schedule that visibly trains a tiny random model
FAST = dict(epochs=3, batch_size=8, lr=3e-3, progress=False)


@pytest.fixture(scope="module")
def train_rows():
    return load_training_data("arc_easy", limit=32, seed=0)


@pytest.fixture(scope="module")
def eval_rows():
    return load_task("arc_easy", limit=16, seed=0)


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits.float()


def _probe(lm):
    return torch.tensor([lm.tokenizer.encode("Question: Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nAnswer:")])


# --------------------------------------------------------------------------------------------
# training data


def test_training_sequences_are_the_evaluated_prompts(train_rows):
    lm = make_tiny("llama")
    seqs = training_sequences(lm, train_rows, "letter")
    req = prepare(lm, train_rows, "letter")
    assert len(seqs) == len(train_rows.items) == 32
    for s, prompt, g in zip(seqs, req.prompts, req.gold):
        assert list(s.input_ids) == list(prompt) + [req.option_ids[g]]  # prompt + " <gold letter>"
        assert s.n_answer == 1 and s.labels == [-100] * len(prompt) + [req.option_ids[g]]
    cloze = training_sequences(lm, train_rows, "cloze")
    creq = prepare(lm, train_rows, "cloze")
    for s, ctxs, conts, g in zip(cloze, creq.contexts, creq.continuations, creq.gold):
        assert list(s.input_ids) == ctxs[g] + conts[g] and s.n_prompt == len(ctxs[g])
    short = training_sequences(lm, train_rows, "cloze", max_length=40)
    assert all(len(s.input_ids) <= 40 for s in short) and any(s.truncated for s in short)
    assert all(s.input_ids[s.n_prompt:] == c.input_ids[c.n_prompt:] for s, c in zip(short, cloze))  # answers kept


def test_training_split_rules():
    assert training_split(get_spec("arc_challenge")) == "train"
    assert training_split(get_spec("mmlu")) == "dev"
    with pytest.raises(DeclensError, match="no training split"):
        training_split(get_spec("hellaswag"))
    with pytest.raises(DeclensError, match="no split 'nope'"):
        training_split(get_spec("arc_easy"), "nope")


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_answer_loss_equals_transformers_masked_loss(arch, train_rows):
    """Our answer-only loss (LM head at answer positions only, soft-capping included) is transformers' own
    causal-LM loss with the prompt labels set to -100."""
    lm = make_tiny(arch)
    seqs = training_sequences(lm, train_rows, "cloze")[:4]
    for s in seqs:
        ids = torch.tensor([s.input_ids])
        with torch.no_grad():
            ref = lm.model(ids, labels=torch.tensor([s.labels])).loss
        assert answer_loss(lm, [s]) == pytest.approx(float(ref), rel=1e-4)


# --------------------------------------------------------------------------------------------
# fine-tuning


def test_lora_lowers_loss_and_changes_dm(train_rows, eval_rows):
    lm = make_tiny("llama", layers=6)
    fp = lm.fingerprint()
    seqs = training_sequences(lm, train_rows, "letter")
    pm = pruned_copy(lm, [2, 3])
    assert pm.num_layers == 4 and lm.num_layers == 6
    before = analyze(pm, eval_rows, "letter", progress=False)
    assert before.metrics.layer_ids == [0, 1, 4, 5]  # dense ids
    loss0 = answer_loss(pm, seqs)
    log = finetune(pm, seqs, "lora", **FAST)
    assert log.steps == 12 and len(log.losses) == 12 and log.merged and log.epochs == 3
    assert 0 < log.trainable_params < log.total_params
    loss1 = answer_loss(pm, seqs)
    assert loss1 < loss0 - 1.0, (loss0, loss1)
    assert log.mean_loss("last") < log.mean_loss("first") - 1.0, log.losses
    after = analyze(pm, eval_rows, "letter", progress=False)
    assert after.metrics.layer_ids == [0, 1, 4, 5]
    assert np.abs(after.metrics.dm - before.metrics.dm).max() > 1e-2
    assert not pm.model.training and lm.fingerprint() == fp  # the dense model is untouched


def test_full_finetune_lowers_loss(train_rows):
    lm = make_tiny("qwen2", layers=6)
    seqs = training_sequences(lm, train_rows, "letter")
    pm = pruned_copy(lm, [4])
    loss0 = answer_loss(pm, seqs)
    log = finetune(pm, seqs, "full", **{**FAST, "lr": 1e-3})
    assert log.trainable_params == log.total_params
    assert answer_loss(pm, seqs) < loss0 - 1.0
    assert log.mean_loss("last") < log.mean_loss("first")
    assert all(p.requires_grad for p in pm.model.parameters())  # as loaded


def test_same_seed_same_losses(train_rows):
    lm = make_tiny("llama")
    seqs = training_sequences(lm, train_rows, "letter")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    runs = []
    for seed in (7, 7, 8):
        pm = pruned_copy(lm, [1])
        runs.append(finetune(pm, seqs, "lora", max_steps=3, seed=seed, **{**FAST, "epochs": 1}).losses)
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone


def test_finetune_inside_inference_mode(train_rows):
    """declens analyses run under torch.inference_mode; fine-tuning must work from there too."""
    lm = make_tiny("llama")
    seqs = training_sequences(lm, train_rows, "letter")
    with torch.inference_mode():
        pm = pruned_copy(lm, [1])
        log = finetune(pm, seqs, "lora", max_steps=2, **FAST)
    assert log.steps == 2 and all(np.isfinite(log.losses))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
def test_lora_merges_into_a_plain_model_that_exports(arch, train_rows, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lm = make_tiny(arch, layers=4)
    pm = pruned_copy(lm, [1])
    seqs = training_sequences(pm, train_rows, "letter")
    ids = _probe(pm)
    untrained = _logits(pm.model, ids)
    log = finetune(pm, seqs, "lora", max_steps=4, merge=False, **FAST)
    assert isinstance(log.peft_model, PeftModel) and not log.merged
    with_adapters = _logits(log.peft_model, ids)
    assert (with_adapters - untrained).abs().max() > 1e-3  # the adapters learned something
    merged = merge_lora(log.peft_model)
    assert not any("lora" in n.lower() for n, _ in merged.named_modules())
    assert not isinstance(merged, PeftModel) and type(merged).__name__.endswith("ForCausalLM")
    torch.testing.assert_close(_logits(merged, ids), with_adapters, rtol=1e-4, atol=1e-4)
    rec = LoadedModel(model=merged, tokenizer=pm.tokenizer, spec=pm.spec, source=pm.source)
    info = export_model(rec, tmp_path / "out")
    assert info["max_abs_logit_diff"] < 1e-4 and info["num_layers"] == 3 and info["removed"] == [1]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg[REMOVED_ATTR] == [1]
    if "layer_types" in cfg:
        assert len(cfg["layer_types"]) == 3
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(back, ids), with_adapters, rtol=1e-4, atol=1e-4)
    reloaded = LoadedModel(model=back.eval(), tokenizer=pm.tokenizer, spec="reloaded")
    res = analyze(reloaded, load_task("arc_easy", limit=4), "letter", progress=False)
    assert res.metrics.layer_ids == [0, 2, 3]  # the lens reports dense ids


def test_export_refuses_unmerged_lora(train_rows, tmp_path):
    lm = make_tiny("llama")
    pm = pruned_copy(lm, [1])
    finetune(pm, training_sequences(pm, train_rows, "letter"), "lora", max_steps=1, merge=False, **FAST)
    with pytest.raises(DeclensError, match="LoRA"):
        export_model(pm, tmp_path / "x")


# --------------------------------------------------------------------------------------------
# the study


def test_recover_study_writes_results_and_models(train_rows, eval_rows, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = make_tiny("llama", layers=6)
    res = recover_study(lm, eval_rows, train_rows, [[2, 3], [1, 2, 3]], fmt="letter", method="lora",
                        measure_train_loss=True, out_dir=tmp_path / "run", export_dir=tmp_path / "models", **FAST)
    assert [r.k for r in res.runs] == [2, 3] and res.runs[1].ratio == pytest.approx(0.5)
    for r in res.runs:
        assert r.train_loss_after < r.train_loss_before
        assert r.restored == (r.tp_before is None and r.tp_after is not None)
        assert r.layers_before["layer_ids"] == [i for i in range(6) if i not in r.removed]
        assert r.layers_after["dm"] != r.layers_before["dm"]
        assert r.export["max_abs_logit_diff"] < 1e-4
        assert AutoModelForCausalLM.from_pretrained(r.export["out_dir"]).config.num_hidden_layers == 6 - r.k
    for f in ("recover.json", "recover.csv", "recover_dm.png", "recover_loss.png"):
        assert (tmp_path / "run" / f).is_file(), f
    d = json.loads((tmp_path / "run" / "recover.json").read_text())
    assert d["kind"] == "recover" and d["config"]["finetune"]["lr"] == 3e-3 and d["config"]["finetune"]["lora_r"] == 16
    assert d["config"]["train"]["sequences"] == 32 and d["provenance"]["model"]["fingerprint"]
    assert len(d["dense"]["dm"]) == 6 and len(d["runs"][0]["train"]["losses"]) == 12
    back = RecoveryResult.load(tmp_path / "run")
    assert back.table() == res.table()


def test_recover_from_a_prune_run(eval_rows, tmp_path):
    from declens.pruning import prune

    lm = make_tiny("llama", layers=8)
    prune(lm, eval_rows, "letter", ["last"], max_ratio=0.5, calib_samples=8, out_dir=tmp_path / "p", progress=False,
          plots=False)
    cfgs = configs_from_prune(tmp_path / "p", [0.25, 0.5], "last", num_layers=8)
    assert [c.removed for c in cfgs] == [(7, 6), (7, 6, 5, 4)] and cfgs[0].source == "prune:last"
    assert len(configs_from_prune(tmp_path / "p", None, "last")) == 4
    with pytest.raises(DeclensError, match="not in the prune run"):
        configs_from_prune(tmp_path / "p", [0.75], "last")
    with pytest.raises(DeclensError, match="no method 'ip'"):
        configs_from_prune(tmp_path / "p", None, "ip")
    with pytest.raises(DeclensError, match="8-layer model"):
        configs_from_prune(tmp_path / "p", None, "last", num_layers=6)
    res = recover_study(lm, eval_rows, "arc_easy", prune=tmp_path / "p", ratios=[0.25], prune_method="last",
                        train_samples=16, max_steps=2, dense=False, **{**FAST, "epochs": 1})
    assert len(res.runs) == 1 and res.runs[0].removed == [7, 6] and res.runs[0].train["steps"] == 2
    assert res.dense is None


def test_bad_input_is_refused(eval_rows, train_rows):
    lm = make_tiny("llama")
    with pytest.raises(DeclensError, match="unknown fine-tuning method 'adam'"):
        recover_study(lm, eval_rows, train_rows, [[1]], method="adam")
    with pytest.raises(DeclensError, match="unknown fine-tuning hyper-parameter"):
        recover_study(lm, eval_rows, train_rows, [[1]], learning_rate=1e-3)
    with pytest.raises(DeclensError, match="lr="):
        FinetuneConfig(lr=-1.0)
    with pytest.raises(DeclensError, match="out of range"):
        recover_study(lm, eval_rows, train_rows, [[9]])
    with pytest.raises(DeclensError, match="more than once"):
        recover_study(lm, eval_rows, train_rows, [[1, 1]])
    with pytest.raises(DeclensError, match="either"):
        recover_study(lm, eval_rows, train_rows)
    with pytest.raises(DeclensError, match="no training split"):
        recover_study(lm, eval_rows, "hellaswag", [[1]])
    with pytest.raises(DeclensError, match="also evaluation rows"):
        recover_study(lm, eval_rows, "arc_easy", [[1]], train_split="test")
    with pytest.raises(DeclensError, match="unknown fine-tuning method"):
        finetune(pruned_copy(lm, [1]), training_sequences(lm, train_rows, "letter"), "qlora")


# --------------------------------------------------------------------------------------------
# end to end on a real model


@pytest.mark.slow
def test_recover_smollm2_end_to_end(smollm2, tmp_path):
    """Remove 3 layers of SmolLM2-135M, LoRA-tune 1 epoch on 32 ARC-Easy train rows, evaluate 16 test rows."""
    data = load_task("arc_easy", limit=16, seed=0)
    res = recover_study(smollm2, data, "arc_easy", [[20, 21, 22]], fmt="letter", method="lora", train_samples=32,
                        epochs=1, batch_size=8, lr=5e-4, measure_train_loss=True, dense=False, progress=False,
                        out_dir=tmp_path / "run", export_dir=tmp_path / "models")
    r = res.runs[0]
    assert r.k == 3 and r.layers_before["layer_ids"] == [i for i in range(30) if i not in (20, 21, 22)]
    assert r.train["steps"] == 4 and r.train_loss_after < r.train_loss_before
    assert r.layers_after["dm"] != r.layers_before["dm"]
    assert r.export["max_abs_logit_diff"] < 1e-3 and r.export["num_layers"] == 27
    assert (tmp_path / "run" / "recover_dm.png").is_file()
    assert smollm2.num_layers == 30  # the shared fixture is untouched
