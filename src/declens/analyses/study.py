"""The paper's study of one model, as one resumable pipeline.

``run_study`` runs, for one model over its tasks, every analysis of the paper into one folder:

====================  =====================================================================
stage                 what it writes (one run folder each, complete or recognisably not)
====================  =====================================================================
``analysis``          ``analysis/<task>_<format>/``: the layer-wise decision analysis
``prune``             ``prune/<task>_<format>/``: Iterative Pruning (SKIP-Prun) to ``ip_max_ratio``
``baselines``         ``baselines/<task>_<format>/``: every baseline to ``baseline_ratio``
``cka``               ``cka/``: the ``cka_ratio`` IP model against the dense one (first task)
``noise``             ``noise/``: noise at every layer and scale (first task)
``ablate``            ``ablate/``: single layers and pairs around the Transition Point, all tasks
``recover``           ``recover/``: fine-tuning recovery of IP's best sets at ``recover_ratios``
``correlate``         ``correlate/``: Transition Point against critical ratio over the tasks
====================  =====================================================================

A stage whose folder verifies (its manifest is complete) is loaded instead of rerun, so a killed
study resumes where it stopped; each stage resumes inside itself where its command does (analysis
checkpoints, the prune state). Compute only: progress and summaries go to the ``on_event`` callback.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import DeclensError
from ..models import LoadedModel
from ..results import RunWriter, figure_drawer, load_result, provenance, register_result, verify_run_folder
from ..tasks import load_task

STAGES = ("analysis", "prune", "baselines", "cka", "noise", "ablate", "recover", "correlate")
#: stages with one folder per task and format (``<stage>/<task>_<format>``); the others have one, keyed ``main``
PER_TASK_STAGES = ("analysis", "prune", "baselines")
DEFAULT_BASELINES = ("shortgpt", "sleb", "angular", "last", "random")


@dataclass
class StudyConfig:
    """What a study runs (every value recorded in ``study.json``).

    Attributes:
        tasks: tasks to analyse, prune and ablate on (the first one also gets CKA, noise and recovery).
        formats: formats of the analyses; pruning, CKA, noise and recovery use the first.
        limit: evaluated rows per task (None: all); seed: row selection and every seeded draw.
        ip_max_ratio: Iterative Pruning (with SKIP-Prun) goes up to this share of the layers.
        baselines: baseline methods, pruned up to ``baseline_ratio``.
        calib_samples: Block Influence calibration rows (ARC-Challenge train, as the paper).
        cka_ratio: the IP state (best at this ratio) compared with the dense model by CKA; cka_rows: rows.
        noise_scales, noise_repeats: the noise study's scales and draws.
        noise_layers: dense ids of the layers the noise study perturbs (None: every layer; a subset covering
            both phases is enough for claim 6 at a fraction of the cost).
        ablate_window: layers on each side of the Transition Point.
        recover_ratios: ratios whose best IP set is fine-tuned (empty: no fine-tuning).
        finetune: fine-tuning overrides: ``declens.finetune.FinetuneConfig`` fields and the recovery's own options
            (``RecoveryStudyConfig`` fields such as ``train_samples``, ``train_split``, ``measure_train_loss``).
        stages: the stages to run (default all).
        ip_order: a removal order (dense layer ids) that the prune stage replays (method ``replay``)
            instead of choosing each layer by Block Influence (``ip`` and ``phase``); for random-weight
            benchmarks, where Block Influence is meaningless. Every later stage and the findings then
            use the replayed trajectory in IP's place and say so.
        phase_aware: the prune stage also runs phase-aware pruning (declens' idea, tested by the findings)
            beside IP; False: IP alone, about half the stage's time (enough for claims 3, 4 and 9).
    """

    tasks: list[str]
    formats: list[str] = field(default_factory=lambda: ["letter"])
    limit: int | None = None
    seed: int = 0
    ip_max_ratio: float = 0.6
    baselines: list[str] = field(default_factory=lambda: list(DEFAULT_BASELINES))
    baseline_ratio: float = 0.5
    calib_samples: int = 256
    cka_ratio: float = 0.5
    cka_rows: int = 500
    noise_scales: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.5, 1.0, 2.0])
    noise_repeats: int = 1
    noise_layers: list[int] | None = None
    ablate_window: int = 2
    recover_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5])
    finetune: dict = field(default_factory=dict)
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    ip_order: list[int] | None = None
    phase_aware: bool = True

    @property
    def ip_method(self) -> str:
        """The prune stage's method standing for Iterative Pruning: ``replay`` with ``ip_order``, else ``ip``."""
        return "replay" if self.ip_order else "ip"

    @property
    def prune_methods(self) -> list[str]:
        """The prune stage's methods: IP (or its replay), and phase-aware pruning unless left out."""
        return [self.ip_method] + (["phase"] if self.phase_aware and not self.ip_order else [])

    def check_for_model(self, num_layers: int) -> None:
        """Refuse an ``ip_order`` that this ``num_layers``-layer model cannot replay to ``ip_max_ratio``, and
        ``noise_layers`` it does not have."""
        from ..pruning.run import max_removed_for
        from .noise import perturbed_positions

        if self.noise_layers is not None and "noise" in self.stages:
            perturbed_positions(list(range(num_layers)), self.noise_layers)
        o = self.ip_order
        if not o:
            return
        bad = [i for i in o if not 0 <= i < num_layers]
        if bad:
            raise DeclensError(f"--ip-order names layer(s) {bad} outside 0..{num_layers - 1} of this {num_layers}-layer "
                               "model; give dense layer ids of this model")
        k = max_removed_for(self.ip_max_ratio, num_layers)
        if len(o) < k:
            raise DeclensError(f"--ip-order has {len(o)} layers but ip-max-ratio {self.ip_max_ratio} removes {k} of "
                               f"{num_layers}; give {k} layers or lower --ip-max-ratio to {len(o) / num_layers:.4g}")

    def check(self) -> None:
        """Refuse impossible settings before any model work (one clear line each)."""
        if not self.tasks:
            raise DeclensError("a study needs at least one task; pass --tasks arc_challenge,arc_easy,...")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise DeclensError(f"unknown study stage(s) {bad}; use some of {', '.join(STAGES)}")
        for name in ("ip_max_ratio", "baseline_ratio", "cka_ratio"):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise DeclensError(f"{name.replace('_', '-')} must be strictly between 0 and 1, not {v}")
        if any(not 0 < r < 1 for r in self.recover_ratios):
            raise DeclensError(f"recover ratios must be strictly between 0 and 1, not {self.recover_ratios}")
        if self.cka_ratio > self.ip_max_ratio:
            raise DeclensError(f"cka-ratio {self.cka_ratio} is beyond ip-max-ratio {self.ip_max_ratio}; raise the latter")
        if any(r > self.ip_max_ratio for r in self.recover_ratios):
            raise DeclensError(f"recover ratios {self.recover_ratios} go beyond ip-max-ratio {self.ip_max_ratio}")
        if self.ip_order is not None:
            o = self.ip_order
            if not o or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in o):
                raise DeclensError(f"--ip-order must list dense layer ids (integers >= 0) like 24,23,25, not {o}")
            dup = sorted({i for i in o if o.count(i) > 1})
            if dup:
                raise DeclensError(f"--ip-order repeats layer(s) {dup}; name each layer once")


