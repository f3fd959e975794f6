"""Does an earlier Transition Point buy more pruning robustness? (the paper's Section 4.2.2,
*The Safe Pruning Margin*).

Across model-task pairs, :func:`correlate` pairs the dense model's **Transition Point** (TP) with
the **critical pruning ratio** of one pruning method and computes Pearson's r with its two-sided
p-value (``scipy.stats.pearsonr``) twice: TP as an absolute layer index, and TP as a fraction of the
model's depth. It also scores the **safe pruning margin** estimate: the Decisive Phase's share of
the depth (``1 - TP / L``, the dense analysis's ``decisive_fraction``) taken as a prediction of the
critical ratio (mean absolute error, mean signed error, and its own Pearson r).

How pairs are formed
--------------------
Every given folder is read through :func:`declens.results.find_runs` (a run folder, or every run
folder below it; each verified against its manifest, its main result file read in the current schema).
Results are grouped by **(model, task, format)**: ``model`` is the ``--model`` string the run was
made with (``config["model"]``: a preset name, a path or a hub id, so spell it the same way in every
command), ``task`` the task name (``mmlu:astronomy`` for a subject), ``format`` ``letter``/``cloze``.

- The **Transition Point** of a group comes, in this order of preference, from
  1. a dense ``analysis`` (``result.json`` with no ``--remove`` and every layer read through the lens),
  2. the dense record (0 layers removed) of a ``prune`` result (``prune.json``),
  3. the dense cell of an ``eval`` result (``eval.json``).
  Among several candidates of the same kind the one on the most rows (``rows_selected``) wins, then
  the one given first; the others are listed in :attr:`CorrelationResult.notes`.
- The **critical ratio** comes from a ``prune`` result of the same group whose ``critical_ratio``
  has ``method``; among several, the one on the most rows wins, then the one given first.
- A group is a **complete pair** when both exist and are numbers and the dense model is above chance.
  A group is left out, with the reason in :attr:`CorrelationResult.incomplete`, when it has no TP
  source, when the dense model never decides (no TP: the Decision Margin is not positive at the last
  layer), when it has no prune result with ``method``, when the critical ratio was not reached within
  the run's ``--max-ratio`` (the ratio is then only known to exceed it; it is not imputed), or when the
  dense model is not above chance with a one-sided binomial p below ``chance_alpha`` (default 0.05): a
  model that guesses has nothing to lose, and its "critical ratio" is sampling noise.
- A **study** folder (``declens study``) stands for its finished stage runs (analysis, prune, ...).

At least three complete pairs are needed; fewer raise :class:`~declens.errors.DeclensError` naming
the pairs found and what is missing. When the TPs (or the critical ratios) of all pairs are equal,
r is undefined and reported as ``None`` with a note instead of scipy's NaN.

Example:
    >>> res = correlate(["runs/llama_arc", "runs/qwen_arc", "runs/prune_qwen_arc", ...], method="ip")
    >>> res.stats["layer"]["r"], res.stats["layer"]["p"]
    >>> res.save("runs/correlate")   # correlate.json, correlate.csv, correlate.png, safe_margin.png
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import DeclensError
from ..results import Run, RunWriter, find_runs, provenance, register_result

CORRELATE_FILE = "correlate.json"
CORRELATE_CSV = "correlate.csv"
MIN_PAIRS = 3
#: a pair counts only when its dense model is above chance with a one-sided binomial p below this
CHANCE_ALPHA = 0.05

#: TP sources in order of preference (lower wins).
_TP_PRIORITY = {"analysis": 0, "prune": 1, "eval": 2}


def model_label(model: Any) -> str:
    """Short display name of a ``--model`` string (the last path component of a path)."""
    s = str(model).rstrip("/\\")
    return Path(s).name or s


# ------------------------------------------------------------------------------------------------
# What each kind of result says about a (model, task, format) group


@dataclass
class DenseDecision:
    """The dense model's decision structure on one (model, task, format), from one result file.

    Attributes:
        model, task, format: the group.
        num_layers: layers of the dense model.
        transition_layer: dense id of the Transition Point (None: the model never decides).
        decisive_fraction: share of the layers in the Decisive Phase (``(L - TP) / L``).
        silent_phase, decisive_phase: first and last layer id of each phase (None if empty).
        final_accuracy, chance: accuracy of the model's own output and of a uniform guess.
        rows: evaluated rows (None if unknown).
        source: the file; kind: its kind (``analysis``, ``prune`` or ``eval``).
        fingerprint: the model fingerprint recorded in the file, if any.
        note: why this candidate cannot give a TP (then it is not used), else "".
    """

    model: str
    task: str
    format: str
    num_layers: int
    transition_layer: int | None
    decisive_fraction: float
    silent_phase: list[int] | None
    decisive_phase: list[int] | None
    final_accuracy: float | None
    chance: float | None
    rows: int | None
    source: Path
    kind: str
    fingerprint: str | None = None
    final_accuracy_norm: float | None = None
    note: str = ""

    @property
    def transition_fraction(self) -> float | None:
        """TP as a fraction of the depth (``TP / L``)."""
        return None if self.transition_layer is None else self.transition_layer / self.num_layers


@dataclass
class CriticalRatio:
    """Critical pruning ratio of one method on one (model, task, format), from a prune result."""

    model: str
    task: str
    format: str
    method: str
    critical_ratio: float | None
    max_ratio: float | None
    collapse_keep: float | None
    num_layers: int
    rows: int | None
    source: Path
    fingerprint: str | None = None
    dense_accuracy: float | None = None
    chance: float | None = None


def _key(model: Any, task: Any, fmt: Any) -> tuple[str, str, str]:
    return (str(model).rstrip("/\\"), str(task), str(fmt))


def _fingerprint(f: Run) -> str | None:
    m = f.provenance.get("model")
    return m.get("fingerprint") if isinstance(m, dict) else None


def _span(ids: list[int]) -> list[int] | None:
    return [ids[0], ids[-1]] if ids else None


def _from_layers(key, layer_ids: list[int], tp: int | None, num_layers: int, **kw) -> DenseDecision:
    """A DenseDecision from the dense model's layer ids and TP (dense id)."""
    ids = list(layer_ids)
    t = ids.index(tp) if tp is not None and tp in ids else None
    silent = ids if t is None else ids[:t]
    decisive = [] if t is None else ids[t:]
    note = "" if ids == list(range(num_layers)) else \
        "its 'dense' model has layer ids other than 0..L-1 (an exported pruned model?)"
    return DenseDecision(*key, num_layers=num_layers, transition_layer=tp,
                         decisive_fraction=0.0 if tp is None else (num_layers - tp) / num_layers,
                         silent_phase=_span(silent), decisive_phase=_span(decisive), note=note, **kw)


