"""Findings: the paper's claims tested one by one against declens results, with stated criteria.

Each claim becomes a :class:`Finding`: the claim in words, the quantitative criterion it is held to,
the measured numbers, a bootstrap confidence interval where rows were sampled, and a verdict:

- ``holds``: the criterion is met by the point estimate *and* by at least ``support`` (default 90%)
  of bootstrap resamples of the rows, where rows are resampled;
- ``does not hold``: the point estimate misses the criterion, or it meets it in fewer than
  ``support`` of the resamples (then the numbers say "not robust");
- ``cannot be tested here``: the results needed are absent, or the precondition of the claim is
  missing (a model without a Transition Point cannot show a sharp transition).

Every criterion is a function of result objects already computed (no model runs here), so findings
are cheap to recompute and can be re-read from saved study folders. The criteria are documented in
``docs/METHOD.md`` ("Findings: the criteria"). Compute only: nothing here prints or draws.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..metrics import compute_metrics, transition_point
from ..results import read_result_file, register_result
from .evaluate import config_label

HOLDS, FAILS, UNTESTABLE = "holds", "does not hold", "cannot be tested here"


@dataclass
class FindingsConfig:
    """Thresholds of the criteria (all stated in docs/METHOD.md).

    Attributes:
        bootstrap: resamples of the rows for confidence intervals and the support share.
        seed: seed of the resampling.
        support: share of resamples that must meet a criterion for ``holds``.
        sharp_width_frac: claim 1: the rise may take at most this share of the depth (and at least 2 layers).
        rise_level: claim 1: the rise ends at the first layer whose DM reaches this share of the
            Decisive Phase's largest DM.
        collapse_of: claim 2: a Silent-Phase layer "collapses" when one option takes at least this share.
        diversify_by: claim 2: after the collapse the top option's share must fall by at least this much.
        decisive_kl: claim 2: mean KL(OF || gold) over the Decisive Phase at most this many nats.
        first_steps_frac: claim 3: the first removed layers considered, as a share of the depth.
        first_steps_decisive: claim 3: share of them that must be Decisive-Phase layers.
        chance_margin: claim 4: "near chance": accuracy within this share of the dense margin above chance.
        cka_high: claim 5: mean hidden-state CKA of each pruned layer with its best dense match.
        alpha: significance level of correlations (claim 9).
    """

    bootstrap: int = 1000
    seed: int = 0
    support: float = 0.9
    sharp_width_frac: float = 0.1
    rise_level: float = 0.5
    collapse_of: float = 0.8
    diversify_by: float = 0.2
    decisive_kl: float = 0.1
    first_steps_frac: float = 0.125
    first_steps_decisive: float = 0.75
    chance_margin: float = 0.25
    cka_high: float = 0.8
    alpha: float = 0.05


@dataclass
class Finding:
    """One claim, its criterion, what was measured, and the verdict."""

    claim: int | str
    statement: str
    criterion: str
    verdict: str
    numbers: dict = field(default_factory=dict)
    ci: dict = field(default_factory=dict)
    support: float | None = None
    source: str = ""
    figure: str | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def untestable(claim, statement: str, criterion: str, why: str) -> Finding:
    return Finding(claim, statement, criterion, UNTESTABLE, note=why)


def verdict(point: bool, support: float | None, cfg: FindingsConfig) -> str:
    """``holds`` when the point estimate meets the criterion and (if resampled) enough resamples do."""
    if not point:
        return FAILS
    return HOLDS if support is None or support >= cfg.support else FAILS


def bootstrap_rows(n: int, cfg: FindingsConfig) -> np.ndarray:
    """``[B, n]`` row indices of ``cfg.bootstrap`` resamples with replacement (seeded)."""
    rng = np.random.default_rng(cfg.seed)
    return rng.integers(0, n, size=(cfg.bootstrap, n))


def interval(values: Sequence[float | None], level: float = 0.95) -> list[float] | None:
    """Percentile interval of bootstrap values (None values, e.g. no Transition Point, dropped)."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return None
    lo, hi = np.percentile(v, [50 * (1 - level), 100 - 50 * (1 - level)])
    return [float(lo), float(hi)]


# ------------------------------------------------------------------------------------------------
# Claims on the dense model (from an analysis: scores [L, N, K])


def rise_width(dm: np.ndarray, cfg: FindingsConfig) -> int | None:
    """Layers from the last non-positive DM to the first layer reaching ``rise_level`` of the
    Decisive Phase's largest DM; None without a Transition Point."""
    tp = transition_point(dm)
    if tp is None or tp == 0:
        return None
    top = float(np.max(dm[tp:]))
    reach = next(i for i in range(tp, len(dm)) if dm[i] >= cfg.rise_level * top)
    return int(reach - (tp - 1))


