"""Linear CKA (against a naive float64 reference) and the pruned-vs-dense CKA study on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from declens.analyses.cka import (CKAConfig, CKAError, cka_matrix, cka_rows, cka_study, collect_states, linear_cka)
from declens.analyses.decision import prepare
from declens.errors import LayerSpecError
from declens.surgery import keep_positions
from declens.tasks import load_task


def reference_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """The feature-space formula, naively: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), column-centred, float64."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    X = X - X.mean(axis=0)
    Y = Y - Y.mean(axis=0)
    return float(np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)))


def orthogonal(d: int, rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# (n, d1, d2): n > d (feature form) and n < d (Gram form), equal and unequal widths
SHAPES = [(60, 8, 8), (50, 12, 5), (10, 40, 40), (7, 30, 90), (33, 33, 20)]


@pytest.mark.parametrize("n,d1,d2", SHAPES)
def test_matches_float64_reference(n, d1, d2):
    rng = np.random.default_rng(n * 1000 + d1 + d2)
    X = rng.standard_normal((n, d1)) * rng.uniform(0.1, 10, d1)  # anisotropic columns
    Y = X[:, rng.integers(0, d1, d2)] @ rng.standard_normal((d2, d2)) + 0.5 * rng.standard_normal((n, d2))
    ref = reference_cka(X, Y)
    assert 0.05 < ref < 0.999  # a non-trivial case
    assert linear_cka(X, Y) == pytest.approx(ref, rel=1e-10)
    assert linear_cka(torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)) == pytest.approx(ref, rel=1e-5)
    assert linear_cka(Y, X) == pytest.approx(ref, rel=1e-10)  # symmetric


@pytest.mark.parametrize("n,d1,d2", SHAPES)
def test_self_is_one_and_invariances(n, d1, d2):
    rng = np.random.default_rng(7 + n)
    X = rng.standard_normal((n, d1)) @ rng.standard_normal((d1, d1))
    Y = rng.standard_normal((n, d2))
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    Q = orthogonal(d1, rng)
    moved = 3.7 * X @ Q + rng.standard_normal(d1) * 5  # rotate, scale isotropically, translate
    assert linear_cka(X, moved) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(moved, Y) == pytest.approx(linear_cka(X, Y), rel=1e-9)
    # not invariant to an anisotropic scaling (so the check above can fail)
    stretched = X * np.linspace(0.1, 10, d1)
    assert linear_cka(X, stretched) < 0.999


def test_huge_and_tiny_magnitudes_stay_finite():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((20, 50))
    Y = rng.standard_normal((20, 50)) + X
    ref = reference_cka(X, Y)
    assert linear_cka(X * 1e150, Y) == pytest.approx(ref, rel=1e-9)  # the naive formula overflows here
    assert linear_cka(X * 1e-150, Y * 1e-150) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("n", [2, 3])
def test_tiny_batches_have_no_nan(n):
    rng = np.random.default_rng(n)
    for d1, d2 in [(1, 1), (4, 64), (64, 4), (64, 64)]:
        X, Y = rng.standard_normal((n, d1)), rng.standard_normal((n, d2))
        v = linear_cka(X, Y)
        assert np.isfinite(v) and 0.0 <= v <= 1.0
        assert v == pytest.approx(reference_cka(X, Y), rel=1e-9)
        m = cka_matrix([X, X], [Y, X])
        assert np.isfinite(m).all()
    # two distinct rows: both centred representations are rank one along one direction, CKA is 1
    assert linear_cka(rng.standard_normal((2, 5)), rng.standard_normal((2, 9))) == pytest.approx(1.0)