@dataclass
class StageEvent:
    """What ``on_event`` receives: a stage starting, skipped (already complete) or done."""

    stage: str
    key: str
    status: str  # "start" | "skip" (complete, reused) | "done" | "omit" (cannot run here; summary says why)
    summary: str = ""
    seconds: float = 0.0


@register_result("study", "study.json", "study")
@dataclass
class Study:
    """Everything one study produced, keyed by stage and then by ``<task>_<format>`` (or ``main``)."""

    config: StudyConfig
    folder: Path
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    SCHEMA_VERSION = 1  #: of ``study.json`` (see :func:`declens.results.register_result`)

    @classmethod
    def load(cls, folder: str | Path) -> "Study":
        """Reload a study folder (see :func:`load_study`)."""
        return load_study(folder)

    def get(self, stage: str, key: str = "main") -> Any:
        return self.results.get(stage, {}).get(key)


def _key(task: str, fmt: str) -> str:
    return f"{task}_{fmt}"


class _Runner:
    """Runs or reloads one stage folder at a time, reporting through ``on_event``.

    A finished folder is reloaded only when it was made with what this study asks (``expect``, see
    :func:`recorded_differences`); otherwise the stage is refused with the differences and the fix, or, for a
    stage derived from the others (``redo=True``: the correlation), run again."""

    def __init__(self, study: Study, on_event: Callable[[StageEvent], None] | None):
        self.study, self.on_event = study, on_event or (lambda e: None)

    def stage(self, stage: str, key: str, folder: Path, run: Callable[[], Any], load: Callable[[Path], Any],
              summary: Callable[[Any], str], expect: dict[str, Any] | None = None, redo: bool = False) -> Any:
        done = finished_as_asked(stage, key, folder, expect or {}, redo)
        if done:
            res = load(folder)
            self.on_event(StageEvent(stage, key, "skip", summary(res)))
        else:
            self.on_event(StageEvent(stage, key, "start"))
            t = time.perf_counter()
            res = run()
            dt = time.perf_counter() - t
            self.study.timings[f"{stage}/{key}"] = dt
            self.on_event(StageEvent(stage, key, "done", summary(res), dt))
        self.study.results.setdefault(stage, {})[key] = res
        return res