def _metrics(scores: np.ndarray, gold: np.ndarray, n_options: np.ndarray, layer_ids: list[int]):
    return compute_metrics(scores, gold, layer_ids, n_options)


def _resampled(scores, gold, n_options, layer_ids, cfg: FindingsConfig, fn: Callable):
    """``fn(metrics)`` on every bootstrap resample of the rows."""
    out = []
    for idx in bootstrap_rows(scores.shape[1], cfg):
        out.append(fn(_metrics(scores[:, idx], gold[idx], n_options[idx], layer_ids)))
    return out


def claim_sharp_transition(analysis, cfg: FindingsConfig) -> Finding:
    """Claim 1: DM crosses from negative to positive within a few layers."""
    st = "a sharp transition: the Decision Margin crosses from negative to positive within a few layers"
    s = analysis.scores
    L = s.scores.shape[0]
    limit = max(2, int(np.ceil(cfg.sharp_width_frac * L)))
    crit = (f"the dense model has a Transition Point, at least 80% of the Silent-Phase layers have DM < 0, and DM "
            f"rises from <= 0 to {cfg.rise_level:.0%} of its Decisive-Phase maximum within {limit} layers "
            f"(max(2, {cfg.sharp_width_frac:.0%} of {L}))")
    m = analysis.metrics
    if m.transition_index is None or m.transition_index == 0:
        return untestable(1, st, crit, "the dense model has no Transition Point on these rows (its DM never crosses "
                          "zero for good)" if m.transition_index is None else "DM is positive at every layer")

    def test(mm) -> tuple[bool, int | None, int | None]:
        t = mm.transition_index
        if t is None or t == 0:
            return False, None, None
        w = rise_width(mm.dm, cfg)
        silent_neg = float(np.mean(mm.dm[:t] < 0))
        return bool(w is not None and w <= limit and silent_neg >= 0.8), w, mm.layer_ids[t]

    ok, w, tp = test(m)
    boots = _resampled(s.scores, s.gold, s.n_options, s.layer_ids, cfg, test)
    sup = float(np.mean([b[0] for b in boots]))
    return Finding(1, st, crit, verdict(ok, sup, cfg),
                   numbers={"transition_layer": tp, "rise_width_layers": w, "width_limit": limit, "num_layers": L,
                            "silent_share_negative": float(np.mean(m.dm[: m.transition_index] < 0))},
                   ci={"transition_layer": interval([b[2] for b in boots]),
                       "rise_width_layers": interval([b[1] for b in boots])},
                   support=sup, figure="dm.png")


def claim_option_dynamics(analysis, cfg: FindingsConfig) -> Finding:
    """Claim 2: Silent-Phase OF collapses onto one option then diversifies; KL ~ 0 in the Decisive Phase."""
    st = ("the Silent Phase's Option Frequency collapses onto one option, then diversifies; KL to the gold labels "
          "falls near zero in the Decisive Phase")
    crit = (f"some Silent-Phase layer puts >= {cfg.collapse_of:.0%} of the rows on one option, the top option's share "
            f"then falls by >= {cfg.diversify_by:.2f} by the Transition Point, and the mean KL(OF || gold) over the "
            f"Decisive Phase is <= {cfg.decisive_kl} nats")
    m = analysis.metrics
    if m.transition_index is None or m.transition_index == 0:
        return untestable(2, st, crit, "no Silent Phase and Decisive Phase to compare (no Transition Point)")

    def test(mm) -> tuple[bool, float | None, float | None, float | None]:
        t = mm.transition_index
        if t is None or t == 0:
            return False, None, None, None
        top = mm.option_frequency.max(axis=1)
        peak = int(np.argmax(top[:t]))
        after = float(np.min(top[peak : t + 1]))
        kl = float(np.mean(mm.kl[t:]))
        ok = top[peak] >= cfg.collapse_of and top[peak] - after >= cfg.diversify_by and kl <= cfg.decisive_kl
        return bool(ok), float(top[peak]), float(top[peak] - after), kl

    ok, peak, drop, kl = test(m)
    s = analysis.scores
    boots = _resampled(s.scores, s.gold, s.n_options, s.layer_ids, cfg, test)
    sup = float(np.mean([b[0] for b in boots]))
    return Finding(2, st, crit, verdict(ok, sup, cfg),
                   numbers={"silent_max_top_share": peak, "diversification_drop": drop, "decisive_mean_kl": kl},
                   ci={"silent_max_top_share": interval([b[1] for b in boots]),
                       "diversification_drop": interval([b[2] for b in boots]),
                       "decisive_mean_kl": interval([b[3] for b in boots])},
                   support=sup, figure="option_frequency.png")


