"""Phase-dependent noise sensitivity (the paper's Figure 6 and A.9).

One layer at a time, Gaussian noise scaled to the layer's own activation size is added to its output::

    h~_l = h_l + a * sigma_l * eps,    eps ~ N(0, I)

and the Decision Margin (and accuracy) of the model's *final* layer is measured, for every layer
``l`` and noise scale ``a``. The scale ``sigma_l`` is measured on the clean dense model, in one of
three ways (``sigma=``, see :data:`SIGMA_MODES`):

- ``no-first`` (default): one standard deviation per layer over every hidden unit of every real
  token *except the first token of each row* (position 0; in a packed cloze row every root token).
  The first token (BOS or the first word) is an attention sink that carries massive activations,
  hundreds of times the other tokens' size in the middle layers only; with it, ``sigma_l`` measures
  that one token and grows unevenly across depth, so "a = 0.1" would mean far more noise, relative
  to the ordinary tokens, in those layers than elsewhere.
- ``all``: the same over every real token, the first included (declens' earlier behaviour).
- ``per-token``: each token's own scale, ``sigma_{l,t}`` = the standard deviation over the hidden
  units of that token's clean output, so every token gets noise in proportion to its own size.

All three are measured in the dense pass whatever the choice, and recorded (``sigma_by_mode``), as is
the choice itself (``config["sigma"]``). The result is a
``[layers, scales]`` map of final DM; the dense model's Transition Point splits its rows into the
Silent and the Decisive Phase, whose sensitivity the paper compares.

Where the noise goes: at the output of layer ``l`` only, at **every real token of every row**
(letter: every prompt token, the decision token included; cloze: every token of the row, context and
continuation, which in a packed row is every token of the item's prefix tree); padding is untouched.

Noise draws: each row gets its own ``eps`` (``[tokens, d]``, float32) from a ``torch.Generator``
seeded by a hash of ``(seed, layer id, scale, repeat, row index)``, so a study is bit-for-bit
repeatable, independent of the order of the loops and of how rows are batched (``max_tokens``), and
every (layer, scale, repeat) cell has an independent draw. The draws are made on the model's device,
so a CUDA run draws other numbers than a CPU run with the same seed. Scale 0 draws nothing: it is
the clean model, computed through the same code path (a check of the prefix reuse).

Speed: noise at layer ``l`` changes nothing before it, so each batch runs the dense model once,
keeps every layer's output, and evaluates each (layer, scale) by running only the layers after ``l``
from the kept output plus noise; noise on the last layer needs no forward pass at all (the lens reads
the noised state directly). The whole study costs about ``L/2 * scales * repeats`` forward passes of
the batch instead of ``L * scales * repeats``.

Resume: with a checkpoint (:func:`noise_checkpoint`: ``.checkpoint/`` of the output folder, keyed by the
model and data fingerprints, the format, the whole :class:`NoiseConfig`, the batch budget, dtype, device
and the execution options that change rounding), the dense pass's results (lens scores and sigma
statistics) are saved once it ends, and the filled final-layer scores with the (batch, perturbed
layer) units done are saved as the units finish (at most every ``checkpoint_every`` seconds, see
:class:`~declens.scoring.Checkpointer`). A killed run restarted with the same key skips the dense pass
and every unit done; since the draws are per row, the numbers are bit-identical to an uninterrupted run.

Under ``torchrun`` (:mod:`declens.distributed`) each rank runs its share of the batches in both passes
(round-robin over the plan; pass 2 starts with the last batch of its own share, whose outputs pass 1
kept); the lens scores and final-layer scores are gathered row by row, and the sigma statistics are
gathered batch by batch and folded in plan order, so every rank ends with the numbers of one process
(bit for bit where the ranks compute each batch as one process does, e.g. with the same thread count).
No checkpoint is written then (a rank holds only its share; one written by a single process is still
read), and only rank 0 writes the result folder (:class:`~declens.results.RunWriter`).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .. import distributed
from ..errors import DeclensError, LayerSpecError, NoiseSpecError
from ..formats import Requests, format_named
from ..metrics import compute_metrics, margins, predictions
from ..models import LoadedModel
from ..results import Checkpoint, RunWriter, check_run_folder_kind, config_key, provenance, register_result
from ..runner import (Batch, LayerStates, Probe, collate, default_max_tokens, flush, forward, plan_batches, run_from,
                      replan_on_oom)
from ..scoring import Checkpointer, ScoreState, ScoringPlan
from ..surgery import dense_layer_ids
from ..tasks import TaskData

NOISE_FILE = "noise.json"
NOISE_NPZ = "noise.npz"
DEFAULT_SCALES = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)

#: How ``sigma_l`` is measured (see the module docstring); the first is the default.
SIGMA_MODES = ("no-first", "all", "per-token")
DEFAULT_SIGMA = SIGMA_MODES[0]
SIGMA_RULES = {
    "no-first": "std of the clean layer output over every real token but the first of each row, and every hidden unit",
    "all": "std of the clean layer output over all real tokens and hidden units",
    "per-token": "each token's own std over the hidden units of its clean layer output",
}

#: Most bytes of kept layer outputs per batch (all layers of one batch are kept, in CPU memory):
#: the default batch budget is lowered so that ``tokens x d x L x itemsize`` stays below it.
CACHE_BYTES = 4 * 1024**3
#: ... but the default budget is never below this many padded tokens (a model too large for the cap still
#: batches its rows; the out-of-memory policy backs off from there).
MIN_CACHE_BUDGET = 256


# ------------------------------------------------------------------------------------------------
# Noise


def validate_scales(scales: Sequence[float]) -> list[float]:
    """Check noise scales: at least one, each finite and >= 0, none repeated; return them as floats.

    Raises:
        NoiseSpecError: otherwise.
    """
    try:
        out = [float(a) for a in scales]
    except (TypeError, ValueError):
        raise NoiseSpecError(f"noise scales must be numbers, got {scales!r}") from None
    if not out:
        raise NoiseSpecError("give at least one noise scale, e.g. 0,0.1,0.5,1")
    bad = [a for a in out if not math.isfinite(a) or a < 0]
    if bad:
        raise NoiseSpecError(f"noise scale(s) {bad} are invalid: a scale multiplies the layer's standard deviation "
                             "and must be a finite number >= 0")
    dup = sorted({a for a in out if out.count(a) > 1})
    if dup:
        raise NoiseSpecError(f"noise scale(s) {dup} given more than once; list each scale once")
    return out


def parse_scales(text: str | Sequence[float]) -> list[float]:
    """Parse ``"0,0.1,0.5,1"`` (or a sequence of numbers) into validated noise scales.

    Raises:
        NoiseSpecError: a part is not a number, or the scales are invalid (see :func:`validate_scales`).
    """
    if not isinstance(text, str):
        return validate_scales(text)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise NoiseSpecError(f"bad noise scales {text!r}; write comma-separated numbers like 0,0.1,0.5,1") from None
    return validate_scales(values)


def validate_sigma(mode: str) -> str:
    """Check a ``sigma`` choice; return it.

    Raises:
        NoiseSpecError: not one of :data:`SIGMA_MODES`.
    """
    if mode not in SIGMA_MODES:
        raise NoiseSpecError(f"unknown noise scale rule --sigma {mode!r}; use one of {', '.join(SIGMA_MODES)}")
    return mode


def token_sigma(h: Tensor) -> Tensor:
    """Per-token scale: the population standard deviation over the hidden units of each token.

    Args:
        h: ``[..., d]`` hidden states (any float dtype).

    Returns:
        ``[...]`` float32.
    """
    return torch.std(h.float(), dim=-1, correction=0)


def noise_seed(seed: int, layer_id: int, scale: float, repeat: int, row: int) -> int:
    """The 63-bit generator seed of one row's noise: a hash of ``(seed, layer id, scale, repeat, row)``."""
    key = f"declens-noise|{int(seed)}|{int(layer_id)}|{float(scale)!r}|{int(repeat)}|{int(row)}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)


