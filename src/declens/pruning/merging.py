"""Layer-merging baselines: LaCo (Yang et al. 2024) and MKA (Liu et al. 2024).

Both shrink a model by folding layers into a kept *host* layer, so a merged model has new weights.
Every merged layer's weights are a linear combination of the dense model's layers' weights::

    theta_host = sum_j c_j theta_j        (c: the host's coefficients over dense layer ids)

which :class:`MergeSpec` records (dense ids removed, and each host's coefficients). A merged state
is evaluated as a *view* (:func:`merged_view`): the host's module in the decoder's layer list is
swapped for a copy holding the combined attention and MLP weights (only those layers are new
tensors, no model copy), and the absorbed layers are dropped with the usual layer view. The
pruning engine reuses the dense prefix up to the first changed layer.

- **LaCo** (Reserving-Differences-while-Seeking-Common, RDSC): ``theta*_l = theta_l + sum_{k=1..m}
  (theta_{l+k} - theta_l)`` for the ``m = C - 1`` layers after ``l``, which are removed; the merge is
  kept when the mean cosine similarity between the merged and the dense model's final hidden states
  on a few calibration sentences exceeds ``T``. The walk starts at ``l = H - C`` and moves down: by
  ``I`` after a kept merge, by one after a rejected one, until ``l < L`` (or the target ratio is reached).
- **MKA**: every layer's output activations on calibration rows are embedded with a diffusion map;
  the similarity of two layers is the normalised mutual information of their embeddings (the
  normalised pairwise information bottleneck, NPIB); the most similar adjacent pair ``(a, b)`` is
  merged into ``a`` as ``theta = lambda theta_a + (1 - lambda) theta_b`` with ``lambda = S_ab``,
  and ``b`` is removed; repeated (activations and similarities re-measured on the merged model) for
  the number of layers to remove.

Parameters merged: every parameter of the attention block (``self_attn``) and of the MLP (``mlp``),
biases and per-head q/k norms included; the layer norms around them stay the host's
(``norms="host"``, as in both authors' code) or follow the same combination (``norms="merge"``).
See docs/METHOD.md ("Layer merging: LaCo and MKA").
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import DeclensError
from ..models import DecoderParts
from ..runner import Batch, LayerStates, collate, forward, plan_batches, run_from, split_on_oom
from ..surgery import dense_layer_ids, keep_positions, suffix_to_run
from .influence import InfluenceProbe
from .methods import Memo, MethodRun, PruneRecord, register_method

MERGE_METHODS = ("laco", "mka")
#: config attribute of an exported merged model: which layer absorbed which (dense ids) and how
MERGES_ATTR = "declens_merges"
_BLOCKS = ("self_attn", "mlp")
NORMS = ("host", "merge")


# ------------------------------------------------------------------------------------------------
# Merge specification and the merged view


@dataclass
class MergeSpec:
    """A merged model relative to its dense model.

    Attributes:
        removed: dense ids of the layers folded into others, in removal order.
        groups: host dense id -> ``{dense id: coefficient}``; the host's attention and MLP weights
            are ``sum_j c_j theta_j``. Hosts not listed keep their own weights.
        norms: ``host`` (the host's layer norms) or ``merge`` (norms combined like the other weights).
    """

    removed: list[int] = field(default_factory=list)
    groups: dict[int, dict[int, float]] = field(default_factory=dict)
    norms: str = "host"

    def __post_init__(self) -> None:
        if self.norms not in NORMS:
            raise DeclensError(f"unknown norms rule {self.norms!r}; use one of {', '.join(NORMS)}")
        gone = set(self.removed) & set(self.groups)
        if gone:
            raise DeclensError(f"merge hosts {sorted(gone)} are also listed as removed; a host must stay in the model")

    def changed(self) -> list[int]:
        """Dense ids of the hosts whose weights differ from their own (identity groups left out)."""
        return sorted(h for h, c in self.groups.items() if c != {h: 1.0})

    def key(self) -> str:
        """A stable text key of the merged weights (the evaluation cache key)."""
        g = ";".join(f"{h}=" + ",".join(f"{j}:{c!r}" for j, c in sorted(self.groups[h].items()))
                     for h in self.changed())
        return f"merge[{self.norms}]:{','.join(map(str, sorted(self.removed)))}|{g}"

    def to_list(self) -> list[dict]:
        """JSON form: one entry per changed host, ``{"layer", "absorbed", "coefficients", "norms"}`` (dense ids)."""
        return [{"layer": h, "absorbed": sorted(j for j in self.groups[h] if j != h),
                 "coefficients": {str(j): float(c) for j, c in sorted(self.groups[h].items())}, "norms": self.norms}
                for h in self.changed()]

    @classmethod
    def from_list(cls, items: Sequence[dict], removed: Sequence[int]) -> "MergeSpec":
        """Inverse of :meth:`to_list` (``removed``: every dense id the merged model lacks)."""
        norms = {d.get("norms", "host") for d in items} or {"host"}
        if len(norms) > 1:
            raise DeclensError(f"a merge mixes norm rules {sorted(norms)}; one rule per merged model")
        return cls(removed=[int(i) for i in removed],
                   groups={int(d["layer"]): {int(j): float(c) for j, c in d["coefficients"].items()} for d in items},
                   norms=norms.pop())


def merged_parameter_names(layer: nn.Module, norms: str = "host") -> list[str]:
    """Names of the parameters of a decoder layer that a merge combines.

    Raises:
        DeclensError: the layer has no ``self_attn`` / ``mlp`` block (an unsupported layout).
    """
    missing = [b for b in _BLOCKS if not isinstance(getattr(layer, b, None), nn.Module)]
    if missing:
        raise DeclensError(f"layer merging needs decoder layers with {' and '.join(_BLOCKS)} blocks; "
                           f"{type(layer).__name__} has no {', '.join(missing)}")
    names = [n for n, _ in layer.named_parameters()]
    if norms == "merge":
        return names
    return [n for n in names if n.split(".", 1)[0] in _BLOCKS]


def combine(layers: dict[int, nn.Module], host: int, coeffs: dict[int, float], norms: str = "host") -> nn.Module:
    """A new layer module: a copy of ``layers[host]`` whose merged parameters are ``sum_j c_j theta_j``.

    Args:
        layers: dense id -> the (unmerged) layer module of every layer the coefficients name.
        host: dense id of the layer whose module (norms, buffers, attributes) the copy starts from.
        coeffs: dense id -> coefficient.
        norms: see :class:`MergeSpec`.

    The sum runs in float32 and is rounded once to the parameter's dtype.
    """
    base = layers[host]
    new = copy.deepcopy(base)
    params = {n: [dict(layers[j].named_parameters())[n] for j in coeffs] for n in merged_parameter_names(base, norms)}
    cs = list(coeffs.values())
    with torch.no_grad():
        mine = dict(new.named_parameters())
        for n, srcs in params.items():
            acc = torch.zeros(srcs[0].shape, dtype=torch.float32, device=srcs[0].device)
            for c, p in zip(cs, srcs):
                acc.add_(p.detach().float(), alpha=float(c))
            mine[n].data = acc.to(srcs[0].dtype)
    new.requires_grad_(False)
    return new


def _merged_modules(parts: DecoderParts, spec: MergeSpec) -> dict[int, nn.Module]:
    """Position in the layer list -> the merged module of every changed host."""
    dense = dense_layer_ids(parts)
    pos = {d: p for p, d in enumerate(dense)}
    bad = sorted({j for c in spec.groups.values() for j in c} - set(pos))
    if bad or any(h not in pos for h in spec.groups):
        raise DeclensError(f"the merge names layer(s) {bad or sorted(set(spec.groups) - set(pos))} that this model "
                           f"does not have (its layers are {dense}); use the model the merge was computed on")
    by_id = {d: parts.layers[p] for d, p in pos.items()}
    return {pos[h]: combine(by_id, h, spec.groups[h], spec.norms) for h in spec.changed()}


@contextmanager
def merged_view(parts: DecoderParts, spec: MergeSpec) -> Iterator[DecoderParts]:
    """Run the model with every changed host's module swapped for its merged copy.

    Only the hosts' modules are new; the absorbed layers stay in the list (drop them with
    :func:`declens.surgery.layer_view` / ``keep_positions(parts, spec.removed)`` inside this view).
    Everything is restored on exit, also when the body raises.
    """
    layers = parts.layers
    new = _merged_modules(parts, spec)
    saved = {p: layers[p] for p in new}
    try:
        for p, mod in new.items():
            layers[p] = mod
        yield parts
    finally:
        for p, mod in saved.items():
            layers[p] = mod


def apply_merges(parts: DecoderParts, spec: MergeSpec) -> None:
    """Swap in the merged hosts permanently and record the merges in the config (for export).

    The absorbed layers are left in place: remove them with :func:`declens.surgery.remove_layers`.
    """
    for p, mod in _merged_modules(parts, spec).items():
        parts.layers[p] = mod
    previous = list(getattr(parts.config, MERGES_ATTR, None) or [])
    setattr(parts.config, MERGES_ATTR, previous + spec.to_list())


def rdsc(coeffs: Sequence[dict[int, float]]) -> dict[int, float]:
    """LaCo's RDSC merge of layers ``[l, l+1, ..., l+m]`` given as coefficient dicts:
    ``theta_l + sum_k (theta_{l+k} - theta_l) = (1 - m) theta_l + sum_k theta_{l+k}``."""
    m = len(coeffs) - 1
    return _lincomb([(1.0 - m, coeffs[0])] + [(1.0, c) for c in coeffs[1:]])


def lerp(a: dict[int, float], b: dict[int, float], lam: float) -> dict[int, float]:
    """MKA's fusion ``lambda theta_a + (1 - lambda) theta_b`` of two coefficient dicts."""
    return _lincomb([(lam, a), (1.0 - lam, b)])


