"""The lens and layer-wise scoring against plain forward passes, on tiny models of every architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from declens.analyses.decision import encoder_for, prepare
from declens.errors import TokenizationError
from declens.formats import build_letter
from declens.lens import Lens
from declens.metrics import margins
from declens.runner import Probe, collate, forward
from declens.scoring import score_cloze, score_letter
from declens.tasks import load_task


class Capture(Probe):
    """Keeps every layer's full output."""

    def start(self, batch):
        self.outs = []

    def layer(self, pos, layer_id, inputs, output):
        self.outs.append(output.detach().clone())


def test_lens_at_last_layer_equals_model_logits(tiny):
    """No double normalisation: lens(last layer output) == the model's own logits (soft-capping included)."""
    enc = encoder_for(tiny)
    seqs = [enc.prompt("Question: Which gas do plants take in?\nAnswer:"), enc.prompt("The sky is")]
    batch = collate(seqs, [0, 1], enc.pad_id, tiny.device)
    cap = Capture()
    forward(tiny.parts, batch, [cap])
    lens = Lens(tiny.parts)
    with torch.inference_mode():
        for b, s in enumerate(seqs):
            ref = tiny.model(torch.tensor([s])).logits[0].float()
            got = lens.logits(cap.outs[-1][b, : len(s)])
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert len(cap.outs) == tiny.num_layers


def test_letter_final_layer_matches_forward_scoring(tiny):
    data = load_task("arc_easy", limit=12, seed=1)
    req = prepare(tiny, data, "letter")
    scores = score_letter(tiny.parts, req, encoder_for(tiny).pad_id, progress=None, max_tokens=300)
    ref = []
    with torch.inference_mode():
        for p in req.prompts:
            ref.append(tiny.model(torch.tensor([p])).logits[0, -1, req.option_ids].float().numpy())
    ref = np.stack(ref)
    np.testing.assert_allclose(scores.final(), ref, rtol=1e-4, atol=1e-4)
    assert (scores.final().argmax(-1) == ref.argmax(-1)).all()
    assert scores.scores.shape == (tiny.num_layers, 12, 4)