def recorded_differences(folder: Path, expect: dict[str, Any]) -> list[str]:
    """What a finished run folder was made with that differs from ``expect``.

    Args:
        folder: a run folder that verifies.
        expect: dotted paths into its main JSON (``config.limit``, ``provenance.data.fingerprint``) -> the
            value asked now. A path the folder does not record (an older declens) is not compared.

    Returns:
        One ``"path: recorded X, asked Y"`` per difference (empty: made as asked).
    """
    from ..results import read_run

    return _differences(read_run(folder).data, expect)


def _differences(d: dict, expect: dict[str, Any]) -> list[str]:
    """:func:`recorded_differences` on a main JSON already read."""
    import json

    out = []
    for path, want in expect.items():
        got: Any = d
        for part in path.split("."):
            got = got.get(part, _MISSING) if isinstance(got, dict) else _MISSING
        want = json.loads(json.dumps(want))  # tuples -> lists, as the JSON holds them
        if got is not _MISSING and got != want:
            out.append(f"{path.split('.', 1)[-1]}: recorded {json.dumps(got)}, asked {json.dumps(want)}")
    return out


_MISSING = object()


def finished_as_asked(stage: str, key: str, folder: Path, expect: dict[str, Any], redo: bool = False) -> bool:
    """True when ``folder`` is a finished run made as ``expect`` says; False when it is not finished (or, with
    ``redo``, made otherwise: the stage runs again).

    Raises:
        DeclensError: (without ``redo``) a finished folder made with other settings: one line naming the
            differences and the fix, so that a rerun never reuses a result of another configuration.
    """
    from ..results import run_of

    try:
        m = verify_run_folder(folder)
    except DeclensError:
        return False
    diffs = _differences(run_of(m).data, expect)  # the folder hashed once
    if not diffs:
        return True
    if redo:
        return False
    raise DeclensError(f"study stage {stage} {key}: the finished folder {str(folder)!r} was made with other settings "
                       f"({'; '.join(diffs)}); pass the settings it was made with, choose another --out folder, or "
                       "delete that folder to redo the stage")


