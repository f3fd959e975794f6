"""Up-front checks of command options: every bad value is refused before a model loads or work starts.

Each check raises a :class:`~declens.errors.DeclensError` whose one-line message names the option,
the value, and the fix. The command line calls :func:`check_options` with the options a command
has; the library functions keep their own checks for callers of the Python API.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import DeclensError
from .formats import FORMAT_REGISTRY, format_named


def _whole(option: str, value: Any, lo: int, what: str = "") -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise DeclensError(f"{option} must be a whole number >= {lo}{what}, got {value!r}")


def _fraction(option: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > lo if lo_open else value >= lo) \
        and (value < hi if hi_open else value <= hi)
    if not ok:
        rng = (f"strictly between {lo:g} and {hi:g}" if lo_open and hi_open
               else f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
        raise DeclensError(f"{option} must lie {rng}, got {value!r}")


def check_format(fmt: str, option: str = "--format") -> str:
    """A registered format (:data:`declens.formats.FORMAT_REGISTRY`: ``letter``, ``cloze``, ...)."""
    format_named(fmt, option)
    return fmt


def check_formats(text: str, option: str = "--formats") -> list[str]:
    """A comma-separated list of formats, each once."""
    fmts = [s.strip() for s in str(text).split(",") if s.strip()]
    if not fmts:
        raise DeclensError(f"{option} is empty; use letter, cloze or letter,cloze")
    for f in fmts:
        check_format(f, option)
    if len(set(fmts)) != len(fmts):
        raise DeclensError(f"{option} {text!r} names a format more than once; list each once")
    return fmts


def check_task_names(text: str, option: str = "--tasks", allow_all: bool = True) -> list[str]:
    """Bundled task names (or ``all``), as commands that evaluate many tasks take them.

    Your own data files need a field mapping, which only the single-task commands take (``--fields``),
    so a file here is refused with a pointer to them.
    """
    from .tasks import ALL_TASKS, get_spec

    raw = str(text).strip()
    if allow_all and raw == "all":
        return list(ALL_TASKS)
    names = [s.strip() for s in raw.split(",") if s.strip()]
    if not names:
        raise DeclensError(f"{option} is empty; give bundled task names like arc_easy,piqa" + (" or 'all'" if allow_all else ""))
    out = []
    for n in names:
        if n.startswith("hf:") or Path(n).suffix in (".jsonl", ".json", ".csv", ".gz") or "/" in n:
            raise DeclensError(f"{option} takes bundled task names ({', '.join(ALL_TASKS)}), not your own data {n!r}; "
                               "analyse your own data with 'declens analyze --task FILE --fields ...'")
        try:
            get_spec(n.partition(":")[0])
        except DeclensError:
            raise DeclensError(f"unknown task {n!r} in {option}; the bundled tasks are: {', '.join(ALL_TASKS)}") from None
        out.append(n)
    if len(set(out)) != len(out):
        raise DeclensError(f"{option} {text!r} names a task more than once; list each once")
    return out


def check_task_fields(task: str, fields: str | None) -> None:
    """``--fields`` maps the fields of your own data; a bundled task has its own mapping."""
    if fields is None:
        return
    from .tasks import ALIASES, REGISTRY

    name = task.partition(":")[0].lower()
    if name in REGISTRY or name in ALIASES:
        raise DeclensError(f"--fields maps the fields of your own data file, and {task!r} is a bundled task with its "
                           "own mapping; drop --fields, or pass your .jsonl/.csv file to --task")


def check_layer_spec(text: str | None, option: str = "--remove") -> None:
    """The syntax of dense layer ids (``24,23,22`` or ``20-27``); their range is checked against the model."""
    if text is None:
        return
    if option == "--layers" and not str(text).strip():
        raise DeclensError("--layers is empty; give dense layer ids like 0-10,20, or leave it out for every layer")
    from .surgery import parse_layer_ids

    try:
        ids = parse_layer_ids(text)
    except DeclensError as e:
        raise DeclensError(f"{option}: {e}") from None
    neg = sorted({i for i in ids if i < 0})
    if neg:
        raise DeclensError(f"{option} {text!r}: layer ids count from 0, got {', '.join(map(str, neg))}; "
                           "give dense ids like 24,23 or ranges like 20-23")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DeclensError(f"{option} {text!r} lists layer(s) {', '.join(map(str, dup))} more than once; list each once")


def check_lens_layers(text: str | None) -> None:
    """``all``, ``last`` or dense layer ids."""
    if text in (None, "all", "last"):
        return
    check_layer_spec(text, "--lens-layers (all, last or layer ids)")


def check_decision_score(value: str) -> None:
    if value not in ("raw", "norm"):
        raise DeclensError(f"--decision-score must be raw or norm, not {value!r}")


def check_dtype(dtype: str) -> None:
    from .models import _DTYPES

    if dtype != "auto" and dtype not in _DTYPES:
        raise DeclensError(f"unknown --dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")


def check_seed(seed: int) -> None:
    from .tasks import check_seed as _check

    _check(seed)


#: option name (as the command functions call it) -> its check; the flag is named in every message
_CHECKS: dict[str, Callable[[Any], None]] = {
    "fmt": check_format,
    "formats": check_formats,
    "seed": check_seed,
    "limit": lambda v: _whole("--limit", v, 1, " (rows)"),
    "num_fewshot": lambda v: _whole("--num-fewshot", v, 0),
    "max_tokens": lambda v: _whole("--max-tokens", v, 1, " (padded tokens per batch)"),
    "dtype": check_dtype,
    "decision_score": check_decision_score,
    "lens_layers": check_lens_layers,
    "remove": check_layer_spec,
    "layers": lambda v: check_layer_spec(v, "--layers"),
    "order": lambda v: check_layer_spec(v, "--order"),
    "calib_samples": lambda v: _whole("--calib-samples", v, 1),
    "train_samples": lambda v: _whole("--train-samples", v, 1, " (training rows)"),
    "window": lambda v: _whole("--window", v, 0),
    "tp": lambda v: _whole("--tp", v, 0, " (a dense layer id)"),
    "repeats": lambda v: _whole("--repeats", v, 1),
    "max_ratio": lambda v: _fraction("--max-ratio", v, 0, 1, True, True),
    "collapse_keep": lambda v: _fraction("--collapse-keep", v, 0, 1, False, True),
    "ratio": lambda v: _fraction("--ratios (each)", v, 0, 1, True, True),
}


def check_options(*, device: str | None = None, device_map: str | None = None, max_memory: str | None = None,
                  **options: Any) -> None:
    """Check the options a command was given, by their parameter names (``fmt``, ``seed``, ``limit`` ...).

    Placement (``device``, ``device_map``, ``max_memory``) is checked as :func:`~declens.models.load_model`
    checks it, without loading anything.

    Raises:
        DeclensError: the first bad option, with the fix.
    """
    for name, value in options.items():
        if name not in _CHECKS:
            raise KeyError(f"no check for option {name!r}")  # a programming error, not bad input
        if isinstance(value, (list, tuple)) and name == "remove":
            for v in value:
                _CHECKS[name](v)
        else:
            _CHECKS[name](value)
    if device is not None or device_map is not None or max_memory is not None:
        from .models import check_placement

        check_placement(device if device is not None else "auto", device_map, max_memory)


def check_methods(methods: Sequence[str], order: str | None) -> None:
    """Pruning methods exist; ``replay`` gets an ``--order`` and ``--order`` is only given with ``replay``
    (:func:`declens.pruning.methods.check_method_names`, which :class:`~declens.pruning.PruneConfig` also runs)."""
    from .pruning.methods import check_method_names

    check_method_names(methods, order)


def check_calibration(calib_task: str | None, calib_split: str | None, calib_from_eval: bool) -> None:
    """``prune``'s calibration options: a bundled ``--calib-task``, no clash with ``--calib-from-eval``
    (the split is checked when the calibration rows are drawn, still before the model loads)."""
    if calib_from_eval and (calib_task or calib_split):
        raise DeclensError("--calib-from-eval takes the calibration rows from the evaluated rows; "
                           "drop --calib-task/--calib-split")
    if calib_task:
        check_task_names(calib_task, "--calib-task", allow_all=False)


def check_distinct_configs(configs: Sequence[Sequence[int]], option: str = "--remove") -> None:
    """Each pruned configuration (a set of dense ids; ``[]`` is the dense model) once: a repeat would
    overwrite its own cells in the results table."""
    seen: dict[frozenset, str] = {}
    for c in configs:
        key = frozenset(int(i) for i in c)
        label = ",".join(map(str, c)) or "the dense model"
        if key in seen:
            what = "the dense model (--dense and an empty --remove)" if not key else f"{option} {label}"
            raise DeclensError(f"{what} is given twice (as {seen[key]!r} and {label!r}); list each configuration once")
        seen[key] = label


def check_train_split(task: str, split: str | None, option: str = "--train-split") -> None:
    """A split the (bundled) training task has."""
    from .tasks import REGISTRY, get_spec

    name = task.partition(":")[0].lower()
    if split is None or name not in REGISTRY:
        return
    spec = get_spec(name)
    if split not in spec.splits:
        raise DeclensError(f"{option} {split!r}: task {spec.name!r} has the splits {', '.join(spec.splits)}; pick one of them")


def check_format_options(fmt: str, labels: str | None = None, decision_score: str = "raw", data=None) -> None:
    """Options of one format are refused with the other (they would be silently ignored), and letter labels
    must be distinct and enough for the task's options (when ``data`` is given)."""
    form = FORMAT_REGISTRY.get(fmt)  # an unknown name is refused by check_format, with its own message
    if labels is not None:
        if form is None or not form.takes_labels:
            raise DeclensError("--labels names the options of the letter format; drop it or use --format letter")
        labs = [s.strip() for s in labels.split(",") if s.strip()]
        if len(set(labs)) != len(labs) or not labs:
            raise DeclensError(f"--labels {labels!r} must be distinct, non-empty labels like A,B,C,D or 1,2,3,4")
        if data is not None and len(labs) < data.max_choices:
            raise DeclensError(f"--labels {labels!r} gives {len(labs)} labels but {data.name!r} has rows with "
                               f"{data.max_choices} options; give at least {data.max_choices}")
    if decision_score == "norm" and (form is None or not form.reports_norm):
        raise DeclensError("--decision-score norm uses the per-character scores of the cloze format; "
                           "use it with --format cloze, or drop it")
