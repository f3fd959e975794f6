"""Layer views and permanent removal keep the model consistent, on every architecture."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from declens.errors import LayerSpecError
from declens.models import decoder_parts
from declens.surgery import kept_layers, layer_view, parse_layer_ids, remove_layers, validate_removal

IDS = torch.tensor([[5, 17, 33, 101, 7, 250, 64, 12, 9, 300, 41, 2]])


def rebuilt(lm, keep):
    """A fresh model built with only the kept layers (config edited, weights copied)."""
    cfg = copy.deepcopy(lm.model.config)
    n = cfg.num_hidden_layers
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[k] for k in keep]
    new = AutoModelForCausalLM.from_config(cfg, attn_implementation=lm.model.config._attn_implementation).eval()
    src = lm.model.state_dict()
    dst = {}
    for key in new.state_dict():
        if ".layers." in key:
            pre, rest = key.split(".layers.", 1)
            i, tail = rest.split(".", 1)
            dst[key] = src[f"{pre}.layers.{keep[int(i)]}.{tail}"]
        else:
            dst[key] = src[key]
    new.load_state_dict(dst)
    assert len(keep) < n
    return new


def test_view_equals_model_rebuilt_with_kept_layers(tiny):
    keep = kept_layers(tiny.num_layers, [2, 0])
    with torch.inference_mode():
        ref = rebuilt(tiny, keep)(IDS).logits
        with layer_view(tiny.parts, keep):
            got = tiny.model(IDS).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_view_restores_everything(tiny):
    cfg = tiny.model.config
    before = (cfg.num_hidden_layers, list(getattr(cfg, "layer_types", []) or []), list(tiny.parts.layers))
    idx_before = [m.layer_idx for m in tiny.model.modules() if hasattr(m, "layer_idx")]
    with torch.inference_mode():
        dense = tiny.model(IDS).logits
    with layer_view(tiny.parts, [0, 3]):
        assert cfg.num_hidden_layers == 2 and len(tiny.parts.layers) == 2
        if before[1]:
            assert cfg.layer_types == [before[1][0], before[1][3]]
        assert [m.layer_idx for m in tiny.parts.layers[1].modules() if hasattr(m, "layer_idx")][0] == 1
    with pytest.raises(RuntimeError):
        with layer_view(tiny.parts, [1]):
            raise RuntimeError("body fails")
    after = (cfg.num_hidden_layers, list(getattr(cfg, "layer_types", []) or []), list(tiny.parts.layers))
    assert after == before
    assert [m.layer_idx for m in tiny.model.modules() if hasattr(m, "layer_idx")] == idx_before
    with torch.inference_mode():
        torch.testing.assert_close(tiny.model(IDS).logits, dense)


def test_view_generation_with_kv_cache(tiny):
    """layer_idx renumbering keeps the KV cache consistent: cached generation == full recompute."""
    keep = [0, 2, 3]
    small = rebuilt(tiny, keep)
    with layer_view(tiny.parts, keep), torch.inference_mode():
        out = tiny.model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
        ref = small.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_remove_layers_permanently(tiny):
    keep = kept_layers(tiny.num_layers, [1])
    with torch.inference_mode():
        ref = rebuilt(tiny, keep)(IDS).logits
    parts = decoder_parts(tiny.model)
    remove_layers(parts, [1])
    assert tiny.model.config.num_hidden_layers == 3
    assert tiny.model.config.declens_removed_layers == [1]
    # a second removal is recorded in the dense numbering: position 1 now holds dense layer 2
    with torch.inference_mode():
        torch.testing.assert_close(tiny.model(IDS).logits, ref, rtol=1e-5, atol=1e-5)
    remove_layers(parts, [1])
    assert tiny.model.config.declens_removed_layers == [1, 2]


@pytest.mark.parametrize(
    "remove, match",
    [([0, 1, 2, 3], "removing all 4 layers"), ([4], r"out of range"), ([-1], "out of range"), ([1, 1], "more than once")],
)
def test_invalid_removals(remove, match):
    with pytest.raises(LayerSpecError, match=match):
        validate_removal(remove, 4)


def test_parse_layer_ids():
    assert parse_layer_ids("24,23,22") == [24, 23, 22]
    assert parse_layer_ids("3-5,1") == [3, 4, 5, 1]
    assert parse_layer_ids("") == []
    with pytest.raises(LayerSpecError, match="bad layer id"):
        parse_layer_ids("3,x")