def _lincomb(terms: Sequence[tuple[float, dict[int, float]]]) -> dict[int, float]:
    out: dict[int, float] = {}
    for w, c in terms:
        for j, v in c.items():
            out[j] = out.get(j, 0.0) + w * v
    return {j: v for j, v in sorted(out.items()) if v != 0.0}


# ------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class LacoConfig:
    """LaCo's search parameters (paper notation).

    Attributes:
        layers: ``C``, layers per merge: a merge folds the ``C - 1`` layers after ``l`` into ``l``.
        low: ``L``, the lowest layer that may host a merge (position in the current model).
        high: ``H``, the highest layer the walk starts under (None: the last layer); the first
            merge tried is at ``l = H - C``.
        interval: ``I``, how far the walk moves down after a kept merge.
        threshold: ``T``, a merge is kept when the mean cosine similarity of final hidden states
            with the dense model's exceeds it.
        samples: calibration sentences (the first rows of the run's calibration set).
    """

    layers: int = 4
    low: int = 1
    high: int | None = None
    interval: int = 2
    threshold: float = 0.65
    samples: int = 10


@dataclass
class MkaConfig:
    """MKA's parameters.

    Attributes:
        samples: calibration rows whose last-token layer outputs are embedded.
        dims: diffusion-map coordinates kept per layer.
        alpha: the diffusion map's density normalisation exponent (0: none, 0.5: Fokker-Planck, 1: Laplace-Beltrami).
        t: diffusion time (coordinates scaled by ``eigenvalue ** t``).
        bins: equal-frequency bins per coordinate for the mutual information (None: ``floor(sqrt(n / 5))``,
            at least 2, see :func:`npib`).
    """

    samples: int = 64
    dims: int = 2
    alpha: float = 0.5
    t: int = 1
    bins: int | None = None


