"""The model builder of ``benchmarks/gpu_shard70b.py`` (issue 12, target 4) on a tiny shape, on the CPU.

The benchmark builds its 70B-shaped model on the meta device, places it with transformers' own
``device_map`` policy, draws every parameter where it is placed and attaches accelerate's hooks as
``from_pretrained(device_map=...)`` does. Here: the same seed gives the same weights, nothing stays
on the meta device, and the hooked model (declens' generic path) gives the analysis that the same
weights give without hooks (declens' fast path).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import make_tokenizer

from declens import fastpath
from declens.analyses.decision import analyze
from declens.models import LoadedModel
from declens.tasks import load_task

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_shard70b.py"
_spec = importlib.util.spec_from_file_location("gpu_shard70b", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["gpu_shard70b"] = bench
_spec.loader.exec_module(bench)

SHAPE = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=500000.0,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _build(seed: int = 0, std: float = 0.2):
    rec: dict = {}
    cfg = bench.BuildConfig(shape=SHAPE, seed=seed, std=std, dtype=torch.float32)
    return bench.build_sharded(cfg, rec), rec


def test_sharded_build_is_seeded_real_and_hooked():
    a, rec = _build(seed=0)
    b, _ = _build(seed=0)
    c, _ = _build(seed=1)
    assert all(p.device.type == "cpu" for p in a.parameters())
    assert getattr(a, "hf_device_map", None), "accelerate's hooks are attached (the sharded path)"
    assert rec["parameters"] == sum(p.numel() for p in a.parameters())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"], sc["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(sa["model.norm.weight"], torch.ones(64))
    w = sa["model.layers.1.self_attn.q_proj.weight"]
    assert abs(float(w.std()) - 0.2) < 0.02 and abs(float(w.mean())) < 0.02


def test_hooked_model_gives_the_unhooked_analysis():
    from accelerate.hooks import remove_hook_from_module

    tok = make_tokenizer()
    data = load_task("arc_challenge", limit=24, seed=0)
    model, _ = _build(seed=3)
    lm = LoadedModel(model=model, tokenizer=tok, spec="hooked")
    assert not fastpath.supported(lm.parts, 64), "a dispatched model runs declens' generic (hooked) path"
    hooked = analyze(lm, data, "letter", progress=False, plots=False)
    remove_hook_from_module(model, recurse=True)
    del model.hf_device_map
    lm = LoadedModel(model=model, tokenizer=tok, spec="plain")
    assert fastpath.supported(lm.parts, 64)
    plain = analyze(lm, data, "letter", progress=False, plots=False)
    assert hooked.scores.scores.shape[:2] == (4, 24)
    np.testing.assert_allclose(hooked.scores.scores, plain.scores.scores, atol=1e-4, equal_nan=True)
    assert hooked.metrics.final_acc == plain.metrics.final_acc
