"""Layer views and permanent removal keep the model consistent, on every architecture."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from declens.errors import LayerSpecError
from declens.models import decoder_parts
from declens.surgery import (DenseIds, Positions, check_removal, dense_ids_of, dense_layer_ids, ids_text, keep_positions,
                             layer_view, parse_layer_ids, positions_of, remove_layers, validate_removal)

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
    keep = keep_positions(tiny.parts, [2, 0])
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
    with layer_view(tiny.parts, Positions([0, 3])):
        assert cfg.num_hidden_layers == 2 and len(tiny.parts.layers) == 2
        assert dense_layer_ids(tiny.parts) == [0, 3]  # the view records its removal in dense ids
        if before[1]:
            assert cfg.layer_types == [before[1][0], before[1][3]]
        assert [m.layer_idx for m in tiny.parts.layers[1].modules() if hasattr(m, "layer_idx")][0] == 1
    with pytest.raises(RuntimeError):
        with layer_view(tiny.parts, Positions([1])):
            raise RuntimeError("body fails")
    after = (cfg.num_hidden_layers, list(getattr(cfg, "layer_types", []) or []), list(tiny.parts.layers))
    assert after == before
    assert [m.layer_idx for m in tiny.model.modules() if hasattr(m, "layer_idx")] == idx_before
    assert not hasattr(cfg, "declens_removed_layers") and dense_layer_ids(tiny.parts) == [0, 1, 2, 3]
    with torch.inference_mode():
        torch.testing.assert_close(tiny.model(IDS).logits, dense)


def test_view_generation_with_kv_cache(tiny):
    """layer_idx renumbering keeps the KV cache consistent: cached generation == full recompute."""
    keep = Positions([0, 2, 3])
    small = rebuilt(tiny, keep)
    with layer_view(tiny.parts, keep), torch.inference_mode():
        out = tiny.model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
        ref = small.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_remove_layers_permanently(tiny):
    with torch.inference_mode():
        ref = rebuilt(tiny, [0, 2, 3])(IDS).logits
        ref2 = rebuilt(tiny, [0, 3])(IDS).logits
    parts = decoder_parts(tiny.model)
    assert remove_layers(parts, [1]) == [0, 2, 3]
    assert tiny.model.config.num_hidden_layers == 3
    assert tiny.model.config.declens_removed_layers == [1]
    with torch.inference_mode():
        torch.testing.assert_close(tiny.model(IDS).logits, ref, rtol=1e-5, atol=1e-5)
    # ids stay dense ids on the pruned model: 2 is dense layer 2 (now at position 1), not position 2
    assert remove_layers(parts, [2]) == [0, 3]
    assert tiny.model.config.declens_removed_layers == [1, 2]
    assert [m.layer_idx for m in parts.layers[1].modules() if hasattr(m, "layer_idx")][0] == 1
    with torch.inference_mode():
        torch.testing.assert_close(tiny.model(IDS).logits, ref2, rtol=1e-5, atol=1e-5)
    with pytest.raises(LayerSpecError, match=r"\[1\] are already removed .*lacks dense layers \[1, 2\]"):
        remove_layers(parts, [1])
    with pytest.raises(LayerSpecError, match="out of range: the dense model has 4 layers"):
        remove_layers(parts, [4])
    with pytest.raises(LayerSpecError, match="all 2 remaining layers"):
        remove_layers(parts, [0, 3])


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
    assert ids_text([8, 0, 1, 2, 3, 5, 7]) == "0-3, 5, 7-8" and ids_text([]) == ""


def test_dense_ids_and_positions_cannot_be_mixed():
    from conftest import make_tiny

    lm = make_tiny("llama", layers=6)
    parts = lm.parts
    remove_layers(parts, [1, 3])  # dense ids 0, 2, 4, 5 remain at positions 0..3
    assert dense_layer_ids(parts) == [0, 2, 4, 5] and isinstance(dense_layer_ids(parts), DenseIds)
    assert positions_of(parts, [4, 0]) == [2, 0] and isinstance(positions_of(parts, [4]), Positions)
    assert dense_ids_of(parts, [2, 0]) == [4, 0]
    assert keep_positions(parts, [4]) == [0, 1, 3]
    assert check_removal(parts, [5, 2]) == [5, 2]
    dense = dense_layer_ids(parts)
    with pytest.raises(TypeError, match="layer_view takes Positions"):
        with layer_view(parts, [0, 1]):
            pass
    with pytest.raises(TypeError, match="DenseIds are not Positions"):
        layer_view(parts, Positions(dense)).__enter__()
    with pytest.raises(TypeError, match="Positions are not DenseIds"):
        remove_layers(parts, positions_of(parts, [4]))
    with pytest.raises(TypeError, match="comparing DenseIds with Positions"):
        _ = dense == Positions([0, 2, 4, 5])
    with pytest.raises(LayerSpecError, match="already removed"):
        positions_of(parts, [3])
    with pytest.raises(LayerSpecError, match="position"):
        dense_ids_of(parts, [4])
    assert dense_layer_ids(parts) == [0, 2, 4, 5]  # nothing changed


def test_a_view_of_a_pruned_model_reports_dense_ids():
    from conftest import make_tiny

    lm = make_tiny("gemma2", layers=6)  # alternating sliding / full attention layers
    cfg = lm.model.config
    dense_types = list(cfg.layer_types)
    assert len(set(dense_types)) == 2
    remove_layers(lm.parts, [2])
    assert cfg.layer_types == [dense_types[i] for i in (0, 1, 3, 4, 5)]
    with layer_view(lm.parts, keep_positions(lm.parts, [4, 0])):
        assert dense_layer_ids(lm.parts) == [1, 3, 5]
        assert cfg.declens_removed_layers == [2, 0, 4]
        assert cfg.layer_types == [dense_types[i] for i in (1, 3, 5)]
    assert cfg.declens_removed_layers == [2] and dense_layer_ids(lm.parts) == [0, 1, 3, 4, 5]
