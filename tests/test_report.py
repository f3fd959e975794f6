"""The HTML report: built from real run folders, opened in headless Chromium, every figure decoded.

Chromium is required (CI installs it: ``apt-get install -y chromium``); these tests fail, not skip,
when it is missing.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import make_analysis, make_prune, make_tiny
from declens.errors import DeclensError
from declens.report import build_report

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

#: appended to a copy of the page: once everything has loaded, record which <img> decoded
CHECKER = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0); });
  var pre = document.createElement("pre");
  pre.id = "img-check";
  pre.textContent = JSON.stringify({total: imgs.length, ok: imgs.length - bad.length,
                                    bad: bad.map(function (i) { return i.alt; }),
                                    widths: imgs.map(function (i) { return i.naturalWidth; })});
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is needed to check that the HTML report renders; install it with "
                "'apt-get install -y chromium' (Debian/Ubuntu)")


def render_images(page: Path, tmp: Path) -> dict:
    """Open a copy of ``page`` with the image checker in headless Chromium; return the checker's verdict."""
    probe = tmp / f"{page.stem}.probe.html"
    text = page.read_text(encoding="utf-8")
    assert text.count("</body>") == 1
    probe.write_text(text.replace("</body>", CHECKER + "\n</body>"), encoding="utf-8")
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=5000", "--dump-dom",
           probe.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="img-check">(.*?)</pre>', r.stdout, re.S)
    assert m, f"Chromium produced no image check (exit {r.returncode}): {r.stderr[-2000:]}"
    return json.loads(html.unescape(m.group(1)))


def _figure_count(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".svg"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Real folders from the real code on a tiny model (analysis, prune, eval), a result of a kind the
    report does not know (like cka / noise), and three synthetic model-task pairs for the correlation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from declens.analyses.decision import analyze
    from declens.analyses.evaluate import evaluate_configs
    from declens.pruning.run import PruneConfig, prune
    from declens.plots import png_bytes
    from declens.results import RunWriter
    from declens.tasks import load_task

    root = tmp_path_factory.mktemp("runs")
    lm = make_tiny("qwen3", layers=4)
    data = load_task("arc_easy", limit=6, seed=0)
    out = {"analysis": root / "analysis", "prune": root / "prune", "eval": root / "eval", "cka": root / "cka"}
    analyze(lm, data, "cloze", out_dir=out["analysis"], progress=False)
    prune(lm, data, "cloze", PruneConfig(["ip", "last"], max_ratio=0.5, calib_samples=4), out_dir=out["prune"],
          progress=False)
    evaluate_configs(lm, ["arc_easy", "piqa"], [[], [2]], ["cloze"], limit=4, out_dir=out["eval"], progress=False)
    # a kind the report has no section for: config, scalar summary, a row table and a figure
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    with RunWriter(out["cka"], "cka") as w:
        w.json("cka.json", {
            "kind": "cka", "config": {"model": lm.spec, "task": "arc_easy", "remove": [2]},
            "provenance": {"versions": {"declens": "test"}, "model": {"fingerprint": lm.fingerprint()}},
            "summary": {"final_best_hidden": 3, "final_best_decision": 1}, "score": 0.5,
            "table": [{"layer": 0, "best": 0}, {"layer": 1, "best": 1}], "matrix": [[1.0, 0.2], [0.2, 1.0]]})
        w.bytes("cka_hidden.png", png_bytes(fig))
    for m, L, tp, kc in (("syn-a", 10, 3, 5), ("syn-b", 12, 8, 2), ("syn-c", 16, 6, 7)):
        out[f"a-{m}"] = make_analysis(root / f"a-{m}", m, "arc_easy", L, tp)
        out[f"p-{m}"] = make_prune(root / f"p-{m}", m, "arc_easy", L, tp, kc, max_k=kc + 1)
    return out


def test_report_renders_every_figure_in_chromium(runs, tmp_path):
    page = build_report(list(runs.values()), tmp_path / "report.html", title="tiny <models> & friends")
    text = page.read_text(encoding="utf-8")
    # self-contained: no external resource, no script
    assert "<script" not in text and "<link" not in text and "@import" not in text
    assert not re.search(r'(?:src|href)="(?!data:|#)', text)
    # one <img> per figure on disk, plus correlate.png and safe_margin.png of each computed correlation
    on_disk = sum(_figure_count(p) for p in runs.values())
    computed = text.count('alt="correlate.png (')
    assert computed == 1 and text.count('alt="safe_margin.png (') == 1  # method ip: 3 synthetic pairs
    assert on_disk >= 4 + 3 + 1
    assert text.count("<img ") == on_disk + 2 * computed
    # headline numbers, kind sections and provenance are there
    assert "<title>tiny &lt;models&gt; &amp; friends</title>" in text
    assert "Headline numbers" in text and "critical ratio (ip)" in text and "safe margin estimate" in text
    assert "Removed Layer IDs (0-based)" in text and "per-layer metrics (4 layers)" in text
    assert "accuracy (%), cloze format" in text and "summary (top-level fields)" in text and "final_best_hidden" in text
    assert "fingerprint" in text and "transformers" in text
    # the "last" method has only the tiny model's pair: said why, not computed
    assert "method last" in text and "Not computed: the correlation needs at least 3" in text

    verdict = render_images(page, tmp_path)
    assert verdict["total"] == on_disk + 2 * computed
    assert verdict["ok"] == verdict["total"], f"figures that did not decode: {verdict['bad']}"
    assert min(verdict["widths"]) > 100


def test_a_broken_figure_is_caught(runs, tmp_path):
    """The Chromium check itself: corrupt one embedded image and it must be reported."""
    page = build_report([runs["analysis"]], tmp_path / "report.html")
    text = page.read_text(encoding="utf-8")
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="dm.png"', text)
    assert m
    garbage = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20).decode()
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace(m.group(1), garbage), encoding="utf-8")
    verdict = render_images(broken, tmp_path)
    assert verdict["total"] == 4 and verdict["bad"] == ["dm.png"]