# ------------------------------------------------------------------------------------------------
# Claims on pruning trajectories


def claim_decisive_first(analysis, prune_result, cfg: FindingsConfig) -> Finding:
    """Claim 3: Iterative Pruning first removes Decisive-Phase layers."""
    st = "Iterative Pruning first removes Decisive-Phase layers"
    L = len(analysis.metrics.layer_ids)
    n = max(1, int(round(cfg.first_steps_frac * L)))
    crit = (f"at least {cfg.first_steps_decisive:.0%} of the first {n} layers IP removes ({cfg.first_steps_frac:.1%} "
            f"of {L}) lie in the dense model's Decisive Phase")
    if prune_result is None or "ip" not in prune_result.runs:
        return untestable(3, st, crit, "no Iterative Pruning run")
    m = analysis.metrics
    if m.transition_index is None:
        return untestable(3, st, crit, "the dense model has no Decisive Phase (no Transition Point)")
    best = prune_result.runs["ip"].best_by_k()
    if max(best) < n:
        return untestable(3, st, crit, f"the IP run removed only {max(best)} layers")
    removed = list(best[n].removed)[:n]
    decisive = set(m.decisive_layers)
    share = float(np.mean([r in decisive for r in removed]))
    return Finding(3, st, crit, verdict(share >= cfg.first_steps_decisive, None, cfg),
                   numbers={"first_removed": removed, "decisive_layers": [m.decisive_layers[0], m.decisive_layers[-1]],
                            "share_decisive": share, "transition_layer": m.transition_layer},
                   figure="removed_layers.png",
                   note="deterministic given the calibration rows; no resampling")


def claim_collapse_in_silent(analysis, prune_result, cfg: FindingsConfig) -> Finding:
    """Claim 4: collapse comes when pruning enters the Silent Phase (TP lost, accuracy near chance)."""
    st = "collapse comes when pruning enters the Silent Phase: the Transition Point is lost and accuracy falls near chance"
    crit = ("along IP's best state per ratio, the first state that has lost the Transition Point with accuracy within "
            f"{cfg.chance_margin:.0%} of the dense margin above chance comes no earlier than the first state that "
            "removed a Silent-Phase layer")
    if prune_result is None or "ip" not in prune_result.runs:
        return untestable(4, st, crit, "no Iterative Pruning run")
    m = analysis.metrics
    if m.transition_index is None:
        return untestable(4, st, crit, "the dense model has no Transition Point")
    best = prune_result.runs["ip"].best_by_k()
    dense = best[0]
    margin = dense.final_accuracy - dense.chance
    silent = set(m.silent_layers)
    k_silent = next((k for k, r in best.items() if k > 0 and any(x in silent for x in r.removed)), None)
    k_collapse = next((k for k, r in best.items() if k > 0 and r.transition_layer is None
                       and r.final_accuracy - r.chance <= cfg.chance_margin * margin), None)
    nums = {"first_silent_k": k_silent, "collapse_k": k_collapse, "num_layers": prune_result.runs["ip"].num_layers,
            "dense_accuracy": dense.final_accuracy, "chance": dense.chance,
            "collapse_accuracy": None if k_collapse is None else best[k_collapse].final_accuracy}
    if k_collapse is None:
        return Finding(4, st, crit, UNTESTABLE, numbers=nums, note="no collapse within the pruned range")
    ok = k_silent is not None and k_collapse >= k_silent
    return Finding(4, st, crit, verdict(ok, None, cfg), numbers=nums, figure="accuracy_vs_ratio.png")


# ------------------------------------------------------------------------------------------------
# Mechanism studies


def claim_cka(cka_result, cfg: FindingsConfig) -> Finding:
    """Claim 5: at 50%, hidden-state CKA stays high while decision-token CKA stays below the diagonal."""
    st = "at 50% pruning, hidden-state CKA stays high while the decision-token CKA stays below the diagonal"
    crit = (f"every pruned layer's best hidden-state match has CKA >= {cfg.cka_high} on average, and for most pruned "
            "layers past the first removal the best decision-token match is a shallower dense layer than the layer itself")
    if cka_result is None:
        return untestable(5, st, crit, "no CKA result")
    hid = cka_result.matrix("hidden").max(axis=1)
    best = cka_result.best_match("decision")
    ids = cka_result.pruned_ids
    dense = cka_result.dense_ids
    first_gap = next((p for p, (a, b) in enumerate(zip(ids, dense)) if a != b), len(ids))
    after = list(range(first_gap, len(ids)))
    below = [best[p] < ids[p] for p in after]
    share = float(np.mean(below)) if below else None
    ok = float(np.mean(hid)) >= cfg.cka_high and share is not None and share > 0.5
    return Finding(5, st, crit, verdict(ok, None, cfg),
                   numbers={"mean_best_hidden_cka": float(np.mean(hid)), "share_decision_below_diagonal": share,
                            "pruned_layers": len(ids), "final_decision_best_match": best[-1]},
                   figure="cka_best_match.png")