def run_study(lm: LoadedModel, cfg: StudyConfig, out_dir: str | Path,
              on_event: Callable[[StageEvent], None] | None = None, progress: bool = True) -> Study:
    """Run (or resume) the study of ``lm`` into ``out_dir``.

    Args:
        lm: the dense model.
        cfg: what to run.
        out_dir: the study folder (created; stage folders inside).
        on_event: called when a stage starts, is skipped as complete, or ends.
        progress: progress bars of the stages.

    Returns:
        The :class:`Study` (results of every stage that ran or was reloaded).
    """
    from ..pruning import PruneConfig, SkipPrun, prune
    from ..pruning.run import PruneResult
    from ..results import AnalysisResult
    from .decision import AnalyzeConfig, analyze

    cfg.check()
    cfg.check_for_model(lm.num_layers)
    out = Path(out_dir)
    study = Study(cfg, out)
    r = _Runner(study, on_event)
    main_task, main_fmt = cfg.tasks[0], cfg.formats[0]
    data = {t: load_task(t, limit=cfg.limit, seed=cfg.seed) for t in cfg.tasks}
    asked = stage_expectations(lm, cfg, data)
    for (stage, key), expect in asked.items():  # before any long work: refuse a finished stage made otherwise
        finished_as_asked(stage, key, _stage_folder(out, stage, key), expect)

    if "analysis" in cfg.stages or _needs_dense(cfg):
        for t in cfg.tasks:
            for f in cfg.formats:
                folder = out / "analysis" / _key(t, f)
                r.stage("analysis", _key(t, f), folder,
                        lambda t=t, f=f, folder=folder: analyze(lm, data[t], f, AnalyzeConfig(seed=cfg.seed),
                                                                out_dir=folder, progress=progress),
                        AnalysisResult.load, _analysis_line, asked[("analysis", _key(t, f))])

    if "prune" in cfg.stages:
        ip_config = PruneConfig(cfg.prune_methods, max_ratio=cfg.ip_max_ratio,
                                calib_samples=cfg.calib_samples, seed=cfg.seed, skip=SkipPrun(enabled=True),
                                order=cfg.ip_order)
        for t in cfg.tasks:
            folder = out / "prune" / _key(t, main_fmt)
            r.stage("prune", _key(t, main_fmt), folder,
                    lambda t=t, folder=folder: prune(lm, data[t], main_fmt, ip_config, out_dir=folder, progress=progress),
                    PruneResult.load, _prune_line, asked[("prune", _key(t, main_fmt))])

    if "baselines" in cfg.stages and cfg.baselines:
        base_config = PruneConfig(list(cfg.baselines), max_ratio=cfg.baseline_ratio, calib_samples=cfg.calib_samples,
                                  seed=cfg.seed)
        for t in cfg.tasks:
            folder = out / "baselines" / _key(t, main_fmt)
            r.stage("baselines", _key(t, main_fmt), folder,
                    lambda t=t, folder=folder: prune(lm, data[t], main_fmt, base_config, out_dir=folder, progress=progress),
                    PruneResult.load, _prune_line, asked[("baselines", _key(t, main_fmt))])

    if "cka" in cfg.stages:
        _cka_stage(lm, cfg, study, r, data[main_task], progress, asked[("cka", "main")])
    if "noise" in cfg.stages:
        _noise_stage(lm, cfg, r, data[main_task], out, progress, asked[("noise", "main")])
    if "ablate" in cfg.stages:
        _ablate_stage(lm, cfg, study, r, out, progress, asked[("ablate", "main")])
    if "recover" in cfg.stages and cfg.recover_ratios:
        _recover_stage(lm, cfg, study, r, data[main_task], out, progress, asked[("recover", "main")])
    if "correlate" in cfg.stages:
        _correlate_stage(cfg, study, r, out)

    prov = provenance(lm)
    adopt_finished(study, (prov.get("model") or {}).get("fingerprint"))
    write_study(study, prov)
    return study


def stage_expectations(lm: LoadedModel, cfg: StudyConfig, data: dict) -> dict[tuple[str, str], dict[str, Any]]:
    """What each stage this study runs must have been made with to be reused, known before any stage runs:
    ``(stage, key)`` -> dotted path in its main JSON -> value (see :func:`recorded_differences`). The model's
    weights and the evaluated rows (fingerprints), then each stage's own settings. Values that depend on
    earlier stages (CKA's removed set, the ablation's Transition Point, recovery's ratios) are added when the
    stage runs."""
    main_fmt = cfg.formats[0]
    weights = lm.fingerprint()  # samples every tensor: once

    def base(task: str, fmt: str) -> dict[str, Any]:
        return {"config.task": task, "config.format": fmt, "config.limit": cfg.limit,
                "provenance.model.fingerprint": weights, "provenance.data.fingerprint": data[task].fingerprint()}

    calib = {"config.calibration.limit": cfg.calib_samples, "config.seed": cfg.seed}
    out: dict[tuple[str, str], dict[str, Any]] = {}
    if "analysis" in cfg.stages or _needs_dense(cfg):
        for t in cfg.tasks:
            for f in cfg.formats:
                out[("analysis", _key(t, f))] = {**base(t, f), "config.fewshot_seed": cfg.seed}
    if "prune" in cfg.stages:
        for t in cfg.tasks:
            out[("prune", _key(t, main_fmt))] = {
                **base(t, main_fmt), **calib, "config.methods": cfg.prune_methods,
                "config.max_ratio": cfg.ip_max_ratio, "config.skip_prun.enabled": True, "config.order": cfg.ip_order}
    if "baselines" in cfg.stages and cfg.baselines:
        for t in cfg.tasks:
            out[("baselines", _key(t, main_fmt))] = {**base(t, main_fmt), **calib, "config.methods": list(cfg.baselines),
                                                      "config.max_ratio": cfg.baseline_ratio}
    main = base(cfg.tasks[0], main_fmt)
    if "cka" in cfg.stages:
        # CKA records the rows it compared (n_samples of the task's rows), not the task's selection
        out[("cka", "main")] = {**{k: v for k, v in main.items() if k != "provenance.data.fingerprint"},
                                "config.n_samples": cfg.cka_rows}
    if "noise" in cfg.stages:
        layers = sorted(cfg.noise_layers) if cfg.noise_layers is not None else list(range(lm.num_layers))
        out[("noise", "main")] = {**main, "config.scales": [float(x) for x in cfg.noise_scales],
                                  "config.layers": layers, "config.repeats": cfg.noise_repeats, "config.seed": cfg.seed}
    if "ablate" in cfg.stages:
        out[("ablate", "main")] = {"provenance.model.fingerprint": weights, "config.tp_task": cfg.tasks[0],
                                   "config.tasks": list(cfg.tasks), "config.format": main_fmt,
                                   "config.window": cfg.ablate_window, "config.limit": cfg.limit, "config.seed": cfg.seed}
    if "recover" in cfg.stages and cfg.recover_ratios:
        rcfg = _recovery_config(cfg)
        out[("recover", "main")] = {
            **main, "config.prune.method": cfg.ip_method,
            **{f"config.finetune.{k}": v for k, v in rcfg.finetune.to_dict().items() if k in cfg.finetune},
            **({"config.train.limit": rcfg.train_samples} if "train_samples" in cfg.finetune else {})}
    return out