def dense_decisions(f: Run) -> list[DenseDecision]:
    """The dense Transition Point(s) a result file provides (none for kinds that carry none)."""
    c = f.config
    fp = _fingerprint(f)
    if f.kind == "analysis":
        s = f.data.get("summary") or {}
        layers = [r["layer"] for r in f.data.get("layers", [])]
        L = int((f.provenance.get("model") or {}).get("num_layers") or s.get("num_layers") or len(layers))
        key = _key(c.get("model"), c.get("task"), c.get("format"))
        note = ""
        if c.get("remove"):
            note = f"analysis of a pruned view (removed {c['remove']}), not of the dense model"
        elif c.get("lens_layers") is not None and len(layers) != L:
            note = f"analysis read only {len(layers)} of {L} layers through the lens (--lens-layers)"
        elif layers != list(range(L)):
            note = "analysis of a pruned model (its layer ids are not 0..L-1), not of the dense model"
        tp = s.get("transition_layer")
        d = DenseDecision(*key, num_layers=L, transition_layer=tp,
                          decisive_fraction=float(s.get("decisive_fraction") if s.get("decisive_fraction") is not None
                                                  else (0.0 if tp is None else (L - tp) / L)),
                          silent_phase=s.get("silent_phase"), decisive_phase=s.get("decisive_phase"),
                          final_accuracy=s.get("final_accuracy"), chance=s.get("chance"),
                          rows=c.get("rows_selected", len(f.data.get("samples", [])) or None), source=f.path,
                          kind="analysis", fingerprint=fp, final_accuracy_norm=s.get("final_accuracy_norm"), note=note)
        return [d]
    if f.kind == "prune":
        key = _key(c.get("model"), c.get("task"), c.get("format"))
        L = int(c.get("num_layers") or 0)
        for body in (f.data.get("methods") or {}).values():
            for r in body.get("records", []):
                if r.get("k") == 0 and L:
                    return [_from_layers(key, r["layer_ids"], r.get("transition_layer"), L,
                                         final_accuracy=r.get("final_accuracy"), chance=r.get("chance"),
                                         rows=c.get("rows_selected"), source=f.path, kind="prune", fingerprint=fp,
                                         final_accuracy_norm=r.get("final_accuracy_norm"))]
        return []
    if f.kind == "eval":
        out = []
        for cell in f.data.get("cells", []):
            if cell.get("removed") != "dense" or not cell.get("layer_ids"):
                continue
            ids = cell["layer_ids"]
            out.append(_from_layers(_key(c.get("model"), cell.get("task"), cell.get("format")), ids,
                                    cell.get("transition_layer"), len(ids), final_accuracy=cell.get("final_accuracy"),
                                    chance=None, rows=c.get("limit"), source=f.path, kind="eval", fingerprint=fp,
                                    final_accuracy_norm=cell.get("final_accuracy_norm")))
        return out
    return []