def add_noise(h: Tensor, batch: Batch, scale: float, sigma: float | Tensor, seed: int, layer_id: int,
              repeat: int = 0) -> Tensor:
    """``h + scale * sigma * eps`` at the real tokens of each row; padding is left as it is.

    Args:
        h: ``[B, T, d]`` a layer's output for ``batch`` (any float dtype, any device).
        batch: the batch (``lengths`` and ``index`` give each row's real tokens and its seed).
        scale: the noise scale ``a`` (0 returns ``h`` itself, nothing drawn).
        sigma: the layer's standard deviation ``sigma_l``, or ``[B, T]`` one per token (``per-token``).
        seed, layer_id, repeat: with the row index, the seed of each row's draw (:func:`noise_seed`).

    Returns:
        ``[B, T, d]`` a new tensor in ``h``'s dtype (``eps`` is float32, the sum is computed in float32).
    """
    if scale == 0:
        return h
    out = h.clone()
    per_token = isinstance(sigma, Tensor)
    std = sigma.to(h.device, torch.float32) * float(scale) if per_token else float(scale) * float(sigma)
    d = h.shape[-1]
    for b, (n, row) in enumerate(zip(batch.lengths.tolist(), batch.index.tolist())):
        g = torch.Generator(device=h.device)
        g.manual_seed(noise_seed(seed, layer_id, scale, repeat, row))
        eps = torch.randn((int(n), d), generator=g, device=h.device, dtype=torch.float32)
        s = std[b, : int(n), None] if per_token else std
        out[b, : int(n)] = (h[b, : int(n)].float() + s * eps).to(h.dtype)
    return out


