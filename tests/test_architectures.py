"""Architectures declared explicitly (issue 9): one adapter per family, and a load-time check that the
lens at the last layer reproduces the model's own logits, on tiny random models of every family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ADAPTER_ARCHS, ARCHS, make_tiny, make_tokenizer, save_tiny, tiny_config
from declens.analyses.decision import analyze
from declens.architectures import ARCHITECTURES, ArchitectureAdapter, adapter_for, register_architecture
from declens.errors import ModelError
from declens.formats import encoder_for, prepare
from declens.kernels import LogitTransform
from declens.lens import Lens
from declens.models import check_lens, decoder_parts, load_model
from declens.pruning.influence import next_token_nll
from declens.runner import Probe, collate, forward
from declens.tasks import load_task

ALL_ARCHS = ARCHS + ADAPTER_ARCHS


class LastLayer(Probe):
    """Keeps the raw output of the last layer run."""

    def start(self, batch):
        self.out = None

    def layer(self, pos, layer_id, inputs, output):
        self.out = output.detach().clone()


@pytest.fixture
def registry(monkeypatch):
    """The adapter registry, restored after the test."""
    monkeypatch.setattr("declens.architectures.ARCHITECTURES", dict(ARCHITECTURES))
    from declens import architectures

    return architectures.ARCHITECTURES


def test_every_registered_family_is_a_tiny_test_architecture():
    tok = make_tokenizer()
    tested = {tiny_config(a, len(tok)).model_type for a in ALL_ARCHS}
    assert tested == set(ARCHITECTURES)


def test_output_transforms_of_the_families():
    tok = make_tokenizer()
    got = {a: decoder_parts(AutoModelForCausalLM.from_config(tiny_config(a, len(tok), layers=1))).logit_transform
           for a in ("llama", "gemma", "gemma2", "cohere", "granite")}
    assert got == {"llama": LogitTransform(), "gemma": LogitTransform(), "gemma2": LogitTransform(cap=30.0),
                   "cohere": LogitTransform(scale=0.25), "granite": LogitTransform(scale=0.25)}


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_lens_at_last_layer_equals_model_logits(arch):
    """The Lens on the runner's last-layer output equals the model's logits, and the load-time check passes."""
    lm = make_tiny(arch)
    enc = encoder_for(lm)
    seqs = [enc.prompt("Question: Which gas do plants take in?\nAnswer:"), enc.prompt("The sky is")]
    cap = LastLayer()
    forward(lm.parts, collate(seqs, [0, 1], enc.pad_id, lm.device), [cap])
    lens = Lens(lm.parts)
    with torch.inference_mode():
        for b, s in enumerate(seqs):
            ref = lm.model(torch.tensor([s])).logits[0].float()
            torch.testing.assert_close(lens.logits(cap.out[b, : len(s)]), ref, rtol=1e-4, atol=1e-4)
            rows = torch.tensor([5, 17, 300])
            torch.testing.assert_close(lens.logits(cap.out[b, : len(s)], rows), ref[:, rows], rtol=1e-4, atol=1e-4)
    checks = check_lens(lm)
    assert set(checks) == {"logits", "option-row logits", "log-probabilities"}
    assert all(c.ok and c.rel_logit_diff <= 1e-5 for c in checks.values())


@pytest.mark.parametrize("arch", ["cohere", "granite", "gemma2"])
def test_lens_without_the_output_transform_is_refused(arch, registry, tmp_path):
    """What guessing attribute names did (no logit scale for Cohere / Granite; a Gemma-2 whose soft-capping
    is not declared): load_model refuses the model with one line instead of giving wrong lens scores."""
    folder = save_tiny(tmp_path / arch, arch)
    assert load_model(str(folder), dtype="float32", device="cpu").parts.logit_transform != LogitTransform()
    model_type = tiny_config(arch, 8).model_type
    registry[model_type] = ArchitectureAdapter(model_type)  # Llama layout, plain logits
    with pytest.raises(ModelError, match="does not reproduce the .* model's own logits") as e:
        load_model(str(folder), dtype="float32", device="cpu")
    assert "\n" not in str(e.value) and "register_architecture" in str(e.value)


def test_unknown_model_type_is_refused_with_the_supported_ones(tmp_path):
    """GraniteMoE also divides its logits by ``logits_scaling``; it has no adapter, so it is refused: by
    decoder_parts, and by the command line with one line and exit status 2 before any work."""
    from transformers import GraniteMoeConfig
    from typer.testing import CliRunner

    from declens.cli import app

    tok = make_tokenizer()
    cfg = GraniteMoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
                           logits_scaling=4.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ModelError, match="'granitemoe' has no declens architecture adapter") as e:
        decoder_parts(model)
    msg = str(e.value)
    assert "\n" not in msg and "cohere, gemma, gemma2" in msg and "register_architecture" in msg
    model.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    r = CliRunner().invoke(app, ["analyze", "--model", str(tmp_path / "moe"), "--task", "arc_easy", "--limit", "2",
                                 "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "'granitemoe' has no declens architecture adapter" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_adapter_ignores_config_attributes_its_family_does_not_use():
    """A Gemma (1) config carrying ``final_logit_softcapping`` (Gemma 1 ignores it): guessing by attribute
    name would soft-cap the lens; the Gemma adapter does not, and the lens matches the model."""
    lm = make_tiny("gemma")
    lm.model.config.final_logit_softcapping = 2.0
    lm.__dict__.pop("parts", None)
    assert lm.parts.softcap is None
    assert all(c.ok for c in check_lens(lm).values())


def test_register_architecture_and_bad_config_numbers(registry):
    with pytest.raises(ModelError, match="already registered"):
        register_architecture(ArchitectureAdapter("llama"))
    mine = register_architecture(ArchitectureAdapter("granite", logit_divisor_attr="logits_scaling"), replace=True)
    assert adapter_for("granite") is mine
    lm = make_tiny("granite", layers=1)
    lm.model.config.logits_scaling = 0.0
    with pytest.raises(ModelError, match="logits_scaling=0.0"):
        lm.parts
    with pytest.raises(ModelError, match="supported: .*granite"):
        adapter_for(None)


def test_missing_part_named_by_the_adapter_is_refused(registry):
    registry["llama"] = ArchitectureAdapter("llama", norm="final_layernorm")
    with pytest.raises(ModelError, match=r"final norm \(model.final_layernorm\)"):
        decoder_parts(make_tiny("llama", layers=1).model)


@pytest.mark.parametrize("arch", ADAPTER_ARCHS)
@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_letter_and_cloze_analyses_on_adapter_families(arch, fmt):
    """analyze runs on Gemma / Cohere / Granite, and its last-layer scores are the model's own."""
    lm = make_tiny(arch)
    data = load_task("arc_easy", limit=5, seed=1)
    res = analyze(lm, data, fmt, progress=False, plots=False)
    req = prepare(lm, data, fmt)
    ref = np.full(res.scores.final().shape, np.nan)
    with torch.inference_mode():
        if fmt == "letter":
            for n, (p, k) in enumerate(zip(req.prompts, res.scores.n_options)):
                ref[n, :k] = lm.model(torch.tensor([p])).logits[0, -1, req.option_ids[:k]].float().numpy()
        else:
            for n, (ctxs, conts) in enumerate(zip(req.contexts, req.continuations)):
                for k, (ctx, cont) in enumerate(zip(ctxs, conts)):
                    logp = torch.log_softmax(lm.model(torch.tensor([ctx + cont])).logits[0].float(), -1)
                    ref[n, k] = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
    np.testing.assert_allclose(res.scores.final(), ref, rtol=1e-4, atol=1e-3)
    assert res.scores.scores.shape[0] == lm.num_layers and np.isfinite(res.metrics.dm).all()


