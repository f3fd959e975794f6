"""Decision metrics on hand-made score arrays."""

from __future__ import annotations

import numpy as np
import pytest

from declens.metrics import (compute_metrics, gold_distribution, kl_divergence, margins, option_frequency, predictions,
                             transition_point)


def test_margin_is_gold_minus_best_other():
    # one layer, three items; item 2 has only three options (NaN = absent)
    s = np.array([[[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 1.0, 2.0], [1.0, 4.0, 2.0, np.nan]]])
    gold = np.array([0, 2, 1])
    np.testing.assert_allclose(margins(s, gold), [[1.0, -4.0, 2.0]])
    np.testing.assert_array_equal(predictions(s), [[0, 1, 1]])


def test_absent_option_never_wins_or_counts_as_rival():
    s = np.array([[[-5.0, -6.0, np.nan]]])
    assert margins(s, np.array([0]))[0, 0] == pytest.approx(1.0)
    assert predictions(s)[0, 0] == 0


def test_option_frequency_and_kl():
    preds = np.array([[0, 0, 0, 0], [0, 1, 2, 3]])
    of = option_frequency(preds, 4)
    np.testing.assert_allclose(of, [[1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]])
    gd = gold_distribution(np.array([0, 1, 2, 3]), 4)
    kl = kl_divergence(of, gd[None])
    assert kl[1] == pytest.approx(0.0, abs=1e-5)
    assert kl[0] == pytest.approx(np.log(4), rel=1e-4)  # all mass on one of four equally likely labels


def test_kl_finite_when_prediction_hits_unused_label():
    of = np.array([0.0, 0.0, 1.0])
    gd = np.array([0.5, 0.5, 0.0])
    assert np.isfinite(kl_divergence(of, gd))


@pytest.mark.parametrize(
    "dm, expected",
    [
        ([-1, -0.5, 0.2, 0.8, 1.0], 2),
        ([-1, 0.3, -0.1, 0.4, 0.5], 3),  # the dip at 2 pushes the transition to 3: "stays positive"
        ([0.1, 0.2, 0.3], 0),
        ([-1, -2, 0.5, -0.1], None),  # last layer not positive: never decides
        ([-1, 0.0], None),  # zero is not positive
    ],
)
def test_transition_point_is_first_layer_from_which_dm_stays_positive(dm, expected):
    assert transition_point(np.array(dm)) == expected


def test_compute_metrics_phases_use_original_layer_ids():
    rng = np.random.default_rng(0)
    L, N, K = 5, 40, 4
    gold = rng.integers(0, K, N)
    s = rng.normal(size=(L, N, K))
    for layer in range(2, L):  # gold gets a growing bonus from layer 2 on
        s[layer, np.arange(N), gold] += 4.0
    m = compute_metrics(s, gold, layer_ids=[0, 1, 5, 6, 9], n_options=np.full(N, K))
    assert m.transition_index == 2
    assert m.transition_layer == 5
    assert m.silent_layers == [0, 1] and m.decisive_layers == [5, 6, 9]
    assert m.acc[-1] > 0.9 and m.chance == pytest.approx(0.25)
    summary = m.summary()
    assert summary["silent_phase"] == [0, 1] and summary["decisive_phase"] == [5, 9]
    assert summary["transition_fraction"] == pytest.approx(2 / 5)
    np.testing.assert_allclose(m.option_frequency.sum(1), 1.0)