@dataclass
class MergeConfig:
    """Settings of the merging methods (recorded in ``prune.json``)."""

    laco: LacoConfig = field(default_factory=LacoConfig)
    mka: MkaConfig = field(default_factory=MkaConfig)
    norms: str = "host"

    def validate(self) -> None:
        """Raise a one-line :class:`DeclensError` on a bad value (before any long work)."""
        c, m = self.laco, self.mka
        if self.norms not in NORMS:
            raise DeclensError(f"unknown --merge-norms {self.norms!r}; use one of {', '.join(NORMS)}")
        if c.layers < 2:
            raise DeclensError(f"LaCo's C (--laco-layers) must be at least 2 (a merge folds C-1 layers), got {c.layers}")
        if c.interval < 1 or c.low < 0:
            raise DeclensError(f"LaCo's I (--laco-interval) must be >= 1 and L >= 0, got I={c.interval}, L={c.low}")
        if not -1.0 <= c.threshold <= 1.0:
            raise DeclensError(f"LaCo's T (--laco-threshold) is a cosine similarity in [-1, 1], got {c.threshold}")
        if c.samples < 1 or m.samples < 4:
            raise DeclensError(f"merge calibration rows: LaCo needs >= 1, MKA >= 4 (got {c.samples}, {m.samples})")
        if m.dims < 1 or m.t < 0 or not 0.0 <= m.alpha <= 1.0 or (m.bins is not None and m.bins < 2):
            raise DeclensError("MKA: dims >= 1, t >= 0, alpha in [0, 1] and bins >= 2 are required")


