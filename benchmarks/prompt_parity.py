"""Prompt parity with lm-evaluation-harness: declens' prompts against lm-eval's stock tasks.

For every bundled task and both formats, each row of each bundled split is rendered twice:

- by declens (``declens.formats.cloze_texts`` / ``letter_text``: zero-shot context and every
  continuation, the gold option, and, on the default split, the ``k``-shot context);
- by lm-evaluation-harness' own stock task (its YAML and ``utils.py`` loaded through
  ``lm_eval.tasks.TaskManager``, instantiated as ``ConfigurableTask`` with the same rows in the
  fields of the Hugging Face dataset the stock task reads, see :func:`hf_doc`): ``fewshot_context``
  + ``construct_requests`` give the (context, continuation) pairs lm-eval scores,
  ``doc_to_target`` the gold option.

The strings must be equal character for character. Few-shot examples: MMLU uses lm-eval's own
``first_n`` sampler on the dev split (a full check of the example choice and order); the other
tasks sample examples at random in both tools, with different generators, so there lm-eval is
handed the examples declens drew (``FirstNSampler`` over them) and the check covers how they are
written and joined, not which ones are drawn.

Tasks with no stock lm-eval definition in a format (the letter format of every task but MMLU)
are counted as ``no stock task`` (declens' own template, docs/METHOD.md).

Usage (project venv with ``pip install -e '.[dev]'``, which brings lm_eval)::

    python benchmarks/prompt_parity.py                    # every row, every task, both formats
    python benchmarks/prompt_parity.py --tasks mmlu --fewshot 5 --show 3 --out parity.json
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from declens.formats import cloze_texts, letter_text
from declens.formats import fewshot_examples
from declens.tasks import ALL_TASKS, LETTERS, Item, TaskData, TaskSpec, _bundled, _read_records, get_spec, read_split
from declens.tasks import hellaswag_split_context

LMEVAL_VERSION = "0.4.13"

# declens task -> format -> lm-eval stock task ("{subject}" is filled per MMLU subject); None: no stock task.
STOCK: dict[str, dict[str, str | None]] = {
    "arc_challenge": {"cloze": "arc_challenge", "letter": None},
    "arc_easy": {"cloze": "arc_easy", "letter": None},
    "hellaswag": {"cloze": "hellaswag", "letter": None},
    "piqa": {"cloze": "piqa", "letter": None},
    "boolq": {"cloze": "boolq", "letter": None},
    "winogrande": {"cloze": "winogrande", "letter": None},
    "mmlu": {"cloze": "mmlu_{subject}_continuation", "letter": "mmlu_{subject}"},
}
# lm-eval task folders holding those stock tasks (indexing only these keeps TaskManager fast).
TASK_DIRS = ("arc", "hellaswag", "piqa", "super_glue/boolq", "winogrande", "mmlu/default", "mmlu/continuation")


def hf_doc(task: str, record: dict, row: int) -> dict:
    """One bundled record in the fields of the Hugging Face dataset lm-eval's stock task reads.

    ARC (``allenai/ai2_arc``), PIQA (``baber/piqa``), WinoGrande (``allenai/winogrande``) and MMLU
    (``cais/mmlu``) rows are bundled with those fields. BoolQ is bundled from the original release
    (``question, title, answer, passage``); lm-eval reads SuperGLUE's copy (``aps/super_glue``), whose
    ``passage`` is ``"<title> -- <passage>"`` and whose ``label`` is ``int(answer)``. HellaSwag is
    bundled with ``ctx`` only; ``Rowan/hellaswag`` also has ``ctx_a``/``ctx_b`` (``ctx = ctx_a + " " +
    ctx_b`` when the context ends in an incomplete noun phrase), recovered by
    :func:`declens.tasks.hellaswag_split_context`.
    """
    if task == "boolq":
        return {"question": record["question"], "passage": f"{record['title']} -- {record['passage']}",
                "idx": row, "label": int(bool(record["answer"]))}
    if task == "hellaswag":
        ctx_a, ctx_b = hellaswag_split_context(record["ctx"])
        return {"ind": record["idx"], "activity_label": record["activity_label"], "ctx_a": ctx_a, "ctx_b": ctx_b,
                "ctx": record["ctx"], "endings": list(record["endings"]), "source_id": "", "split": "val",
                "split_type": "", "label": str(record["label"])}
    return dict(record)


def _quiet_lmeval() -> None:
    import datasets

    datasets.disable_progress_bars()
    for name in ("lm-eval", "lm_eval", "lm_eval.api.task", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


@dataclass
class StockTasks:
    """lm-eval's stock task definitions, instantiated on the bundled rows.

    Attributes:
        manager: ``lm_eval.tasks.TaskManager`` indexing the stock task folders.
        docs: (task, split) -> the bundled split as HF-style docs, in file order (before
            ``process_docs``).
    """

    manager: object
    docs: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict)

    @classmethod
    def load(cls) -> "StockTasks":
        import lm_eval
        from lm_eval.tasks import TaskManager

        if lm_eval.__version__ != LMEVAL_VERSION:
            raise RuntimeError(f"prompt parity is pinned to lm_eval {LMEVAL_VERSION}, found {lm_eval.__version__}")
        _quiet_lmeval()
        root = Path(lm_eval.__file__).parent / "tasks"
        return cls(manager=TaskManager(include_defaults=False, include_path=[str(root / d) for d in TASK_DIRS]))

    def split_docs(self, task: str, split: str) -> list[dict]:
        key = (task, split)
        if key not in self.docs:
            spec = get_spec(task)
            records = _read_records(_bundled(spec.splits[split]), spec.splits[split])
            self.docs[key] = [hf_doc(task, r, n) for n, r in enumerate(records)]
        return self.docs[key]

    def task(self, name: str, splits: dict[str, list[dict]], key: tuple):
        """lm-eval's stock task ``name`` (its YAML, ``utils.py``, description, sampler) reading ``splits``.

        ``key`` names the docs in ``splits`` (the task is built once per key).

        Returns:
            (task, processed) where ``processed[split]`` are the docs after the task's ``process_docs``.
        """
        key = (name, *key)
        if key in self._cache:
            return self._cache[key]
        task, dsd = self.build(name, splits)
        proc = task.config.process_docs
        processed = {s: list(proc(dsd[s])) if proc else list(dsd[s]) for s in splits}
        self._cache[key] = (task, processed)
        return task, processed

    def build(self, name: str, splits: dict[str, list[dict]]):
        """lm-eval's stock task ``name`` as a ``ConfigurableTask`` reading ``splits`` (not cached).

        Returns:
            (task, dataset) where ``dataset`` is the ``datasets.DatasetDict`` the task reads.
        """
        import datasets
        from lm_eval.api.task import ConfigurableTask

        entry = self.manager.task_index[name]
        dsd = datasets.DatasetDict({s: datasets.Dataset.from_list(d) for s, d in splits.items()})
        cfg = self.manager._factory._load_full_config(entry, {"custom_dataset": lambda **_: dsd, "dataset_kwargs": None})
        for name_key in ("tag", "group", "task_list"):  # as TaskFactory._build_task does
            cfg.pop(name_key, None)
        # the stock configs name train/validation/test splits we may not bundle: point them at one we have
        have = next(iter(splits))
        for split_key in ("training_split", "validation_split", "test_split", "fewshot_split"):
            if cfg.get(split_key) is not None and cfg[split_key] not in splits:
                cfg[split_key] = have
        return ConfigurableTask(config=cfg), dsd


def lmeval_requests(task, doc: dict, num_fewshot: int, shots: list[dict] | None = None) -> tuple[list[tuple[str, str]], int]:
    """The (context, continuation) pairs and the gold index lm-eval builds for ``doc``.

    ``shots``: the few-shot docs to use, in order (replacing the stock sampler); None keeps the
    task's own sampler.
    """
    from lm_eval.api import samplers

    if shots is not None:
        task.sampler = samplers.FirstNSampler(shots, rnd=None)
    ctx = task.fewshot_context(doc, num_fewshot)
    reqs = task.construct_requests(doc, ctx, metadata=(task.config.task, 0, 1))
    pairs = [tuple(r.arguments[:2]) for r in reqs]
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = task.doc_to_choice(doc).index(gold)
    return pairs, int(gold)


def declens_requests(fmt: str, data: TaskData, item: Item, num_fewshot: int, seed: int) -> list[tuple[str, str]]:
    """declens' (context, continuation) pairs of ``item``: one per option (cloze) or one prompt and
    each option label (letter)."""
    if fmt == "cloze":
        return cloze_texts(data, item, num_fewshot, seed)
    text = letter_text(data, item, num_fewshot, seed)
    return [(text, " " + LETTERS[k]) for k in range(len(item.choices))]


@dataclass
class Mismatch:
    """The first difference found in one row: ``what`` is ``gold``, ``context`` or ``continuation``;
    ``declens``/``lmeval`` hold the gold indices or the (context, continuation) pairs."""

    task: str
    fmt: str
    split: str
    row: int
    shots: int
    what: str
    declens: object
    lmeval: object


@dataclass
class Tally:
    """Rows whose prompts are identical / different, rows without a stock task, and the mismatches."""

    identical: int = 0
    different: int = 0
    no_stock: int = 0
    mismatches: list = field(default_factory=list)


def _subject_groups(items: list[Item]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.subject, []).append(i)
    return groups


def compare_task(stock: StockTasks, task: str, fmt: str, split: str, rows: list[int] | None = None,
                 num_fewshot: int = 0, seed: int = 0, spec: TaskSpec | None = None) -> Tally:
    """Compare declens' and lm-eval's prompts of ``rows`` (None: all) of one split, one format.

    ``num_fewshot`` > 0 also compares the ``k``-shot context of each row (on a split with a
    separate few-shot split only). ``spec`` replaces the registered declens task definition (to
    show that a changed template is caught).
    """
    spec = spec or get_spec(task)
    items = read_split(spec, split)
    rows = list(range(len(items))) if rows is None else rows
    tally = Tally()
    stock_name = STOCK[task][fmt]
    if stock_name is None:
        tally.no_stock = len(rows)
        return tally
    fs_split = spec.fewshot_split if spec.fewshot_split and spec.fewshot_split != split else None
    pool = read_split(spec, fs_split) if fs_split else []
    data = TaskData(spec=spec, split=split, items=items, fewshot_pool=pool)
    shot_counts = [0] + ([num_fewshot] if num_fewshot and fs_split else [])
    pool_index = {id(p): n for n, p in enumerate(pool)}
    wanted = set(rows)
    groups = _subject_groups(items) if spec.has_subjects else {"": list(range(len(items)))}
    for subject, idx in groups.items():
        idx = [i for i in idx if i in wanted]
        if not idx:
            continue
        name = stock_name.format(subject=subject)
        all_docs = stock.split_docs(task, split)
        splits = {split: [all_docs[i] for i in idx]}
        if fs_split:
            fs_docs = stock.split_docs(task, fs_split)
            splits[fs_split] = [d for d, p in zip(fs_docs, pool) if p.subject == subject] if subject else fs_docs
        lm_task, processed = stock.task(name, splits, key=(split, tuple(idx), fs_split))
        pos = {i: n for n, i in enumerate(idx)}
        for i in idx:
            doc = processed[split][pos[i]]
            first: Mismatch | None = None
            for k in shot_counts:
                shots = None
                if k and not spec.has_subjects:  # random sampling differs by design: hand lm-eval declens' draw
                    fs_proc = processed[fs_split]
                    shots = [fs_proc[pool_index[id(s)]] for s in fewshot_examples(data, items[i], k, seed)]
                ours = declens_requests(fmt, data, items[i], k, seed)
                theirs, gold = lmeval_requests(lm_task, doc, k, shots)
                if first is None and gold != items[i].gold:
                    first = Mismatch(task, fmt, split, i, k, "gold", items[i].gold, gold)
                elif first is None and ours != theirs:
                    what = "context" if [c for c, _ in ours] != [c for c, _ in theirs] else "continuation"
                    first = Mismatch(task, fmt, split, i, k, what, ours, theirs)
            if first is None:
                tally.identical += 1
            else:
                tally.different += 1
                tally.mismatches.append(first)
    return tally


def sample_rows(n: int, size: int, seed: int) -> list[int]:
    """``size`` row indices of ``n``, drawn with ``seed`` (all rows when ``size >= n``)."""
    return sorted(random.Random(seed).sample(range(n), size)) if size < n else list(range(n))


def _first_diff(a: str, b: str) -> str:
    i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at char {i}: declens {a[max(0, i - 30):i + 30]!r} | lm-eval {b[max(0, i - 30):i + 30]!r}"


def describe(m: Mismatch) -> str:
    """One line naming where a mismatch starts."""
    head = f"{m.task}/{m.fmt}/{m.split} row {m.row} ({m.shots}-shot) {m.what}"
    if m.what == "gold":
        return f"{head}: declens {m.declens} | lm-eval {m.lmeval}"
    for (c1, x1), (c2, x2) in zip(m.declens, m.lmeval):
        if c1 != c2:
            return f"{head}: {_first_diff(c1, c2)}"
        if x1 != x2:
            return f"{head}: {_first_diff(x1, x2)}"
    return f"{head}: {len(m.declens)} vs {len(m.lmeval)} options"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(ALL_TASKS))
    ap.add_argument("--formats", default="letter,cloze")  # the formats lm-evaluation-harness has stock tasks for
    ap.add_argument("--fewshot", type=int, default=5, help="also compare k-shot contexts where a few-shot split exists")
    ap.add_argument("--seed", type=int, default=0, help="declens' few-shot seed")
    ap.add_argument("--show", type=int, default=2, help="mismatches printed per task and format")
    ap.add_argument("--out", type=Path, help="write the counts as JSON")
    args = ap.parse_args(argv)
    stock = StockTasks.load()
    report = []
    t0 = time.time()
    for task in args.tasks.split(","):
        spec = get_spec(task)
        for fmt in args.formats.split(","):
            for split in spec.splits:
                tally = compare_task(stock, task, fmt, split, None, args.fewshot, args.seed)
                row = {"task": task, "format": fmt, "split": split, "stock": STOCK[task][fmt],
                       "identical": tally.identical, "different": tally.different, "no_stock": tally.no_stock}
                report.append(row)
                print(f"{task:14s} {fmt:6s} {split:10s} identical {tally.identical:6d}  different {tally.different:6d}"
                      f"  no stock task {tally.no_stock:6d}", flush=True)
                for m in tally.mismatches[: args.show]:
                    print("    " + describe(m))
    if args.out:
        args.out.write_text(json.dumps({"lm_eval": LMEVAL_VERSION, "fewshot": args.fewshot, "seed": args.seed,
                                        "seconds": round(time.time() - t0, 1), "rows": report}, indent=1))
    return 0 if all(r["different"] == 0 for r in report) else 1


if __name__ == "__main__":
    sys.exit(main())