def test_report_escapes_text_from_result_files(tmp_path):
    evil = '<img src=x onerror="alert(1)">'
    a = make_analysis(tmp_path / "a", evil, "t&<b>", 6, 2)
    page = build_report([a], tmp_path / "r.html")
    text = page.read_text(encoding="utf-8")
    assert evil not in text and "onerror=&quot;alert(1)&quot;" in text and "t&amp;&lt;b&gt;" in text
    assert text.count("<img ") == _figure_count(a) == 0
    assert "Not computed" in text  # a prune result is needed for the correlation


def test_report_without_enough_pairs_says_why(runs, tmp_path):
    page = build_report([runs["analysis"], runs["prune"]], tmp_path / "r.html")
    text = html.unescape(page.read_text(encoding="utf-8"))
    assert "Not computed: the correlation needs at least 3 complete (Transition Point, critical ratio) pairs" in text
    assert "found 0" in text or "found 1" in text


def test_report_errors_are_clear(runs, tmp_path):
    with pytest.raises(DeclensError, match="does not exist"):
        build_report([tmp_path / "missing"], tmp_path / "r.html")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "figure.png").write_bytes(b"")
    with pytest.raises(DeclensError, match="holds no declens results"):
        build_report([runs["analysis"], tmp_path / "plain"], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_report_is_deterministic(runs, tmp_path):
    dirs = list(runs.values())  # the correlation figures included
    a = build_report(dirs, tmp_path / "a.html").read_bytes()
    b = build_report(dirs, tmp_path / "b.html").read_bytes()
    assert a == b


@pytest.mark.slow
def test_smollm2_analyze_prune_correlate_report(smollm2, tmp_path):
    """The real SmolLM2-135M on three tasks (8 rows each): analyze + prune, then correlate and report.

    On so few rows SmolLM2-135M decides (has a Transition Point) on PIQA at most and collapses nowhere
    within 2 removed layers, so the correlation is expected to be refused with the reason for every
    task; should the pairs become complete (another CPU, other rounding), the computed branch is
    checked instead. Either way the report must render every figure.
    """
    from declens.analyses.correlation import correlate, gather
    from declens.analyses.decision import analyze
    from declens.pruning.run import PruneConfig, prune
    from declens.tasks import load_task

    tasks = ("arc_easy", "piqa", "winogrande")
    dirs, tps, crit = [], {}, {}
    for task in tasks:
        data = load_task(task, limit=8, seed=0)
        a = analyze(smollm2, data, "cloze", out_dir=tmp_path / f"a-{task}", progress=False)
        p = prune(smollm2, data, "cloze", PruneConfig(["ip"], max_ratio=0.07, calib_samples=4),
                  out_dir=tmp_path / f"p-{task}", progress=False)
        # the prune run's dense record is the same model on the same rows: the same Transition Point
        assert p.runs["ip"].best_by_k()[0].transition_layer == a.metrics.transition_layer
        tps[task], crit[task] = a.metrics.transition_layer, p.critical["ip"]
        dirs += [tmp_path / f"a-{task}", tmp_path / f"p-{task}"]
    g = gather(dirs)
    for task in tasks:
        key = ("smollm2-135m", task, "cloze")
        assert g.decisions[key].kind == "analysis" and g.decisions[key].transition_layer == tps[task]
        assert g.decisions[key].num_layers == 30 and g.ratios[key]["ip"].critical_ratio == crit[task]
    complete = [t for t in tasks if tps[t] is not None and crit[t] is not None]
    if len(complete) >= 3:
        res = correlate(dirs, method="ip")
        assert [p.task for p in res.pairs] == sorted(tasks) and res.stats["layer"]["n"] == 3
        res.save(tmp_path / "corr")
        dirs.append(tmp_path / "corr")
    else:
        with pytest.raises(DeclensError) as ei:
            correlate(dirs, method="ip")
        msg = str(ei.value)
        assert f"found {len(complete)}" in msg and all(f"smollm2-135m · {t} · cloze" in msg for t in tasks)
    page = build_report(dirs, tmp_path / "report.html", title="SmolLM2-135M, three tasks")
    text = page.read_text(encoding="utf-8")
    assert all(f"<td class=\"l\">{t}</td>" in text for t in tasks)  # a headline row per task
    assert ("Not computed: the correlation needs at least 3" in text) == (len(complete) < 3)
    on_disk = sum(_figure_count(d) for d in dirs)
    assert on_disk >= 3 * (4 + 2) and text.count("<img ") == on_disk + (2 if len(complete) >= 3 else 0)
    verdict = render_images(page, tmp_path)
    assert verdict["total"] == text.count("<img ") and verdict["ok"] == verdict["total"], verdict["bad"]


def test_report_embeds_only_the_files_a_run_wrote(runs, tmp_path):
    """A figure the manifest does not list (a leftover of another run, a file dropped in by hand) is not
    shown; a listed figure replaced by another run's refuses the whole folder with the fix."""
    folder = tmp_path / "analysis"
    shutil.copytree(runs["analysis"], folder)
    shutil.copyfile(runs["prune"] / "accuracy_vs_ratio.png", folder / "old_run.png")
    text = build_report([folder], tmp_path / "r.html").read_text(encoding="utf-8")
    assert text.count("<img ") == _figure_count(runs["analysis"]) >= 4 and 'alt="old_run.png"' not in text
    shutil.copyfile(runs["prune"] / "accuracy_vs_ratio.png", folder / "overview.png")
    with pytest.raises(DeclensError, match="incomplete or was modified after it was written .overview.png has [0-9]+ "
                                           "bytes, the run wrote [0-9]+.; rerun the command that wrote it"):
        build_report([folder], tmp_path / "r2.html")
    (folder / "manifest.json").unlink()
    with pytest.raises(DeclensError, match="has no manifest.json"):
        build_report([runs["prune"], folder], tmp_path / "r2.html")
    assert not (tmp_path / "r2.html").exists()
