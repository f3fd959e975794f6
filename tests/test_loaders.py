"""Every result kind a study reads back loads from its folder into an equal object."""

from __future__ import annotations

import numpy as np

from conftest import make_tiny
from declens.analyses.ablation import AblateConfig, AblationResult, ablate
from declens.analyses.cka import CKAConfig, CKAResult, cka_study
from declens.analyses.noise import NoiseConfig, NoiseResult, noise_study
from declens.tasks import load_task


def test_cka_noise_and_ablation_results_round_trip(tmp_path):
    lm = make_tiny("llama", layers=4)
    data = load_task("arc_easy", limit=6, seed=0)

    cka = cka_study(lm, data, [2], "letter", CKAConfig(n_samples=None), progress=False)
    cka.save(tmp_path / "cka", plots=False)
    back = CKAResult.load(tmp_path / "cka")
    assert back.pruned_ids == cka.pruned_ids and back.dense_ids == cka.dense_ids
    np.testing.assert_array_equal(back.hidden, cka.hidden)
    assert back.best_decision == cka.best_decision and back.config == cka.config

    noise = noise_study(lm, data, "letter", NoiseConfig(scales=[0.0, 1.0], layers=[0, 3]), progress=False)
    noise.save(tmp_path / "noise", plots=False)
    nb = NoiseResult.load(tmp_path / "noise")
    np.testing.assert_array_equal(nb.scores, noise.scores)
    assert nb.phase_summary() == noise.phase_summary() and nb.sigma == noise.sigma

    abl = ablate(lm, "arc_easy", ["arc_easy", "piqa"], "letter", AblateConfig(window=1, tp=2, limit=4), progress=False,
                 out_dir=tmp_path / "ablate")
    ab = AblationResult.load(tmp_path / "ablate")
    assert ab.transition_layer == 2 and ab.eval.cells == abl.eval.cells and ab.eval.configs == abl.eval.configs