class NoiseProbe(Probe):
    """Adds noise to the output of one layer during an ordinary forward pass (the straightforward
    implementation of the study, without prefix reuse; same draws as :func:`noise_study`).

    Put it before the probes that should see the noised state.

    Args:
        layer_id: dense id of the layer whose output is noised.
        scale, seed, repeat: as in :func:`add_noise`.
        sigma: the layer's ``sigma_l``, or ``"per-token"`` for each token's own scale (:func:`token_sigma`
            of the clean output the noise is added to).
    """

    def __init__(self, layer_id: int, scale: float, sigma: float | str, seed: int = 0, repeat: int = 0):
        self.layer_id, self.scale, self.sigma, self.seed, self.repeat = layer_id, scale, sigma, seed, repeat

    def start(self, batch: Batch) -> None:
        self.batch = batch

    def layer(self, pos, layer_id, inputs, output):
        if layer_id != self.layer_id or self.scale == 0:
            return None
        sigma = token_sigma(output) if self.sigma == "per-token" else self.sigma
        return add_noise(output, self.batch, self.scale, sigma, self.seed, self.layer_id, self.repeat)


def _moments(x: Tensor) -> tuple[int, float, float] | None:
    """``(count, mean, M2)`` of the values ``x`` (float64 Python numbers); None when ``x`` is empty."""
    if x.numel() == 0:
        return None
    var, mean = torch.var_mean(x, correction=0)
    return x.numel(), float(mean), float(var) * x.numel()


def _combine(stats: dict, key, moments: tuple[int, float, float]) -> None:
    """Fold one batch's ``(count, mean, M2)`` into ``stats[key]`` (Chan's formula, float64)."""
    n_b, mean_b, m2_b = moments
    n_a, mean_a, m2_a = stats.get(key, (0, 0.0, 0.0))
    n = n_a + n_b
    delta = mean_b - mean_a
    stats[key] = (n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n)


class SigmaProbe(Probe):
    """The noise scale of every layer's output under each rule of :data:`SIGMA_MODES`.

    ``all``: population std over all real tokens and hidden units; ``no-first``: the same without the
    first token of each row (position id 0); ``per-token``: the mean over real tokens of each token's
    own std over hidden units (the scale the noise of that rule has on average). Combined across
    batches in float64 (Chan's formula), in the order the batches ran; each batch's own moments are kept
    too (``moments``), so that :func:`merge_sigma` can fold the batches of several ``torchrun`` ranks in
    the order one process runs them (the same numbers, bit for bit).
    """

    def __init__(self):
        self.stats: dict[tuple[str, int], tuple[int, float, float]] = {}  # (mode, id) -> (count, mean, M2)
        self.moments: list[dict[tuple[str, int], tuple[int, float, float]]] = []  # per batch run, in order

    def start(self, batch: Batch) -> None:
        T = batch.input_ids.shape[1]
        dev = batch.input_ids.device
        self.mask = torch.arange(T, device=dev)[None, :] < batch.lengths[:, None]  # [B, T] real tokens
        pos = batch.position_ids if batch.position_ids is not None else torch.arange(T, device=dev)[None, :]
        self.rest = self.mask & (pos != 0)  # [B, T] real tokens but the first of each (packed) sequence
        self.moments.append({})

    def layer(self, pos, layer_id, inputs, output):
        mask, rest = self.mask.to(output.device), self.rest.to(output.device)
        for mode, x in (("all", output[mask].float()), ("no-first", output[rest].float()),
                        ("per-token", token_sigma(output[mask]))):
            m = _moments(x)
            if m is not None:
                self.moments[-1][(mode, layer_id)] = m
                _combine(self.stats, (mode, layer_id), m)
        return None

    def sigma(self, mode: str = "all") -> dict[int, float]:
        """Dense layer id -> the scale of its output under ``mode`` (``nan`` for ``no-first`` when every
        row has a single token)."""
        out = {}
        for (m, lid), (n, mean, m2) in sorted(self.stats.items(), key=lambda kv: kv[0][1]):
            if m == mode:
                out[lid] = mean if mode == "per-token" else math.sqrt(m2 / n)
        for (m, lid) in self.stats:
            out.setdefault(lid, float("nan"))
        return dict(sorted(out.items()))

    def to_array(self, layer_ids: Sequence[int]) -> np.ndarray:
        """``[modes, L, 3]`` float64 ``(count, mean, M2)`` per rule of :data:`SIGMA_MODES` and layer (count 0:
        nothing measured), exact: what :meth:`from_array` restores for a resumed run."""
        out = np.zeros((len(SIGMA_MODES), len(layer_ids), 3), dtype=np.float64)
        for (m, lid), st in self.stats.items():
            out[SIGMA_MODES.index(m), list(layer_ids).index(lid)] = st
        return out

    @classmethod
    def from_array(cls, arr: np.ndarray, layer_ids: Sequence[int]) -> "SigmaProbe":
        """The probe whose statistics :meth:`to_array` wrote."""
        probe = cls()
        for mi, m in enumerate(SIGMA_MODES):
            for li, lid in enumerate(layer_ids):
                n, mean, m2 = arr[mi, li].tolist()
                if n > 0:
                    probe.stats[(m, int(lid))] = (int(n), mean, m2)
        return probe