def claim_noise(noise_result, cfg: FindingsConfig, analysis=None) -> Finding:
    """Claim 6: noise hurts the Silent Phase more than the Decisive Phase at equal scale.

    ``analysis``: the dense analysis of the same rows (its gold labels and clean final-layer scores
    let the rows be resampled); without it the verdict rests on the point estimate.
    """
    st = "noise hurts the Silent Phase more than the Decisive Phase at equal scale"
    crit = ("at every non-zero scale the mean drop of the final DM is larger for noise in Silent-Phase layers than in "
            "Decisive-Phase layers; interval: bootstrap over rows of the difference at the largest scale")
    if noise_result is None:
        return untestable(6, st, crit, "no noise result")
    ps = noise_result.phase_summary()
    if not ps["silent"]["layers"] or not ps["decisive"]["layers"]:
        return untestable(6, st, crit, "the perturbed layers do not cover both phases")
    scales = list(noise_result.scales)
    nz = [i for i, a in enumerate(scales) if a > 0]
    sd, dd = np.array(ps["silent"]["dm_drop"]), np.array(ps["decisive"]["dm_drop"])
    ok = bool(nz) and all(sd[i] > dd[i] for i in nz)
    sup, ci = None, None
    sc = np.asarray(noise_result.scores)
    if analysis is not None and nz and sc.ndim == 5 and sc.shape[3] == len(analysis.scores.gold):
        sup, ci = _noise_bootstrap(noise_result, nz[-1], analysis, cfg)
    return Finding(6, st, crit, verdict(ok, sup, cfg),
                   numbers={"scales": scales, "silent_dm_drop": sd.tolist(), "decisive_dm_drop": dd.tolist()},
                   ci={"drop_difference_at_largest_scale": ci} if ci else {}, support=sup, figure="noise_phases.png")


def _noise_bootstrap(res, s: int, analysis, cfg: FindingsConfig) -> tuple[float, list[float] | None]:
    """Support and interval of (silent drop - decisive drop) at scale index ``s``, rows resampled."""
    from ..metrics import margins

    gold = np.asarray(analysis.scores.gold)
    clean = margins(analysis.scores.scores[-1:], gold)[0]  # [N]
    sc = np.asarray(res.scores)[:, :, s]  # [R, P, N, K]
    m = np.stack([margins(sc[r], gold) for r in range(sc.shape[0])]).mean(axis=0)  # [P, N]
    silent = np.array([res.phase_of(lid) == "silent" for lid in res.layer_ids])
    diffs = []
    for idx in bootstrap_rows(m.shape[1], cfg):
        drop = clean[idx].mean() - m[:, idx].mean(axis=1)
        diffs.append(drop[silent].mean() - drop[~silent].mean())
    diffs = np.array(diffs)
    return float(np.mean(diffs > 0)), interval(diffs)


def claim_ablation(ablation_result, cfg: FindingsConfig) -> Finding:
    """Claim 7: ablating the pair just before the Transition Point hurts most (Table 1's asymmetry)."""
    st = "ablating the pair just before the Transition Point hurts most, and the late Silent-Phase layer more than the early Decisive one"
    crit = ("averaged over the evaluated tasks, removing the pair (TP-1, TP) gives the lowest accuracy of all ablated pairs, "
            "and removing layer TP-1 costs more accuracy than removing layer TP+1")
    if ablation_result is None:
        return untestable(7, st, crit, "no ablation result")
    tp = ablation_result.transition_layer
    avg = ablation_average(ablation_result)
    pair, before, after = (tp - 1, tp), (tp - 1,), (tp + 1,)
    if pair not in avg or before not in avg or after not in avg:
        return untestable(7, st, crit, f"the ablation did not include {pair}, {before} and {after}")
    pairs = {k: v for k, v in avg.items() if len(k) == 2}
    worst = min(pairs, key=pairs.get)
    ok = worst == pair and avg[before] < avg[after]
    return Finding(7, st, crit, verdict(ok, None, cfg),
                   numbers={"transition_layer": tp, "mean_accuracy": {",".join(map(str, k)): v for k, v in avg.items()},
                            "worst_pair": list(worst)}, figure="ablate.png")