def critical_ratios(f: Run) -> list[CriticalRatio]:
    """The critical ratio of every method of a ``prune`` result (empty for other kinds)."""
    if f.kind != "prune":
        return []
    c = f.config
    key = _key(c.get("model"), c.get("task"), c.get("format"))
    out = []
    for m, v in sorted((f.data.get("critical_ratio") or {}).items()):
        recs = ((f.data.get("methods") or {}).get(m) or {}).get("records") or []
        dense = next((r for r in recs if r.get("k") == 0), {})
        out.append(CriticalRatio(*key, method=m, critical_ratio=v, max_ratio=c.get("max_ratio"),
                                 collapse_keep=c.get("collapse_keep"), num_layers=int(c.get("num_layers") or 0),
                                 rows=c.get("rows_selected"), source=f.path, fingerprint=_fingerprint(f),
                                 dense_accuracy=dense.get("final_accuracy"), chance=dense.get("chance")))
    return out


# ------------------------------------------------------------------------------------------------
# Gathering


@dataclass
class Gathered:
    """Everything the given folders say per (model, task, format): the chosen TP source, the chosen
    critical ratio per method, and notes about duplicates and unusable candidates."""

    files: list[Run]
    decisions: dict[tuple[str, str, str], DenseDecision]
    ratios: dict[tuple[str, str, str], dict[str, CriticalRatio]]
    notes: dict[tuple[str, str, str], list[str]]
    unusable: dict[tuple[str, str, str], list[str]]

    @property
    def keys(self) -> list[tuple[str, str, str]]:
        return sorted(set(self.decisions) | set(self.ratios) | set(self.unusable))

    @property
    def methods(self) -> list[str]:
        """Pruning methods with a critical ratio somewhere ("ip" first, then alphabetical)."""
        ms = {m for per in self.ratios.values() for m in per}
        return sorted(ms, key=lambda m: (m != "ip", m))


def _rows_key(rows: Any) -> float:
    return -float(rows) if isinstance(rows, (int, float)) and rows is not None else math.inf


def _stage_runs(run: Run) -> list[Run]:
    """A study folder stands for the runs of its stages (analysis, prune, baselines ...: the finished ones); any
    other run for itself."""
    if run.kind != "study":
        return [run]
    return [r for r in find_runs(run.folder, nested=True, skip_incomplete=True) if r.kind != "study"]