# ------------------------------------------------------------------------------------------------
# Running merged states


class CalibRows:
    """A method's calibration rows, with the dense model's states cached for prefix reuse.

    A merged state runs its layers only from the first removed or changed layer on, starting from
    the dense input of that layer (the layers before it are the dense model's), as the engine does
    for the evaluation rows.

    Attributes:
        batches: the rows, batched (the same rows on every rank).
        inputs: ``[batch][position]`` -> ``[B, T, d]`` dense input of every layer (kept by
            :class:`~declens.runner.LayerStates`).
        finals: the dense model's final normalised hidden states per batch.
        last: dense id -> ``[n, d]`` float32 dense layer output at each row's last real token
            (rows in batch order).
    """

    def __init__(self, memo: Memo, n: int):
        eng = memo.engine
        if eng.calib is None:
            raise DeclensError("layer merging needs calibration rows; give --calib-samples > 0")
        self.parts = eng.parts
        self.reuse = eng.reuse
        rows = eng.calib.rows[:n]
        lengths = [len(r) for r in rows]
        plan = plan_batches(lengths, eng.max_tokens, batch_cost=eng.parts.options.batch_cost)
        self.batches, self.inputs, self.finals = [], [], []
        last = InfluenceProbe(keep_last=True)

        def run(idx: list[int]) -> None:  # a batch's states are kept only once it has run through
            b = collate(rows, idx, eng.pad, eng.device)
            cache = LayerStates("input")
            self.finals.append(forward(self.parts, b, [cache, last]))
            self.batches.append(b)
            self.inputs.append(cache.states)

        for idx in plan:
            split_on_oom(run, idx, lengths)  # out of memory: the batch runs as two (rows keep their order)
        self.last = {lid: torch.cat(hs).numpy() for lid, hs in last.last_states.items() if lid >= 0}

    def run(self, spec: MergeSpec, probes=()) -> tuple[list[torch.Tensor], list[int]]:
        """Run the merged state over the rows.

        Returns:
            the final normalised hidden states per batch, and the dense ids of the kept layers that
            did not run (those before the first changed layer; their states are the dense ones).
        """
        parts = self.parts
        s = suffix_to_run(parts, spec.removed, spec.changed(), reuse=self.reuse)
        with merged_view(parts, spec):
            finals = [run_from(parts, b, list(probes), None if s.start is None else self.inputs[j][s.start], s.run)
                      for j, b in enumerate(self.batches)]
        dense = dense_layer_ids(parts)
        return finals, [dense[p] for p in s.skipped]


def _flat_rows(finals: Sequence[torch.Tensor], batches: Sequence[Batch]) -> dict[int, torch.Tensor]:
    """Row index -> the row's real-token final states, flattened (``[T * d]``, float32)."""
    out = {}
    for fin, b in zip(finals, batches):
        for r in range(b.size):
            out[int(b.index[r])] = fin[r, : int(b.host_lengths[r])].float().reshape(-1)
    return out


def laco_similarity(dense: dict[int, torch.Tensor], merged: dict[int, torch.Tensor]) -> float:
    """LaCo's ``Avg_Cos_Sim``: the mean over sentences of the cosine similarity of the flattened
    final hidden states ``[T * d]`` of two models."""
    sims = [float(torch.nn.functional.cosine_similarity(dense[i], merged[i], dim=0)) for i in sorted(dense)]
    return float(np.mean(sims))


def record_state(memo: Memo, method: str, index: int, spec: MergeSpec, **kw) -> PruneRecord:
    """Evaluate a merged state through the engine (cached in the memo under its merge key) and
    return its record, with the merge map."""
    key = spec.key()
    have = memo.data.get(key)
    if have is None:
        eng = memo.engine
        with merged_view(eng.parts, spec):
            ev = eng.evaluate(spec.removed, scores=True, bi=False, changed=spec.changed())
        have = {"rec": PruneRecord.from_eval("", 0, ev, eng.num_layers, None).to_dict()}
        memo.data[key] = have
        if memo.on_new:
            memo.on_new()
    d = dict(have["rec"])
    d.update(method=method, index=index, removed=list(spec.removed), layer=None)
    rec = PruneRecord.from_dict(d)
    rec.merges = spec.to_list()
    for k, v in kw.items():
        setattr(rec, k, v)
    if memo.on_record:
        memo.on_record(rec)
    return rec


