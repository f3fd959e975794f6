"""One self-contained HTML page over any number of declens run folders.

:func:`build_report` gathers what the folders hold and writes a single ``.html`` file that needs
nothing else: figures are embedded as base64 ``data:`` URIs, the style sheet is inline, there is no
script, font or other external resource. The page has

1. **headline numbers** per (model, task, format): Transition Point, Silent / Decisive phase spans,
   final accuracy against chance, the critical pruning ratio of every method found, and the safe
   pruning margin estimate (the Decisive Phase's share of the depth) next to it;
2. the **correlation** of the Transition Point with the critical ratio (paper Section 4.2.2) for
   every pruning method with at least three complete model-task pairs, or the reason it cannot be
   computed (see :mod:`declens.analyses.correlation` for how pairs are formed);
3. **one section per run folder**, in the order given: a table per result file by kind (``analysis``:
   summary and the per-layer DM / accuracy / KL table in a collapsed ``<details>``; ``prune``: the
   per-ratio *Remain / #Removed / Pruning Ratio / Removed Layer IDs* table per method; ``eval``: the
   accuracy table; any other kind (``cka``, ``noise``, ``recover``, ``ablate``, ...): its config and
   its top-level scalar fields), every image of the run, and the provenance (model and data
   fingerprints, library versions) in small print.

Every folder is found by :func:`declens.results.find_runs` and verified against its ``manifest.json``
before anything is read (:func:`declens.results.verify_run_folder`): a folder left half-written by a killed run, or holding a
file of another run, is refused with a clear error instead of being shown; only files the manifest
lists are read or embedded.

All text from the result files is escaped (:func:`html.escape`). The output is deterministic: the
same folders give the same bytes (no generation time is written; each file's own ``created`` time
is shown in its provenance).

Example:
    >>> build_report(["runs/smollm2_arc", "runs/prune_smollm2_arc"], "report.html", title="SmolLM2 on ARC")
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from .analyses.correlation import CorrelationResult, Gathered, correlate_gathered, gather, model_label
from .errors import DeclensError
from .results import Run, RunManifest, atomic_write_text, incomplete_error

#: image types embedded, by suffix
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
               ".gif": "image/gif", ".webp": "image/webp"}
#: figures shown first, in this order; the rest follow alphabetically
FIGURE_ORDER = ("overview.png", "dm.png", "accuracy.png", "option_frequency.png", "accuracy_vs_ratio.png",
                "correlate.png", "safe_margin.png")

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;
padding:1rem 1.5rem 3rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.3rem;border-bottom:2px solid #ddd;padding-bottom:.2rem;
margin-top:2.2rem}h3{font-size:1.08rem;margin-top:1.4rem}h4{font-size:.98rem;margin:1rem 0 .3rem}
table{border-collapse:collapse;margin:.4rem 0 .9rem;font-size:.86rem}
th,td{border:1px solid #d6d6d6;padding:.22rem .5rem;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.dense td{background:#fafafa;font-style:italic}
tr.decisive td{background:#eef8ec}table.kv td:first-child{text-align:left;color:#555}
table.kv td{text-align:left}
figure{margin:.8rem 0 1.4rem}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.8rem;color:#666}.small,.prov{font-size:.78rem;color:#666}.prov code{font-size:.76rem}
.note{background:#fff8e1;border-left:4px solid #f0c040;padding:.4rem .7rem;margin:.6rem 0;font-size:.9rem}
.err{background:#fdecea;border-left:4px solid #d9534f;padding:.4rem .7rem;margin:.6rem 0;font-size:.9rem}
details{margin:.4rem 0 .8rem}summary{cursor:pointer;color:#245;font-size:.92rem}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}nav ol{font-size:.9rem}
"""


# ------------------------------------------------------------------------------------------------
# Small helpers