def _stage_folder(out: Path, stage: str, key: str) -> Path:
    """The folder of one stage result of a study folder ``out``."""
    return out / stage / key if stage in PER_TASK_STAGES else out / stage


def _load_stage(folder: Path, stage: str) -> Any:
    """A stage folder's typed result (verified against its manifest)."""
    return load_result(folder, kind="prune" if stage == "baselines" else stage)


def _stage_folders_on_disk(out: Path, stage: str) -> list[tuple[str, Path]]:
    """``(key, folder)`` of every folder of ``stage`` in a study folder (finished or not)."""
    if stage in PER_TASK_STAGES:
        base = out / stage
        return [(p.name, p) for p in sorted(base.iterdir()) if p.is_dir() and "_" in p.name] if base.is_dir() else []
    return [("main", out / stage)] if (out / stage).is_dir() else []


def adopt_finished(study: Study, fingerprint: str | None = None) -> None:
    """Make a study run in pieces whole: every finished stage folder of the study folder that this run did not
    list (other stages or tasks run by earlier invocations) joins :attr:`Study.results`, and the config's tasks,
    formats and stages become the union: the earlier ``study.json``'s first, then this run's, then any found
    only on disk (each stage folder records its own full config). Unfinished folders (a killed run's) stay out,
    and so do results of other weights than ``fingerprint`` (the model's, when given): a folder reused for
    another model never mixes two models' results."""
    import json
    from dataclasses import replace

    out, cfg = study.folder, study.config
    tasks, formats, stages = set(cfg.tasks), set(cfg.formats), set(cfg.stages)
    for stage in STAGES:
        for key, folder in _stage_folders_on_disk(out, stage):
            if key in study.results.get(stage, {}):
                continue
            try:
                res = _load_stage(folder, stage)
            except DeclensError:
                continue
            theirs = ((getattr(res, "provenance", None) or {}).get("model") or {}).get("fingerprint")
            if fingerprint and theirs and theirs != fingerprint:
                continue
            study.results.setdefault(stage, {})[key] = res
            stages.add(stage)
            if key != "main":
                task, fmt = key.rsplit("_", 1)
                tasks.add(task)
                formats.add(fmt)
    try:  # the order of an earlier invocation (read, not trusted: only stage folders that verify joined above)
        prev = json.loads((out / "study.json").read_text()).get("config", {})
    except (OSError, ValueError):
        prev = {}
    first = lambda *lists: list(dict.fromkeys(x for xs in lists for x in xs))  # noqa: E731 (order kept, once each)
    task_order = first([t for t in prev.get("tasks", []) if isinstance(t, str) and t in tasks], cfg.tasks, sorted(tasks))
    format_order = first([f for f in prev.get("formats", []) if isinstance(f, str) and f in formats], cfg.formats, sorted(formats))
    study.config = replace(cfg, tasks=task_order, formats=format_order, stages=[x for x in STAGES if x in stages])


def stage_folders(study: Study) -> list[Path]:
    """Every stage folder of a study, in stage order."""
    out = []
    for stage in STAGES:
        for key in sorted(study.results.get(stage, {})):
            out.append(_stage_folder(study.folder, stage, key))
    return out