def ablation_average(ablation_result) -> dict[tuple[int, ...], float]:
    """Removed set -> accuracy averaged over the tasks and formats of an ablation."""
    ev = ablation_result.eval
    by: dict[tuple[int, ...], list[float]] = {}
    for config in ev.configs:
        label = config_label(config)
        accs = [ev.cells[(t, f, label)]["final_accuracy"] for t in ev.tasks for f in ev.formats if (t, f, label) in ev.cells]
        if config and accs:
            by[tuple(sorted(int(i) for i in config))] = accs
    return {k: float(np.mean(v)) for k, v in by.items()}


def claim_recovery(recovery_result, cfg: FindingsConfig) -> Finding:
    """Claim 8: fine-tuning restores the Decision Margin only partially, less at deeper pruning."""
    st = "fine-tuning restores the Decision Margin only partially, and less at deeper pruning"
    crit = ("for every recovered ratio the final DM after fine-tuning lies between the pruned (before) and the dense "
            "value, and the restored share (after - before) / (dense - before) is smaller at the deepest ratio than at the shallowest")
    if recovery_result is None or not recovery_result.runs:
        return untestable(8, st, crit, "no recovery result")
    block = recovery_result.dense or {}
    dense = block.get("summary", block).get("final_dm")  # the dense block is an analysis: its summary holds final_dm
    if dense is None:
        return untestable(8, st, crit, "the recovery run has no dense reference")
    runs = sorted(recovery_result.runs, key=lambda r: r.ratio)
    shares = []
    for r in runs:
        b, a = r.before["final_dm"], r.after["final_dm"]
        shares.append(None if dense == b else (a - b) / (dense - b))
    partial = all(s is not None and s < 1 for s in shares)
    deeper_less = len(runs) >= 2 and shares[0] is not None and shares[-1] is not None and shares[-1] < shares[0]
    return Finding(8, st, crit, verdict(partial and deeper_less, None, cfg),
                   numbers={"ratios": [r.ratio for r in runs], "restored_share": shares, "dense_final_dm": dense,
                            "dm_before": [r.before["final_dm"] for r in runs], "dm_after": [r.after["final_dm"] for r in runs]},
                   figure="recover_dm.png")


def claim_correlation(correlation_result, cfg: FindingsConfig, tps: ResampledTPs | None = None) -> Finding:
    """Claim 9: across model/task pairs, the Transition Point correlates negatively with the critical ratio.

    With four pairs or more, the correlation must also keep its sign with any one pair left out: a
    negative r carried by a single pair (a model that "decides" at layer 0, say) is not a trend. The
    Transition Points are resampled over each pair's rows (bootstrap; the critical ratios, one pruning run
    each, are held fixed): the interval of r and the support come from the resamples (``tps``: those resamples,
    computed once for claim 9 and the safe margin; None: drawn here)."""
    st = "across model/task pairs, the Transition Point correlates negatively with the critical pruning ratio"
    crit = (f"Pearson r < 0 with p < {cfg.alpha} between the Transition Point (share of depth) and the critical ratio, "
            "and (with >= 4 pairs) r < 0 with any one pair left out")
    if correlation_result is None:
        return untestable(9, st, crit, "no correlation result (needs >= 3 analysed and pruned model/task pairs)")
    stat = correlation_result.stats.get("fraction") or {}
    r, p, n = stat.get("r"), stat.get("p"), stat.get("n", len(correlation_result.pairs))
    if r is None:
        return untestable(9, st, crit, "the correlation could not be computed")
    numbers = {"pearson_r": r, "p_value": p, "pairs": n}
    pairs, labels = correlation_result.pairs, correlation_result.labels()
    ok, point = _correlation_test([q.transition_fraction for q in pairs], [q.critical_ratio for q in pairs], cfg)
    notes = []
    loo = point["r_leaving_out"]
    if loo is not None:
        numbers["r_leaving_out"] = dict(zip(labels, loo))
        worst = max(range(len(loo)), key=lambda i: math.inf if loo[i] is None else loo[i])
        notes.append(f"r with one pair left out ranges up to "
                     f"{'undefined' if loo[worst] is None else format(loo[worst], '+.3f')} (leaving out {labels[worst]})")
    rs = _over_resampled_tps(correlation_result, cfg, lambda x, y: _correlation_test(x, y, cfg), ("r",), tps=tps)
    numbers.update(rs.numbers)
    return Finding(9, st, crit, verdict(ok, rs.support, cfg), numbers=numbers,
                   ci={"pearson_r": rs.ci["r"]} if rs.ci else {}, support=rs.support, figure="correlation.png",
                   note="; ".join(notes + rs.notes))