def merge_sigma(probe: SigmaProbe, mine: Sequence[int]) -> SigmaProbe:
    """Under ``torchrun``: the sigma statistics of every rank's batches, folded in the batch order of one process.

    Args:
        probe: this rank's probe, which ran the batches ``mine`` (indices into the plan), in that order.
        mine: this rank's batches (:func:`~declens.distributed.my_batches`).

    Returns:
        A probe whose ``stats`` equal, bit for bit, those of one process running every batch in plan order
        (each batch's moments are gathered exactly and combined in the same order); ``probe`` itself
        in a single process.
    """
    if not distributed.active():
        return probe
    by_batch = {j: m for js, ms in distributed.gather_objects((list(mine), probe.moments)) for j, m in zip(js, ms)}
    out = SigmaProbe()
    for j in sorted(by_batch):
        out.moments.append(by_batch[j])
        for key, m in by_batch[j].items():
            _combine(out.stats, key, m)
    return out


# ------------------------------------------------------------------------------------------------
# Result


@register_result("noise", NOISE_FILE, "noise")
@dataclass
class NoiseResult:
    """Final-layer Decision Margin under noise at each layer and scale.

    Attributes:
        config: what was asked for (model, task, format, scales, layers, seed, repeats ...).
        provenance: versions, model and data fingerprints, timings.
        layer_ids: ``[P]`` dense ids of the perturbed layers.
        scales: ``[S]`` noise scales.
        dm: ``[P, S]`` final-layer mean Decision Margin, averaged over repeats.
        acc: ``[P, S]`` final-layer accuracy, averaged over repeats.
        dm_runs, acc_runs: ``[R, P, S]`` the same per repeat.
        scores: ``[R, P, S, N, K]`` final-layer decision scores of every item (NaN for absent options).
        sigma: dense id -> ``sigma_l`` under the chosen rule (every layer of the model; ``per-token``: the
            mean of the per-token scales).
        dense: the clean model's layer ids ``[L]``, per-layer DM ``[L]`` and accuracy ``[L]`` through the
            lens, final DM and accuracy, Transition Point and phases.
    """

    config: dict
    provenance: dict
    layer_ids: list[int]
    scales: list[float]
    dm: np.ndarray
    acc: np.ndarray
    dm_runs: np.ndarray
    acc_runs: np.ndarray
    scores: np.ndarray
    sigma: dict[int, float]
    dense: dict
    extra: dict = field(default_factory=dict)
    SCHEMA_VERSION = 1  #: of ``noise.json`` (see :func:`declens.results.register_result`)

    def phase_of(self, layer_id: int) -> str:
        """``silent`` or ``decisive`` (the dense model's phase of a layer)."""
        return "decisive" if layer_id in set(self.dense["decisive_layers"]) else "silent"

    def phase_summary(self) -> dict:
        """Per phase: its perturbed layers, the mean final DM and the mean DM drop (clean final DM minus
        noised) at each scale (None where the phase has no perturbed layer)."""
        out = {}
        clean = float(self.dense["final_dm"])
        for ph in ("silent", "decisive"):
            rows = [i for i, lid in enumerate(self.layer_ids) if self.phase_of(lid) == ph]
            if rows:
                dm = self.dm[rows].mean(axis=0)
                out[ph] = {"layers": [self.layer_ids[i] for i in rows], "dm": dm.tolist(),
                           "dm_drop": (clean - dm).tolist(), "accuracy": self.acc[rows].mean(axis=0).tolist()}
            else:
                out[ph] = {"layers": [], "dm": None, "dm_drop": None, "accuracy": None}
        return out

    def layer_rows(self) -> list[dict]:
        """One dict per perturbed layer: phase, sigma, and final DM / accuracy at each scale."""
        return [{"layer": lid, "phase": self.phase_of(lid), "sigma": self.sigma[lid],
                 "dm": self.dm[i].tolist(), "accuracy": self.acc[i].tolist()} for i, lid in enumerate(self.layer_ids)]

    def to_dict(self) -> dict:
        return {
            "kind": "noise",
            "config": self.config,
            "provenance": self.provenance,
            "scales": self.scales,
            "layer_ids": self.layer_ids,
            "dense": self.dense,
            "phase_summary": self.phase_summary(),
            "layers": self.layer_rows(),
            "dm": self.dm,
            "accuracy": self.acc,
            **self.extra,
        }

    @classmethod
    def load(cls, path: Path | str) -> "NoiseResult":
        """Read a folder written by :meth:`save` (verified against its manifest)."""
        from ..results import read_result_file

        p, d = read_result_file(path, NOISE_FILE, "noise", also=(NOISE_NPZ,))
        with np.load(p.parent / NOISE_NPZ) as z:
            arrays = {k: z[k] for k in ("dm", "accuracy", "dm_runs", "acc_runs", "scores", "sigma", "dense_layer_ids")}
        sigma = {int(i): float(s) for i, s in zip(arrays["dense_layer_ids"], arrays["sigma"])}
        known = {"kind", "schema_version", "config", "provenance", "scales", "layer_ids", "dense", "phase_summary",
                 "layers", "dm", "accuracy"}
        return cls(config=d["config"], provenance=d["provenance"], layer_ids=[int(i) for i in d["layer_ids"]],
                   scales=[float(a) for a in d["scales"]], dm=arrays["dm"], acc=arrays["accuracy"],
                   dm_runs=arrays["dm_runs"], acc_runs=arrays["acc_runs"], scores=arrays["scores"], sigma=sigma,
                   dense=d["dense"], extra={k: v for k, v in d.items() if k not in known})

    def save(self, out_dir: Path | str, plots: bool = True) -> Path:
        """Write ``noise.json``, ``noise.npz`` and (with ``plots``) ``noise_heatmap.png`` and
        ``noise_phases.png`` into ``out_dir`` as one run folder (the manifest last, see
        :class:`~declens.results.RunWriter`)."""
        out = Path(out_dir)
        with RunWriter(out, "noise") as run:
            run.npz(NOISE_NPZ, dm=self.dm, accuracy=self.acc, dm_runs=self.dm_runs, acc_runs=self.acc_runs,
                    scores=self.scores, layer_ids=np.array(self.layer_ids), scales=np.array(self.scales),
                    sigma=np.array([self.sigma[i] for i in self.dense["layer_ids"]]),
                    dense_layer_ids=np.array(self.dense["layer_ids"]), dense_dm=np.array(self.dense["dm"]))
            run.json(NOISE_FILE, self.to_dict())
            if plots:
                run.draw_figures(self, out)
        return out