def write_study(study: Study, prov: dict, findings=None) -> None:
    """Write ``study.json``, ``findings.json``, ``findings.md`` and ``report.html`` into the study folder
    (one run folder: the manifest last), the findings computed from the study's results when not given.
    The page is rendered by the presentation layer (:func:`declens.report.study_page`, looked up by kind)."""
    findings = findings or study_findings([study])
    out = study.folder
    html = figure_drawer("study")(stage_folders(study), title=f"declens study: {prov.get('model', {}).get('spec', '')}",
                                  preface=findings.html())
    with RunWriter(out, "study") as w:
        w.json("study.json", {"kind": "study", "config": asdict(study.config), "provenance": prov,
                              "timings_s": study.timings,
                              "stages": {s: sorted(v) for s, v in study.results.items()}})
        w.json("findings.json", findings.to_dict())
        w.text("findings.md", findings.markdown())
        w.bytes("report.html", html)


def _needs_dense(cfg: StudyConfig) -> bool:
    return any(s in cfg.stages for s in ("cka", "noise", "ablate"))


def _best_removed(prune_result, ratio: float, method: str = "ip") -> list[int]:
    """The removed set of ``method``'s best state with the largest ratio not above ``ratio``."""
    best = prune_result.runs[method].best_by_k()
    ks = [k for k, rec in best.items() if rec.ratio <= ratio + 1e-9]
    return list(best[max(ks)].removed)


def _cka_stage(lm, cfg, study, r, data, progress, expect) -> None:
    from .cka import CKAConfig, CKAResult, cka_study

    pr = study.get("prune", _key(cfg.tasks[0], cfg.formats[0]))
    if pr is None:
        raise DeclensError("the cka stage needs the prune stage of the first task; add 'prune' to --stages")
    remove = _best_removed(pr, cfg.cka_ratio, cfg.ip_method)
    folder = study.folder / "cka"

    def run():
        res = cka_study(lm, data, remove, cfg.formats[0], CKAConfig(n_samples=cfg.cka_rows, seed=cfg.seed),
                        progress=progress)
        res.save(folder)
        return res

    r.stage("cka", "main", folder, run, CKAResult.load,
            lambda x: f"{len(x.pruned_ids)} of {len(x.dense_ids)} layers; final layer's decision state best matches "
                      f"dense layer {x.best_decision[-1]}", {**expect, "config.remove": remove})


def _noise_stage(lm, cfg, r, data, out, progress, expect) -> None:
    from .noise import NoiseConfig, NoiseResult, noise_checkpoint, noise_study

    folder = out / "noise"

    def run():
        ncfg = NoiseConfig(scales=cfg.noise_scales, seed=cfg.seed, repeats=cfg.noise_repeats, layers=cfg.noise_layers)
        # a killed study resumes the stage from noise/.checkpoint/; saving the result removes it
        res = noise_study(lm, data, cfg.formats[0], ncfg, progress=progress,
                          checkpoint=noise_checkpoint(folder, lm, data, cfg.formats[0], ncfg))
        res.save(folder)
        return res

    def line(x) -> str:
        ps = x.phase_summary()
        fmt = lambda v: "-" if v is None else f"{v[-1]:+.3f}"  # noqa: E731
        return f"DM drop at scale {x.scales[-1]}: silent {fmt(ps['silent']['dm_drop'])}, decisive {fmt(ps['decisive']['dm_drop'])}"

    r.stage("noise", "main", folder, run, NoiseResult.load, line, expect)


def _ablate_stage(lm, cfg, study, r, out, progress, expect) -> None:
    from .ablation import AblateConfig, AblationResult, ablate

    dense = study.get("analysis", _key(cfg.tasks[0], cfg.formats[0]))
    tp = None if dense is None else dense.metrics.transition_layer
    folder = out / "ablate"
    if tp is None:  # nothing to ablate around (the findings say so)
        r.on_event(StageEvent("ablate", "main", "omit", f"the dense model has no Transition Point on {cfg.tasks[0]}"))
        return
    r.stage("ablate", "main", folder,
            lambda: ablate(lm, cfg.tasks[0], cfg.tasks, cfg.formats[0],
                           AblateConfig(window=cfg.ablate_window, tp=tp, limit=cfg.limit, seed=cfg.seed),
                           out_dir=folder, progress=progress),
            AblationResult.load, lambda x: f"around layer {x.transition_layer} on {len(x.eval.tasks)} task(s)",
            {**expect, "transition_layer": tp})


