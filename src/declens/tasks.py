"""Tasks as data: a registry of declarative multiple-choice task definitions.

A :class:`TaskSpec` says where the rows are (bundled package data, a local JSONL/CSV file, or a
Hugging Face ``datasets`` source), how a raw row maps to an :class:`Item` (a :class:`FieldMap`),
and how an item is written as a prompt in the two scoring formats (templates). The seven
benchmarks of the paper ship with the package, compressed, with their licenses
(``declens/data/LICENSES.md``).

Example:
    >>> data = load_task("arc_challenge", limit=100, seed=0)
    >>> data.items[0].choices
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import random
import re
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import TaskError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Item:
    """One multiple-choice question, independent of how it is prompted.

    Attributes:
        id: stable identifier (from the data, else ``<split>-<row number>``).
        question: question, goal, context or sentence text.
        choices: the option texts, in order.
        gold: index of the correct option in ``choices``.
        passage: text shown before the question (BoolQ), else empty.
        subject: MMLU subject (or any grouping key), else empty.
    """

    id: str
    question: str
    choices: tuple[str, ...]
    gold: int
    passage: str = ""
    subject: str = ""


@dataclass(frozen=True)
class FieldMap:
    """How a raw record becomes an :class:`Item`.

    Field paths are dotted (``choices.text``). ``choices`` is one path to a list, or several
    paths (one per option). ``gold_kind`` says how the gold field is read:

    - ``index``: a 0-based integer (or digit string);
    - ``one_based``: a 1-based integer or digit string (WinoGrande's ``"1"``/``"2"``);
    - ``letter``: ``"A"``, ``"B"``, ...;
    - ``label``: a value looked up in the list at ``gold_labels`` (ARC's ``answerKey`` in ``choices.label``);
    - ``bool``: ``False``/``True`` -> 0/1 (BoolQ with choices ``no``/``yes``);
    - ``text``: the text of the correct option.
    """

    question: str
    choices: tuple[str, ...] | str
    gold: str
    gold_kind: str = "index"
    gold_labels: str | None = None
    passage: str | None = None
    id: str | None = None
    subject: str | None = None
    const_choices: tuple[str, ...] | None = None

    GOLD_KINDS = ("index", "one_based", "letter", "label", "bool", "text")

    def __post_init__(self):
        if self.gold_kind not in self.GOLD_KINDS:
            raise TaskError(f"unknown gold kind {self.gold_kind!r}; use one of {', '.join(self.GOLD_KINDS)}")
        if self.gold_kind == "label" and not self.gold_labels:
            raise TaskError("gold kind 'label' needs gold_labels, the field holding the list of option labels")

    @classmethod
    def parse(cls, text: str) -> "FieldMap":
        """Parse ``question=q,choices=a|b|c,gold=label,gold_kind=letter,passage=p,id=uid``."""
        kv: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "=" not in part:
                raise TaskError(f"bad field mapping {part!r} in {text!r}: write key=value pairs separated by commas")
            k, v = (s.strip() for s in part.split("=", 1))
            if k not in cls.__dataclass_fields__ or k == "GOLD_KINDS":
                raise TaskError(f"unknown field-mapping key {k!r}; keys: question, choices, gold, gold_kind, gold_labels, passage, id, subject")
            kv[k] = tuple(v.split("|")) if k in ("choices", "const_choices") and "|" in v else v
        for need in ("question", "choices", "gold"):
            if need not in kv:
                raise TaskError(f"the field mapping {text!r} lacks {need}=...; e.g. question=q,choices=options,gold=label")
        return cls(**kv)


def _get(record: dict, path: str) -> Any:
    cur: Any = record
    for key in path.split("."):
        if isinstance(cur, dict) and key in cur:
            cur = cur[key]
        else:
            raise KeyError(path)
    return cur


def _as_text(value: Any, what: str) -> str:
    if value is None:
        raise ValueError(f"{what} is null")
    return str(value)


def to_item(record: dict, fm: FieldMap, row_id: str) -> Item:
    """Map one raw record to an :class:`Item`; raises ``ValueError``/``KeyError`` on a malformed row."""
    question = _as_text(_get(record, fm.question), "question")
    if fm.const_choices is not None:
        choices = tuple(fm.const_choices)
    elif isinstance(fm.choices, tuple):
        choices = tuple(_as_text(_get(record, p), p) for p in fm.choices)
    else:
        raw = _get(record, fm.choices)
        if isinstance(raw, str):
            raw = json.loads(raw) if raw.strip().startswith("[") else raw.split("|")
        if not isinstance(raw, (list, tuple)):
            raise ValueError(f"choices field {fm.choices!r} is not a list")
        choices = tuple(_as_text(c, "a choice") for c in raw)
    if len(choices) < 2:
        raise ValueError(f"only {len(choices)} choice(s); a multiple-choice row needs at least 2")
    if any(not c.strip() for c in choices):
        raise ValueError("an option text is empty")
    g = _get(record, fm.gold)
    kind = fm.gold_kind
    if kind == "bool":
        if isinstance(g, str):
            if g.lower() not in ("true", "false"):
                raise ValueError(f"gold {g!r} is not a boolean")
            g = g.lower() == "true"
        gold = int(bool(g))
    elif kind == "letter":
        gs = str(g).strip().upper()
        if len(gs) != 1 or gs not in LETTERS:
            raise ValueError(f"gold {g!r} is not an option letter")
        gold = LETTERS.index(gs)
    elif kind == "label":
        labels = [str(x) for x in _get(record, fm.gold_labels)]
        if str(g) not in labels:
            raise ValueError(f"gold {g!r} is not among the labels {labels}")
        gold = labels.index(str(g))
    elif kind == "text":
        if str(g) not in choices:
            raise ValueError(f"gold text {g!r} is not one of the choices")
        gold = choices.index(str(g))
    else:
        try:
            gold = int(str(g).strip())
        except ValueError:
            raise ValueError(f"gold {g!r} is not an integer") from None
        if kind == "one_based":
            gold -= 1
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold label {g!r} is out of range for {len(choices)} choices")
    item_id = str(_get(record, fm.id)) if fm.id else row_id
    passage = _as_text(_get(record, fm.passage), "passage") if fm.passage else ""
    subject = str(_get(record, fm.subject)) if fm.subject else ""
    return Item(id=item_id, question=question, choices=choices, gold=gold, passage=passage, subject=subject)


# --------------------------------------------------------------------------------------------
# Text preprocessing named by task definitions


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness' HellaSwag cleaning: strip, drop ``[tags]``, collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


_SENTENCE_END = re.compile(r'[.!?]"?(?= )')


def hellaswag_split_context(ctx: str) -> tuple[str, str]:
    """``(ctx_a, ctx_b)`` of a HellaSwag context bundled as ``ctx`` only.

    In the HellaSwag release, a context that ends in an incomplete noun phrase (the ActivityNet
    rows) keeps that phrase in ``ctx_b`` and the complete sentences before it in ``ctx_a``, with
    ``ctx = ctx_a + " " + ctx_b``; otherwise ``ctx_b`` is empty. So ``ctx_b`` is the text after the
    last sentence end when ``ctx`` itself does not end a sentence (``"A man is sitting on a roof.
    he"`` -> ``("A man is sitting on a roof.", "he")``).
    """
    if not ctx or ctx[-1] in '.!?"':
        return ctx, ""
    ends = list(_SENTENCE_END.finditer(ctx))
    if not ends:
        return "", ctx
    cut = ends[-1].end()
    return ctx[:cut], ctx[cut + 1 :]


PREPROCESSORS = {"none": lambda s: s, "hellaswag": hellaswag_preprocess}


def hellaswag_process_doc(record: dict) -> dict:
    """lm-evaluation-harness' HellaSwag ``process_docs``: ``query = preprocess(activity_label + ": " +
    ctx_a + " " + ctx_b.capitalize())``, every ending cleaned with :func:`hellaswag_preprocess`."""
    ctx_a, ctx_b = hellaswag_split_context(record["ctx"])
    query = hellaswag_preprocess(f"{record['activity_label']}: {ctx_a} {ctx_b.capitalize()}")
    return {**record, "query": query, "endings": [hellaswag_preprocess(e) for e in record["endings"]]}


def boolq_process_doc(record: dict) -> dict:
    """The passage as SuperGLUE's BoolQ (which lm-evaluation-harness reads) writes it: ``"<title> -- <passage>"``."""
    return {**record, "passage": f"{record['title']} -- {record['passage']}"}


# Record-level processing named by task definitions (lm-eval's ``process_docs``), applied to each raw
# row before its field mapping.
DOC_PROCESSORS = {"none": lambda r: r, "hellaswag": hellaswag_process_doc, "boolq": boolq_process_doc}


# --------------------------------------------------------------------------------------------
# Task definitions


DEFAULT_LETTER_TEMPLATE = "{passage_block}Question: {question}\n{options}Answer:"
DEFAULT_CLOZE_CONTEXT = "{passage_block}Question: {question}\nAnswer:"


@dataclass(frozen=True)
class TaskSpec:
    """A declarative multiple-choice task.

    Attributes:
        name: registry name.
        title: human-readable name.
        fields: how raw rows map to items.
        splits: split name -> bundled file (relative to ``declens/data``) or a local path.
        default_split: split evaluated by default.
        fewshot_split: split few-shot examples are drawn from (None: no few-shot).
        letter_template: prompt of the ``letter`` format; fields ``{passage_block}``, ``{question}``,
            ``{options}`` (``"A. text\\n"`` lines), ``{subject}``.
        letter_header: text printed once before the (few-shot) prompts in the letter format.
        cloze_context: context of the ``cloze`` format (same fields, no ``{options}``).
        cloze_mode: ``shared`` (one context, each option is a continuation) or ``partial``
            (WinoGrande: the option fills the blank ``_`` in the context; the rest of the sentence
            is the continuation scored).
        preprocess: name of a text cleaner applied to question and choices (see ``PREPROCESSORS``).
        process_docs: name of a record-level function applied to each raw row before its field
            mapping (see ``DOC_PROCESSORS``; lm-eval's ``process_docs``).
        cloze_header: text printed once before the (few-shot) contexts in the cloze format
            (lm-eval's ``description``).
        source: ``bundled``, ``file`` or ``hf``.
        hf: for ``source="hf"``, ``(path, config_name)``.
        license: data license.
    """

    name: str
    title: str
    fields: FieldMap
    splits: dict[str, str]
    default_split: str
    fewshot_split: str | None = None
    letter_template: str = DEFAULT_LETTER_TEMPLATE
    letter_header: str = ""
    cloze_context: str = DEFAULT_CLOZE_CONTEXT
    cloze_mode: str = "shared"
    preprocess: str = "none"
    source: str = "bundled"
    hf: tuple[str, str | None] | None = None
    license: str = ""
    has_subjects: bool = False
    cloze_header: str = ""
    process_docs: str = "none"


_ARC_FIELDS = FieldMap(question="question", choices="choices.text", gold="answerKey", gold_kind="label",
                       gold_labels="choices.label", id="id")

REGISTRY: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            name="arc_challenge", title="ARC-Challenge", fields=_ARC_FIELDS,
            splits={s: f"arc_challenge/{s}.jsonl.gz" for s in ("test", "validation", "train")},
            default_split="test", fewshot_split="train", license="CC BY-SA 4.0 (AI2)",
        ),
        TaskSpec(
            name="arc_easy", title="ARC-Easy", fields=_ARC_FIELDS,
            splits={s: f"arc_easy/{s}.jsonl.gz" for s in ("test", "validation", "train")},
            default_split="test", fewshot_split="train", license="CC BY-SA 4.0 (AI2)",
        ),
        TaskSpec(
            name="hellaswag", title="HellaSwag",
            fields=FieldMap(question="query", choices="endings", gold="label", id="idx"),
            splits={"validation": "hellaswag/validation.jsonl.gz"}, default_split="validation",
            letter_template="{question}...\nQuestion: Which ending is the most plausible?\n{options}Answer:",
            cloze_context="{question}", process_docs="hellaswag", license="MIT",
        ),
        TaskSpec(
            name="piqa", title="PIQA",
            fields=FieldMap(question="goal", choices=("sol1", "sol2"), gold="label"),
            splits={"validation": "piqa/validation.jsonl.gz"}, default_split="validation",
            letter_template="Goal: {question}\nQuestion: Which solution achieves the goal?\n{options}Answer:",
            license="AFL 3.0",
        ),
        TaskSpec(
            name="boolq", title="BoolQ",
            fields=FieldMap(question="question", choices="-", const_choices=("no", "yes"), gold="answer",
                            gold_kind="bool", passage="passage"),
            splits={"validation": "boolq/validation.jsonl.gz"}, default_split="validation",
            letter_template="{passage}\nQuestion: {question}?\n{options}Answer:",
            cloze_context="{passage}\nQuestion: {question}?\nAnswer:", process_docs="boolq", license="CC BY-SA 3.0",
        ),
        TaskSpec(
            name="winogrande", title="WinoGrande",
            fields=FieldMap(question="sentence", choices=("option1", "option2"), gold="answer", gold_kind="one_based", id="qID"),
            splits={"validation": "winogrande/validation.jsonl.gz"}, default_split="validation",
            letter_template="Sentence: {question}\nQuestion: Which option best fills the blank (_)?\n{options}Answer:",
            cloze_mode="partial", license="CC-BY",
        ),
        TaskSpec(
            name="mmlu", title="MMLU",
            fields=FieldMap(question="question", choices="choices", gold="answer", subject="subject"),
            splits={"test": "mmlu/test.jsonl.gz", "dev": "mmlu/dev.jsonl.gz"},
            default_split="test", fewshot_split="dev",
            letter_template="{question_stripped}\n{options}Answer:",
            letter_header="The following are multiple choice questions (with answers) about {subject}.\n\n",
            cloze_context="Question: {question_stripped}\nAnswer:",
            cloze_header="The following are questions (with answers) about {subject}.\n\n",
            license="MIT", has_subjects=True,
        ),
    ]
}

