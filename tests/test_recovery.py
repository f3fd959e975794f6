"""Fine-tuning recovery (``declens recover``): training data, the fine-tuning loop, LoRA merge, export,
the before/after study, and one end-to-end run on the real SmolLM2-135M."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_tiny

from declens.analyses.decision import analyze, prepare
from declens.analyses.recovery import RecoveryResult, RecoveryStudyConfig, configs_from_prune, recover_study
from declens.finetune import (FinetuneConfig, answer_loss, export_model, finetune, load_training_data, merge_lora,
                              pruned_copy, training_sequences, training_split)
from declens.errors import DeclensError
from declens.models import LoadedModel
from declens.surgery import REMOVED_ATTR
from declens.tasks import get_spec, load_task

#: a short, fast schedule that visibly trains a tiny random model
FAST = dict(epochs=3, batch_size=8, lr=3e-3, progress=False)
#: FAST's fine-tuning hyper-parameters (a :class:`FinetuneConfig`'s fields)
HP = {k: v for k, v in FAST.items() if k != "progress"}
#: prompts cut to their last tokens keep the tiny tests fast (the tiny tokenizer makes long sequences)
MAXLEN = 96


@pytest.fixture(scope="module")
def train_rows():
    return load_training_data("arc_easy", limit=24, seed=0)


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
    assert len(seqs) == len(train_rows.items) == 24
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


@pytest.fixture(scope="module")
def lora_run(train_rows, eval_rows):
    """One LoRA run on a pruned tiny Llama (adapters left unmerged), shared by the tests below."""
    lm = make_tiny("llama", layers=6)
    fp = lm.fingerprint()
    seqs = training_sequences(lm, train_rows, "letter", max_length=MAXLEN)
    pm = pruned_copy(lm, [2, 3])
    ids = _probe(pm)
    before = analyze(pm, eval_rows, "letter", progress=False)
    loss0 = answer_loss(pm, seqs)
    untrained = _logits(pm.model, ids)
    log = finetune(pm, seqs, "lora", merge=False, **FAST)
    with_adapters = _logits(log.peft_model, ids)
    merged = merge_lora(log.peft_model)
    rec = LoadedModel(model=merged, tokenizer=pm.tokenizer, spec=pm.spec, source=pm.source)
    return SimpleNamespace(lm=lm, fp=fp, pm=pm, rec=rec, seqs=seqs, ids=ids, before=before, loss0=loss0, log=log,
                           loss1=answer_loss(rec, seqs), after=analyze(rec, eval_rows, "letter", progress=False),
                           untrained=untrained, with_adapters=with_adapters, merged=merged)


def test_lora_lowers_loss_and_changes_dm(lora_run):
    r = lora_run
    assert r.pm.num_layers == 4 and r.lm.num_layers == 6 and r.lm.fingerprint() == r.fp  # the dense model is untouched
    assert r.before.metrics.layer_ids == r.after.metrics.layer_ids == [0, 1, 4, 5]  # dense ids
    log = r.log
    assert log.steps == 9 and len(log.losses) == 9 and log.epochs == 3
    assert 0 < log.trainable_params < log.total_params
    assert r.loss1 < r.loss0 - 1.0, (r.loss0, r.loss1)
    assert log.mean_loss("last") < log.mean_loss("first") - 1.0, log.losses
    assert np.abs(r.after.metrics.dm - r.before.metrics.dm).max() > 1e-2
    assert not r.merged.training


def test_lora_merges_into_a_plain_model_that_exports(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r = lora_run
    assert isinstance(r.log.peft_model, PeftModel) and not r.log.merged
    assert (r.with_adapters - r.untrained).abs().max() > 1e-3  # the adapters learned something
    assert not any("lora" in n.lower() for n, _ in r.merged.named_modules())
    assert not isinstance(r.merged, PeftModel) and type(r.merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(r.merged, r.ids), r.with_adapters, rtol=1e-4, atol=1e-4)
    info = export_model(r.rec, tmp_path / "out")
    assert info["max_abs_logit_diff"] < 1e-4 and info["num_layers"] == 4 and info["removed"] == [2, 3]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg[REMOVED_ATTR] == [2, 3]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(back, r.ids), r.with_adapters, rtol=1e-4, atol=1e-4)
    reloaded = LoadedModel(model=back.eval(), tokenizer=r.pm.tokenizer, spec="reloaded")
    res = analyze(reloaded, load_task("arc_easy", limit=4), "letter", progress=False)
    assert res.metrics.layer_ids == [0, 1, 4, 5]  # the lens reports dense ids


@pytest.mark.parametrize("arch", ["gemma3", "phi3"])
def test_lora_merge_and_export_other_layouts(arch, train_rows, tmp_path):
    """Sliding-window layer types (Gemma 3) and fused projections (Phi-3: qkv_proj, gate_up_proj)."""
    from transformers import AutoModelForCausalLM

    lm = make_tiny(arch, layers=4)
    pm = pruned_copy(lm, [1])
    ids = _probe(pm)
    log = finetune(pm, training_sequences(pm, train_rows, "letter", max_length=MAXLEN)[:8], "lora", max_steps=2,
                   merge=False, **FAST)
    with_adapters = _logits(log.peft_model, ids)
    pm.model = merge_lora(log.peft_model)
    assert not any("lora" in n.lower() for n, _ in pm.model.named_modules())
    info = export_model(pm, tmp_path / "out")
    assert info["max_abs_logit_diff"] < 1e-4
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg[REMOVED_ATTR] == [1]
    if "layer_types" in cfg:
        assert len(cfg["layer_types"]) == 3
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(back, ids), with_adapters, rtol=1e-4, atol=1e-4)


def test_export_refuses_unmerged_lora(lora_run, tmp_path):
    lm = make_tiny("llama")
    pm = pruned_copy(lm, [1])
    finetune(pm, lora_run.seqs[:8], "lora", max_steps=1, merge=False, **FAST)
    with pytest.raises(DeclensError, match="LoRA"):
        export_model(pm, tmp_path / "x")


def test_full_finetune_lowers_loss(train_rows):
    lm = make_tiny("qwen2", layers=4)
    seqs = training_sequences(lm, train_rows, "letter", max_length=MAXLEN)[:16]
    pm = pruned_copy(lm, [3])
    loss0 = answer_loss(pm, seqs)
    log = finetune(pm, seqs, "full", **{**FAST, "lr": 1e-3})
    assert log.trainable_params == log.total_params and log.steps == 6
    assert answer_loss(pm, seqs) < loss0 - 1.0
    assert log.mean_loss("last") < log.mean_loss("first")
    assert all(p.requires_grad for p in pm.model.parameters())  # as loaded


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bfloat16_models_train_and_stay_bfloat16(method, lora_run, tmp_path):
    """Full fine-tuning of a 16-bit model keeps float32 master weights (bf16 would swallow small
    updates); LoRA keeps float32 adapters. Either way the recovered model is bf16 again."""
    lm = make_tiny("llama", layers=2, dtype=torch.bfloat16)
    pm = pruned_copy(lm, [1])
    seqs = lora_run.seqs[:8]
    w0 = pm.model.model.layers[0].mlp.down_proj.weight.detach().clone()
    buffers = {n: b.dtype for n, b in pm.model.named_buffers()}
    log = finetune(pm, seqs, method, max_steps=3, **{**FAST, "lr": 1e-3 if method == "full" else 3e-3})
    assert log.precision == ("float32 master weights, autocast bfloat16" if method == "full" else "bfloat16")
    assert {p.dtype for p in pm.model.parameters()} == {torch.bfloat16} and log.merged
    assert buffers == {n: b.dtype for n, b in pm.model.named_buffers()}  # RoPE inv_freq & co. untouched
    assert not torch.equal(pm.model.model.layers[0].mlp.down_proj.weight, w0)
    assert np.isfinite(log.losses).all() and log.losses[-1] < log.losses[0]
    info = export_model(pm, tmp_path / "out")
    assert info["max_abs_logit_diff"] == 0.0  # reloads bit for bit


def test_same_seed_same_losses(lora_run):
    lm = make_tiny("llama", layers=2)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    runs = []
    for seed in (7, 7, 8):
        pm = pruned_copy(lm, [1])
        runs.append(finetune(pm, lora_run.seqs[:12], "lora", max_steps=3, seed=seed, **{**FAST, "batch_size": 4}).losses)
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone


def test_finetune_inside_inference_mode(lora_run):
    """declens analyses run under torch.inference_mode; fine-tuning must work from there too."""
    lm = make_tiny("llama", layers=2)
    with torch.inference_mode():
        pm = pruned_copy(lm, [1])
        log = finetune(pm, lora_run.seqs[:4], "lora", max_steps=1, **FAST)
    assert log.steps == 1 and np.isfinite(log.losses).all()


# --------------------------------------------------------------------------------------------
# the study


def test_recover_study_writes_results_and_models(train_rows, eval_rows, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = make_tiny("llama", layers=4)
    train = load_training_data("arc_easy", limit=16, seed=0)
    cfg = RecoveryStudyConfig(fmt="letter", finetune=FinetuneConfig(method="lora", max_length=MAXLEN, **HP),
                              measure_train_loss=True)
    res = recover_study(lm, eval_rows, train, [[1, 2]], cfg, out_dir=tmp_path / "run", export_dir=tmp_path / "models",
                        progress=False)
    (r,) = res.runs
    assert r.k == 2 and r.ratio == pytest.approx(0.5) and r.removed == [1, 2] and r.source == "remove"
    assert r.train_loss_after < r.train_loss_before
    assert r.restored == (r.tp_before is None and r.tp_after is not None)
    assert r.layers_before["layer_ids"] == r.layers_after["layer_ids"] == [0, 3]
    assert r.layers_after["dm"] != r.layers_before["dm"]
    assert r.export["max_abs_logit_diff"] < 1e-4
    assert AutoModelForCausalLM.from_pretrained(r.export["out_dir"]).config.num_hidden_layers == 2
    for f in ("recover.json", "recover.csv", "recover_dm.png", "recover_loss.png"):
        assert (tmp_path / "run" / f).is_file(), f
    d = json.loads((tmp_path / "run" / "recover.json").read_text())
    assert d["kind"] == "recover" and d["config"]["finetune"]["lr"] == 3e-3 and d["config"]["finetune"]["lora_r"] == 16
    assert d["config"]["train"]["sequences"] == 16 and d["provenance"]["model"]["fingerprint"]
    assert len(d["dense"]["dm"]) == 4 and len(d["runs"][0]["train"]["losses"]) == 6
    back = RecoveryResult.load(tmp_path / "run")
    assert back.table() == res.table()
    # the findings step reads the dense reference of a real recovery result (claim 8 is testable)
    from declens.analyses.findings import UNTESTABLE, FindingsConfig, claim_recovery

    f8 = claim_recovery(back, FindingsConfig())
    assert f8.verdict != UNTESTABLE and f8.numbers["dense_final_dm"] == pytest.approx(d["dense"]["summary"]["final_dm"])
    assert f8.numbers["dm_before"] == [r.before["final_dm"]]


def test_recover_from_a_prune_run(eval_rows, tmp_path):
    from declens.pruning import PruneConfig, PruneResult, prune

    lm = make_tiny("llama", layers=4)
    prune(lm, eval_rows, "letter", PruneConfig(["last"], max_ratio=0.5, calib_samples=4), out_dir=tmp_path / "p",
          progress=False, plots=False)
    best = PruneResult.load(tmp_path / "p").runs["last"].best_by_k()
    cfgs = configs_from_prune(tmp_path / "p", [0.25, 0.5], "last", num_layers=4)
    assert [list(c.removed) for c in cfgs] == [best[1].removed, best[2].removed] and cfgs[0].source == "prune:last"
    assert len(configs_from_prune(tmp_path / "p", None, "last")) == 2
    with pytest.raises(DeclensError, match="has no state with 3 of 4 layers"):
        configs_from_prune(tmp_path / "p", [0.75], "last")
    with pytest.raises(DeclensError, match="no method 'ip'"):
        configs_from_prune(tmp_path / "p", None, "ip")
    with pytest.raises(DeclensError, match="4-layer model"):
        configs_from_prune(tmp_path / "p", None, "last", num_layers=6)
    cfg = RecoveryStudyConfig(ratios=[0.5], prune_method="last", train_samples=8, dense=False,
                              finetune=FinetuneConfig(**{**HP, "epochs": 1}, max_steps=1, max_length=MAXLEN))
    res = recover_study(lm, eval_rows, "arc_easy", None, cfg, prune=tmp_path / "p", progress=False)
    assert len(res.runs) == 1 and res.runs[0].removed == best[2].removed and res.runs[0].train["steps"] == 1
    assert res.runs[0].before["final_accuracy"] == pytest.approx(best[2].final_accuracy)  # same numbers as the prune run
    assert res.runs[0].layers_before["dm"] == pytest.approx(best[2].dm, abs=1e-5)
    assert res.dense is None and res.runs[0].source == "prune:last" and res.config["prune"]["method"] == "last"


def test_bad_input_is_refused(eval_rows, train_rows, tmp_path):
    lm = make_tiny("llama", layers=2)
    (tmp_path / "models" / "00_k1").mkdir(parents=True)
    (tmp_path / "models" / "00_k1" / "config.json").write_text("{}")
    with pytest.raises(DeclensError, match="not empty"):  # refused before any training
        recover_study(lm, eval_rows, train_rows, [[1]], export_dir=tmp_path / "models")
    with pytest.raises(DeclensError, match="unknown fine-tuning method 'adam'"):
        RecoveryStudyConfig(finetune=FinetuneConfig(method="adam"))
    with pytest.raises(DeclensError, match="unknown fine-tuning hyper-parameter"):
        FinetuneConfig.make(learning_rate=1e-3)
    with pytest.raises(DeclensError, match="lr="):
        FinetuneConfig(lr=-1.0)
    with pytest.raises(DeclensError, match="schedule"):
        FinetuneConfig(schedule="step")
    with pytest.raises(DeclensError, match="out of range"):
        recover_study(lm, eval_rows, train_rows, [[9]])
    with pytest.raises(DeclensError, match="more than once"):
        recover_study(lm, eval_rows, train_rows, [[1, 1]])
    with pytest.raises(DeclensError, match="all 2 layers"):
        recover_study(lm, eval_rows, train_rows, [[0, 1]])
    with pytest.raises(DeclensError, match="either"):
        recover_study(lm, eval_rows, train_rows)
    with pytest.raises(DeclensError, match="no training split"):
        recover_study(lm, eval_rows, "hellaswag", [[1]])
    with pytest.raises(DeclensError, match="also evaluation rows"):
        recover_study(lm, eval_rows, "arc_easy", [[1]], RecoveryStudyConfig(train_split="test"))
    with pytest.raises(DeclensError, match="unknown fine-tuning method"):
        finetune(pruned_copy(lm, [1]), training_sequences(lm, train_rows, "letter"), "qlora")


# --------------------------------------------------------------------------------------------
# end to end on a real model


@pytest.mark.slow
def test_recover_smollm2_end_to_end(smollm2, tmp_path):
    """Remove 3 layers of SmolLM2-135M, LoRA-tune 1 epoch on 16 ARC-Easy train rows, evaluate 16 test rows,
    export the merged model."""
    fp = smollm2.fingerprint()
    data = load_task("arc_easy", limit=16, seed=0)
    cfg = RecoveryStudyConfig(fmt="letter", finetune=FinetuneConfig(method="lora", epochs=1, batch_size=8, lr=5e-4),
                              train_samples=16, measure_train_loss=True, dense=False)
    res = recover_study(smollm2, data, "arc_easy", [[20, 21, 22]], cfg, progress=False, out_dir=tmp_path / "run",
                        export_dir=tmp_path / "models")
    r = res.runs[0]
    assert r.k == 3 and r.layers_before["layer_ids"] == [i for i in range(30) if i not in (20, 21, 22)]
    assert r.train["steps"] == 2 and r.train_loss_after < r.train_loss_before
    assert r.layers_after["dm"] != r.layers_before["dm"]
    assert r.export["max_abs_logit_diff"] < 1e-3 and r.export["num_layers"] == 27
    assert (tmp_path / "run" / "recover_dm.png").is_file() and (tmp_path / "models" / "00_k3" / "config.json").is_file()
    assert smollm2.num_layers == 30 and smollm2.fingerprint() == fp  # the shared fixture is untouched
