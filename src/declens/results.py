"""Result files: atomic writes, provenance, and the layer-wise analysis result.

Every result file records the config that produced it, the library versions, and the model and
data fingerprints. Files are written to a temporary name and renamed into place, so a killed run
never leaves a half-written file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import LayerMetrics, compute_metrics, margins, predictions
from .scoring import LayerScores, ScoreState

RESULT_FILE = "result.json"
LAYERS_CSV = "layers.csv"
SCORES_FILE = "scores.npz"


def _atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give results the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write text to ``path`` atomically (temp file + rename)."""
    _atomic(Path(path), text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def atomic_save_npz(path: Path | str, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    _atomic(Path(path), buf.getvalue())


def to_jsonable(obj: Any) -> Any:
    """Convert numpy values (and NaN) to plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if f != f or f in (float("inf"), float("-inf")) else f  # exact: JSON round-trips floats
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_key(*parts: Any) -> str:
    """A short hash of JSON-serialisable parts (for checkpoint names)."""
    return hashlib.sha256(json.dumps(to_jsonable(list(parts)), sort_keys=True).encode()).hexdigest()[:16]


def versions() -> dict:
    """Versions of the libraries that shape the numbers."""
    import torch
    import transformers

    from . import __version__

    return {
        "declens": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def provenance(lm=None, data=None, **extra: Any) -> dict:
    """Versions, fingerprints of the model and data, device and time."""
    out: dict[str, Any] = {"versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if lm is not None:
        out["model"] = {"spec": lm.spec, "source": lm.source, "family": lm.family, "num_layers": lm.num_layers,
                        "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
                        "fingerprint": lm.fingerprint()}
    if data is not None:
        out["data"] = {"task": data.name, "split": data.split, "selection": data.selection,
                       "fingerprint": data.fingerprint()}
    out.update(extra)
    return out


class Checkpoint:
    """Partial scoring results on disk, keyed by everything that determines them.

    A killed run restarted with the same config finds its checkpoint and continues; a
    checkpoint written for another config is ignored.
    """

    def __init__(self, directory: Path | str, key: str, name: str = "scores"):
        self.path = Path(directory) / ".checkpoint" / f"{name}-{key}.npz"
        self.key = key

    def load(self) -> ScoreState | None:
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path) as z:
                if str(z["key"]) != self.key:
                    return None
                arrays = {k[2:]: z[k] for k in z.files if k.startswith("a_")}
                return ScoreState(arrays, z["done"].astype(bool))
        except Exception:
            return None  # a corrupt checkpoint is recomputed, never trusted

    def save(self, state: ScoreState) -> None:
        atomic_save_npz(self.path, key=np.array(self.key), done=state.done,
                        **{f"a_{k}": v for k, v in state.arrays.items()})

    def clear(self) -> None:
        if self.path.exists():
            self.path.unlink()
        try:
            self.path.parent.rmdir()
        except OSError:
            pass


def read_result_file(path: str | Path, filename: str, command: str) -> tuple[Path, dict]:
    """A result folder (or the file itself) written by ``declens <command>``: the file's path and its JSON.

    Raises:
        DeclensError: the path holds no ``filename``.
    """
    from .errors import DeclensError

    p = Path(path)
    p = p / filename if p.is_dir() else p
    if not p.is_file():
        raise DeclensError(f"{str(path)!r} holds no {filename}; pass a folder written by 'declens {command}'")
    return p, json.loads(p.read_text())


@dataclass
class AnalysisResult:
    """A layer-wise decision analysis of one model on one task in one format.

    Attributes:
        config: what was asked for (model, task, format, selection, seed, dtype ...).
        provenance: versions, model and data fingerprints, timings.
        scores: the per-layer option scores.
        metrics: per-layer metrics computed from ``scores``.
        item_ids: id of every item, in order.
        option_labels: label of each option slot.
    """

    config: dict
    provenance: dict
    scores: LayerScores
    metrics: LayerMetrics
    item_ids: list[str]
    option_labels: list[str]
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_scores(cls, scores: LayerScores, config: dict, provenance: dict, item_ids: list[str],
                    option_labels: list[str], decision_score: str = "raw") -> "AnalysisResult":
        """Compute metrics from scores. ``decision_score="norm"`` bases DM/OF on length-normalised cloze scores."""
        base = scores.norm_scores if decision_score == "norm" and scores.norm_scores is not None else scores.scores
        other = scores.norm_scores if decision_score != "norm" else None
        m = compute_metrics(base, scores.gold, scores.layer_ids, scores.n_options, norm_scores=other)
        return cls(config=config, provenance=provenance, scores=scores, metrics=m, item_ids=item_ids,
                   option_labels=option_labels)

    @property
    def summary(self) -> dict:
        return self.metrics.summary()

    def layer_rows(self) -> list[dict]:
        """One dict per layer (the CSV rows)."""
        m = self.metrics
        decisive = set(m.decisive_layers)
        rows = []
        for i, lid in enumerate(m.layer_ids):
            row = {"layer": lid, "position": i, "phase": "decisive" if lid in decisive else "silent",
                   "dm": m.dm[i], "dm_std": m.dm_std[i], "dm_median": m.dm_median[i], "dm_q25": m.dm_q25[i],
                   "dm_q75": m.dm_q75[i], "accuracy": m.acc[i]}
            if m.acc_norm is not None:
                row["accuracy_norm"] = m.acc_norm[i]
            row["kl"] = m.kl[i]
            for k, lab in enumerate(self.option_labels):
                row[f"of_{lab}"] = m.option_frequency[i, k]
            rows.append(row)
        return rows

    def sample_rows(self) -> list[dict]:
        """Final-layer prediction of every item."""
        s = self.scores
        base = s.scores
        preds = predictions(base[-1:])[0]
        marg = margins(base[-1:], s.gold)[0]
        out = []
        for n, iid in enumerate(self.item_ids):
            k = int(s.n_options[n])
            row = {"id": iid, "gold": int(s.gold[n]), "pred": int(preds[n]), "correct": bool(preds[n] == s.gold[n]),
                   "margin": float(marg[n]), "scores": [float(x) for x in base[-1, n, :k]]}
            if s.norm_scores is not None:
                row["pred_norm"] = int(np.nanargmax(s.norm_scores[-1, n, :k]))
            out.append(row)
        return out

    def to_dict(self) -> dict:
        return {
            "kind": "analysis",
            "config": self.config,
            "provenance": self.provenance,
            "summary": self.summary,
            "option_labels": self.option_labels,
            "gold_frequency": self.metrics.gold_frequency,
            "layers": self.layer_rows(),
            "samples": self.sample_rows(),
            **self.extra,
        }

    def save(self, out_dir: Path | str) -> Path:
        """Write ``result.json``, ``layers.csv`` and ``scores.npz`` into ``out_dir`` (atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        s = self.scores
        arrays = {"scores": s.scores, "gold": s.gold, "n_options": s.n_options, "layer_ids": np.array(s.layer_ids)}
        if s.norm_scores is not None:
            arrays["norm_scores"] = s.norm_scores
        atomic_save_npz(out / SCORES_FILE, **arrays)
        rows = self.layer_rows()
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, (float, np.floating)) else v) for k, v in r.items()})
        atomic_write_text(out / LAYERS_CSV, buf.getvalue())
        atomic_write_json(out / RESULT_FILE, self.to_dict())
        return out

    @classmethod
    def load(cls, out_dir: Path | str) -> "AnalysisResult":
        """Read a result folder written by :meth:`save`."""
        path, d = read_result_file(out_dir, RESULT_FILE, "analyze")
        with np.load(path.parent / SCORES_FILE) as z:
            scores = LayerScores(
                layer_ids=[int(i) for i in z["layer_ids"]], scores=z["scores"], gold=z["gold"], n_options=z["n_options"],
                kind="loglik" if d["config"].get("format") == "cloze" else "logit",
                norm_scores=z["norm_scores"] if "norm_scores" in z.files else None,
            )
        extra = {k: v for k, v in d.items() if k not in ("kind", "config", "provenance", "summary", "option_labels",
                                                         "gold_frequency", "layers", "samples")}
        res = cls.from_scores(scores, d["config"], d["provenance"], [s["id"] for s in d["samples"]], d["option_labels"],
                              decision_score=d["config"].get("decision_score", "raw"))
        res.extra = extra
        return res