ALIASES = {"arc-c": "arc_challenge", "arc_c": "arc_challenge", "arc-challenge": "arc_challenge",
           "arc-e": "arc_easy", "arc_e": "arc_easy", "arc-easy": "arc_easy", "winog": "winogrande",
           "hellas": "hellaswag"}

ALL_TASKS = tuple(REGISTRY)


def get_spec(name: str) -> TaskSpec:
    """Look up a registered task by name or alias."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in REGISTRY:
        raise TaskError(
            f"unknown task {name!r}; the tasks are: {', '.join(REGISTRY)} "
            "(or pass a .jsonl/.csv file with --fields, or hf:<dataset>[:<config>])"
        )
    return REGISTRY[key]


# --------------------------------------------------------------------------------------------
# Loading rows


def _read_records(path_or_resource: Any, label: str) -> list[dict]:
    """Read JSONL (optionally gzipped), a JSON list, or CSV rows."""
    name = str(label)
    try:
        raw = path_or_resource.read_bytes()
    except FileNotFoundError:
        raise TaskError(f"data file {name!r} does not exist; check the path") from None
    except IsADirectoryError:
        raise TaskError(f"{name!r} is a directory; pass a .jsonl, .json or .csv file") from None
    if name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise TaskError(f"{name!r} is not a readable gzip file ({e}); compress it again or pass it uncompressed") from None
        name = name[:-3]
    try:
        text = raw.decode("utf-8-sig")  # a leading UTF-8 byte-order mark (Excel's CSV export) is dropped
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TaskError(
            f"{name}, line {line}: bytes that are not UTF-8 ({raw[e.start:e.end]!r} at byte {e.start}); "
            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    if name.endswith(".csv"):
        return [dict(r) for r in csv.DictReader(io.StringIO(text))]
    if name.endswith(".json") and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskError(f"{name}: not valid JSON ({e})") from None
        if not all(isinstance(r, dict) for r in data):
            raise TaskError(f"{name}: expected a JSON list of objects")
        return data
    records = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): it also splits on U+2028 inside strings
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{name}, line {n}: malformed JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise TaskError(f"{name}, line {n}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def _records_to_items(records: Iterable[dict], fm: FieldMap, prefix: str, where: str, preprocess: str,
                      process_docs: str = "none") -> list[Item]:
    clean = PREPROCESSORS[preprocess]
    process = DOC_PROCESSORS[process_docs]
    items = []
    for n, rec in enumerate(records):
        try:
            it = to_item(process(rec), fm, f"{prefix}-{n}")
        except KeyError as e:
            raise TaskError(
                f"{where}, row {n + 1}: field {e.args[0]!r} is missing (row keys: {', '.join(map(str, rec))}); "
                "fix the row or the field mapping (--fields)"
            ) from None
        except (ValueError, TypeError) as e:
            raise TaskError(f"{where}, row {n + 1}: {e}") from None
        if preprocess != "none":
            it = replace(it, question=clean(it.question), choices=tuple(clean(c) for c in it.choices))
        items.append(it)
    return items


def _bundled(relpath: str):
    return resources.files("declens").joinpath("data").joinpath(relpath)


def read_split(spec: TaskSpec, split: str) -> list[Item]:
    """All items of one split of a task, in file order."""
    if split not in spec.splits and spec.source != "hf":
        raise TaskError(f"task {spec.name!r} has no split {split!r}; its splits are: {', '.join(spec.splits)}")
    if spec.source == "hf":
        return _hf_items(spec, split)
    location = spec.splits[split]
    if spec.source == "bundled":
        records = _read_records(_bundled(location), location)
    else:
        records = _read_records(Path(location).expanduser(), location)
    return _records_to_items(records, spec.fields, split, location, spec.preprocess, spec.process_docs)


def _hf_items(spec: TaskSpec, split: str) -> list[Item]:
    try:
        import datasets
    except ImportError:
        raise TaskError("Hugging Face sources need the datasets package: pip install 'declens[hf]'") from None
    path, cfg = spec.hf
    try:
        ds = datasets.load_dataset(path, cfg, split=split)
    except Exception as e:  # network, unknown dataset, unknown split
        raise TaskError(
            f"could not load hf:{path}{':' + cfg if cfg else ''} split {split!r} from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); is the hub reachable and the name right?"
        ) from None
    return _records_to_items(ds, spec.fields, split, f"hf:{path}", spec.preprocess, spec.process_docs)


def custom_spec(source: str, fields: FieldMap | str | None, name: str | None = None,
                split: str = "test", cloze_mode: str = "shared") -> TaskSpec:
    """A task over the user's own data: a local ``.jsonl``/``.json``/``.csv`` file or ``hf:path[:config]``."""
    if fields is None:
        raise TaskError(
            f"custom data {source!r} needs a field mapping, e.g. --fields question=question,choices=options,gold=label "
            "(gold_kind=index|one_based|letter|label|bool|text)"
        )
    fm = FieldMap.parse(fields) if isinstance(fields, str) else fields
    if source.startswith("hf:"):
        path, _, cfg = source[3:].partition(":")
        return TaskSpec(name=name or source, title=source, fields=fm, splits={}, default_split=split,
                        source="hf", hf=(path, cfg or None), cloze_mode=cloze_mode)
    p = Path(source).expanduser()
    if not p.is_file():
        raise TaskError(f"data file {source!r} does not exist; check the path")
    if not p.name.endswith((".jsonl", ".json", ".csv", ".jsonl.gz")):
        raise TaskError(f"{source!r}: unsupported file type; use .jsonl, .json, .csv or .jsonl.gz")
    return TaskSpec(name=name or p.stem, title=p.name, fields=fm, splits={split: str(p.resolve())},
                    default_split=split, source="file", cloze_mode=cloze_mode)