def test_degenerate_inputs_give_zero_not_nan():
    rng = np.random.default_rng(2)
    Y = rng.standard_normal((6, 10))
    const = np.tile(rng.standard_normal(10), (6, 1))
    assert linear_cka(const, Y) == 0.0
    assert linear_cka(Y, np.zeros((6, 3))) == 0.0
    assert linear_cka(np.ones((1, 4)), np.ones((1, 4))) == 0.0  # a single row has no variance
    m = cka_matrix([const, Y], [Y, const])
    assert m[0, 0] == 0.0 and m[0, 1] == 0.0 and m[1, 1] == 0.0 and m[1, 0] == pytest.approx(1.0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(CKAError, match="same rows"):
        linear_cka(np.ones((4, 3)), np.ones((5, 3)))
    with pytest.raises(CKAError, match="NaN"):
        linear_cka(np.full((4, 3), np.nan), np.ones((4, 3)))
    with pytest.raises(CKAError, match="2-D"):
        linear_cka(np.ones(4), np.ones((4, 3)))
    with pytest.raises(CKAError, match="same rows"):
        cka_matrix([np.ones((4, 3))], [np.ones((3, 3))])


@pytest.mark.parametrize("n", [6, 40])  # Gram form (n <= d) and feature form (n > d)
def test_cka_matrix_equals_pairwise(n):
    rng = np.random.default_rng(n)
    A = [rng.standard_normal((n, 16)) @ rng.standard_normal((16, 16)) for _ in range(3)]
    B = [A[1] @ orthogonal(16, rng), rng.standard_normal((n, 12)), A[0] + 0.3 * rng.standard_normal((n, 16))]
    m = cka_matrix(A, B)
    assert m.shape == (3, 3)
    ref = np.array([[reference_cka(a, b) for b in B] for a in A])
    np.testing.assert_allclose(m, ref, rtol=1e-9, atol=1e-12)
    assert m[1, 0] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# The study on tiny models


def test_dense_against_itself_has_unit_diagonal(tiny):
    data = load_task("arc_easy", limit=4, seed=0)
    res = cka_study(tiny, data, remove=[], config=CKAConfig(n_samples=None), progress=False)
    L = tiny.num_layers
    assert res.hidden.shape == res.decision.shape == (L, L)
    np.testing.assert_allclose(np.diag(res.hidden), 1.0, atol=1e-9)
    np.testing.assert_allclose(np.diag(res.decision), 1.0, atol=1e-9)
    assert res.best_hidden == res.best_decision == list(range(L))
    assert np.isfinite(res.hidden).all() and (res.hidden <= 1).all() and (res.hidden >= 0).all()


def test_pruned_view_with_prefix_reuse_equals_plain_passes(tiny):
    """The study copies unpruned-prefix features from the dense pass and runs only the suffix; a plain
    pass of the pruned view gives the same matrices, and an unpruned layer best-matches itself."""
    data = load_task("arc_easy", limit=4, seed=0)
    remove = [2]
    res = cka_study(tiny, data, remove=remove, config=CKAConfig(n_samples=None), progress=False)
    assert res.pruned_ids == [0, 1, 3] and res.dense_ids == [0, 1, 2, 3]
    rows = cka_rows(prepare(tiny, data, "letter"))
    dense = collect_states(tiny, rows, max_tokens=200)  # another batching, too
    pruned = collect_states(tiny, rows, layers=keep_positions(tiny.parts, remove), max_tokens=200)
    for signal in ("hidden", "decision"):
        d, p = getattr(dense, signal), getattr(pruned, signal)
        ref = cka_matrix([p[i] for i in res.pruned_ids], [d[i] for i in res.dense_ids])
        np.testing.assert_allclose(res.matrix(signal), ref, atol=1e-5)
        # layers before the removed one are the dense layers: identical rows, best match = itself
        np.testing.assert_allclose(res.matrix(signal)[:2], cka_matrix([d[0], d[1]], [d[i] for i in res.dense_ids]),
                                   atol=1e-5)
        assert res.matrix(signal)[0, 0] == pytest.approx(1.0) and res.matrix(signal)[1, 1] == pytest.approx(1.0)
        assert res.best_match(signal)[:2] == [0, 1]
        # the layer after the gap runs on another input: not identical to its dense self
        assert res.matrix(signal)[2, 3] < 1 - 1e-6


def test_cloze_rows_and_subsample():
    from conftest import make_tiny

    lm = make_tiny("qwen2")
    data = load_task("piqa", limit=10, seed=0)
    res = cka_study(lm, data, remove=[0, 3], fmt="cloze", config=CKAConfig(n_samples=5, seed=1), progress=False)
    assert res.config["n_samples"] == 5 and res.config["kept_layer_ids"] == [1, 2]
    assert res.hidden.shape == (2, 4)
    again = cka_study(lm, data, remove=[0, 3], fmt="cloze", config=CKAConfig(n_samples=5, seed=1), progress=False)
    assert np.array_equal(res.hidden, again.hidden) and np.array_equal(res.decision, again.decision)


def test_bad_requests_raise():
    from conftest import make_tiny

    lm = make_tiny("llama")
    data = load_task("arc_easy", limit=3)
    with pytest.raises(LayerSpecError):
        cka_study(lm, data, remove=[0, 1, 2, 3], progress=False)
    with pytest.raises(LayerSpecError):
        cka_study(lm, data, remove=[9], progress=False)
    with pytest.raises(CKAError):
        cka_study(lm, load_task("arc_easy", limit=5), remove=[1], config=CKAConfig(n_samples=0), progress=False)


def test_save_writes_json_npz_and_figures(tmp_path):
    from conftest import make_tiny

    lm = make_tiny("phi3")
    res = cka_study(lm, load_task("arc_easy", limit=5, seed=2), remove=[1], progress=False)
    res.save(tmp_path)
    d = json.loads((tmp_path / "cka.json").read_text())
    assert d["kind"] == "cka" and d["config"]["remove"] == [1] and d["config"]["kept_layer_ids"] == [0, 2, 3]
    assert d["provenance"]["model"]["fingerprint"] and d["provenance"]["data"]["fingerprint"]
    assert np.array(d["cka"]["hidden"]).shape == (3, 4)
    assert d["best_match"]["hidden"] == res.best_hidden and d["best_match"]["decision"] == res.best_decision
    with np.load(tmp_path / "cka.npz") as z:
        np.testing.assert_array_equal(z["decision"], res.decision)
        assert list(z["pruned_layer_ids"]) == [0, 2, 3]
    for f in ("cka_hidden.png", "cka_decision.png", "cka_best_match.png"):
        assert (tmp_path / f).stat().st_size > 1000


@pytest.mark.slow
def test_smollm2_pruned_cka(smollm2, tmp_path):
    data = load_task("arc_challenge", limit=24, seed=0)
    remove = list(range(18, 27))
    res = cka_study(smollm2, data, remove=remove, config=CKAConfig(n_samples=20), progress=False)
    L = smollm2.num_layers
    assert res.hidden.shape == res.decision.shape == (L - len(remove), L)
    assert np.isfinite(res.hidden).all() and np.isfinite(res.decision).all()
    # the 18 layers before the gap are the dense layers themselves
    np.testing.assert_allclose(res.hidden[np.arange(18), np.arange(18)], 1.0, atol=1e-9)
    assert res.best_hidden[:18] == list(range(18)) and res.best_decision[:18] == list(range(18))
    res.save(tmp_path)
    assert json.loads((tmp_path / "cka.json").read_text())["summary"]["hidden"]["final_layer_best_match"] in range(L)