# ------------------------------------------------------------------------------------------------
# The study


def perturbed_positions(dense_ids: list[int], layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(len(dense_ids)))
    ids = [int(i) for i in layers]
    if not ids:
        raise LayerSpecError("give at least one layer to perturb (or none, for every layer)")
    bad = [i for i in ids if i not in dense_ids]
    if bad:
        raise LayerSpecError(f"layer id(s) {bad} are not in the model (its layers are {dense_ids[0]}..{dense_ids[-1]}"
                             f"{'' if dense_ids == list(range(len(dense_ids))) else f': {dense_ids}'})")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise LayerSpecError(f"layer id(s) {dup} given more than once; list each layer once")
    return sorted(dense_ids.index(i) for i in ids)


def _rows(batches: Sequence[Sequence[int]], mine: Sequence[int]) -> list[int]:
    """The rows of the batches ``mine`` (indices into ``batches``)."""
    return [i for j in mine for i in batches[j]]


def _cache_budget(lm: LoadedModel, max_tokens: int | None) -> int:
    if max_tokens:
        return int(max_tokens)
    d = lm.parts.config.hidden_size
    per_token = d * lm.num_layers * torch.empty((), dtype=lm.dtype).element_size()
    return max(MIN_CACHE_BUDGET, min(default_max_tokens(lm.parts), CACHE_BYTES // max(per_token, 1)))


@dataclass(frozen=True)
class NoiseConfig:
    """Knobs of :func:`noise_study` (recorded in ``noise.json``'s ``config`` under the same keys as before).

    Attributes:
        scales: noise scales ``a`` (each >= 0; 0 is the clean model); the heatmap's columns ``S``.
        layers: dense ids of the layers to perturb, the heatmap's rows ``P`` (``None``: every layer).
        seed: seed of the noise draws (see the module docstring).
        repeats: independent draws ``R`` per (layer, scale); ``dm`` / ``acc`` are their mean.
        max_tokens: padded tokens per batch (``None``: sized to the device and to the kept states).
        num_fewshot: solved examples prepended to each prompt.
        decision_score: cloze only: DM / accuracy on ``raw`` log-likelihoods or per-character ``norm``.
        sigma: how the noise scale is measured: ``no-first`` (default), ``all`` or ``per-token`` (see the
            module docstring).
    """

    scales: Sequence[float] = DEFAULT_SCALES
    layers: Sequence[int] | None = None
    seed: int = 0
    repeats: int = 1
    max_tokens: int | None = None
    num_fewshot: int = 0
    decision_score: str = "raw"
    sigma: str = DEFAULT_SIGMA


def noise_checkpoint(directory: Path | str, lm: LoadedModel, data: TaskData, fmt: str,
                     config: NoiseConfig | None = None) -> Checkpoint:
    """The resume checkpoint of :func:`noise_study` in ``directory/.checkpoint/``.

    Its key holds everything that determines the numbers: the model and data fingerprints, the format, the
    whole :class:`NoiseConfig`, the batch budget it resolves to, dtype, device and the execution options
    that change rounding (all but ``checkpoint_every``); a checkpoint of any other run is ignored.

    Raises:
        NoiseSpecError: bad scales (checked before the key is built); DeclensError: ``directory`` holds the
            result of another command (checked before the work, not after it).
    """
    check_run_folder_kind(directory, "noise")
    cfg = config if config is not None else NoiseConfig()
    knobs = {**asdict(cfg), "scales": validate_scales(cfg.scales),
             "layers": None if cfg.layers is None else [int(i) for i in cfg.layers]}
    execution = {k: v for k, v in lm.options.to_dict().items() if k != "checkpoint_every"}
    run = {"kind": "noise", "format": fmt, "config": knobs, "budget": _cache_budget(lm, cfg.max_tokens),
           "dtype": str(lm.dtype), "device": str(lm.device), "execution": execution}
    return Checkpoint(directory, config_key(run, lm.fingerprint(), data.fingerprint()), name="noise")


def noise_study(
    lm: LoadedModel,
    data: TaskData,
    fmt: str = "letter",
    config: NoiseConfig | None = None,
    progress: bool = True,
    *,
    requests: Requests | None = None,
    checkpoint: Checkpoint | None = None,
) -> NoiseResult:
    """Final-layer Decision Margin with noise ``a * sigma_l * eps`` added to the output of one layer ``l``.

    Args:
        lm: the model (dense, or an exported pruned model: layers keep their dense ids).
        data: the task rows.
        fmt: ``letter`` or ``cloze``.
        config: scales, layers, seed, repeats, batch budget, few-shot, decision score and sigma rule
            (:class:`NoiseConfig`; ``None``: the defaults).
        progress: show progress bars.
        requests: prebuilt requests (from :func:`~declens.analyses.decision.prepare`).
        checkpoint: resume state (:func:`noise_checkpoint`, whose key must describe this run): a killed run
            continues from it to the same numbers. Left in place when the study ends (complete, so a rerun
            costs nothing); :meth:`NoiseResult.save` into its folder removes it. Written only by a single
            process: under ``torchrun`` the ranks run disjoint batches (see the module docstring), so none is
            written (one left by a single process is read).

    Out of memory: both passes keep state per planned batch (sigma folded batch by batch, units done
    counted in batches), so the study starts again planned with half the batch budget
    (:func:`~declens.runner.replan_on_oom`); its result then records that budget (``config["max_tokens"]``) and
    its checkpoint is the one :func:`noise_checkpoint` gives for it (a resumed run backs off the same way).

    Returns:
        The :class:`NoiseResult`.

    Raises:
        NoiseSpecError: bad scales, repeats or sigma rule; LayerSpecError: bad layer ids; DeclensError: bad format.
    """
    cfg = config if config is not None else NoiseConfig()
    first = _cache_budget(lm, cfg.max_tokens)
    prepared = {"requests": requests}

    def lengths() -> list[int]:  # the rows' token counts, wanted only on out-of-memory
        from .decision import prepare

        if prepared["requests"] is None:
            prepared["requests"] = prepare(lm, data, fmt, num_fewshot=cfg.num_fewshot)
        return [len(r) for r in ScoringPlan(lm.parts, prepared["requests"]).rows]

    def attempt(budget: int) -> NoiseResult:
        if budget == first:  # as asked
            return _noise_study(lm, data, fmt, cfg, progress, requests=prepared["requests"], checkpoint=checkpoint)
        c = replace(cfg, max_tokens=budget)  # re-planned: the checkpoint of a run asked with that budget
        ck = None if checkpoint is None else noise_checkpoint(checkpoint.path.parent.parent, lm, data, fmt, c)
        return _noise_study(lm, data, fmt, c, progress, requests=prepared["requests"], checkpoint=ck)

    return replan_on_oom(attempt, first, lengths)


def _noise_study(lm: LoadedModel, data: TaskData, fmt: str, cfg: NoiseConfig, progress: bool, *,
                 requests: Requests | None, checkpoint: Checkpoint | None) -> NoiseResult:
    """:func:`noise_study` planned with ``cfg``'s batch budget (no out-of-memory back-off here)."""
    from tqdm.auto import tqdm

    from .decision import encoder_for, prepare

    scales, layers, seed, repeats, max_tokens = cfg.scales, cfg.layers, cfg.seed, cfg.repeats, cfg.max_tokens
    num_fewshot, decision_score, sigma = cfg.num_fewshot, cfg.decision_score, cfg.sigma
    format_named(fmt)  # an unknown format fails here, before any work
    if decision_score not in ("raw", "norm"):
        raise DeclensError(f"decision_score must be 'raw' or 'norm', not {decision_score!r}")
    scales = validate_scales(scales)
    sigma_mode = validate_sigma(sigma)
    if int(repeats) != repeats or repeats < 1:
        raise NoiseSpecError(f"repeats must be a whole number >= 1, got {repeats}")
    repeats = int(repeats)
    parts = lm.parts
    dense_ids = dense_layer_ids(parts)
    L = len(dense_ids)
    positions = perturbed_positions(dense_ids, layers)
    t0 = time.perf_counter()
    req = requests if requests is not None else prepare(lm, data, fmt, num_fewshot=num_fewshot)
    plan = ScoringPlan(parts, req)
    pad = encoder_for(lm).pad_id
    budget = _cache_budget(lm, max_tokens)
    batches = plan_batches([len(r) for r in plan.rows], budget, batch_cost=lm.options.batch_cost)

    def assemble(out: np.ndarray, ids: list[int]) -> np.ndarray:
        s = plan.assemble(out, ids)
        return s.norm_scores if decision_score == "norm" and s.norm_scores is not None else s.scores

    # Resume state: the dense pass (lens scores, sigma statistics) and the final-layer probe outputs of
    # every (repeat, layer, scale) [R, P, S, 1, N, K] (cloze: [R, P, S, 1, slots]); done: [batches * P]
    # the (batch, perturbed layer) units finished
    P = len(positions)
    shapes = {"dense": plan.out_shape(L), "sigma": (len(SIGMA_MODES), L, 3),
              "outs": (repeats, P, len(scales), *plan.out_shape(1))}
    state = checkpoint.load() if checkpoint is not None else None
    restored = state is not None and state.compatible(shapes, len(batches) * P)
    if not restored:
        state = ScoreState.empty(shapes, len(batches) * P)
    # under torchrun ranks run disjoint batches, so a checkpoint would hold one rank's share only: none is
    # written (one from a single process is still read: every rank skips what it holds)
    save = checkpoint.save if checkpoint is not None and not distributed.active() else None
    dense_out, outs = state.arrays["dense"], state.arrays["outs"]
    # every layer's output (the dense states noise is added to): on a CUDA device with room for twice
    # CACHE_BYTES there (no copy to the host and back, no wait for the device), else in CPU memory
    cache = LayerStates("output", where="auto", room=2 * CACHE_BYTES)
    cached = None  # the batch whose layer outputs ``cache`` holds
    mine = distributed.my_batches(batches)  # this rank's batches (all of them in a single process)
    talk = progress and distributed.is_main()

    # Pass 1: the clean dense model, every layer through the lens, and sigma of every layer. The
    # outputs of the last batch stay cached, so pass 2 starts with that batch without rerunning it.
    if restored:
        sig = SigmaProbe.from_array(state.arrays["sigma"], dense_ids)
    else:
        sig = SigmaProbe()
        bar = tqdm(total=sum(len(batches[j]) for j in mine), desc="noise: dense pass", unit="seq", disable=not talk,
                   leave=False)
        for j in mine:
            keep = [cache] if j == mine[-1] else []
            forward(parts, collate(plan.rows, batches[j], pad, lm.device), [plan.probe(dense_out), sig, *keep])
            bar.update(len(batches[j]))
        bar.close()
        cached = mine[-1] if mine else None
        if distributed.active():  # every rank: all rows' lens scores, sigma folded as one process folds it
            dense_out = state.arrays["dense"] = distributed.merge_rows(dense_out, plan.out_rows(_rows(batches, mine)))
            sig = merge_sigma(sig, mine)
        state.arrays["sigma"] = sig.to_array(dense_ids)
    dense_scores = assemble(dense_out, dense_ids)
    s0 = plan.assemble(dense_out, dense_ids)
    dm0 = compute_metrics(dense_scores, s0.gold, dense_ids, s0.n_options)
    sigma_l = sig.sigma(sigma_mode)  # the per-token rule: the mean per-token scale, for the record
    if any(math.isnan(v) for v in sigma_l.values()):
        raise NoiseSpecError(f"--sigma {sigma_mode}: every row has a single token, so no token is left to measure the "
                             "scale on; use --sigma all")
    if save and not restored:
        save(state)  # the dense pass, so that a resumed run skips it

    # Pass 2: per batch, every layer's output kept; each (layer, scale, repeat) runs from it.
    last = dense_ids[-1]
    done = state.done.reshape(len(batches), P)  # a view: the checkpointer marks state.done
    units_restored = int(done.sum())
    ck = Checkpointer(state, save, every=parts.options.checkpoint_every)
    bar = tqdm(total=len(mine) * P * len(scales) * repeats, desc="noise", unit="run", disable=not talk, leave=False)
    bar.update(int(done[mine].sum()) * len(scales) * repeats)
    in_flight: list = []  # probes whose results may still be on their way to the host

    def sync() -> None:
        flush(in_flight)
        in_flight.clear()

    try:
        with torch.inference_mode():
            scale_of: dict[int, float | Tensor] = {}
            for j in reversed(mine):  # the draws are per row: neither the order nor skips matter
                if done[j].all():
                    continue
                idx = batches[j]
                b = collate(plan.rows, idx, pad, lm.device)
                if cached != j:
                    forward(parts, b, [cache])
                    cached = j
                for pi, p in enumerate(positions):
                    if done[j, pi]:
                        continue
                    lid = dense_ids[p]
                    h = cache.states[p].to(lm.device)
                    scale_of[pi] = token_sigma(h) if sigma_mode == "per-token" else sigma_l[lid]
                    for r in range(repeats):
                        for si, a in enumerate(scales):
                            probe = plan.probe(outs[r, pi, si], {last: 0})
                            noised = add_noise(h, b, a, scale_of[pi], seed, lid, r)
                            if p == L - 1:  # the model's output itself: read the lens on the noised state
                                probe.start(b)
                                probe.layer(p, lid, noised, noised)
                                probe.finish(b)
                            else:
                                # every position of the final layer is computed (no last-position
                                # trim), so scale 0 rounds exactly like pass 1
                                run_from(parts, b, [probe], noised, list(range(p + 1, L)), trim_final=False,
                                         defer=True)
                            in_flight.append(probe)  # its copy to the host overlaps the next runs
                            bar.update(1)
                    del h
                    ck([j * P + pi], sync)
        sync()
    finally:
        bar.close()
        cache.clear()
    if distributed.active():  # every rank: the final-layer scores of all rows
        outs = state.arrays["outs"] = distributed.merge_rows(outs, plan.out_rows(_rows(batches, mine)), axis=4)
    if save:
        save(state)  # complete: a kill before the result is written loses nothing
    t_run = time.perf_counter() - t0

    R, P, S = repeats, len(positions), len(scales)
    gold = s0.gold
    finals = np.stack([assemble(outs[r, pi, si], [last])[0] for r in range(R) for pi in range(P) for si in range(S)])
    finals = finals.reshape(R, P, S, *finals.shape[1:])  # [R, P, S, N, K]
    flat = finals.reshape(R * P * S, *finals.shape[3:])
    dm_runs = margins(flat, gold).mean(axis=1).reshape(R, P, S)
    acc_runs = (predictions(flat) == gold[None]).mean(axis=1).reshape(R, P, S)
    layer_ids = [dense_ids[p] for p in positions]
    dense = {
        "layer_ids": list(dense_ids), "dm": dm0.dm, "accuracy": dm0.acc,
        "final_dm": dm0.final_dm, "final_accuracy": dm0.final_acc, "chance": dm0.chance,
        "transition_layer": dm0.transition_layer, "silent_layers": dm0.silent_layers,
        "decisive_layers": dm0.decisive_layers,
    }
    config = {
        "model": lm.spec, "task": data.name, "format": fmt, **data.selection, "num_fewshot": num_fewshot,
        "scales": scales, "layers": layer_ids, "seed": seed, "repeats": repeats, "decision_score": decision_score,
        "noise": "h_l + a * sigma_l * eps, eps ~ N(0, I) float32, at the output of one layer, at every real token of "
                 "every row; sigma_l: " + SIGMA_RULES[sigma_mode],
        "sigma": sigma_mode,
        "packed_rows": bool(plan.pack),
        "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device), "max_tokens": budget,
    }
    prov = provenance(lm, data, timing={"study_s": round(t_run, 3), "noise_runs": len(batches) * P * S * R,
                                        "noise_runs_restored": units_restored * S * R, "dense_pass_restored": restored,
                                        "ranks": distributed.world()})
    return NoiseResult(config=config, provenance=prov, layer_ids=layer_ids, scales=scales,
                       dm=dm_runs.mean(axis=0), acc=acc_runs.mean(axis=0), dm_runs=dm_runs, acc_runs=acc_runs,
                       scores=finals.astype(np.float32), sigma=sigma_l, dense=dense,
                       extra={"sigma_by_mode": {m: {str(k): None if math.isnan(v) else v for k, v in sig.sigma(m).items()}
                                               for m in SIGMA_MODES}})