@dataclass
class TaskData:
    """The selected rows of a task, ready to be formatted.

    Attributes:
        spec: the task definition.
        split: the split the rows come from.
        items: the selected items, in a deterministic order.
        fewshot_pool: items few-shot examples are drawn from (empty if none).
        selection: how the rows were selected (limit, seed, subjects, total rows).
    """

    spec: TaskSpec
    split: str
    items: list[Item]
    fewshot_pool: list[Item] = field(default_factory=list)
    selection: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def fingerprint(self) -> str:
        """sha256 over the selected items (ids, texts, gold labels), order included."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(json.dumps(asdict(it), sort_keys=True, ensure_ascii=False).encode())
        return h.hexdigest()[:16]

    @property
    def max_choices(self) -> int:
        return max(len(it.choices) for it in self.items)


def subsample(n: int, limit: int | None, seed: int) -> list[int]:
    """Deterministic subset of ``range(n)``: ``limit`` indices drawn with ``seed``, in ascending order."""
    check_seed(seed)
    if limit is not None and limit <= 0:
        raise TaskError(f"the number of rows to draw must be positive (a whole number), got {limit}")
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def check_seed(seed: int, option: str = "--seed") -> int:
    """A seed must be a non-negative integer: ``random.Random(-s)`` draws exactly what ``random.Random(s)`` draws,
    so a negative seed would silently repeat another seed's selection."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TaskError(f"{option} must be a whole number >= 0, got {seed!r} (a negative seed would draw the same "
                        f"rows as {abs(seed) if isinstance(seed, int) else 'its absolute value'}); use e.g. {option} 0")
    return seed