@pytest.mark.parametrize("task", ["arc_easy", "winogrande"])
def test_cloze_final_layer_matches_forward_scoring(tiny, task):
    """Packed (shared-context) and unpacked lens scores at the last layer equal a plain per-option forward pass."""
    data = load_task(task, limit=6, seed=2)
    req = prepare(tiny, data, "cloze")
    pad = encoder_for(tiny).pad_id
    packed = score_cloze(tiny.parts, req, pad, progress=None, pack=True)
    single = score_cloze(tiny.parts, req, pad, progress=None, pack=False, max_tokens=200)
    ref = np.full(packed.final().shape, np.nan)
    with torch.inference_mode():
        for i, (ctxs, conts) in enumerate(zip(req.contexts, req.continuations)):
            for k, (ctx, cont) in enumerate(zip(ctxs, conts)):
                logp = torch.log_softmax(tiny.model(torch.tensor([ctx + cont])).logits[0].float(), -1)
                ref[i, k] = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
    np.testing.assert_allclose(packed.final(), ref, rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(single.scores, packed.scores, rtol=1e-4, atol=2e-3)
    assert (np.nanargmax(packed.final(), -1) == np.nanargmax(ref, -1)).all()


def test_acc_norm_divides_by_the_option_text_length():
    """acc_norm is log-likelihood per character of the option text (lm-eval's ``len(choice)``), so
    the joining space does not count, and it is the argmax of those per-character scores."""
    from conftest import make_tiny

    lm = make_tiny("llama")
    data = load_task("arc_easy", limit=5, seed=1)
    req = prepare(lm, data, "cloze")
    for it, row in zip(data.items, req.cont_chars):
        assert list(row[: len(it.choices)]) == [len(c) for c in it.choices]
    pad = encoder_for(lm).pad_id
    sc = score_cloze(lm.parts, req, pad, progress=None)
    per_char = sc.final() / np.where(req.cont_chars > 0, req.cont_chars, np.nan)
    np.testing.assert_allclose(sc.norm_scores[-1], per_char, rtol=1e-6)


def test_dm_from_option_logits_equals_full_vocabulary(tiny):
    data = load_task("piqa", limit=8, seed=3)
    req = prepare(tiny, data, "letter")
    enc = encoder_for(tiny)
    scores = score_letter(tiny.parts, req, enc.pad_id, progress=None)
    lens = Lens(tiny.parts)
    full = np.zeros_like(scores.scores)
    for n, p in enumerate(req.prompts):
        cap = Capture()
        forward(tiny.parts, collate([p], [0], enc.pad_id, tiny.device), [cap])
        for layer, out in enumerate(cap.outs):
            with torch.inference_mode():
                z = lens.logits(out[0, -1])  # [V], the whole vocabulary
            full[layer, n] = z[req.option_ids].numpy()
    np.testing.assert_allclose(margins(scores.scores, req.gold), margins(full, req.gold), rtol=1e-4, atol=1e-4)


def test_letter_labels_must_be_single_tokens(tiny):
    data = load_task("arc_easy", limit=3)
    with pytest.raises(TokenizationError, match="not one"):
        build_letter(data, encoder_for(tiny), labels=["Qzx", "Wvj", "Kpf", "Yqu", "Jzz"])


def test_bos_prefix_detected_not_assumed():
    from conftest import make_tiny

    gemma = make_tiny("gemma3")
    qwen = make_tiny("qwen2")
    assert encoder_for(gemma).prefix == [gemma.tokenizer.bos_token_id]
    assert encoder_for(qwen).prefix == []
    data = load_task("arc_easy", limit=2)
    assert prepare(gemma, data, "letter").prompts[0][0] == gemma.tokenizer.bos_token_id
    assert prepare(qwen, data, "letter").prompts[0][0] != qwen.tokenizer.bos_token_id


def test_batching_does_not_change_scores(tiny):
    """Right padding: a row scores the same alone and in a padded batch."""
    data = load_task("arc_challenge", limit=10, seed=4)
    req = prepare(tiny, data, "letter")
    pad = encoder_for(tiny).pad_id
    big = score_letter(tiny.parts, req, pad, progress=None, max_tokens=100000)
    small = score_letter(tiny.parts, req, pad, progress=None, max_tokens=1)  # one row per batch
    np.testing.assert_allclose(big.scores, small.scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_fast_path_equals_the_models_own_forward(arch, fmt):
    """The lean decoder loop computes what the model's own forward (through hooks) computes."""
    from conftest import make_tiny

    from declens import fastpath
    from declens.execution import ExecutionOptions

    lm = make_tiny(arch, layers=3)
    data = load_task("arc_easy", limit=6, seed=5)
    req = prepare(lm, data, fmt)
    pad = encoder_for(lm).pad_id
    assert fastpath.supported(lm.parts, 64)  # the default options: auto
    fast = (score_letter if fmt == "letter" else score_cloze)(lm.parts, req, pad, progress=None)
    lm.options = ExecutionOptions(fastpath="off")
    assert not fastpath.supported(lm.parts, 64)
    slow = (score_letter if fmt == "letter" else score_cloze)(lm.parts, req, pad, progress=None)
    np.testing.assert_allclose(fast.scores, slow.scores, rtol=1e-4, atol=1e-4)


def test_fast_path_declines_other_architectures():
    from conftest import make_tiny

    from declens import fastpath

    for arch in ("gemma2", "gemma3", "phi3"):
        assert not fastpath.supported(make_tiny(arch).parts, 16)


def test_letter_option_rows_are_read_in_float32_on_a_bf16_model():
    """A bf16 model whose two option logits differ by less than bf16's step: the bf16 product ties
    them (argmax would pick the first option), the lens' float32 option rows keep them apart, equal to
    a float64 reference on the same normed bf16 state, through the whole letter scoring."""
    import torch.nn.functional as F
    from conftest import make_tiny

    lm = make_tiny("llama", dtype=torch.bfloat16)
    data = load_task("arc_easy", limit=3, seed=1)
    req = prepare(lm, data, "letter")
    enc = encoder_for(lm)
    cap = Capture()
    forward(lm.parts, collate(req.prompts, [0], enc.pad_id, lm.device), [cap])
    h = cap.outs[-1][0, len(req.prompts[0]) - 1]  # [d] bf16, the decision token of item 0
    lens = Lens(lm.parts)
    with torch.inference_mode():
        x = lens.norm(h)  # [d] bf16, as the model normalises
        a, b = req.option_ids[0], req.option_ids[1]
        W = lm.parts.head.weight
        c = torch.tensor(64.0 / float(x.float().abs().sum()), dtype=torch.bfloat16)
        base = (torch.sign(x.float()) * c.float()).to(torch.bfloat16)  # logit of option A ~ +64
        tied = False
        for j in torch.argsort(x.float().abs(), descending=True).tolist()[:16]:
            bumped = base.clone()
            bumped.view(torch.int16)[j] += 1  # the next bf16 value away from 0: |x_j w_j| grows
            W[a], W[b] = base, bumped  # option B's row: one unit larger in one coordinate
            z16 = F.linear(x, W[[a, b]])  # the product in bf16
            if z16[0] == z16[1]:
                tied = True
                break
        assert tied, "precondition: the two option logits must tie in bf16"
        ref = (x.double() @ W[[a, b]].double().T)  # float64 reference on the same normed state
        assert ref[1] > ref[0]
        z = Lens(lm.parts).logits(h, torch.tensor([a, b]))
    assert z.dtype == torch.float32
    assert z[1] > z[0]
    np.testing.assert_allclose(z.double().numpy(), ref.numpy(), rtol=1e-6)
    scores = score_letter(lm.parts, req, enc.pad_id, progress=None)
    assert scores.final()[0, 1] > scores.final()[0, 0]
