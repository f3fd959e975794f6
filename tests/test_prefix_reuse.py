"""Prefix reuse (runner.LayerStates + run_from): running the layers after ``m`` from the kept input of layer
``m`` gives the full pass's result, on the lean fast path (llama) and through transformers' own layers (gemma2)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from declens.analyses.decision import encoder_for, prepare
from declens.runner import LayerStates, collate, forward, run_from
from declens.tasks import load_task


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("where", ["device", "cpu"])
def test_running_from_a_kept_state_equals_the_full_pass(arch, where):
    lm = make_tiny(arch, layers=5)
    req = prepare(lm, load_task("arc_easy", limit=6, seed=2), "letter")
    batch = collate(req.prompts, list(range(6)), encoder_for(lm).pad_id, lm.device)
    kept_in, kept_out = LayerStates("input", where=where), LayerStates("output", positions=[1], where=where)
    full = forward(lm.parts, batch, [kept_in, kept_out], trim_final=False)
    assert sorted(kept_in.states) == [0, 1, 2, 3, 4] and sorted(kept_out.states) == [1]
    assert all(s.device.type == "cpu" for s in kept_in.states.values())  # the CPU is the device here too
    # the input of layer m+1 is the output of layer m
    assert torch.equal(kept_in.states[2], kept_out.states[1])
    for m in (1, 3, 4):
        again = run_from(lm.parts, batch, [], kept_in.states[m], list(range(m, 5)), trim_final=False)
        torch.testing.assert_close(again, full, rtol=0, atol=1e-6)
    # a wrong start is visible: running from layer 3 with layer 1's input does not reproduce the pass
    wrong = run_from(lm.parts, batch, [], kept_in.states[1], [3, 4], trim_final=False)
    assert (wrong - full).abs().max() > 1e-3


def test_layer_states_refuse_unknown_sides_and_places():
    with pytest.raises(ValueError, match="side"):
        LayerStates("middle")
    with pytest.raises(ValueError, match="where"):
        LayerStates("input", where="disk")


@pytest.mark.parametrize("pruned_first", [False, True])
def test_the_suffix_to_run_reproduces_the_pruned_model(pruned_first):
    """suffix_to_run: running its positions from the dense input at its start equals a full pass of the
    kept layers, for several removals (and changed layers), on a dense model and on one already pruned
    (where dense ids and positions differ)."""
    from declens.surgery import dense_layer_ids, keep_positions, layer_view, remove_layers, suffix_to_run

    lm = make_tiny("llama", layers=6)
    if pruned_first:
        remove_layers(lm.parts, [1])  # dense ids 0, 2, 3, 4, 5 at positions 0..4
    dense = dense_layer_ids(lm.parts)
    req = prepare(lm, load_task("arc_easy", limit=4, seed=3), "letter")
    batch = collate(req.prompts, list(range(4)), encoder_for(lm).pad_id, lm.device)
    kept_in = LayerStates("input")
    forward(lm.parts, batch, [kept_in], trim_final=False)
    for remove in ([dense[2]], [dense[4], dense[2]], [dense[-1]], [dense[0], dense[3]]):
        s = suffix_to_run(lm.parts, remove)
        assert s.start == min(dense.index(i) for i in remove)
        assert list(s.keep) == list(keep_positions(lm.parts, remove))
        assert list(s.skipped) + list(s.run) == list(s.keep)
        with layer_view(lm.parts, s.keep):
            full = forward(lm.parts, batch, [], trim_final=False)
        if not s.run:  # only the last layer removed: the dense input of it is the pruned model's last state
            continue
        again = run_from(lm.parts, batch, [], kept_in.states[s.start], list(s.run), trim_final=False)
        torch.testing.assert_close(again, full, rtol=0, atol=1e-6)
    # a changed (merged) layer also ends the reusable prefix; reuse=False runs everything from the embeddings
    assert suffix_to_run(lm.parts, [dense[4]], changed=[dense[1]]).start == 1
    s = suffix_to_run(lm.parts, [dense[4]], reuse=False)
    assert s.start is None and s.run == s.keep and not s.skipped
    assert suffix_to_run(lm.parts, []).start is None
