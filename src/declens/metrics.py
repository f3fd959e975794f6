"""Decision metrics per layer (pure numpy): Decision Margin, accuracy, Option Frequency, KL,
Transition Point and the Silent / Decisive phases.

All functions take ``scores`` of shape ``[L, N, K]`` (layers x items x options) with NaN for
options an item does not have, and ``gold`` of shape ``[N]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Added to the gold-label distribution before the KL divergence so that a predicted option no
#: gold label uses gives a large finite value instead of infinity.
KL_EPS = 1e-6


def _masked(scores: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(scores), -np.inf, scores)


def margins(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Per-item Decision Margin ``z(gold) - max_{k != gold} z(k)``: ``[L, N]`` (Eq. 1 before the mean)."""
    s = _masked(np.asarray(scores, dtype=np.float64))
    gold = np.asarray(gold)
    n = np.arange(s.shape[1])
    z_gold = s[:, n, gold]
    others = s.copy()
    others[:, n, gold] = -np.inf
    return z_gold - others.max(axis=-1)


def predictions(scores: np.ndarray) -> np.ndarray:
    """Predicted option per layer and item (``argmax_k``, first index on ties): ``[L, N]``."""
    return np.argmax(_masked(np.asarray(scores, dtype=np.float64)), axis=-1)


def option_frequency(preds: np.ndarray, k: int) -> np.ndarray:
    """Option Frequency (Eq. 2): share of items predicting each option, ``[L, K]``."""
    L, N = preds.shape
    of = np.zeros((L, k))
    for opt in range(k):
        of[:, opt] = (preds == opt).mean(axis=1)
    return of


def gold_distribution(gold: np.ndarray, k: int) -> np.ndarray:
    """Share of items whose gold option is each option: ``[K]``."""
    return np.bincount(np.asarray(gold), minlength=k)[:k] / len(gold)


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = KL_EPS) -> np.ndarray:
    """``KL(p || q)`` in nats along the last axis, with ``q`` smoothed by ``eps`` (renormalised)."""
    q = (np.asarray(q, dtype=np.float64) + eps)
    q = q / q.sum(axis=-1, keepdims=True)
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q), 0.0)
    return terms.sum(axis=-1)


def transition_point(dm: np.ndarray) -> int | None:
    """Index of the first layer from which the mean Decision Margin stays positive.

    ``None`` when the last layer's DM is not positive (the model never decides). Returned as a
    position in ``dm`` (map it through the layer ids for a pruned model).
    """
    dm = np.asarray(dm)
    positive = dm > 0
    if not positive[-1]:
        return None
    neg = np.flatnonzero(~positive)
    return int(neg[-1] + 1) if len(neg) else 0


@dataclass
class LayerMetrics:
    """Decision metrics of one model on one task, per layer.

    Attributes:
        layer_ids: original ids of the layers, in running order.
        dm: ``[L]`` mean Decision Margin.
        dm_std: ``[L]`` its standard deviation across items.
        dm_median, dm_q25, dm_q75: ``[L]`` quartiles of the per-item margins.
        acc: ``[L]`` accuracy of the lens argmax.
        acc_norm: ``[L]`` accuracy with length-normalised scores (cloze only).
        option_frequency: ``[L, K]`` Option Frequency.
        gold_frequency: ``[K]`` gold-label distribution.
        kl: ``[L]`` KL(OF || gold distribution), nats.
        transition_index: position (in ``layer_ids``) of the Transition Point, or None.
        chance: expected accuracy of a uniform guess.
    """

    layer_ids: list[int]
    dm: np.ndarray
    dm_std: np.ndarray
    dm_median: np.ndarray
    dm_q25: np.ndarray
    dm_q75: np.ndarray
    acc: np.ndarray
    option_frequency: np.ndarray
    gold_frequency: np.ndarray
    kl: np.ndarray
    transition_index: int | None
    chance: float
    acc_norm: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def transition_layer(self) -> int | None:
        """Original id of the Transition Point layer, or None."""
        return None if self.transition_index is None else self.layer_ids[self.transition_index]

    @property
    def silent_layers(self) -> list[int]:
        """Original ids of the Silent Phase (before the Transition Point; every layer if none)."""
        t = len(self.layer_ids) if self.transition_index is None else self.transition_index
        return self.layer_ids[:t]

    @property
    def decisive_layers(self) -> list[int]:
        """Original ids of the Decisive Phase (from the Transition Point on)."""
        return [] if self.transition_index is None else self.layer_ids[self.transition_index :]

    @property
    def final_acc(self) -> float:
        return float(self.acc[-1])

    @property
    def final_dm(self) -> float:
        return float(self.dm[-1])

    def summary(self) -> dict:
        """Headline numbers (JSON-ready)."""
        L = len(self.layer_ids)
        out = {
            "num_layers": L,
            "final_accuracy": self.final_acc,
            "final_dm": self.final_dm,
            "chance": self.chance,
            "transition_layer": self.transition_layer,
            "transition_fraction": None if self.transition_index is None else self.transition_index / L,
            "silent_phase": _span(self.silent_layers),
            "decisive_phase": _span(self.decisive_layers),
            "decisive_fraction": len(self.decisive_layers) / L,
            "final_kl": float(self.kl[-1]),
        }
        if self.acc_norm is not None:
            out["final_accuracy_norm"] = float(self.acc_norm[-1])
        return out


