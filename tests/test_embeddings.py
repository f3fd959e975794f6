"""The optional embedding read-out (``--include-embeddings``): through the lens and in CKA, outside the
Transition Point and the phases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from declens.analyses.decision import AnalyzeConfig, analyze, encoder_for, prepare
from declens.lens import EMBEDDING_ID, Lens
from declens.metrics import margins
from declens.runner import Probe, collate, forward
from declens.tasks import load_task


class FirstInput(Probe):
    """Keeps the input of the first layer (the embedding output)."""

    def layer(self, pos, layer_id, inputs, output):
        if pos == 0:
            self.h = inputs.detach().clone()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # the fast path and the hooked forward (scaled embeddings)
def test_embedding_readout_is_the_lens_on_the_first_layer_input(arch):
    from conftest import make_tiny

    lm = make_tiny(arch)
    data = load_task("arc_easy", limit=6, seed=1)
    req = prepare(lm, data, "letter")
    with_emb = analyze(lm, data, "letter", AnalyzeConfig(include_embeddings=True), progress=False, requests=req)
    plain = analyze(lm, data, "letter", progress=False, requests=req)
    e = with_emb.extra["embedding"]
    assert e["layer"] == EMBEDDING_ID and with_emb.config["include_embeddings"] is True
    # the layer metrics (and so the Transition Point and phases) are untouched
    np.testing.assert_array_equal(with_emb.scores.scores, plain.scores.scores)
    assert with_emb.metrics.layer_ids == plain.metrics.layer_ids and EMBEDDING_ID not in with_emb.metrics.layer_ids
    assert with_emb.metrics.transition_layer == plain.metrics.transition_layer
    lens = Lens(lm.parts)
    pad = encoder_for(lm).pad_id
    ref = np.zeros((len(req.prompts), len(req.option_ids)), dtype=np.float32)
    for n, p in enumerate(req.prompts):
        cap = FirstInput()
        forward(lm.parts, collate([p], [0], pad, lm.device), [cap])
        with torch.inference_mode():
            ref[n] = lens.logits(cap.h[0, len(p) - 1], torch.tensor(req.option_ids)).numpy()
    ref[~(np.arange(ref.shape[1])[None] < req.n_options[:, None])] = np.nan
    np.testing.assert_allclose(with_emb.scores.embedding.scores[0], ref, rtol=1e-4, atol=1e-4)
    assert e["dm"] == pytest.approx(float(margins(ref[None], req.gold).mean()), abs=1e-4)
    assert sum(e["option_frequency"]) == pytest.approx(1.0)


def test_embedding_readout_cloze_and_saved(tmp_path):
    import json

    from conftest import make_tiny

    from declens.plots import plot_dm, plt

    lm = make_tiny("qwen2")
    data = load_task("piqa", limit=4, seed=0)
    res = analyze(lm, data, "cloze", AnalyzeConfig(include_embeddings=True), progress=False, out_dir=tmp_path)
    e = res.extra["embedding"]
    assert "accuracy_norm" in e and np.isfinite(e["dm"])
    d = json.loads((tmp_path / "result.json").read_text())
    assert d["embedding"]["layer"] == -1 and all(r["layer"] != -1 for r in d["layers"])
    fig, ax = plt.subplots()
    plot_dm(ax, res.metrics, emb=e)
    assert "emb" in [t.get_text() for t in ax.get_xticklabels()]
    assert any(l.get_label().startswith("embedding output") for l in ax.get_lines())
    plt.close(fig)


def test_cka_with_embeddings():
    from conftest import make_tiny

    from declens.analyses.cka import CKAConfig, cka_study

    lm = make_tiny("llama")
    data = load_task("arc_easy", limit=8, seed=0)
    a = cka_study(lm, data, [1, 2], config=CKAConfig(n_samples=None, include_embeddings=True), progress=False)
    b = cka_study(lm, data, [1, 2], config=CKAConfig(n_samples=None), progress=False)
    assert a.pruned_ids == [EMBEDDING_ID, 0, 3] and a.dense_ids == [EMBEDDING_ID, 0, 1, 2, 3]
    assert a.config["num_layers"] == 4 and a.config["include_embeddings"] is True
    assert a.hidden[0, 0] == pytest.approx(1.0)  # the same embedding output in both models
    # every letter prompt ends with the same token, whose embedding is one constant row: no structure (0)
    assert (a.decision[0] == 0).all() and (a.decision[:, 0] == 0).all()
    for m_a, m_b in ((a.hidden, b.hidden), (a.decision, b.decision)):
        np.testing.assert_allclose(m_a[1:, 1:], m_b, atol=1e-12)
    assert a.best_hidden[0] == EMBEDDING_ID
    sa, sb = a.summary(), b.summary()
    assert sa["num_pruned_layers"] == 2 and sa["num_dense_layers"] == 4  # the embedding row is not a layer
    for sig in ("hidden", "decision"):
        assert sa[sig]["mean_own_layer_cka"] == pytest.approx(sb[sig]["mean_own_layer_cka"])