def _recover_stage(lm, cfg, study, r, data, out, progress, expect) -> None:
    from .recovery import RecoveryResult, recover_study

    pr = study.get("prune", _key(cfg.tasks[0], cfg.formats[0]))
    if pr is None:
        raise DeclensError("the recover stage needs the prune stage of the first task; add 'prune' to --stages")
    folder = out / "recover"
    ratios = _recover_ratios(pr, cfg.recover_ratios, cfg.ip_method)
    L = pr.runs[cfg.ip_method].num_layers
    if not ratios:
        raise DeclensError(f"no Iterative Pruning state at or below the recover ratios {cfg.recover_ratios} "
                           f"(one layer of {L} is {1 / L:.1%}); raise --recover-ratios")
    rcfg = _recovery_config(cfg, ratios)
    r.stage("recover", "main", folder,
            lambda: recover_study(lm, data, cfg.tasks[0], None, rcfg, prune=pr, out_dir=folder, progress=progress),
            RecoveryResult.load,
            lambda x: "; ".join(f"{run.ratio:.0%}: DM {run.before['final_dm']:+.2f} -> {run.after['final_dm']:+.2f}"
                                for run in x.runs),
            {**expect, "config.prune.ratios": ratios})


def _recovery_config(cfg: StudyConfig, ratios: Sequence[float] | None = None):
    """The recovery stage's :class:`~declens.analyses.recovery.RecoveryStudyConfig`: ``cfg.finetune`` holds
    ``FinetuneConfig`` fields and the recovery's own options (``train_samples``, ``train_split``, ...)."""
    from ..finetune import FinetuneConfig
    from .recovery import RecoveryStudyConfig

    own = {f.name for f in fields(RecoveryStudyConfig)} - {"fmt", "finetune", "ratios", "prune_method", "train_seed"}
    return RecoveryStudyConfig(fmt=cfg.formats[0], ratios=ratios, prune_method=cfg.ip_method, train_seed=cfg.seed,
                               finetune=FinetuneConfig.make(**{k: v for k, v in cfg.finetune.items() if k not in own}),
                               **{k: v for k, v in cfg.finetune.items() if k in own})


def _recover_ratios(prune_result, wanted: Sequence[float], method: str = "ip") -> list[float]:
    """The ratios of ``method``'s best states closest to each wanted ratio from below."""
    best = prune_result.runs[method].best_by_k()
    out = []
    for w in wanted:
        ks = [k for k, rec in best.items() if 0 < k and rec.ratio <= w + 1e-9]
        if ks:
            out.append(best[max(ks)].ratio)
    return sorted(set(out))


def _correlate_stage(cfg, study, r, out) -> None:
    from .correlation import CorrelationResult, correlate

    dirs = [out / stage / key for stage in ("analysis", "prune") for key in sorted(study.results.get(stage, {}))]
    n = len(study.results.get("prune", {}))
    if n < 3:
        return  # the correlation needs >= 3 model/task pairs: across studies, `declens findings` combines them
    folder = out / "correlate"
    # derived from the stage folders: made again whenever they changed (another set of tasks)
    expect = {"config.run_dirs": [str(d) for d in dirs], "config.method": cfg.ip_method}
    if not finished_as_asked("correlate", "main", folder, expect, redo=True):
        try:
            correlate(dirs, cfg.ip_method)  # cheap (reads result files): refuse here, not as a failed stage
        except DeclensError as e:
            r.on_event(StageEvent("correlate", "main", "omit", str(e).split(". Missing")[0]))
            return

    def run():
        res = correlate(dirs, cfg.ip_method)
        res.save(folder)
        return res

    r.stage("correlate", "main", folder, run, CorrelationResult.load,
            lambda x: f"r = {x.stats['fraction'].get('r')} over {len(x.pairs)} pairs",
            expect, redo=True)


def _analysis_line(res) -> str:
    s = res.metrics.summary()
    tp = s["transition_layer"]
    return (f"{len(res.item_ids)} rows, accuracy {s['final_accuracy']:.3f} (chance {s['chance']:.2f}), final DM "
            f"{s['final_dm']:+.3f}, Transition Point {'none' if tp is None else tp}")


def _prune_line(res) -> str:
    parts = []
    for m in res.runs:
        c = res.critical.get(m)
        parts.append(f"{m}: critical ratio {'not reached' if c is None else format(c, '.1%')}")
    if "replay" in res.runs:
        parts.append("IP replayed from the given removal order (--ip-order), not chosen by Block Influence")
    return "; ".join(parts)


