"""Evaluate many pruned configurations of one model quickly, reusing the unchanged prefix.

A pruned model that lacks layers ``R`` runs every layer before ``min(R)`` exactly as the dense
model does, so the hidden states entering layer ``min(R)`` are the dense model's. The engine runs
the dense model once over the evaluation rows and the calibration rows, keeps the input of every
layer, and evaluates a pruned configuration by running only its layers after ``min(R)`` from
those states. Scores and Block Influence of the kept layers before ``min(R)`` are the dense ones.
No weight is copied and the model is never reloaded: layers are dropped through a layer view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .. import distributed
from ..formats import Requests, encoder_for
from ..metrics import LayerMetrics, compute_metrics
from ..models import LoadedModel
from ..runner import Batch, LayerStates, collate, default_max_tokens, forward, plan_batches, replan_on_oom, run_from
from ..scoring import LayerScores, ScoringPlan
from ..surgery import dense_layer_ids, suffix_to_run
from .influence import InfluenceProbe, angular_distances, next_token_nll


@dataclass
class Evaluation:
    """One pruned configuration, evaluated.

    Attributes:
        removed: dense ids of the removed layers, in removal order.
        layer_ids: dense ids of the kept layers.
        scores: per-layer option scores on the evaluation rows (None if not asked).
        metrics: per-layer decision metrics (None if not asked).
        bi: dense id -> Block Influence on the calibration rows, for every kept layer (None if not asked).
        nll: mean next-token negative log-likelihood on the calibration rows (None if not asked).
    """

    removed: list[int]
    layer_ids: list[int]
    scores: LayerScores | None = None
    metrics: LayerMetrics | None = None
    bi: dict[int, float] | None = None
    nll: float | None = None


@dataclass
class _RowSet:
    rows: list
    plan: list[list[int]] = field(default_factory=list)  # every batch (the same on every rank)
    batches: list[Batch] = field(default_factory=list)  # this rank's batches, collated
    cache: list[dict[int, Tensor]] = field(default_factory=list)  # [my batch][layer position] -> [B, T, d]
    mine: list[int] = field(default_factory=list)  # row indices this rank runs


class PruningEngine:
    """Evaluates pruned configurations of ``lm`` on fixed evaluation and calibration rows.

    Args:
        lm: the (dense) model.
        eval_req: tokenized evaluation requests (letter or cloze), or None (calibration only).
        calib_seqs: calibration token sequences for Block Influence / perplexity, or None.
        max_tokens: padded tokens per batch (default: sized to the device).
        reuse: reuse the dense prefix across configurations (False recomputes every layer, for comparison).
        offload: keep the cached prefix states in CPU memory instead of on the model's device.
        decision_score: cloze: ``raw`` or ``norm`` scores for DM / OF.
        progress: show a progress bar for the dense pass.
    """

    def __init__(self, lm: LoadedModel, eval_req: Requests | None,
                 calib_seqs: Sequence[Sequence[int]] | None, max_tokens: int | None = None, reuse: bool = True,
                 offload: bool = False, decision_score: str = "raw", progress: bool = True):
        self.lm = lm
        self.parts = lm.parts
        self.pad = encoder_for(lm).pad_id
        self.device = lm.device
        self.reuse = reuse
        self.offload = offload
        self.decision_score = decision_score
        self.progress = progress
        self.max_tokens = max_tokens or default_max_tokens(self.parts)
        self.dense_ids = dense_layer_ids(self.parts)
        self.plan = ScoringPlan(self.parts, eval_req) if eval_req is not None else None
        self.eval = _RowSet(list(self.plan.rows)) if self.plan else None
        self.calib = _RowSet([list(s) for s in calib_seqs]) if calib_seqs else None
        #: eval row indices of the calibration rows, when every calibration row is also an evaluation
        #: row (then Block Influence comes from the evaluation pass and the calibration pass is skipped)
        self.calib_in_eval: torch.Tensor | None = self._calib_rows_in_eval()
        self.dense: Evaluation | None = None
        self.dense_out: np.ndarray | None = None
        self.dense_bi: dict[int, float] | None = None
        self.angular: np.ndarray | None = None
        #: layer-token units run (layers x real tokens) and what full recomputation would have run
        self.work = {"run": 0, "full": 0}
        #: a pruned state held for calibration-only evaluations (:meth:`hold`): its removed set and,
        #: once built, [my calib batch] -> {position -> that state's input to the layer there}
        self._held: list[int] | None = None
        self._held_cache: list[dict[int, Tensor]] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.dense_ids)

    def _calib_rows_in_eval(self) -> torch.Tensor | None:
        if not (self.eval and self.calib) or not self.plan.rows_are_items:
            return None
        where = {tuple(r): i for i, r in enumerate(self.eval.rows)}
        hits = [where.get(tuple(r)) for r in self.calib.rows]
        if any(h is None for h in hits) or len(set(hits)) != len(hits):
            return None
        mask = torch.zeros(len(self.eval.rows), dtype=torch.bool)
        mask[hits] = True
        return mask

    def _calib_rows(self, batch: Batch) -> Tensor:
        return self.calib_in_eval[batch.index]  # on the CPU

    # ---------------------------------------------------------------------------- dense pass

    def _prepare(self, rs: _RowSet) -> None:
        rs.plan = plan_batches([len(r) for r in rs.rows], self.max_tokens, batch_cost=self.parts.options.batch_cost)
        js = distributed.my_batches(rs.plan)  # all batches in a single process
        rs.batches = [collate(rs.rows, rs.plan[j], self.pad, self.device) for j in js]
        rs.mine = [i for j in js for i in rs.plan[j]]

    def run_dense(self) -> Evaluation:
        """Run the dense model once over all rows (cached; later calls return at once)."""
        if self.dense is not None:
            return self.dense
        # the prefix states are kept per planned batch: on out-of-memory the pass re-plans with half the
        # budget (the policy of runner.replan_on_oom); later passes run the batches of the plan that fit
        lengths = [len(r) for rs in (self.eval, self.calib) if rs for r in rs.rows]
        return replan_on_oom(self._run_dense_at, self.max_tokens, lengths)

    def _run_dense_at(self, max_tokens: int) -> Evaluation:
        """The dense pass planned with ``max_tokens`` padded tokens per batch (a failed pass's states dropped first)."""
        self.max_tokens = max_tokens
        for rs in (self.eval, self.calib):
            if rs is not None:
                rs.batches, rs.cache = [], []
        return self._run_dense()

    def _run_dense(self) -> Evaluation:
        from tqdm.auto import tqdm

        L = self.num_layers
        shared = self.calib_in_eval is not None
        n_rows = (len(self.eval.rows) if self.eval else 0) + (len(self.calib.rows) if self.calib and not shared else 0)
        bar = tqdm(total=n_rows, desc="dense pass", unit="seq", disable=not self.progress, leave=False)
        scores = metrics = None
        infl = InfluenceProbe(keep_last=True, rows=self._calib_rows if shared else None)
        if self.eval:
            self._prepare(self.eval)
            self.eval.cache = []
            out = self.plan.new_out(L)
            probe = self.plan.probe(out)
            cache = self._states()
            for b in self.eval.batches:
                forward(self.parts, b, [probe, cache] + ([infl] if shared else []), defer=True)
                self.eval.cache.append(cache.states)
                bar.update(b.size)
            probe.flush()
            self.dense_out = out = distributed.merge_rows(out, self.plan.out_rows(self.eval.mine), axis=1)
            scores = self.plan.assemble(out, self.dense_ids)
            metrics = self._metrics(scores)
        if self.calib and not shared:
            self._dense_calib(infl, bar)
        if self.calib:
            self.dense_bi = infl.block_influence()
            self.angular = angular_distances(infl.gathered_last_states(), self.dense_ids)
        bar.close()
        self.dense = Evaluation(removed=[], layer_ids=list(self.dense_ids), scores=scores, metrics=metrics,
                                bi=self.dense_bi)
        return self.dense

    def _dense_calib(self, infl: InfluenceProbe | None, bar=None) -> None:
        """Dense pass over the calibration rows, caching every layer's input."""
        self._prepare(self.calib)
        self.calib.cache = []
        cache = self._states()
        for b in self.calib.batches:
            forward(self.parts, b, [cache] + ([infl] if infl is not None else []))
            self.calib.cache.append(cache.states)
            if bar is not None:
                bar.update(b.size)

    def _states(self, side: str = "input", positions: Sequence[int] | None = None) -> LayerStates:
        """A probe keeping the layer states that later passes start from (in CPU memory with ``offload``;
        none without ``reuse``, where the probe only keeps the pass as it is with reuse)."""
        return LayerStates(side, positions if self.reuse else (), where="cpu" if self.offload else "device")

    def _metrics(self, s: LayerScores) -> LayerMetrics:
        base = s.norm_scores if self.decision_score == "norm" and s.norm_scores is not None else s.scores
        other = s.norm_scores if self.decision_score != "norm" else None
        return compute_metrics(base, s.gold, s.layer_ids, s.n_options, norm_scores=other)

    # ---------------------------------------------------------------------------- pruned configurations

    def _suffix(self, removed: Sequence[int], changed: Sequence[int] = ()) -> tuple[list[int], list[int], int | None]:
        """Kept positions, positions to run, and the position whose dense input starts the run (see
        :func:`~declens.surgery.suffix_to_run`; ``changed``: dense ids of kept layers whose weights differ
        from the dense model's, a merged layer swapped in by a view)."""
        s = suffix_to_run(self.parts, removed, changed, reuse=self.reuse)
        return list(s.keep), list(s.run), s.start

    def _run_set(self, rs: _RowSet, keep: list[int], run: list[int], m: int | None, probes_for,
                 starts: Sequence[Tensor] | None = None) -> list[Tensor | None]:
        """Run the kept layers after ``m`` over every batch of a row set; return each batch's final
        normalised hidden states (None where nothing had to run). ``starts``: each batch's input to
        position ``m`` (default: the dense prefix cache)."""
        finals = []
        for j, b in enumerate(rs.batches):
            tokens = int(b.lengths.sum())
            self.work["full"] += tokens * len(keep)
            if not run:
                finals.append(None)
                continue
            self.work["run"] += tokens * len(run)
            start = None if m is None else rs.cache[j][m] if starts is None else starts[j]
            finals.append(run_from(self.parts, b, probes_for(j), start, run, defer=True))
        return finals

    def evaluate(self, removed: Sequence[int], scores: bool = True, bi: bool = True, nll: bool = False,
                 changed: Sequence[int] = ()) -> Evaluation:
        """Evaluate the model without the layers ``removed`` (dense ids).

        Args:
            removed: dense ids of the layers to remove (any order; recorded as given).
            scores: score the evaluation rows (per-layer DM, accuracy, OF, ...).
            bi: measure Block Influence of every kept layer on the calibration rows.
            nll: measure the mean next-token NLL on the calibration rows (SLEB's criterion).
            changed: dense ids of kept layers whose weights the caller has swapped for new ones (a
                merged layer, see :func:`declens.pruning.merging.merged_view`); they and everything
                after them are recomputed.
        """
        self.run_dense()
        removed = list(removed)
        changed = list(changed)
        keep, run, m = self._suffix(removed, changed)
        layer_ids = [self.dense_ids[p] for p in keep]
        ev = Evaluation(removed=removed, layer_ids=layer_ids)
        bi = bi and self.calib is not None
        if not removed and not changed:  # the dense model: scores and BI are known; its NLL needs one full pass
            ev.scores, ev.metrics, ev.bi = self.dense.scores, self.dense.metrics, self.dense.bi
            if nll and self.calib:
                ev.nll = self._nll(keep, keep, None)
            return ev
        shared_bi = bi and scores and self.eval is not None and self.calib_in_eval is not None
        infl = InfluenceProbe(rows=self._calib_rows if shared_bi else None) if bi else None
        if scores and self.eval:
            row_of = {lid: i for i, lid in enumerate(layer_ids)}
            out = self.plan.new_out(len(keep))
            if m is not None:  # kept layers before the first removed one: the dense scores
                for p in keep:
                    if p < m:
                        out[row_of[self.dense_ids[p]]] = self.dense_out[p]
            probes = [self.plan.probe(out, row_of)] + ([infl] if shared_bi else [])
            self._run_set(self.eval, keep, run, m, lambda j: probes)
            probes[0].flush()
            out = distributed.merge_rows(out, self.plan.out_rows(self.eval.mine), axis=1)
            ev.scores = self.plan.assemble(out, layer_ids)
            ev.metrics = self._metrics(ev.scores)
        if (bi and not shared_bi) or (nll and self.calib):
            calib_infl = infl if not shared_bi else None
            starts = None
            if calib_infl is None and not changed:  # NLL only: may start from the held state's prefix
                run, m, starts = self._from_held(removed, run, m)
            ev.nll = self._nll(keep, run, m, calib_infl, want=nll, starts=starts)
        if bi:
            got = infl.block_influence()
            ev.bi = {lid: (got[lid] if lid in got else self.dense_bi[lid]) for lid in layer_ids}
        return ev

    def hold(self, removed: Sequence[int] | None) -> None:
        """Hold the pruned state without ``removed`` (dense ids; None releases it) for calibration-only
        evaluations (NLL, as SLEB's candidates): an evaluation that removes ``removed`` plus more layers
        then starts from this state's input to the first further removed layer instead of from the dense
        prefix. The state's layer inputs on the calibration rows are computed on first use (one pass over
        its layers from its first removed one, counted as run work) and kept like the dense cache."""
        self._held = sorted(removed) if removed and self.reuse and self.calib else None
        self._held_cache = None

    def _from_held(self, removed: list[int], run: list[int], m: int | None):
        """``(run, m, starts)`` of a calibration-only evaluation of ``removed``: from the held state's
        prefix when it reaches further than the dense one, else unchanged (``starts`` None)."""
        held = self._held
        if held is None or m is None or not set(held) < set(removed):
            return run, m, None
        pos = self.dense_ids.index
        m_new = min(pos(i) for i in removed if i not in held)
        if m_new <= min(pos(i) for i in held):  # the dense prefix reaches as far
            return run, m, None
        if self._held_cache is None:
            self._held_cache = self._held_pass()
        run = suffix_to_run(self.parts, removed).starting_at(m_new).run
        return list(run), m_new, [c[m_new] for c in self._held_cache]

    def _held_pass(self) -> list[dict[int, Tensor]]:
        """The held state's input to each of its layers from its first removed one, per calibration batch."""
        if not self.calib.batches:
            self._dense_calib(None)
        _, run, m = self._suffix(self._held)
        out = []
        for j, b in enumerate(self.calib.batches):
            start = self.calib.cache[j][m]  # the input of the first kept layer after m is the dense one
            states = [start]
            if len(run) > 1:  # the last kept layer's output is no candidate's input
                outs = self._states("output")
                run_from(self.parts, b, [outs], start, run[:-1])
                self.work["run"] += int(b.lengths.sum()) * (len(run) - 1)
                states += [outs.states[i] for i in range(len(run) - 1)]  # running positions of run[:-1]
            out.append(dict(zip(run, states)))
        return out

    def _nll(self, keep, run, m, infl: InfluenceProbe | None = None, want: bool = True,
             starts: Sequence[Tensor] | None = None) -> float | None:
        """Run the calibration rows (feeding ``infl``); return their mean next-token NLL if ``want``.
        ``starts``: each calibration batch's input to position ``m`` (default: the dense prefix cache)."""
        if not self.calib.batches:  # calibration rows were served by the evaluation pass until now
            self._dense_calib(None)
        finals = self._run_set(self.calib, keep, run, m, lambda j: [infl] if infl is not None else [], starts)
        if not want:
            return None
        tot, cnt = 0.0, 0
        for j, (b, fin) in enumerate(zip(self.calib.batches, finals)):
            with torch.inference_mode():
                if fin is None:  # nothing ran: the last kept layer's output is the input of m
                    fin = self.parts.norm((self.calib.cache[j][m] if starts is None else starts[j]).to(self.device))
                s, n = next_token_nll(fin, b, self.parts.head, self.parts.logit_transform)
            tot += s
            cnt += n
        if distributed.active():
            tot, cnt = distributed.all_reduce_sum(torch.tensor([tot, float(cnt)])).tolist()
        return tot / max(cnt, 1)

    def total_work(self) -> dict[str, int]:
        """Layer-token work run and what full recomputation would have run, summed over ranks."""
        if not distributed.active():
            return dict(self.work)
        run, full = distributed.all_reduce_sum(torch.tensor([float(self.work["run"]), float(self.work["full"])])).tolist()
        return {"run": int(run), "full": int(full)}

    def work_saved(self) -> float:
        """Share of layer-token work avoided by prefix reuse so far (0 without reuse)."""
        w = self.total_work()
        return 0.0 if w["full"] == 0 else 1.0 - w["run"] / w["full"]


def calibration_sequences(lm: LoadedModel, req: Requests) -> list[list[int]]:
    """Calibration token sequences from prepared requests (``req.calibration_rows()``): letter prompts as
    they are; cloze items as context + gold continuation."""
    return req.calibration_rows()