def gather(run_dirs: Sequence[str | Path]) -> Gathered:
    """Scan run folders and choose, per (model, task, format), the TP source and the critical ratio
    per method (see the module docstring for the rules).

    Raises:
        DeclensError: no folders, a folder that does not exist, or one with no declens result.
    """
    if not run_dirs:
        raise DeclensError("no run folders given; pass folders written by 'declens analyze' and 'declens prune'")
    files: list[Run] = []
    seen: set[Path] = set()
    for d in run_dirs:
        for f in (g for r in find_runs(d) for g in _stage_runs(r)):
            rp = f.path.resolve()
            if rp not in seen:
                seen.add(rp)
                files.append(f)
    dec_cands: dict[tuple, list[tuple[tuple, DenseDecision]]] = {}
    unusable: dict[tuple, list[str]] = {}
    rat_cands: dict[tuple, dict[str, list[tuple[tuple, CriticalRatio]]]] = {}
    for order, f in enumerate(files):
        for dd in dense_decisions(f):
            key = (dd.model, dd.task, dd.format)
            if dd.note:
                unusable.setdefault(key, []).append(f"{dd.source}: {dd.note}")
                continue
            rank = (_TP_PRIORITY[dd.kind], _rows_key(dd.rows), order)
            dec_cands.setdefault(key, []).append((rank, dd))
        for cr in critical_ratios(f):
            key = (cr.model, cr.task, cr.format)
            rat_cands.setdefault(key, {}).setdefault(cr.method, []).append(((_rows_key(cr.rows), order), cr))
    decisions: dict[tuple, DenseDecision] = {}
    ratios: dict[tuple, dict[str, CriticalRatio]] = {}
    notes: dict[tuple, list[str]] = {}
    for key, cands in dec_cands.items():
        cands.sort(key=lambda x: x[0])
        best = cands[0][1]
        decisions[key] = best
        for _, other in cands[1:]:
            if other.kind == best.kind:
                notes.setdefault(key, []).append(
                    f"Transition Point taken from {best.source} ({best.rows} rows); duplicate {other.kind} result "
                    f"{other.source} ({other.rows} rows, TP {other.transition_layer}) not used")
            elif other.transition_layer != best.transition_layer:
                notes.setdefault(key, []).append(
                    f"{other.kind} result {other.source} puts the dense Transition Point at layer "
                    f"{other.transition_layer} ({other.rows} rows), the {best.kind} result used here at "
                    f"{best.transition_layer} ({best.rows} rows)")
    for key, per in rat_cands.items():
        for m, cands in per.items():
            cands.sort(key=lambda x: x[0])
            best = cands[0][1]
            ratios.setdefault(key, {})[m] = best
            for _, other in cands[1:]:
                notes.setdefault(key, []).append(
                    f"critical ratio ({m}) taken from {best.source} ({best.rows} rows); duplicate prune result "
                    f"{other.source} ({other.rows} rows, critical ratio {other.critical_ratio}) not used")
    for key in decisions:
        d, per = decisions[key], ratios.get(key, {})
        for cr in per.values():
            if d.fingerprint and cr.fingerprint and d.fingerprint != cr.fingerprint:
                notes.setdefault(key, []).append(
                    f"model fingerprints differ between {d.source} ({d.fingerprint}) and {cr.source} "
                    f"({cr.fingerprint}): another dtype or other weights")
                break
    return Gathered(files=files, decisions=decisions, ratios=ratios,
                    notes={k: sorted(set(v), key=v.index) for k, v in notes.items()}, unusable=unusable)


# ------------------------------------------------------------------------------------------------
# The correlation