def load_task(
    task: str | TaskSpec,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    subjects: Sequence[str] | None = None,
    fields: FieldMap | str | None = None,
) -> TaskData:
    """Load and select the rows of a task.

    Args:
        task: a registered name (``arc_challenge``, ``mmlu``, ``mmlu:astronomy`` ...), a
            :class:`TaskSpec`, a local ``.jsonl``/``.json``/``.csv`` file, or ``hf:<path>[:<config>]``
            (files and hf sources need ``fields``).
        split: split to evaluate (default: the task's default split).
        limit: keep this many rows, drawn deterministically with ``seed`` (None: all).
        seed: seed of the row selection.
        subjects: MMLU subjects to keep (None: all 57).
        fields: field mapping for custom data.

    Raises:
        TaskError: unknown task or split, unreadable file, malformed row, empty selection.
    """
    if isinstance(task, TaskSpec):
        spec = task
    elif task.startswith("hf:") or Path(task).suffix in (".jsonl", ".json", ".csv", ".gz") or "/" in task:
        spec = custom_spec(task, fields, split=split or "test")
    else:
        name, _, subj = task.partition(":")
        spec = get_spec(name)
        if subj:
            subjects = [*(subjects or []), *subj.split("+")]
    split = split or spec.default_split
    rows = read_split(spec, split)
    total = len(rows)
    if subjects:
        if not spec.has_subjects:
            raise TaskError(f"task {spec.name!r} has no subjects; --subjects applies to mmlu")
        known = sorted({it.subject for it in rows})
        unknown = [s for s in subjects if s not in known]
        if unknown:
            raise TaskError(f"unknown subject(s) {', '.join(unknown)}; the subjects are: {', '.join(known)}")
        rows = [it for it in rows if it.subject in set(subjects)]
    if not rows:
        raise TaskError(f"the selection from {spec.name!r} split {split!r} is empty")
    idx = subsample(len(rows), limit, seed)
    items = [rows[i] for i in idx]
    pool: list[Item] = []
    if spec.fewshot_split and spec.fewshot_split != split:
        pool = read_split(spec, spec.fewshot_split)
    selection = {"split": split, "limit": limit, "seed": seed, "subjects": list(subjects) if subjects else None,
                 "rows_in_split": total, "rows_selected": len(items)}
    return TaskData(spec=spec, split=split, items=items, fewshot_pool=pool, selection=selection)