def _correlation_test(x: Sequence[float], y: Sequence[float], cfg: FindingsConfig) -> tuple[bool, dict]:
    """Claim 9's criterion on one set of pairs: whether it is met, and ``r``, ``p`` and ``r_leaving_out`` (r
    without each pair, with four pairs or more; else None)."""
    from .correlation import pearson

    st = pearson(list(x), list(y))
    r, p = st["r"], st["p"]
    loo = None
    if r is not None and len(x) >= 4:  # None when one side is constant
        loo = [pearson([v for j, v in enumerate(x) if j != i], [v for j, v in enumerate(y) if j != i])["r"]
               for i in range(len(x))]
    ok = (r is not None and r < 0 and p is not None and p < cfg.alpha
          and (loo is None or all(v is not None and v < 0 for v in loo)))
    return bool(ok), {"r": r, "p": p, "r_leaving_out": loo}


@dataclass
class _Resampled:
    """A criterion over resampled Transition Points: support, intervals and what the finding should say."""

    support: float | None = None
    ci: dict = field(default_factory=dict)
    numbers: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def _over_resampled_tps(correlation_result, cfg: FindingsConfig, test: Callable, keys: Sequence[str],
                        decisive: bool = False, tps: ResampledTPs | None = None) -> _Resampled:
    """``test(x, y) -> (meets, stats)`` on every bootstrap resample of the pairs' Transition Points (x: each TP as
    a share of depth, or the Decisive Phase's share with ``decisive``; y: the critical ratios, fixed): the
    share of resamples that meet it, and percentile intervals of ``stats[k]`` for ``keys``. A pair without a TP
    in a resample is left out of it (fewer than 3 pairs left: not met)."""
    pairs, labels = correlation_result.pairs, correlation_result.labels()
    y = [q.critical_ratio for q in pairs]
    tps = tps or resample_tps(correlation_result, cfg)
    fractions, fixed = tps.fractions, tps.fixed
    out = _Resampled()
    if fixed:
        out.notes.append(f"Transition Point held fixed (no per-row scores to resample) for: {', '.join(fixed)}")
    if len(fixed) == len(pairs):
        return out
    boots = []
    for b in range(cfg.bootstrap):
        keep = [i for i in range(len(pairs)) if fractions[i][b] is not None]
        x = [1 - fractions[i][b] if decisive else fractions[i][b] for i in keep]
        boots.append(test(x, [y[i] for i in keep]) if len(keep) >= 3 else (False, {}))
    out.support = float(np.mean([ok for ok, _ in boots]))
    out.ci = {k: interval([st.get(k) for _, st in boots]) for k in keys}
    lost = {labels[i]: float(np.mean([f is None for f in fr])) for i, fr in enumerate(fractions) if None in fr}
    if lost:
        out.numbers["share_of_resamples_without_tp"] = lost
        out.notes.append("a resample where a pair has no Transition Point leaves that pair out")
    return out


@dataclass
class ResampledTPs:
    """The pairs' Transition Points over bootstrap resamples of their rows (see :func:`resample_tps`).

    Attributes:
        fractions: per pair, ``bootstrap`` TPs as shares of depth (None: no TP in that resample).
        fixed: labels of the pairs whose TP is held fixed (a TP from a prune record, or an analysis folder no
            longer found).
    """

    fractions: list[list[float | None]]
    fixed: list[str]


def resample_tps(correlation_result, cfg: FindingsConfig) -> ResampledTPs:
    """Per pair, ``cfg.bootstrap`` Transition Points, each from a resample of the rows of the analysis the pair
    took its TP from (independent draws per pair, seeded)."""
    from ..errors import DeclensError
    from ..results import load_result

    pairs, labels = correlation_result.pairs, correlation_result.labels()
    out, fixed = [], []
    for i, q in enumerate(pairs):
        a = None
        if q.tp_kind == "analysis":
            try:
                a = load_result(Path(q.tp_source).parent, kind="analysis")
            except (DeclensError, OSError):
                a = None
        if a is None:
            out.append([q.transition_fraction] * cfg.bootstrap)
            fixed.append(labels[i])
            continue
        s = a.scores
        rng = np.random.default_rng([cfg.seed, i])  # each pair its own draws
        fr = []
        for idx in rng.integers(0, s.scores.shape[1], size=(cfg.bootstrap, s.scores.shape[1])):
            mm = _metrics(s.scores[:, idx], s.gold[idx], s.n_options[idx], s.layer_ids)
            t = mm.transition_index
            fr.append(None if t is None else mm.layer_ids[t] / q.num_layers)
        out.append(fr)
    return ResampledTPs(out, fixed)


#: the baselines claim 10 names (the paper's Table 5)
TABLE5_BASELINES = ("shortgpt", "sleb", "mka")