@dataclass
class Pair:
    """One complete (Transition Point, critical ratio) pair."""

    model: str
    task: str
    format: str
    num_layers: int
    transition_layer: int
    transition_fraction: float
    decisive_fraction: float
    critical_ratio: float
    max_ratio: float | None
    collapse_keep: float | None
    tp_source: str
    tp_kind: str
    ratio_source: str

    @property
    def label(self) -> str:
        """``model · task`` (``· format`` appended by :meth:`CorrelationResult.labels` when formats differ)."""
        return f"{model_label(self.model)} · {self.task}"

    @property
    def margin_error(self) -> float:
        """Predicted safe margin minus measured critical ratio."""
        return self.decisive_fraction - self.critical_ratio

    def to_dict(self) -> dict:
        return {"model": self.model, "task": self.task, "format": self.format, "label": self.label,
                "num_layers": self.num_layers, "transition_layer": self.transition_layer,
                "transition_fraction": self.transition_fraction, "decisive_fraction": self.decisive_fraction,
                "critical_ratio": self.critical_ratio, "margin_error": self.margin_error,
                "max_ratio": self.max_ratio, "collapse_keep": self.collapse_keep, "tp_source": self.tp_source,
                "tp_kind": self.tp_kind, "ratio_source": self.ratio_source}


def pearson(x: Sequence[float], y: Sequence[float]) -> dict:
    """Pearson r and two-sided p (scipy); ``None`` with a reason when undefined (a constant input)."""
    from scipy.stats import pearsonr

    n = len(x)
    if len(set(x)) < 2 or len(set(y)) < 2:
        which = "x" if len(set(x)) < 2 else "y"
        return {"r": None, "p": None, "n": n, "undefined": f"all {which} values are equal"}
    res = pearsonr(x, y)
    return {"r": float(res.statistic), "p": float(res.pvalue), "n": n}