@pytest.mark.parametrize("arch", ["cohere", "granite"])
def test_pruning_nll_uses_the_output_transform(arch):
    """The calibration NLL of pruning equals the model's own language-modelling loss."""
    lm = make_tiny(arch)
    enc = encoder_for(lm)
    ids = enc.prompt("Question: Which gas do plants take in?\nAnswer: carbon dioxide")
    batch = collate([ids], [0], enc.pad_id, lm.device)
    cap = LastLayer()
    forward(lm.parts, batch, [cap])
    with torch.inference_mode():
        total, count = next_token_nll(lm.parts.norm(cap.out), batch, lm.parts.head, lm.parts.logit_transform)
        loss = lm.model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert count == len(ids) - 1
    assert total / count == pytest.approx(float(loss), rel=1e-5)



@pytest.mark.parametrize("arch", ["cohere", "granite"])
def test_finetune_answer_loss_uses_the_output_transform(arch):
    """The fine-tuning answer loss equals transformers' own masked causal-LM loss (logit scale included)."""
    from declens.finetune import answer_loss, load_training_data, training_sequences

    lm = make_tiny(arch)
    for s in training_sequences(lm, load_training_data("arc_easy", limit=4, seed=0), "cloze")[:2]:
        with torch.no_grad():
            ref = lm.model(torch.tensor([s.input_ids]), labels=torch.tensor([s.labels])).loss
        assert answer_loss(lm, [s]) == pytest.approx(float(ref), rel=1e-4)