def claim_table5(compare_table: dict | None, cfg: FindingsConfig, complete: bool = True) -> Finding:
    """Claim 10: after fine-tuning, Iterative Pruning beats ShortGPT, SLEB and MKA (Table 5).

    ``compare_table``: ``{ratio: {method: average accuracy after fine-tuning}}``; ``complete``: False for a
    comparison stopped before its end (see :func:`~declens.analyses.compare.compare_averages`). IP losing
    to any method at any ratio fails the claim whatever is missing; it holds only when ShortGPT, SLEB and
    MKA were all compared at every ratio of the table and IP is strictly ahead of each.
    """
    st = "after fine-tuning, Iterative Pruning beats ShortGPT, SLEB and MKA (Table 5)"
    crit = ("at every compared ratio, IP's post-fine-tuning average accuracy over the tasks is strictly the highest, "
            "with ShortGPT, SLEB and MKA all compared")
    if not compare_table:
        return untestable(10, st, crit, "no comparison table")
    avg = {r: m for r, m in compare_table.items() if "ip" in m and len(m) > 1}
    if not avg:
        return untestable(10, st, crit, "the comparison has no IP row beside another method")
    beaten_by = {r: sorted(k for k, v in m.items() if k != "ip" and v >= m["ip"]) for r, m in avg.items()}
    missing = {r: [b for b in TABLE5_BASELINES if b not in m] for r, m in avg.items()}
    missing = {r: v for r, v in missing.items() if v}
    numbers = {"average_accuracy": compare_table, "ip_best": {r: not b for r, b in beaten_by.items()},
               "ip_beaten_by": beaten_by, "missing": missing, "complete": complete}
    note = "" if complete else "partial comparison: the run was stopped before its end (finished cells only)"
    if any(beaten_by.values()):
        return Finding(10, st, crit, FAILS, numbers=numbers, figure="compare.png", note=note)
    if missing or not complete:
        why = f"IP leads, but {', '.join(f'{m} at {r:g}' for r, ms in missing.items() for m in ms)} not compared" \
            if missing else "IP leads in the finished cells of a stopped comparison"
        return Finding(10, st, crit, UNTESTABLE, numbers=numbers, figure="compare.png",
                       note="; ".join(x for x in (note, why) if x))
    return Finding(10, st, crit, HOLDS, numbers=numbers, figure="compare.png")


def spearman_pearson(x: Sequence[float], y: Sequence[float]) -> dict:
    """Pearson and Spearman correlations with p-values (scipy)."""
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or len(set(x.tolist())) < 2 or len(set(y.tolist())) < 2:  # undefined for a constant input
        return {"n": len(x), "pearson_r": None, "pearson_p": None, "spearman_rho": None, "spearman_p": None}
    pr = stats.pearsonr(x, y)
    sr = stats.spearmanr(x, y)
    return {"n": len(x), "pearson_r": float(pr[0]), "pearson_p": float(pr[1]),
            "spearman_rho": float(sr[0]), "spearman_p": float(sr[1])}


@register_result("findings", "findings.json", "findings")
@dataclass
class Findings:
    """All findings of one or more study folders."""

    config: dict
    findings: list[Finding]
    SCHEMA_VERSION = 1  #: of ``findings.json`` (see :func:`declens.results.register_result`)

    @classmethod
    def load(cls, path) -> "Findings":
        """Read a folder written by ``declens findings`` (verified against its manifest)."""
        d = read_result_file(path, "findings.json", "findings")[1]
        return cls(config=d["config"], findings=[Finding(**f) for f in d["findings"]])

    def table(self) -> list[dict]:
        return [{"claim": f.claim, "verdict": f.verdict, "statement": f.statement} for f in self.findings]

    def to_dict(self) -> dict:
        return {"kind": "findings", "config": self.config, "findings": [f.to_dict() for f in self.findings]}

    def html(self) -> str:
        """The verdict table as an HTML section (for the study's report page)."""
        from html import escape

        rows = "".join(f"<tr><td>{escape(str(f.claim))}</td><td>{escape(f.statement)}</td><td><b>{escape(f.verdict)}</b></td>"
                       f"<td>{'-' if f.support is None else format(f.support, '.0%')}</td>"
                       f"<td>{escape(f.source)}</td></tr>" for f in self.findings)
        return ('<section id="findings"><h2>Findings: the paper\'s claims</h2><table><tr><th>#</th><th>claim</th>'
                f"<th>verdict</th><th>bootstrap support</th><th>from</th></tr>{rows}</table>"
                '<p class="small">Criteria: docs/METHOD.md, "Findings: the criteria"; numbers and intervals: '
                "findings.md / findings.json beside this page.</p></section>")

    def markdown(self) -> str:
        """The verdict table, then each claim's criterion, numbers and intervals."""
        out = ["| # | claim | verdict | support | from |", "|---|---|---|---|---|"]
        for f in self.findings:
            sup = "-" if f.support is None else f"{f.support:.0%}"
            out.append(f"| {f.claim} | {f.statement} | **{f.verdict}** | {sup} | {f.source or 'all studies'} |")
        for f in self.findings:
            where = f" ({f.source})" if f.source else ""
            out += ["", f"### Claim {f.claim}{where}: {f.verdict}", "", f"*Criterion:* {f.criterion}", ""]
            if f.numbers:
                out.append("*Measured:* " + "; ".join(f"{k} = {_fmt(v)}" for k, v in f.numbers.items()))
            if f.ci:
                out.append("")
                out.append("*95% intervals (bootstrap over rows):* " + "; ".join(f"{k} {_fmt(v)}" for k, v in f.ci.items()))
            if f.note:
                out += ["", f"*Note:* {f.note}"]
        return "\n".join(out) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