@register_result("correlate", CORRELATE_FILE, "correlate")
@dataclass
class CorrelationResult:
    """Transition Point vs critical pruning ratio across model-task pairs.

    Attributes:
        config: the inputs (``run_dirs``, ``method``).
        provenance: versions (scipy included) and creation time.
        method: the pruning method whose critical ratio is used.
        pairs: the complete pairs, sorted by (model, task, format).
        incomplete: groups left out: ``{"model", "task", "format", "missing"}``.
        stats: ``layer`` and ``fraction``: Pearson r / p / n of TP (layer index, fraction of depth)
            against the critical ratio; ``safe_margin``: ``mae``, ``bias`` (mean predicted minus
            measured), and r / p / n of the Decisive Phase fraction against the critical ratio.
        notes: duplicates not used, disagreeing sources, undefined statistics.
    """

    config: dict
    provenance: dict
    method: str
    pairs: list[Pair]
    incomplete: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    SCHEMA_VERSION = 1  #: of ``correlate.json`` (see :func:`declens.results.register_result`)

    def labels(self) -> list[str]:
        """Point labels: ``model · task``, with ``· format`` when the pairs mix formats or repeat a label."""
        base = [p.label for p in self.pairs]
        if len(set(base)) < len(base) or len({p.format for p in self.pairs}) > 1:
            return [f"{p.label} · {p.format}" for p in self.pairs]
        return base

    def compute(self) -> "CorrelationResult":
        """Fill :attr:`stats` from :attr:`pairs`."""
        tl = [float(p.transition_layer) for p in self.pairs]
        tf = [p.transition_fraction for p in self.pairs]
        df = [p.decisive_fraction for p in self.pairs]
        cr = [p.critical_ratio for p in self.pairs]
        err = [p.margin_error for p in self.pairs]
        margin = pearson(df, cr)
        margin.update(mae=sum(abs(e) for e in err) / len(err), bias=sum(err) / len(err),
                      max_abs_error=max(abs(e) for e in err))
        self.stats = {"layer": pearson(tl, cr), "fraction": pearson(tf, cr), "safe_margin": margin}
        for name, s in self.stats.items():
            if s.get("undefined"):
                self.notes.append(f"Pearson r ({name}) is undefined: {s['undefined']}")
        return self

    def to_dict(self) -> dict:
        return {"kind": "correlate", "config": self.config, "provenance": self.provenance, "method": self.method,
                "num_pairs": len(self.pairs), "stats": self.stats, "pairs": [p.to_dict() for p in self.pairs],
                "incomplete": self.incomplete, "notes": self.notes}

    def csv_text(self) -> str:
        """One row per pair (the CSV file's content)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        cols = ["model", "task", "format", "num_layers", "transition_layer", "transition_fraction",
                "decisive_fraction", "critical_ratio", "margin_error", "max_ratio", "tp_kind", "tp_source",
                "ratio_source"]
        w.writerow(cols)
        for p in self.pairs:
            d = p.to_dict()
            w.writerow([f"{d[c]:.6g}" if isinstance(d[c], float) else ("" if d[c] is None else d[c]) for c in cols])
        return buf.getvalue()

    def figures(self) -> dict[str, bytes]:
        """PNG bytes of ``correlate.png`` and ``safe_margin.png`` (drawn by :func:`declens.plots.correlation_figures`)."""
        from ..results import figure_drawer

        return figure_drawer("correlate")(self)

    @classmethod
    def load(cls, path: str | Path) -> "CorrelationResult":
        """Read a folder written by :meth:`save` (verified against its manifest)."""
        from ..results import read_result_file

        d = read_result_file(path, CORRELATE_FILE, "correlate")[1]
        fields = set(Pair.__dataclass_fields__)
        pairs = [Pair(**{k: v for k, v in p.items() if k in fields}) for p in d["pairs"]]
        return cls(config=d["config"], provenance=d["provenance"], method=d["method"], pairs=pairs,
                   incomplete=d.get("incomplete", []), stats=d.get("stats", {}), notes=d.get("notes", []))

    def save(self, out_dir: str | Path) -> Path:
        """Write ``correlate.json``, ``correlate.csv``, ``correlate.png`` and ``safe_margin.png`` as one run
        folder (the manifest last, see :class:`~declens.results.RunWriter`)."""
        out = Path(out_dir)
        with RunWriter(out, "correlate") as run:
            run.text(CORRELATE_CSV, self.csv_text())
            for name, data in self.figures().items():
                run.bytes(name, data)
            run.json(CORRELATE_FILE, self.to_dict())
        return out


def above_chance_p(accuracy: float, chance: float, rows: int) -> float:
    """One-sided binomial p-value of ``accuracy`` on ``rows`` rows against a uniform guess's ``chance`` (the
    probability that guessing scores at least as many rows right; approximate where items have different
    numbers of options, ``chance`` being their mean)."""
    from scipy.stats import binomtest

    return float(binomtest(int(round(accuracy * rows)), int(rows), float(chance), alternative="greater").pvalue)


def _missing(key, g: Gathered, method: str, chance_alpha: float = CHANCE_ALPHA) -> str | None:
    """Why a group is not a complete pair (None if it is)."""
    d = g.decisions.get(key)
    per = g.ratios.get(key, {})
    why = []
    if d is None:
        extra = "; ".join(g.unusable.get(key, []))
        why.append("no dense Transition Point (no analysis, prune or eval result of the dense model)"
                   + (f" [{extra}]" if extra else ""))
    elif d.transition_layer is None:
        why.append(f"the dense model never decides (Decision Margin not positive at the last layer) in {d.source}")
    cr = per.get(method)
    if cr is None:
        have = ", ".join(sorted(per)) or "none"
        why.append(f"no prune result with method {method!r} (methods found: {have})")
    elif cr.critical_ratio is None:
        if cr.dense_accuracy is not None and cr.chance is not None and cr.dense_accuracy <= cr.chance:
            why.append(f"the dense model is not above chance in {cr.source} (accuracy {cr.dense_accuracy:.3g}, "
                       f"chance {cr.chance:.3g}), so no collapse can be measured")
        else:
            why.append(f"critical ratio ({method}) not reached within --max-ratio {cr.max_ratio} in {cr.source}")
    elif cr.dense_accuracy is not None and cr.chance is not None and cr.rows:
        # a model that guesses has no accuracy to lose: its "collapse" is a matter of sampling noise
        p = above_chance_p(cr.dense_accuracy, cr.chance, int(cr.rows))
        if p >= chance_alpha:
            why.append(f"the dense model is not significantly above chance in {cr.source} (accuracy "
                       f"{cr.dense_accuracy:.3g} on {int(cr.rows)} rows, chance {cr.chance:.3g}: one-sided binomial "
                       f"p = {p:.2g}, needs < {chance_alpha:g})")
    return "; ".join(why) or None


def correlate(run_dirs: Sequence[str | Path], method: str = "ip", chance_alpha: float = CHANCE_ALPHA) -> CorrelationResult:
    """Correlate the Transition Point with the critical pruning ratio across model-task pairs.

    Args:
        run_dirs: folders written by ``declens analyze`` / ``prune`` / ``eval`` (or their JSON files).
        method: the pruning method whose critical ratio is used (``ip``, ``shortgpt``, ``last`` ...).
        chance_alpha: a pair counts only when its dense model is above chance with a one-sided binomial
            p-value below this (:func:`above_chance_p`; 1 keeps every pair above chance).

    Returns:
        A :class:`CorrelationResult` with Pearson r / p for TP as layer index and as fraction of
        depth, and the safe-pruning-margin check.

    Raises:
        DeclensError: a folder is missing or holds no declens result, or fewer than three complete
            pairs were found (the message lists the pairs found and what each other group lacks).
    """
    g = gather(run_dirs)
    return correlate_gathered(g, method, [str(d) for d in run_dirs], chance_alpha)


def correlate_gathered(g: Gathered, method: str, run_dirs: Sequence[str] = (),
                       chance_alpha: float = CHANCE_ALPHA) -> CorrelationResult:
    """:func:`correlate` on already gathered results (the report computes one per method)."""
    if not 0 < chance_alpha <= 1:
        raise DeclensError(f"chance_alpha must be in (0, 1], got {chance_alpha}: the significance level of 'the dense "
                           "model is above chance' (1 keeps every pair above chance)")
    pairs, incomplete = [], []
    for key in g.keys:
        why = _missing(key, g, method, chance_alpha)
        if why:
            incomplete.append({"model": key[0], "task": key[1], "format": key[2], "missing": why})
            continue
        d, cr = g.decisions[key], g.ratios[key][method]
        pairs.append(Pair(*key, num_layers=d.num_layers, transition_layer=int(d.transition_layer),
                          transition_fraction=d.transition_layer / d.num_layers,
                          decisive_fraction=float(d.decisive_fraction), critical_ratio=float(cr.critical_ratio),
                          max_ratio=cr.max_ratio, collapse_keep=cr.collapse_keep, tp_source=str(d.source),
                          tp_kind=d.kind, ratio_source=str(cr.source)))
    if len(pairs) < MIN_PAIRS:
        found = ", ".join(f"{model_label(p.model)} · {p.task} · {p.format}" for p in pairs) or "none"
        lacking = "; ".join(f"{model_label(i['model'])} · {i['task']} · {i['format']}: {i['missing']}"
                            for i in incomplete) or "no other model/task/format found"
        raise DeclensError(
            f"the correlation needs at least {MIN_PAIRS} complete (Transition Point, critical ratio) pairs of "
            f"different model/task/format; found {len(pairs)} ({found}) for method {method!r}. Missing: {lacking}. "
            f"Give folders of 'declens analyze' and 'declens prune --method {method}' for more models or tasks "
            f"(raise --max-ratio where the critical ratio was not reached)")
    notes = [f"{model_label(k[0])} · {k[1]} · {k[2]}: {n}" for k in sorted(g.notes) for n in g.notes[k]]
    keeps = {p.collapse_keep for p in pairs}
    if len(keeps) > 1:
        notes.append(f"critical ratios were measured with different --collapse-keep values: {sorted(keeps, key=str)}")
    from scipy import __version__ as scipy_version

    prov = provenance()
    prov["versions"]["scipy"] = scipy_version
    prov["inputs"] = [{"path": str(f.path), "kind": f.kind, "model_fingerprint": _fingerprint(f),
                       "data_fingerprint": (f.provenance.get("data") or {}).get("fingerprint")} for f in g.files]
    res = CorrelationResult(config={"run_dirs": list(run_dirs), "method": method, "chance_alpha": chance_alpha,
                                    "chance_test": "one-sided binomial test of the dense accuracy against chance"},
                            provenance=prov, method=method,
                            pairs=pairs, incomplete=incomplete, notes=notes)
    return res.compute()