# ------------------------------------------------------------------------------------------------
# LaCo


def run_laco(memo: Memo, max_removed: int, cfg: LacoConfig, norms: str = "host") -> MethodRun:
    """LaCo's layer-collapse walk (see the module docstring), stopped once ``max_removed`` layers are
    folded (the last merge folds only as many layers as are left to reach it).

    One record per kept merge; ``candidates`` holds the similarity of every merge tried since the
    previous kept one (host dense id -> similarity).
    """
    eng = memo.engine
    eng.run_dense()
    L = eng.num_layers
    calib = CalibRows(memo, cfg.samples)
    dense = _flat_rows(calib.finals, calib.batches)
    run = MethodRun("laco", L)
    run.records.append(memo.record("laco", 0, [], None))
    current = list(eng.dense_ids)  # dense ids of the current model's layers, in order
    groups: dict[int, dict[int, float]] = {}
    removed: list[int] = []
    high = len(current) - 1 if cfg.high is None else min(cfg.high, len(current) - 1)
    C = cfg.layers
    l = high - C
    tried: dict[int, float] = {}
    while l >= cfg.low and len(removed) < max_removed:
        m = min(C - 1, len(current) - 1 - l, max_removed - len(removed))
        if m <= 0:
            l -= 1
            continue
        host, absorbed = current[l], current[l + 1 : l + 1 + m]
        merged = rdsc([groups.get(i, {i: 1.0}) for i in [host, *absorbed]])
        new_groups = {h: c for h, c in groups.items() if h not in absorbed}
        new_groups[host] = merged
        spec = MergeSpec(removed + absorbed, new_groups, norms)
        s = laco_similarity(dense, _flat_rows(calib.run(spec)[0], calib.batches))
        tried[host] = s
        if s > cfg.threshold:
            current = current[: l + 1] + current[l + 1 + m :]
            groups, removed = new_groups, spec.removed
            note = (f"RDSC: layers {absorbed} folded into {host}; similarity {s:.4f} > T={cfg.threshold}")
            run.records.append(record_state(memo, "laco", len(run.records), spec, candidates=dict(tried), note=note))
            tried = {}
            l -= cfg.interval
            if l >= len(current):
                l = len(current) - 1 - C
        else:
            l -= 1
    if len(removed) < max_removed:
        last = run.records[-1]
        last.note = (last.note + "; " if last.note else "") + (
            f"walk ended at {len(removed)} of {max_removed} layers: no further merge above T={cfg.threshold} "
            "(lower --laco-threshold to prune more)")
    return run


# ------------------------------------------------------------------------------------------------
# MKA