def e(x: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape("" if x is None else str(x), quote=True)


def num(v: Any, digits: int = 4) -> str:
    """A compact, escaped rendering of a value (numbers to ``digits`` significant digits)."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return e(v)
    if isinstance(v, int):
        return e(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return e(f"{v:.{digits}g}")
    if isinstance(v, (list, dict)):
        s = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
        return e(s if len(s) <= 160 else s[:157] + "...")
    return e(v)


def pct(v: Any, digits: int = 1) -> str:
    return "–" if not isinstance(v, (int, float)) or isinstance(v, bool) else e(f"{100 * v:.{digits}f}%")


def span(s: Any) -> str:
    return "–" if not s else e(f"{s[0]}–{s[1]}")


def table(head: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "", left: Sequence[int] = (),
          row_cls: Sequence[str] | None = None) -> str:
    """An HTML table; cells are already-escaped HTML; columns in ``left`` are left-aligned."""
    left = set(left)
    out = [f'<table class="{e(cls)}">' if cls else "<table>", "<thead><tr>"]
    out += [f'<th class="l">{h}</th>' if i in left else f"<th>{h}</th>" for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for n, r in enumerate(rows):
        c = row_cls[n] if row_cls and n < len(row_cls) and row_cls[n] else ""
        out.append(f'<tr class="{e(c)}">' if c else "<tr>")
        out += [f'<td class="l">{v}</td>' if i in left else f"<td>{v}</td>" for i, v in enumerate(r)]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def kv_table(pairs: Iterable[tuple[str, str]]) -> str:
    """Two-column key / value table (values already escaped)."""
    return '<table class="kv"><tbody>' + "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in pairs) + \
        "</tbody></table>"


def img_tag(data: bytes, mime: str, name: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="data:{e(mime)};base64,{b64}" alt="{e(name)}" title="{e(name)}">'
            f"<figcaption>{e(name)}</figcaption></figure>")


def _flat_scalars(d: dict, prefix: str = "", depth: int = 0, limit: int = 60) -> list[tuple[str, Any]]:
    """Scalar (and short scalar-list) fields of a dict, nested dicts flattened to ``a.b.c`` (three levels)."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, (str, int, float, bool)) or v is None:
            out.append((name, v))
        elif isinstance(v, list) and len(v) <= 12 and all(isinstance(x, (str, int, float, bool)) or x is None for x in v):
            out.append((name, v))
        elif isinstance(v, dict) and depth < 2:
            out.extend(_flat_scalars(v, f"{name}.", depth + 1, limit))
        if len(out) >= limit:
            break
    return out[:limit]


# ------------------------------------------------------------------------------------------------
# Sections per kind


def _provenance(f: Run) -> str:
    p = f.provenance
    items = [f"file <code>{e(f.path.name)}</code>", f"kind <code>{e(f.kind)}</code>"]
    m = p.get("model") if isinstance(p.get("model"), dict) else {}
    if m:
        items.append(f"model <code>{e(m.get('spec'))}</code> fingerprint <code>{e(m.get('fingerprint'))}</code>"
                     f" ({e(m.get('family'))}, {e(m.get('num_layers'))} layers, {e(m.get('dtype'))} on "
                     f"{e(m.get('device'))})")
        src = m.get("source") if isinstance(m.get("source"), dict) else {}
        if src.get("gguf_sha256"):
            items.append(f"weights sha256 <code>{e(src['gguf_sha256'])}</code>")
    dd = p.get("data") if isinstance(p.get("data"), dict) else {}
    if dd:
        items.append(f"data <code>{e(dd.get('task'))}</code>/<code>{e(dd.get('split'))}</code> fingerprint "
                     f"<code>{e(dd.get('fingerprint'))}</code>")
    if isinstance(p.get("data_fingerprints"), dict):
        items.append("data fingerprints " + ", ".join(f"{e(k)} <code>{e(v)}</code>"
                                                     for k, v in p["data_fingerprints"].items()))
    v = p.get("versions") if isinstance(p.get("versions"), dict) else {}
    if v:
        items.append("versions " + ", ".join(f"{e(k)} {e(x)}" for k, x in v.items()))
    if p.get("created"):
        items.append(f"created {e(p['created'])}")
    if isinstance(p.get("timing"), dict):
        items.append("timing " + ", ".join(f"{e(k)} {num(x)}" for k, x in p["timing"].items()))
    return '<p class="prov">' + " · ".join(items) + "</p>"


def _config_details(f: Run, open_: bool = False) -> str:
    c = f.config
    if not c:
        return '<p class="small">no config recorded</p>'
    return (f"<details{' open' if open_ else ''}><summary>config ({len(c)} fields)</summary>"
            + kv_table((k, num(v)) for k, v in c.items()) + "</details>")


def _analysis_section(f: Run) -> str:
    d, c = f.data, f.config
    s = d.get("summary") or {}
    tp = s.get("transition_layer")
    acc = num(s.get("final_accuracy"))
    if s.get("final_accuracy_norm") is not None:
        acc += f" (length-normalised {num(s['final_accuracy_norm'])})"
    head = kv_table([
        ("model", e(c.get("model"))),
        ("task / format", f"{e(c.get('task'))} · {e(c.get('format'))} (split {e(c.get('split'))}, "
                          f"{e(c.get('rows_selected', len(d.get('samples', []))))} rows)"),
        ("removed layers", num(c.get("remove") or [])),
        ("final accuracy", acc),
        ("chance", num(s.get("chance"))),
        ("final Decision Margin", num(s.get("final_dm"))),
        ("Transition Point", "none (DM never stays positive)" if tp is None else
         f"layer {e(tp)} ({pct(s.get('transition_fraction'))} of depth)"),
        ("Silent Phase", span(s.get("silent_phase"))),
        ("Decisive Phase", span(s.get("decisive_phase")) + f" ({pct(s.get('decisive_fraction'))} of depth)"),
        ("final KL(OF ‖ gold)", num(s.get("final_kl"))),
    ])
    labels = d.get("option_labels") or []
    rows, cls = [], []
    has_norm = any("accuracy_norm" in r for r in d.get("layers", []))
    for r in d.get("layers", []):
        ofs = [(lab, r.get(f"of_{lab}")) for lab in labels if r.get(f"of_{lab}") is not None]
        top = max(ofs, key=lambda x: x[1]) if ofs else None
        row = [e(r.get("layer")), e(r.get("phase")), num(r.get("dm")),
               f"[{num(r.get('dm_q25'), 3)}, {num(r.get('dm_q75'), 3)}]", num(r.get("accuracy"))]
        if has_norm:
            row.append(num(r.get("accuracy_norm")))
        row += [num(r.get("kl")), "–" if top is None else f"{e(top[0])} ({num(top[1], 2)})"]
        rows.append(row)
        cls.append("decisive" if r.get("phase") == "decisive" else "")
    cols = ["layer", "phase", "mean DM", "DM IQR", "accuracy"] + (["acc_norm"] if has_norm else []) + \
        ["KL(OF‖gold)", "top option (share)"]
    layers = (f"<details><summary>per-layer metrics ({len(rows)} layers)</summary>"
              + table(cols, rows, left=(1,), row_cls=cls) + "</details>")
    return head + layers + _config_details(f)


def _ratio_text(v: Any, max_ratio: Any, dense_acc: Any = None, chance: Any = None) -> str:
    """A critical ratio, or why there is none (never collapsed within the run, or nothing to lose)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return pct(v)
    if isinstance(dense_acc, (int, float)) and isinstance(chance, (int, float)) and dense_acc <= chance:
        return "n/a (dense model not above chance)"
    if isinstance(max_ratio, (int, float)):
        return f"not reached (&gt; {pct(max_ratio)})"
    return "not reached"


def _dense_acc_chance(dense: dict | None) -> tuple[Any, Any]:
    return (None, None) if not dense else (dense.get("final_accuracy"), dense.get("chance"))


def _prune_section(f: Run) -> str:
    d, c = f.data, f.config
    crit = d.get("critical_ratio") or {}
    methods = d.get("methods") or {}
    out = [kv_table([
        ("model", e(c.get("model"))),
        ("task / format", f"{e(c.get('task'))} · {e(c.get('format'))} (split {e(c.get('split'))}, "
                          f"{e(c.get('rows_selected'))} rows)"),
        ("layers", e(c.get("num_layers"))),
        ("pruned up to", f"{pct(c.get('max_ratio'))} ({e(c.get('max_removed'))} layers)"),
        ("critical ratio criterion", f"accuracy above chance at most {pct(c.get('collapse_keep'), 0)} of the dense "
                                     f"model's"),
        ("SKIP-Prun", num((c.get("skip_prun") or {}).get("enabled"))),
        ("calibration", num(c.get("calibration"))),
    ])]
    rows = []
    for m in methods:
        recs = methods[m].get("records") or []
        dense = next((r for r in recs if r.get("k") == 0), None)
        tab = methods[m].get("table") or []
        last = tab[-1] if tab else None
        rows.append([e(m), _ratio_text(crit.get(m), c.get("max_ratio"), *_dense_acc_chance(dense)),
                     num(None if dense is None else dense.get("final_accuracy")),
                     num(None if last is None else last.get("final_accuracy")),
                     pct(None if last is None else last.get("ratio")), e(len(recs))])
    out.append("<h4>critical pruning ratio per method</h4>")
    out.append(table(["method", "critical ratio", "dense accuracy", "accuracy at max ratio", "max ratio",
                      "states evaluated"], rows, left=(0,)))
    for m, body in methods.items():
        recs = body.get("records") or []
        dense = next((r for r in recs if r.get("k") == 0), None)
        rows, cls = [], []
        if dense is not None:
            rows.append([e(c.get("num_layers")), "0", "0.000%", num(dense.get("final_accuracy")), num(dense.get("final_dm")),
                         num(dense.get("transition_layer")), "[] (dense)"])
            cls.append("dense")
        for r in body.get("table") or []:
            rows.append([e(r.get("remain")), e(r.get("removed_count")), pct(r.get("ratio"), 3), num(r.get("final_accuracy")),
                         num(r.get("final_dm")), num(r.get("transition_layer")), e(json.dumps(r.get("removed")))])
            cls.append("")
        out.append(f"<h4>{e(m)}: removed layers per pruning ratio (critical ratio "
                   f"{_ratio_text(crit.get(m), c.get('max_ratio'), *_dense_acc_chance(dense))})</h4>")
        out.append(table(["Remain", "#Removed", "Pruning Ratio", "accuracy", "final DM", "TP",
                          "Removed Layer IDs (0-based)"], rows, left=(6,), row_cls=cls))
    work = d.get("work")
    if isinstance(work, dict) and work:
        out.append('<p class="small">work: ' + ", ".join(f"{e(k)} {num(v)}" for k, v in work.items()) + "</p>")
    out.append(_config_details(f))
    return "".join(out)


def _eval_tables(f: Run) -> str:
    """Accuracy (%) per task and configuration, one table per format (``eval`` and eval-shaped results)."""
    d = f.data
    cells = d.get("cells") or []
    tasks = d.get("tasks") or sorted({x.get("task") for x in cells}, key=str)
    formats = d.get("formats") or sorted({x.get("format") for x in cells}, key=str)
    labels: list[str] = []
    for x in cells:
        if x.get("removed") not in labels:
            labels.append(x.get("removed"))
    by = {(x.get("task"), x.get("format"), x.get("removed")): x for x in cells}
    out = [f'<p>model <code>{e(f.config.get("model"))}</code>; columns: removed layer ids (dense numbering)</p>']
    for fm in formats:
        rows = []
        sums = {lab: [] for lab in labels}
        for t in tasks:
            row = [e(t)]
            for lab in labels:
                cell = by.get((t, fm, lab))
                a = None if cell is None else cell.get("final_accuracy")
                row.append("–" if a is None else e(f"{100 * a:.2f}"))
                if a is not None:
                    sums[lab].append(a)
            rows.append(row)
        rows.append(["<b>Avg</b>"] + [("–" if not v else "<b>" + format(100 * sum(v) / len(v), ".2f") + "</b>")
                                       for v in sums.values()])
        out.append(f"<h4>accuracy (%), {e(fm)} format</h4>")
        out.append(table(["Task"] + [e(lab) for lab in labels], rows, left=(0,)))
    return "".join(out)


def _eval_section(f: Run) -> str:
    return _eval_tables(f) + _config_details(f)


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


def _row_tables(d: dict, max_rows: int = 500, max_cols: int = 24) -> str:
    """Top-level lists of flat records (like a ``table`` field), each as a collapsed table."""
    out = []
    for k, v in d.items():
        if k in ("kind", "config", "provenance", "cells") or not isinstance(v, list) or not v or len(v) > max_rows:
            continue
        if not all(isinstance(r, dict) for r in v):
            continue
        cols: list[str] = []
        for r in v:
            cols += [c for c in r if c not in cols]
        flat = all(_is_scalar(x) or (isinstance(x, list) and len(x) <= 16 and all(_is_scalar(y) for y in x))
                   for r in v for x in r.values())
        if not flat or len(cols) > max_cols:
            continue
        rows = [[num(r.get(c)) for c in cols] for r in v]
        out.append(f"<details><summary>{e(k)} ({len(v)} rows)</summary>" + table([e(c) for c in cols], rows)
                   + "</details>")
    return "".join(out)


def _generic_section(f: Run) -> str:
    fields = _flat_scalars({k: v for k, v in f.data.items() if k not in ("kind", "config", "provenance")})
    out = [_config_details(f, open_=True)]
    if fields:
        out.append("<h4>summary (top-level fields)</h4>" + kv_table((k, num(v)) for k, v in fields))
    else:
        out.append('<p class="small">no top-level scalar fields</p>')
    cells = f.data.get("cells")
    if isinstance(cells, list) and cells and all(isinstance(c, dict) and {"task", "format", "removed", "final_accuracy"}
                                                 <= set(c) for c in cells):
        out.append(_eval_tables(f))  # eval-shaped results (ablate): the accuracy table
    out.append(_row_tables(f.data))
    return "".join(out)


SECTIONS = {"analysis": _analysis_section, "prune": _prune_section, "eval": _eval_section}


# ------------------------------------------------------------------------------------------------
# Headlines and correlation


def _headlines(g: Gathered) -> str:
    keys = g.keys
    if not keys:
        return ('<p class="small">No analysis, prune or eval results: nothing to summarise per model and task '
                "(the sections below show what the folders hold).</p>")
    methods = g.methods
    head = ["model", "task", "format", "layers", "Transition Point", "Silent Phase", "Decisive Phase",
            "final accuracy", "chance"] + [f"critical ratio ({e(m)})" for m in methods] + \
        ["safe margin estimate", "TP from"]
    rows = []
    for key in keys:
        dd = g.decisions.get(key)
        per = g.ratios.get(key, {})
        row = [e(model_label(key[0])), e(key[1]), e(key[2])]
        if dd is None:
            why = "; ".join(g.unusable.get(key, [])) or "no dense result"
            row += ["–", f'<span title="{e(why)}">–</span>', "–", "–", "–", "–"]
        else:
            tp = "none" if dd.transition_layer is None else \
                f"{e(dd.transition_layer)} ({pct(dd.transition_fraction)})"
            acc = num(dd.final_accuracy, 3)
            if dd.final_accuracy_norm is not None:
                acc += f" (norm {num(dd.final_accuracy_norm, 3)})"
            row += [e(dd.num_layers), tp, span(dd.silent_phase), span(dd.decisive_phase), acc, num(dd.chance, 3)]
        for m in methods:
            cr = per.get(m)
            row.append("–" if cr is None else _ratio_text(cr.critical_ratio, cr.max_ratio, cr.dense_accuracy, cr.chance))
        row.append("–" if dd is None or dd.transition_layer is None else pct(dd.decisive_fraction))
        row.append("–" if dd is None else f'<span class="small">{e(dd.kind)}: {e(dd.source)}</span>')
        rows.append(row)
    note = ('<p class="small">Transition Point: first layer from which the mean Decision Margin stays positive '
            "(layer index, and share of the depth before it). Critical ratio: smallest pruning ratio whose best "
            "state keeps at most the run's --collapse-keep share of the dense accuracy above chance. Safe margin "
            "estimate: the Decisive Phase's share of the depth, the paper's predictor of the critical ratio.</p>")
    extra = []
    for key in keys:
        for n in g.notes.get(key, []):
            extra.append(f"<li>{e(model_label(key[0]))} · {e(key[1])} · {e(key[2])}: {e(n)}</li>")
    notes = f'<details><summary>notes ({len(extra)})</summary><ul class="small">{"".join(extra)}</ul></details>' \
        if extra else ""
    return table(head, rows, left=(0, 1, 2, len(head) - 1)) + note + notes


def _correlation_block(res: CorrelationResult) -> str:
    st = res.stats

    def rp(s: dict) -> list[str]:
        if s.get("r") is None:
            return [f'undefined ({e(s.get("undefined"))})', "–", e(s.get("n"))]
        return [e(f"{s['r']:+.3f}"), e(f"{s['p']:.3g}"), e(s["n"])]

    out = [table(["relation", "Pearson r", "p (two-sided)", "pairs"], [
        ["TP layer index vs critical ratio"] + rp(st["layer"]),
        ["TP fraction of depth vs critical ratio"] + rp(st["fraction"]),
        ["safe margin estimate vs critical ratio"] + rp(st["safe_margin"]),
    ], left=(0,))]
    sm = st["safe_margin"]
    mae, bias, worst = (format(sm["mae"], ".3f"), format(sm["bias"], "+.3f"), format(sm["max_abs_error"], ".3f"))
    out.append(f"<p>Safe pruning margin estimate (Decisive Phase share of depth) as a prediction of the critical "
               f"ratio: mean absolute error <b>{mae}</b>, mean signed error (estimate − measured) {bias}, "
               f"largest error {worst}.</p>")
    labels = res.labels()
    rows = [[e(lab), e(p.transition_layer), pct(p.transition_fraction), pct(p.decisive_fraction),
             pct(p.critical_ratio), e(f"{p.margin_error:+.3f}"), e(p.tp_kind)] for lab, p in zip(labels, res.pairs)]
    out.append(table(["pair", "TP layer", "TP fraction", "safe margin estimate", "critical ratio",
                      "estimate − measured", "TP from"], rows, left=(0, 6)))
    for name, data in res.figures().items():
        out.append(img_tag(data, "image/png", f"{name} ({res.method})"))
    if res.incomplete:
        items = "".join(f"<li>{e(model_label(i['model']))} · {e(i['task'])} · {e(i['format'])}: {e(i['missing'])}</li>"
                        for i in res.incomplete)
        out.append(f'<details><summary>left out ({len(res.incomplete)})</summary><ul class="small">{items}'
                   "</ul></details>")
    if res.notes:
        out.append('<ul class="small">' + "".join(f"<li>{e(n)}</li>" for n in res.notes) + "</ul>")
    return "".join(out)


def _correlations(g: Gathered, run_dirs: Sequence[str]) -> str:
    methods = g.methods
    if not methods:
        return ('<p class="note">Not computed: the correlation of the Transition Point with the critical pruning ratio '
                "needs prune results ('declens prune') for at least 3 model/task/format combinations; none of the "
                "given folders holds a prune result.</p>")
    out = []
    for m in methods:
        out.append(f"<h3>method {e(m)}</h3>")
        try:
            res = correlate_gathered(g, m, run_dirs)
        except DeclensError as err:
            out.append(f'<p class="note">Not computed: {e(err)}</p>')
            continue
        out.append(_correlation_block(res))
    return "".join(out)


# ------------------------------------------------------------------------------------------------
# Folders and the page


def _figures(manifest: RunManifest) -> list[Path]:
    """The images of a run: only files its manifest lists (never leftovers of another run)."""
    imgs = manifest.paths(tuple(IMAGE_TYPES))
    order = {n: i for i, n in enumerate(FIGURE_ORDER)}
    return sorted(imgs, key=lambda p: (order.get(p.name, len(order)), p.name))


def _read_listed(manifest: RunManifest, p: Path) -> bytes:
    """The bytes of a listed file, checked against the manifest's sha256 as they are read."""
    data = p.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.files[p.name]["sha256"]:
        raise incomplete_error(manifest.folder, f"{p.name} changed while the report was built")
    return data


def _folder_section(idx: int, folder: Path, files: list[Run], manifest: RunManifest) -> str:
    kinds = ", ".join(sorted({f.kind for f in files}))
    out = [f'<section id="run-{idx}"><h2>{idx}. {e(folder.name or folder)} <span class="small">({e(kinds)})</span></h2>',
           f'<p class="small">folder <code>{e(folder)}</code></p>']
    for f in files:
        out.append(f"<h3>{e(f.path.name)} — {e(f.kind)}</h3>")
        out.append(SECTIONS.get(f.kind, _generic_section)(f))
        out.append(_provenance(f))
    figs = _figures(manifest)
    if figs:
        out.append(f"<h3>figures ({len(figs)})</h3>")
        for p in figs:
            try:
                data = _read_listed(manifest, p)
            except OSError as err:
                out.append(f'<p class="err">cannot read {e(p.name)}: {e(err)}</p>')
                continue
            out.append(img_tag(data, IMAGE_TYPES[p.suffix.lower()], p.name))
    else:
        out.append('<p class="small">no figures in this folder</p>')
    out.append("</section>")
    return "".join(out)


def build_report(run_dirs: Sequence[str | Path], out_html: str | Path, title: str | None = None,
                 preface: str = "") -> Path:
    """Write one self-contained HTML report over run folders.

    Args:
        run_dirs: folders written by ``declens analyze``, ``prune``, ``eval``, ``correlate`` or any
            command that writes a ``*.json`` with a top-level ``kind`` (a result file itself may be
            given too; its folder's figures are shown). Each must be complete (see the module docstring).
        out_html: the page to write (its folder is created; written atomically).
        title: page title (default: "declens report" and the models found).
        preface: HTML placed before the headline numbers (a study's verdict table, say).

    Returns:
        The path of the written page.

    Raises:
        DeclensError: no folders, a folder that does not exist, holds no declens result, or is
            incomplete or was modified after it was written.
    """
    g = gather(run_dirs)  # finds every run (declens.results.find_runs), each verified against its manifest
    folders: list[tuple[Path, list[Run], RunManifest]] = [(f.folder, [f], f.manifest) for f in g.files]
    models = sorted({model_label(f.config.get("model")) for _, fs, _ in folders for f in fs if f.config.get("model")})
    if title is None:
        title = "declens report" + (f": {', '.join(models)}" if models else "")
    from ._version import __version__

    body = [f"<h1>{e(title)}</h1>",
            f'<p class="small">declens {e(__version__)} · {len(folders)} run folder(s) · '
            f"{len(g.files)} result file(s) · models: {e(', '.join(models) or '–')}</p>",
            "<nav><ol>" + '<li><a href="#headlines">Headline numbers</a></li>'
            + '<li><a href="#correlation">Transition Point vs critical pruning ratio</a></li>'
            + "".join(f'<li><a href="#run-{i}">{e(folder.name or folder)}</a> '
                      f'<span class="small">({e(", ".join(sorted({f.kind for f in fs})))})</span></li>'
                      for i, (folder, fs, _) in enumerate(folders, 1)) + "</ol></nav>",
            preface,
            '<section id="headlines"><h2>Headline numbers</h2>', _headlines(g), "</section>",
            '<section id="correlation"><h2>Transition Point vs critical pruning ratio</h2>',
            '<p class="small">Pearson correlation across model/task/format pairs (paper Section 4.2.2, the safe '
            "pruning margin).</p>", _correlations(g, [str(d) for d in run_dirs]), "</section>"]
    body += [_folder_section(i, folder, fs, m) for i, (folder, fs, m) in enumerate(folders, 1)]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<meta name=\"generator\" content=\"declens {e(__version__)}\">\n"
            f"<title>{e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body)
            + "\n</body>\n</html>\n")
    out = Path(out_html)
    atomic_write_text(out, page)
    return out


def study_page(run_dirs: Sequence[str | Path], title: str | None = None, preface: str = "") -> bytes:
    """The report of a study's stage folders (see :func:`build_report`) as HTML bytes, for the study to
    write into its own run folder."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return build_report(run_dirs, Path(tmp) / "report.html", title=title, preface=preface).read_bytes()


#: Pages rendered for a result kind (looked up like the figures of :data:`declens.plots.FIGURES`)
PAGES = {"study": study_page}