def fewshot_capacity(data: TaskData) -> tuple[int, str]:
    """The most solved examples every selected item can get, and where that limit comes from.

    Tasks with subjects (MMLU) take the examples from the same subject's rows of the few-shot split
    (5 per subject in MMLU's dev split); other tasks draw them from the whole few-shot split. With no
    few-shot split distinct from the evaluated one, the capacity is 0.
    """
    spec, pool = data.spec, data.fewshot_pool
    if not pool:
        why = (f"task {data.name!r} has no few-shot split" if not spec.fewshot_split
               else f"the few-shot split of {data.name!r} is the evaluated split {data.split!r}")
        return 0, why
    if spec.has_subjects:
        counts: dict[str, int] = {}
        for it in pool:
            counts[it.subject] = counts.get(it.subject, 0) + 1
        subjects = sorted({it.subject for it in data.items}, key=lambda sb: (counts.get(sb, len(pool)), sb))
        if subjects and subjects[0] in counts:
            sb = subjects[0]
            return counts[sb], f"{data.name}'s {spec.fewshot_split} split has {counts[sb]} solved examples for subject {sb!r}"
    return len(pool), f"{data.name}'s {spec.fewshot_split} split has {len(pool)} rows"


def check_fewshot(data: TaskData, k: int, option: str = "--num-fewshot") -> int:
    """Refuse a few-shot count the task cannot supply for every selected item (never use fewer silently).

    Raises:
        TaskError: ``k`` is negative or larger than :func:`fewshot_capacity`.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise TaskError(f"{option} must be a whole number >= 0, got {k!r}")
    if k == 0:
        return k
    cap, why = fewshot_capacity(data)
    if k > cap:
        fix = f"use {option} {cap} or less" if cap else f"use {option} 0"
        if not cap and data.spec.fewshot_split and data.spec.fewshot_split == data.split:
            fix += f" or evaluate another split than {data.split!r}"
        raise TaskError(f"{option} {k} asks for more solved examples than there are: {why}; {fix}")
    return k


def task_info() -> list[dict]:
    """One dict per registered task (name, title, splits, license) for listings."""
    return [{"name": s.name, "title": s.title, "splits": list(s.splits), "default_split": s.default_split,
             "fewshot_split": s.fewshot_split, "license": s.license} for s in REGISTRY.values()]
