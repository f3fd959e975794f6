"""The one out-of-memory policy of the execution layer (runner.split_on_oom / runner.replan_on_oom), on the CPU.

The device's memory limit is the only stand-in: :class:`MemoryLimit` raises ``torch.OutOfMemoryError`` when a
forward pass runs more than ``tokens`` padded tokens (rows x longest row). It sits on the model's rotary
embedding, which every pass calls once with its hidden states (the model's own forward and the fast path,
from the embeddings or from injected states), because the analyses build their own probes and take none from
the caller. Everything else is real: a tiny random Qwen3 of tests/conftest.py, real rows and tokenizer.

Each loop run over the limit must finish with the numbers of a run that never hits it. Where the policy splits
a batch (analyze, cka, merging's calibration rows) the halves are other batches than the unlimited run's, and
on the CPU in float32 a row's numbers may round differently in a batch of other shape: compared to 1e-5. Where
it re-plans (the pruning engine's dense pass, noise) the run equals, bit for bit, one planned with the budget
it backed off to, and the unlimited run to 1e-5.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_tiny

from declens.analyses.cka import CKAConfig, cka_study
from declens.analyses.decision import AnalyzeConfig, analyze, prepare
from declens.analyses.noise import NoiseConfig, noise_checkpoint, noise_study
from declens.errors import DeviceMemoryError
from declens.pruning.engine import PruningEngine, calibration_sequences
from declens.runner import plan_batches
from declens.scoring import ScoringPlan
from declens.tasks import load_task

#: a budget whose batches hold several rows of these tiny tasks (the limit, :func:`_limit`, cuts them)
BIG = 4096
#: float32 on the CPU: a row's numbers in a batch of another shape (see the module docstring), relative to
#: the largest value compared
TOL = 1e-5


def _close(actual, desired) -> None:
    desired = np.asarray(desired)
    scale = max(1.0, float(np.nanmax(np.abs(desired))))
    np.testing.assert_allclose(actual, desired, rtol=TOL, atol=TOL * scale)


class MemoryLimit:
    """Raises ``torch.OutOfMemoryError`` in a forward pass of more than ``tokens`` padded tokens; counts them."""

    def __init__(self, lm, tokens: int):
        self.tokens, self.hits, self.largest = tokens, 0, 0
        self.handle = lm.parts.decoder.rotary_emb.register_forward_pre_hook(self._check)

    def _check(self, module, args):
        size = int(args[0].shape[0] * args[0].shape[1])  # [B, T, d] hidden states
        if size > self.tokens:
            self.hits += 1
            raise torch.OutOfMemoryError(f"stand-in: {size} padded tokens > {self.tokens}")
        self.largest = max(self.largest, size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def lm():
    return make_tiny("qwen3")


@pytest.fixture(scope="module")
def data():
    return load_task("arc_easy", limit=10, seed=0)


def _limit(lm, data, fmt: str = "letter") -> int:
    """The stand-in memory limit: half the largest padded batch of the plan of ``data``'s rows under ``BIG`` (so
    that limit is hit), but room for the longest row alone."""
    rows = ScoringPlan(lm.parts, prepare(lm, data, fmt)).rows
    largest = max(len(b) * max(len(rows[i]) for i in b) for b in plan_batches([len(r) for r in rows], BIG))
    assert largest // 2 >= max(len(r) for r in rows)  # every row fits alone
    return largest // 2


@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_analyze_splits_batches_that_run_out_of_memory(lm, data, fmt):
    free = analyze(lm, data, fmt, AnalyzeConfig(max_tokens=BIG), progress=False, plots=False)
    with MemoryLimit(lm, _limit(lm, data, fmt)) as limit:
        got = analyze(lm, data, fmt, AnalyzeConfig(max_tokens=BIG), progress=False, plots=False)
    assert limit.hits > 0 and 0 < limit.largest <= limit.tokens
    _close(got.scores.scores, free.scores.scores)
    assert got.metrics.transition_layer == free.metrics.transition_layer
    np.testing.assert_array_equal(got.metrics.acc, free.metrics.acc)


def test_a_row_that_does_not_fit_alone_is_a_one_line_error(lm, data):
    shortest = min(len(r) for r in ScoringPlan(lm.parts, prepare(lm, data, "letter")).rows)
    with MemoryLimit(lm, shortest - 1), pytest.raises(DeviceMemoryError) as err:
        analyze(lm, data, "letter", AnalyzeConfig(max_tokens=BIG), progress=False, plots=False)
    msg = str(err.value)
    assert "\n" not in msg and "one row" in msg and "tokens" in msg and "--device-map" in msg
    with MemoryLimit(lm, shortest - 1), pytest.raises(DeviceMemoryError) as err:  # the re-plan policy too
        PruningEngine(lm, prepare(lm, data, "letter"), None, max_tokens=BIG, progress=False).run_dense()
    assert "\n" not in str(err.value) and "--device-map" in str(err.value)


def _engine(lm, data, budget):
    calib = calibration_sequences(lm, prepare(lm, load_task("arc_easy", split="train", limit=4), "letter"))
    return PruningEngine(lm, prepare(lm, data, "letter"), calib, max_tokens=budget, progress=False)


def test_pruning_engine_replans_its_dense_pass(lm, data):
    with MemoryLimit(lm, _limit(lm, data)) as limit:
        eng = _engine(lm, data, BIG)
        dense = eng.run_dense()
        pruned = eng.evaluate([2], nll=True)
    assert limit.hits > 0 and eng.max_tokens < BIG  # backed off
    same = _engine(lm, data, eng.max_tokens)  # planned with that budget from the start: bit for bit
    free = _engine(lm, data, BIG)  # never hits the limit
    for ref, exact in ((same, True), (free, False)):
        d, p = ref.run_dense(), ref.evaluate([2], nll=True)
        check = np.testing.assert_array_equal if exact else _close
        check(dense.scores.scores, d.scores.scores)
        check(pruned.scores.scores, p.scores.scores)
        check(np.array([dense.bi[i] for i in eng.dense_ids]), np.array([d.bi[i] for i in eng.dense_ids]))
        check(np.array([pruned.nll]), np.array([p.nll]))


def test_noise_study_replans(lm, data, tmp_path):
    cfg = NoiseConfig(scales=(0.0, 0.5), layers=[1, 3], max_tokens=BIG)
    with MemoryLimit(lm, _limit(lm, data)) as limit:
        got = noise_study(lm, data, "letter", cfg, progress=False,
                          checkpoint=noise_checkpoint(tmp_path, lm, data, "letter", cfg))
        assert limit.hits > 0
        # the re-planned study checkpoints under the key of a run asked with its budget; a rerun backs off
        # the same way and resumes from it (nothing left to run)
        again = noise_study(lm, data, "letter", cfg, progress=False,
                            checkpoint=noise_checkpoint(tmp_path, lm, data, "letter", cfg))
    budget = got.config["max_tokens"]
    assert budget < BIG
    assert noise_checkpoint(tmp_path, lm, data, "letter", replace(cfg, max_tokens=budget)).load() is not None
    assert again.provenance["timing"]["dense_pass_restored"] is True
    assert again.provenance["timing"]["noise_runs_restored"] == again.provenance["timing"]["noise_runs"]
    np.testing.assert_array_equal(again.scores, got.scores)
    same = noise_study(lm, data, "letter", NoiseConfig(scales=(0.0, 0.5), layers=[1, 3], max_tokens=budget),
                       progress=False)
    np.testing.assert_array_equal(got.scores, same.scores)
    np.testing.assert_array_equal(got.dm, same.dm)
    assert got.sigma == same.sigma
    free = noise_study(lm, data, "letter", cfg, progress=False)
    _close(got.scores, free.scores)
    _close(got.dm, free.dm)
    _close([got.sigma[i] for i in sorted(got.sigma)], [free.sigma[i] for i in sorted(free.sigma)])


@pytest.mark.parametrize("remove", [[], [2]])
def test_cka_splits_batches_that_run_out_of_memory(lm, data, remove):
    cfg = CKAConfig(n_samples=None, max_tokens=BIG, include_embeddings=True)
    free = cka_study(lm, data, remove, "letter", cfg, progress=False)
    with MemoryLimit(lm, _limit(lm, data)) as limit:
        got = cka_study(lm, data, remove, "letter", cfg, progress=False)
    assert limit.hits > 0
    _close(got.hidden, free.hidden)
    _close(got.decision, free.decision)


def test_merging_calibration_rows_split_batches_that_run_out_of_memory(lm, data):
    from declens.pruning.merging import CalibRows, _flat_rows
    from declens.pruning.methods import Memo

    calib = calibration_sequences(lm, prepare(lm, data, "letter"))  # the letter prompts: _limit's rows
    eng = PruningEngine(lm, None, calib, max_tokens=BIG, progress=False)
    free = CalibRows(Memo(eng), len(calib))
    with MemoryLimit(lm, _limit(lm, data)) as limit:
        got = CalibRows(Memo(eng), len(calib))
    assert limit.hits > 0 and len(got.batches) > len(free.batches)
    a, b = _flat_rows(got.finals, got.batches), _flat_rows(free.finals, free.batches)
    assert sorted(a) == sorted(b) == list(range(len(calib)))
    for i in a:
        _close(a[i], b[i])
    assert sorted(got.last) == sorted(free.last)
    for lid in got.last:  # rows in plan order either way
        _close(got.last[lid], free.last[lid])


def test_the_fine_tuning_loss_splits_batches_that_run_out_of_memory(lm, data):
    from declens.finetune import answer_loss
    from declens.finetune.data import TrainSeq

    rows = ScoringPlan(lm.parts, prepare(lm, data, "letter")).rows
    seqs = [TrainSeq(tuple(r) + (7, 9), len(r)) for r in rows]  # two answer tokens each
    free = answer_loss(lm, seqs, batch_size=len(seqs))
    longest = max(len(s.input_ids) for s in seqs)
    assert len(seqs) // 2 >= 2  # the limit below cuts the one batch, and every row fits alone
    with MemoryLimit(lm, len(seqs) * longest // 2) as limit:
        got = answer_loss(lm, seqs, batch_size=len(seqs))
    assert limit.hits > 0
    _close(np.array([got]), np.array([free]))
    shortest = min(len(s.input_ids) for s in seqs)
    with MemoryLimit(lm, shortest - 1), pytest.raises(DeviceMemoryError, match="one row"):
        answer_loss(lm, seqs, batch_size=len(seqs))