# ------------------------------------------------------------------------------------------------
# declens' own ideas beyond the paper


def idea_safe_margin(correlation_result, cfg: FindingsConfig, tps: ResampledTPs | None = None) -> Finding:
    """The safe-margin estimate (Decisive Phase's share of depth, one dense pass) as a predictor of the critical ratio."""
    st = "the safe-margin estimate (the Decisive Phase's share of depth) predicts the critical pruning ratio"
    crit = (f"Pearson r > 0 and Spearman rho > 0, both with p < {cfg.alpha}, between the Decisive Phase's share of depth "
            "and the measured critical ratio across model/task pairs (the mean absolute error is reported)")
    if correlation_result is None or len(correlation_result.pairs) < 3:
        return untestable("safe margin", st, crit, "fewer than 3 model/task pairs with a Transition Point and a critical ratio")
    x = [p.decisive_fraction for p in correlation_result.pairs]
    y = [p.critical_ratio for p in correlation_result.pairs]

    def test(x, y) -> tuple[bool, dict]:
        s = spearman_pearson(x, y)
        ok = (s["pearson_r"] is not None and s["pearson_r"] > 0
              and s["pearson_p"] < cfg.alpha and s["spearman_rho"] > 0 and s["spearman_p"] < cfg.alpha)
        return bool(ok), s

    ok, s = test(x, y)
    s["mean_abs_error"] = float(np.mean(np.abs(np.subtract(x, y))))
    # as claim 9: each pair's TP (so its Decisive Phase's share) resampled over its rows, critical ratios fixed
    rs = _over_resampled_tps(correlation_result, cfg, test, ("pearson_r", "spearman_rho"), decisive=True, tps=tps)
    return Finding("safe margin", st, crit, verdict(ok, rs.support, cfg), numbers={**s, **rs.numbers}, ci=rs.ci,
                   support=rs.support, figure="safe_margin.png", note="; ".join(rs.notes))


def idea_phase_aware(prune_results: Sequence, cfg: FindingsConfig) -> Finding:
    """Phase-aware pruning against IP and the baselines at equal ratios."""
    st = "phase-aware pruning (only inside the Decisive Phase) keeps more accuracy than IP and the baselines at equal ratios"
    crit = ("averaged over every ratio both methods reached, phase-aware pruning's best-state accuracy is at least each "
            "other method's (per method: mean difference phase - method over shared ratios)")
    # keyed by (run, ratio): a method is only ever compared with another on the same task and rows
    best: dict[str, dict[tuple[str, float], float]] = {}
    for pr in prune_results:
        if pr is None:
            continue
        c = getattr(pr, "config", None) or {}
        run_key = "|".join(str(c.get(f)) for f in ("model", "task", "format", "split", "limit", "seed"))
        for m, run in pr.runs.items():
            for k, rec in run.best_by_k().items():
                # a phase-aware step taken with no Decisive Phase left falls back to plain IP: not phase-aware
                if k > 0 and not (m == "phase" and "decisive phase empty" in (rec.note or "")):
                    best.setdefault(m, {})[(run_key, round(rec.ratio, 6))] = rec.final_accuracy
    if "phase" not in best:
        return untestable("phase-aware", st, crit, "no phase-aware pruning state (no 'phase' run, or every step fell "
                          "back to plain IP because the model had no Decisive Phase)")
    diffs = {}
    for m, accs in best.items():
        if m == "phase":
            continue
        shared = sorted(set(accs) & set(best["phase"]))
        if shared:
            diffs[m] = {"mean_difference": float(np.mean([best["phase"][r] - accs[r] for r in shared])),
                        "ratios": len(shared)}
    if not diffs:
        return untestable("phase-aware", st, crit, "no other method reached the same ratios")
    ok = all(d["mean_difference"] >= 0 for d in diffs.values())
    return Finding("phase-aware", st, crit, verdict(ok, None, cfg), numbers=diffs, figure="accuracy_vs_ratio.png")