def study_findings(studies: Sequence[Study], cfg=None, compare_table: dict | None = None, compare_complete: bool = True):
    """The findings of one or more studies: claims 1-4 for every analysed task of each study (its own analysis
    and IP run), claims 5-8 per study from the stages run on its first task (CKA, noise, recovery; the
    ablation averages its tasks), 9 across all pairs, 10 from ``compare_table`` (see
    :func:`~declens.analyses.compare.compare_averages`; ``compare_complete`` False for a comparison stopped
    before its end)."""
    from .findings import (Findings, FindingsConfig, claim_ablation, claim_cka, claim_collapse_in_silent,
                           claim_correlation, claim_decisive_first, claim_noise, claim_option_dynamics,
                           claim_recovery, claim_sharp_transition, claim_table5, idea_phase_aware, idea_safe_margin,
                           resample_tps)

    cfg = cfg or FindingsConfig()
    found = []
    for st in studies:
        keys = [_key(t, f) for f in st.config.formats for t in st.config.tasks]
        keys = sorted((k for k in keys if st.get("analysis", k) is not None),
                      key=lambda k: k != _key(st.config.tasks[0], st.config.formats[0]))  # the first task first
        if not keys:
            continue
        replayed = False
        for key in keys:
            dense, pr = st.get("analysis", key), st.get("prune", key)
            replayed = bool(st.config.ip_order) and pr is not None and "replay" in pr.runs
            first = claim_decisive_first(dense, None if replayed else pr, cfg)
            if replayed:  # a given order says nothing about which layers Block Influence picks first
                first.note = REPLAYED + "; this claim is about IP's own choice, so it is not tested"
            fs = [claim_sharp_transition(dense, cfg), claim_option_dynamics(dense, cfg), first,
                  claim_collapse_in_silent(dense, _as_ip(pr) if replayed else pr, cfg)]
            if replayed:
                fs[3].note = f"{REPLAYED}; {fs[3].note}" if fs[3].note else REPLAYED
            for f in fs:
                f.source = f"{st.folder.name}:{key}"
            found += fs
        key = keys[0]
        dense, pr = st.get("analysis", key), st.get("prune", key)
        replayed = bool(st.config.ip_order) and pr is not None and "replay" in pr.runs
        fs = [claim_cka(st.get("cka"), cfg), claim_noise(st.get("noise"), cfg, analysis=dense),
              claim_ablation(st.get("ablate"), cfg), claim_recovery(st.get("recover"), cfg)]
        if replayed:
            for f in (fs[0], fs[3]):  # CKA and recovery follow the replayed trajectory
                f.note = f"{REPLAYED}; {f.note}" if f.note else REPLAYED
        for f in fs:
            f.source = f"{st.folder.name}:{key}"
        found += fs
    corr = _correlation_over(studies)
    prunes = [p for st in studies for stage in ("prune", "baselines") for p in st.results.get(stage, {}).values()]
    tps = resample_tps(corr, cfg) if corr is not None else None  # drawn once, for claim 9 and the safe margin
    found += [claim_correlation(corr, cfg, tps), claim_table5(compare_table, cfg, compare_complete),
              idea_safe_margin(corr, cfg, tps), idea_phase_aware(prunes, cfg)]
    return Findings({"findings": asdict(cfg), "studies": [str(s.folder) for s in studies]}, found)


#: the note on every finding that follows a replayed trajectory (``StudyConfig.ip_order``)
REPLAYED = "IP was replayed from the given removal order (ip_order), not chosen by Block Influence"


def _as_ip(prune_result):
    """``prune_result`` with its ``replay`` trajectory standing in as ``ip`` (for the findings)."""
    from dataclasses import replace as _replace

    return _replace(prune_result, runs={**prune_result.runs, "ip": prune_result.runs["replay"]})


def _correlation_over(studies: Sequence[Study]):
    """Transition Point against critical ratio over every analysed and pruned pair of the studies (None if < 3)."""
    from .correlation import correlate

    dirs = [st.folder / stage / key for st in studies for stage in ("analysis", "prune")
            for key in st.results.get(stage, {})]
    n = sum(len(st.results.get("prune", {})) for st in studies)
    if n < 3:
        return None
    methods = {st.config.ip_method for st in studies}
    try:
        return correlate(dirs, methods.pop() if len(methods) == 1 else "ip")
    except DeclensError:
        return None


def load_study(folder: str | Path) -> Study:
    """Reload a study folder written by :func:`run_study` (every complete stage folder in it).

    Raises:
        DeclensError: the folder holds no complete study (``study.json`` missing or unverified).
    """
    from ..results import read_result_file

    folder = Path(folder)
    _, d = read_result_file(folder, "study.json", "study")
    cfg = StudyConfig(**d["config"])
    study = Study(cfg, folder, timings=d.get("timings_s", {}))
    for stage, keys in d.get("stages", {}).items():
        for key in keys:
            study.results.setdefault(stage, {})[key] = _load_stage(_stage_folder(folder, stage, key), stage)
    return study
