"""The layer-wise decision analysis: model + task -> Decision Margin, accuracy, Option Frequency,
KL and Transition Point at every layer.

Example:
    >>> lm = load_model("smollm2-135m")
    >>> data = load_task("arc_easy", limit=100)
    >>> res = analyze(lm, data, fmt="cloze")
    >>> res.metrics.transition_layer, res.metrics.dm
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .. import distributed
from ..errors import DeclensError
from ..formats import Requests, encoder_for, format_named, prepare  # encoder_for, prepare: re-exported
from ..lens import EMBEDDING_ID
from ..metrics import readout_summary
from ..models import LoadedModel
from ..results import AnalysisResult, Checkpoint, check_run_folder_kind, config_key, provenance
from ..scoring import LayerScores, Resume, score_requests
from ..surgery import dense_layer_ids, keep_positions
from ..tasks import LETTERS, TaskData

__all__ = ["AnalyzeConfig", "analyze", "encoder_for", "parse_lens_layers", "prepare", "score"]


def score(lm: LoadedModel, req: Requests, layers: Sequence[int] | None = None, max_tokens: int | None = None,
          progress: str | None = None, checkpoint: Checkpoint | None = None,
          read_layers: Sequence[int] | None = None, stats: dict | None = None, embeddings: bool = False) -> LayerScores:
    """Per-layer option scores of prepared requests (optionally on a layer subset); ``stats`` (if given)
    receives ``items`` and ``items_restored`` (from the checkpoint, not scored now)."""
    pad = encoder_for(lm).pad_id
    state = checkpoint.load() if checkpoint else None
    save = checkpoint.save if checkpoint else None
    return score_requests(lm.parts, req, pad, layers=layers, max_tokens=max_tokens, progress=progress,
                          resume=Resume(state, save, stats), read_layers=read_layers, embeddings=embeddings)


def parse_lens_layers(spec: str | Sequence[int] | None, kept_ids: Sequence[int]) -> list[int] | None:
    """``all`` (None), ``last`` (the model's own output only) or dense ids ``"0,10,27"``."""
    if spec is None or spec == "all":
        return None
    if spec == "last":
        return [kept_ids[-1]]
    from ..surgery import parse_layer_ids

    ids = parse_layer_ids(spec) if isinstance(spec, str) else [int(i) for i in spec]
    if kept_ids[-1] not in ids:
        ids.append(kept_ids[-1])  # the final layer is always read: accuracy is its argmax
    return sorted(ids, key=list(kept_ids).index) if all(i in kept_ids for i in ids) else ids


@dataclass(frozen=True)
class AnalyzeConfig:
    """Knobs of :func:`analyze` (recorded in the analysis' ``config`` under the same keys as before:
    ``seed`` is recorded as ``fewshot_seed``, ``lens_layers`` as the layers actually read).

    Attributes:
        num_fewshot: solved examples prepended to every prompt (>= 0).
        seed: seed of the few-shot draw (the row selection's seed lives in the :class:`TaskData`).
        remove: dense ids of layers to remove (evaluates a pruned view of the model).
        labels: option labels of the letter format.
        label_prefix: text before each label in the answer (``" "`` -> ``" A"``).
        decision_score: cloze only: ``raw`` (log-likelihood) or ``norm`` (per character) for DM/OF.
        max_tokens: padded tokens per batch (``None``: sized to the device).
        lens_layers: ``all`` / ``None`` (every layer), ``last`` (only the model's own output: accuracy at the
            cost of a plain forward pass) or dense layer ids to read through the lens.
        include_embeddings: also read the embedding output (before layer 0) through the lens; its metrics go
            to ``res.extra["embedding"]`` (layer id ``-1``, shown ``emb``), outside the layer metrics, so the
            Transition Point and the phases never count it.

    Raises:
        DeclensError: a bad value (one line naming it and the fix), when the config is built.
    """

    num_fewshot: int = 0
    seed: int = 0
    remove: Sequence[int] = ()
    labels: str | Sequence[str] = LETTERS
    label_prefix: str = " "
    decision_score: str = "raw"
    max_tokens: int | None = None
    lens_layers: str | Sequence[int] | None = None
    include_embeddings: bool = False

    def __post_init__(self) -> None:
        from ..checks import check_layer_spec, check_lens_layers, check_options
        from ..surgery import parse_layer_ids

        check_options(num_fewshot=self.num_fewshot, seed=self.seed, max_tokens=self.max_tokens,
                      decision_score=self.decision_score)
        check_layer_spec(self.remove, "remove")
        object.__setattr__(self, "remove", tuple(parse_layer_ids(self.remove)))
        if self.lens_layers is None or isinstance(self.lens_layers, str):
            check_lens_layers(self.lens_layers)
        else:
            check_layer_spec(self.lens_layers, "lens_layers")
            object.__setattr__(self, "lens_layers", tuple(parse_layer_ids(self.lens_layers)))
        labs = list(self.labels)
        if not labs or len(set(labs)) != len(labs):
            raise DeclensError(f"labels {self.labels!r} must be distinct, non-empty labels like ABCD or A,B,C,D")

    def to_dict(self) -> dict:
        """The fields, JSON-ready (``AnalyzeConfig(**d)`` rebuilds an equal config)."""
        d = asdict(self)
        d["remove"] = list(self.remove)
        d["labels"] = self.labels if isinstance(self.labels, str) else list(self.labels)
        if self.lens_layers is not None and not isinstance(self.lens_layers, str):
            d["lens_layers"] = list(self.lens_layers)
        return d


def analyze(
    lm: LoadedModel,
    data: TaskData,
    fmt: str = "letter",
    config: AnalyzeConfig | None = None,
    *,
    requests: Requests | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    plots: bool = True,
) -> AnalysisResult:
    """Run the layer-wise decision analysis.

    Args:
        lm: the model.
        data: the selected task rows.
        fmt: ``letter`` (decision token) or ``cloze`` (continuation log-likelihood).
        config: few-shot, removed layers, labels, decision score, batch budget, lens layers and embeddings
            (:class:`AnalyzeConfig`; ``None``: the defaults).
        requests: prebuilt requests (from :func:`prepare`) to skip tokenization.
        out_dir: write results, plots and a resumable checkpoint here.
        progress: show progress bars.
        plots: with ``out_dir``, also draw the PNG figures (when more than one layer is read).

    Returns:
        The :class:`~declens.results.AnalysisResult`.
    """
    cfg = config if config is not None else AnalyzeConfig()
    num_fewshot, seed, remove, labels, label_prefix = cfg.num_fewshot, cfg.seed, cfg.remove, cfg.labels, cfg.label_prefix
    decision_score, max_tokens, include_embeddings = cfg.decision_score, cfg.max_tokens, cfg.include_embeddings
    layers = keep_positions(lm.parts, remove) if remove else None
    kept_ids = [dense_layer_ids(lm.parts)[p] for p in (layers or range(lm.num_layers))]
    read = parse_lens_layers(cfg.lens_layers, kept_ids)
    t0 = time.perf_counter()
    form = format_named(fmt)
    req = requests if requests is not None else prepare(lm, data, fmt, num_fewshot, seed, labels, label_prefix)
    t_prep = time.perf_counter() - t0
    config = {
        "model": lm.spec, "task": data.name, "format": fmt, **data.selection, "num_fewshot": num_fewshot,
        "fewshot_seed": seed, "remove": list(remove), "decision_score": decision_score,
        "labels": form.recorded_labels(req),
        "label_prefix": label_prefix if form.takes_labels else None,
        "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
        "lens_layers": read,
    }
    if include_embeddings:  # only when asked: older configs (and their checkpoints) stay as they were
        config["include_embeddings"] = True
    if not distributed.is_main():
        out_dir = None  # under torchrun every rank ends with the same numbers; rank 0 writes them
    ck = None
    if out_dir is not None:
        check_run_folder_kind(out_dir, "analysis")  # before the work, not after it
        ck = Checkpoint(out_dir, config_key(config, lm.fingerprint(), data.fingerprint()))
    t1 = time.perf_counter()
    stats: dict = {}
    scores = score(lm, req, layers=layers, max_tokens=max_tokens, progress=f"{data.name}/{fmt}" if progress else None,
                   checkpoint=ck, read_layers=read, stats=stats, embeddings=include_embeddings)
    t_score = time.perf_counter() - t1
    restored = stats.get("items_restored", 0)
    scored = len(data.items) - restored  # scored by this process; the rest came from a checkpoint of a killed run
    prov = provenance(lm, data, timing={"prepare_s": round(t_prep, 3), "score_s": round(t_score, 3),
                                        "items_scored": scored, "items_restored": restored,
                                        "items_per_s": round(scored / max(t_score, 1e-9), 2)})
    res = AnalysisResult.from_scores(scores, config, prov, [it.id for it in data.items], req.option_labels(), decision_score)
    if scores.embedding is not None:
        e = scores.embedding
        base = e.norm_scores if decision_score == "norm" and e.norm_scores is not None else e.scores
        other = e.norm_scores if decision_score != "norm" and e.norm_scores is not None else None
        res.extra["embedding"] = readout_summary(base[0], e.gold, e.n_options, EMBEDDING_ID,
                                                 None if other is None else other[0])
    if out_dir is not None:  # a one-layer read (``lens_layers="last"``) has no curve to draw
        res.save(out_dir, plots=plots and (read is None or len(read) > 1))  # also removes the checkpoint
    return res