def _span(ids: list[int]) -> list[int] | None:
    return [ids[0], ids[-1]] if ids else None


def compute_metrics(scores: np.ndarray, gold: np.ndarray, layer_ids: list[int], n_options: np.ndarray,
                    norm_scores: np.ndarray | None = None) -> LayerMetrics:
    """All per-layer decision metrics from ``[L, N, K]`` option scores."""
    L, N, K = scores.shape
    gold = np.asarray(gold)
    m = margins(scores, gold)
    preds = predictions(scores)
    of = option_frequency(preds, K)
    gd = gold_distribution(gold, K)
    dm = m.mean(axis=1)
    acc_norm = None
    if norm_scores is not None:
        acc_norm = (predictions(norm_scores) == gold[None]).mean(axis=1)
    return LayerMetrics(
        layer_ids=list(layer_ids), dm=dm, dm_std=m.std(axis=1), dm_median=np.median(m, axis=1),
        dm_q25=np.percentile(m, 25, axis=1), dm_q75=np.percentile(m, 75, axis=1),
        acc=(preds == gold[None]).mean(axis=1), option_frequency=of, gold_frequency=gd,
        kl=kl_divergence(of, gd[None]), transition_index=transition_point(dm),
        chance=float(np.mean(1.0 / np.asarray(n_options))), acc_norm=acc_norm,
    )


def readout_summary(scores: np.ndarray, gold: np.ndarray, n_options: np.ndarray, layer_id: int,
                    norm_scores: np.ndarray | None = None) -> dict:
    """Decision metrics of one read-out outside the layer stack (the embedding output, see
    :data:`declens.lens.EMBEDDING_ID`), JSON-ready: it takes no part in the Transition Point or phases.

    Args:
        scores: ``[N, K]`` option scores of the read-out (NaN for absent options).
        gold: ``[N]``; n_options: ``[N]``.
        layer_id: its id; norm_scores: cloze ``[N, K]`` per-character scores (for ``accuracy_norm``).

    Returns:
        ``layer``, ``dm``, ``dm_q25``, ``dm_q75``, ``accuracy`` (``accuracy_norm``), ``kl`` and ``option_frequency``.
    """
    m = compute_metrics(np.asarray(scores)[None], gold, [layer_id], n_options,
                        norm_scores=None if norm_scores is None else np.asarray(norm_scores)[None])
    out = {"layer": int(layer_id), "dm": float(m.dm[0]), "dm_q25": float(m.dm_q25[0]), "dm_q75": float(m.dm_q75[0]),
           "accuracy": float(m.acc[0]), "kl": float(m.kl[0]),
           "option_frequency": [float(v) for v in m.option_frequency[0]]}
    if m.acc_norm is not None:
        out["accuracy_norm"] = float(m.acc_norm[0])
    return out
