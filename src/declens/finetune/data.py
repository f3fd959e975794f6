"""Training rows and training sequences; evaluated rows never enter training.

Rows come from a task's *training* split (ARC-Easy / ARC-Challenge: ``train``; MMLU: ``dev``),
written in exactly the format that is evaluated, through the evaluation's own prompt builders
(:func:`declens.formats.prepare`):

- ``letter``: the letter prompt (question, lettered options, ``Answer:``) followed by the gold
  option's label token (``" A"``), i.e. the very decision token the lens reads;
- ``cloze``: the item's context followed by the gold option as continuation.

The loss is the next-token cross-entropy on the answer tokens only (prompt tokens are labelled
-100, as in supervised fine-tuning on prompt/response pairs).

HellaSwag, PIQA, BoolQ and WinoGrande ship with their validation split only, which is the
evaluated one. A multi-task recipe (``declens compare``) therefore trains on the pooled training
splits of the tasks that have one (:data:`TRAINABLE_TASKS`) and nothing of those four;
:func:`training_mixture` drops any training row whose id or text equals an evaluated row's and
records what it used and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from ..errors import DeclensError
from ..models import LoadedModel
from ..tasks import LETTERS, REGISTRY, Item, TaskData, TaskSpec, get_spec, load_task

IGNORE_INDEX = -100
#: the bundled tasks with a training split of their own (the default training mixture)
TRAINABLE_TASKS = tuple(name for name, s in REGISTRY.items() if s.fewshot_split or "train" in s.splits)


@dataclass(frozen=True)
class TrainSeq:
    """One training sequence: prompt tokens followed by answer tokens (the loss is on the answer only).

    Attributes:
        input_ids: the token ids (prompt, then answer).
        n_prompt: how many leading tokens are prompt (masked out of the loss); at least 1.
        truncated: the prompt lost its start to fit ``max_length``.
    """

    input_ids: tuple[int, ...]
    n_prompt: int
    truncated: bool = False

    @property
    def n_answer(self) -> int:
        return len(self.input_ids) - self.n_prompt

    @property
    def labels(self) -> list[int]:
        """Next-token targets in Hugging Face convention: -100 on the prompt, the ids on the answer."""
        return [IGNORE_INDEX] * self.n_prompt + list(self.input_ids[self.n_prompt :])


def training_split(spec: TaskSpec, split: str | None = None) -> str:
    """The split fine-tuning rows come from: ``split``, else the task's few-shot/training split.

    Raises:
        DeclensError: the task has no training split (e.g. HellaSwag, PIQA: validation only).
    """
    if split is not None:
        if spec.source != "hf" and split not in spec.splits:
            raise DeclensError(f"task {spec.name!r} has no split {split!r}; its splits are: {', '.join(spec.splits)}")
        return split
    if spec.fewshot_split:
        return spec.fewshot_split
    if "train" in spec.splits:
        return "train"
    raise DeclensError(
        f"task {spec.name!r} has no training split (its splits: {', '.join(spec.splits) or 'none'}); fine-tune on a "
        f"task that has one (--train-task, one of {', '.join(TRAINABLE_TASKS)}), or name a split with --train-split "
        "(never the evaluated one)"
    )


def load_training_data(task: str | TaskSpec | TaskData, split: str | None = None, limit: int | None = None,
                       seed: int = 0) -> TaskData:
    """The training rows of a task (``limit`` rows drawn with ``seed``; None: the whole split)."""
    if isinstance(task, TaskData):
        return task
    spec = task if isinstance(task, TaskSpec) else get_spec(task.partition(":")[0])
    name = task if isinstance(task, str) else spec
    return load_task(name, split=training_split(spec, split), limit=limit, seed=seed)


def _text_key(it: Item) -> tuple:
    return (it.passage.strip().lower(), it.question.strip().lower(), tuple(c.strip().lower() for c in it.choices))


def exclude_evaluated(train: TaskData, evaluated: Sequence[TaskData]) -> tuple[TaskData, int]:
    """``train`` without the rows that are evaluated: same task and id, or the same passage, question and options.

    Returns:
        The filtered rows and how many were dropped.
    """
    ids = {(d.name, it.id) for d in evaluated for it in d.items}
    texts = {_text_key(it) for d in evaluated for it in d.items}
    keep = [it for it in train.items if (train.name, it.id) not in ids and _text_key(it) not in texts]
    dropped = len(train.items) - len(keep)
    if not keep:
        raise DeclensError(f"every training row of {train.name!r} (split {train.split!r}) is also evaluated; "
                           "fine-tune on a training split, never the evaluated one")
    return replace(train, items=keep, selection={**train.selection, "rows_selected": len(keep),
                                                 "dropped_as_evaluated": dropped}), dropped


@dataclass(frozen=True)
class TrainData:
    """Where the fine-tuning rows come from (one recipe for every model of a comparison).

    Attributes:
        tasks: training tasks (default: every bundled task with a training split).
        samples: rows per task, drawn with ``seed`` (None: the whole training split).
        seed: seed of the draw.
    """

    tasks: tuple[str, ...] = TRAINABLE_TASKS
    samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.tasks:
            raise DeclensError(f"no training task; name at least one of {', '.join(TRAINABLE_TASKS)}")
        if self.samples is not None and self.samples < 1:
            raise DeclensError(f"--train-samples must be positive, got {self.samples}")
        for t in self.tasks:
            training_split(get_spec(t.partition(":")[0]))  # refuse a task without a training split now


def training_mixture(cfg: TrainData, evaluated: Sequence[TaskData]) -> tuple[list[TaskData], dict]:
    """The training rows of every task of ``cfg``, without any evaluated row, and a record of them.

    Returns:
        ``(rows per task, record)``; the record lists per task the split, rows used, rows dropped
        because they are evaluated, and the fingerprint of the rows used.
    """
    parts, record = [], {"tasks": {}, "samples_per_task": cfg.samples, "seed": cfg.seed,
                         "evaluated_tasks": [d.name for d in evaluated],
                         "rule": "training splits only; rows whose id or text equals an evaluated row's are dropped"}
    for t in cfg.tasks:
        rows, dropped = exclude_evaluated(load_training_data(t, None, cfg.samples, cfg.seed), evaluated)
        parts.append(rows)
        record["tasks"][rows.name] = {"split": rows.split, "rows": len(rows.items), "dropped_as_evaluated": dropped,
                                      "fingerprint": rows.fingerprint()}
    untrained = sorted({d.name for d in evaluated} - {p.name for p in parts})
    record["evaluated_without_training_rows"] = untrained
    return parts, record


def training_sequences(lm: LoadedModel, data: TaskData, fmt: str = "letter", max_length: int = 512,
                       labels: str | Sequence[str] = LETTERS, label_prefix: str = " ") -> list[TrainSeq]:
    """Tokenized training sequences, built by the evaluation's own prompt builders.

    The (prompt, answer) pairs of the format's requests (``answer_pairs()``): ``letter``: prompt + gold
    label token (the decision token the lens reads); ``cloze``: context + gold continuation. No few-shot examples. A sequence longer than ``max_length`` keeps the
    tokenizer's special prefix (BOS) and the end of the prompt, and its whole answer.
    """
    from ..formats import encoder_for, prepare

    req = prepare(lm, data, fmt, labels=labels, label_prefix=label_prefix)  # an unknown format fails here, first
    prefix = len(encoder_for(lm).prefix)
    out = []
    for prompt, answer in req.answer_pairs():
        if not prompt:
            raise DeclensError(f"a {data.name!r} row has an empty prompt: its first answer token cannot be predicted")
        trunc = False
        if len(prompt) + len(answer) > max_length:
            keep = max_length - len(answer)
            if keep <= max(prefix, 0) or keep < 1:
                raise DeclensError(f"an answer of {len(answer)} tokens does not fit max_length={max_length}; raise --max-length")
            prompt = prompt[:prefix] + prompt[len(prompt) - (keep - prefix) :]
            trunc = True
        out.append(TrainSeq(tuple(prompt + answer), len(prompt), trunc))
    return out


def sequence_stats(seqs: Sequence[TrainSeq]) -> dict:
    """Counts recorded with a training set: sequences, answer tokens, truncated, mean length."""
    n = len(seqs)
    return {"sequences": n, "answer_tokens": sum(s.n_answer for s in seqs), "truncated": sum(s.truncated for s in seqs),
            "mean_length": (sum(len(s.input_ids) for s in seqs) / n) if n else 0.0}


__all__ = ["IGNORE_INDEX", "TRAINABLE_TASKS", "TrainData", "TrainSeq", "exclude_evaluated", "load_training_data",
           "sequence_stats", "training_mixture", "training_sequences", "training_split"]