def diffusion_map(x: np.ndarray, dims: int = 2, alpha: float = 0.5, t: int = 1) -> np.ndarray:
    """Diffusion-map coordinates of the rows of ``x``.

    Args:
        x: ``[n, d]`` points (activations of one layer, one row per sample).
        dims: coordinates kept (the leading non-trivial eigenvectors).
        alpha: density normalisation ``K / (p_i p_j)^alpha`` with ``p`` the kernel's degrees.
        t: diffusion time.

    Returns:
        ``[n, dims]``: ``lambda_k^t psi_k`` for ``k = 1..dims``, with ``psi_k`` the right eigenvectors
        of the Markov matrix and the Gaussian kernel ``exp(-|x_i - x_j|^2 / eps)``, ``eps`` the median
        squared distance.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    off = d2[~np.eye(n, dtype=bool)]
    eps = float(np.median(off)) if off.size else 1.0
    if not eps > 0:
        eps = float(off.max()) if off.size and off.max() > 0 else 1.0
    k = np.exp(-d2 / eps)
    p = k.sum(1)
    k1 = k / np.outer(p, p) ** alpha
    v = np.sqrt(k1.sum(1))
    a = k1 / np.outer(v, v)  # symmetric conjugate of the Markov matrix D^-1 K1
    w, u = np.linalg.eigh(a)
    order = np.argsort(-w, kind="stable")
    w, u = w[order], u[:, order]
    psi = u / u[:, :1]  # right eigenvectors of the Markov matrix; psi_0 = 1
    keep = min(dims, n - 1)
    return psi[:, 1 : keep + 1] * (w[1 : keep + 1] ** t)[None, :]


def _quantile_bins(x: np.ndarray, bins: int) -> np.ndarray:
    """Equal-frequency bin of every value of a 1-D array (ties broken by position, deterministic)."""
    rank = np.empty(len(x), dtype=np.int64)
    rank[np.argsort(x, kind="stable")] = np.arange(len(x))
    return rank * bins // len(x)


def npib(a: np.ndarray, b: np.ndarray, bins: int | None = None) -> float:
    """Normalised pairwise information bottleneck similarity of two embeddings ``[n, da]``, ``[n, db]``.

    ``I(a; b) / sqrt(H(a) H(b))`` with every embedding coded as one discrete symbol per row: each
    coordinate cut into ``bins`` equal-frequency bins (default ``floor(sqrt(n / 5))``, at least 2:
    about five rows per bin of a coordinate), plug-in entropies. In [0, 1]; 1 for embeddings that
    determine each other (a layer compared with itself). Adjacent layers are nearly monotone images
    of each other, so coarse bins saturate at 1 and cannot rank them; these bins are as fine as a
    coordinate's rows allow (the plug-in MI is biased upwards alike for every pair).
    """
    n = a.shape[0]
    B = bins or max(2, math.isqrt(n // 5))

    def code(e: np.ndarray) -> np.ndarray:
        out = np.zeros(n, dtype=np.int64)
        for i in range(e.shape[1]):
            out = out * B + _quantile_bins(e[:, i], B)
        return out

    def entropy(codes: np.ndarray) -> float:
        _, counts = np.unique(codes, return_counts=True)
        p = counts / n
        return float(-(p * np.log(p)).sum())

    ca, cb = code(a), code(b)
    ha, hb = entropy(ca), entropy(cb)
    if ha <= 0 or hb <= 0:
        return 0.0
    mi = ha + hb - entropy(ca * (B ** b.shape[1]) + cb)
    return float(min(1.0, max(0.0, mi / math.sqrt(ha * hb))))


def mka_similarities(calib: CalibRows, spec: MergeSpec, layer_ids: Sequence[int], cfg: MkaConfig,
                     dense_emb: dict[int, np.ndarray] | None = None) -> dict[int, float]:
    """NPIB similarity of every adjacent pair of the state's layers: ``a`` -> ``S(a, next layer)``.

    Layers before the state's first changed layer have the dense activations (their embeddings are
    taken from, and stored in, ``dense_emb``).
    """
    dense_emb = {} if dense_emb is None else dense_emb
    probe = InfluenceProbe(keep_last=True)
    _, same = calib.run(spec, [probe])
    emb = {}
    for lid in layer_ids:
        if lid in same:
            if lid not in dense_emb:
                dense_emb[lid] = diffusion_map(calib.last[lid], cfg.dims, cfg.alpha, cfg.t)
            emb[lid] = dense_emb[lid]
        else:
            emb[lid] = diffusion_map(torch.cat(probe.last_states[lid]).numpy(), cfg.dims, cfg.alpha, cfg.t)
    return {a: npib(emb[a], emb[b], cfg.bins) for a, b in zip(layer_ids[:-1], layer_ids[1:])}


def run_mka(memo: Memo, max_removed: int, cfg: MkaConfig, norms: str = "host") -> MethodRun:
    """MKA: merge the most similar adjacent pair, ``max_removed`` times (see the module docstring).

    ``candidates`` of each record: the similarity of every adjacent pair measured on the state
    before the merge (earlier layer's dense id -> NPIB); ties go to the deeper pair.
    """
    eng = memo.engine
    eng.run_dense()
    calib = CalibRows(memo, cfg.samples)
    dense_emb: dict[int, np.ndarray] = {}
    run = MethodRun("mka", eng.num_layers)
    run.records.append(memo.record("mka", 0, [], None))
    current = list(eng.dense_ids)
    spec = MergeSpec(norms=norms)
    for _ in range(max_removed):
        sims = mka_similarities(calib, spec, current, cfg, dense_emb)
        a = max(sims, key=lambda h: (sims[h], h))
        b = current[current.index(a) + 1]
        lam = sims[a]
        groups = {h: c for h, c in spec.groups.items() if h != b}
        groups[a] = lerp(spec.groups.get(a, {a: 1.0}), spec.groups.get(b, {b: 1.0}), lam)
        spec = MergeSpec(spec.removed + [b], groups, norms)
        current.remove(b)
        note = f"layer {b} merged into {a}: lambda = S = {lam:.4f}"
        run.records.append(record_state(memo, "mka", len(run.records), spec, candidates=sims, note=note))
    return run


def run_merging(memo: Memo, method: str, max_removed: int, cfg: MergeConfig | None = None) -> MethodRun:
    """Run ``laco`` or ``mka`` up to ``max_removed`` removed layers."""
    cfg = cfg or MergeConfig()
    cfg.validate()
    merged_parameter_names(memo.engine.parts.layers[0], cfg.norms)  # fail early on an unsupported layout
    if method == "laco":
        return run_laco(memo, max_removed, cfg.laco, cfg.norms)
    if method == "mka":
        return run_mka(memo, max_removed, cfg.mka, cfg.norms)
    raise DeclensError(f"unknown merging method {method!r}; use one of {', '.join(MERGE_METHODS)}")


register_method("laco", lambda memo, k, o: run_merging(memo, "laco", k, o.merge),
                "LaCo: fold layers into a kept one by Reserving-Differences-while-Seeking-Common (merged weights)")
register_method("mka", lambda memo, k, o: run_merging(memo, "mka", k, o.merge),
                "MKA: fuse the most similar adjacent layers, weighted by manifold similarity (merged weights)")


def spec_from_record(rec: PruneRecord) -> MergeSpec:
    """The merge of a recorded state (a plain removal when the record has no merges)."""
    return MergeSpec.from_list(rec.merges or [], rec.removed)


# ------------------------------------------------------------------------------------------------
# Export


def export_merged(lm, spec: MergeSpec, out_dir, tolerance: float | None = None) -> dict:
    """Write a merged model (hosts' merged weights, absorbed layers removed) that plain
    ``AutoModelForCausalLM.from_pretrained`` loads, self-checked against the in-memory merged view.

    The config records the removed dense ids (``declens_removed_layers``, so every declens command
    reports layers in dense ids) and the merges (``declens_merges``: host, absorbed ids, coefficients).
    A spec without merged hosts is a plain removal (:func:`~declens.pruning.export.export_pruned`).

    Returns:
        export_pruned's summary plus ``"merges"``.

    Note:
        The model object is changed in place; load it again for dense use.
    """
    from ..errors import LayerSpecError
    from ..surgery import check_removal, layer_view, remove_layers, removed_dense_ids
    from .export import check_export_dir, export_pruned, probe_ids, save_verified

    if not spec.changed():
        return {**export_pruned(lm, spec.removed, out_dir, tolerance), "merges": []}
    out = check_export_dir(out_dir)
    parts = lm.parts
    remove = check_removal(parts, spec.removed)
    if not remove:
        raise LayerSpecError("a merge removes at least one layer; this one removes none")
    probe = probe_ids(lm)
    with merged_view(parts, spec):
        with torch.inference_mode(), layer_view(parts, keep_positions(parts, remove)):
            ref = lm.model(probe).logits.float().cpu()
    apply_merges(parts, spec)
    remove_layers(parts, remove)
    check = save_verified(lm, out, ref, probe, tolerance)
    return {"out_dir": str(out), "removed": list(remove), "removed_total": list(removed_dense_ids(parts)),
            "kept": int(parts.num_layers), "kept_ids": list(dense_layer_ids(parts)), "merges": spec.to_list(),
            "max_abs_logit_diff": check.max_abs_logit_diff, "logit_scale": check.logit_scale,
            "rel_logit_diff": check.rel_logit_diff, "tolerance": check.tolerance}


def state_from_prune(prune, method: str, ratio: float | None = None, num_layers: int | None = None) -> tuple[MergeSpec, PruneRecord]:
    """The best state of ``method`` at ``ratio`` (default: its largest ratio) in a ``declens prune`` run.

    Args:
        prune: a prune folder / ``prune.json`` or a loaded :class:`~declens.pruning.run.PruneResult`.
        method: the method whose state to take (any method; ``laco`` / ``mka`` states carry merges).
        ratio: mapped to ``floor(ratio x L)`` removed layers.
        num_layers: the model's dense layer count, checked against the run's.
    """
    from .run import best_states

    L, best = best_states(prune, method, num_layers, None if ratio is None else [ratio])
    k = max(best)
    return spec_from_record(best[k]), best[k]
