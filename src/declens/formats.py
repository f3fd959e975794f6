"""The two scoring formats: prompts and their tokenization.

``letter`` (the paper's decision token): the question with lettered options; the decision is
read from the logits of the option-letter tokens (``" A"``, ``" B"``, ...) at the last prompt
position.

``cloze`` (lm-evaluation-harness style): each option is a continuation of a context and is
scored by its log-likelihood (``acc``) and its log-likelihood per character (``acc_norm``).
WinoGrande uses partial scoring: the option fills the blank in the context and the rest of the
sentence is the scored continuation.

Each format is a small :class:`Format` class registered by name in :data:`FORMAT_REGISTRY`
(:func:`register_format`): it builds the format's requests (:class:`LetterRequests`,
:class:`ClozeRequests`) and says which format options apply to it. The requests classes carry what differs
downstream (the rows to calibrate on, the decision rows, the training answers, the option labels), and
:class:`declens.scoring.ScoringPlan` scores each requests class with its own probe, so nothing else in the
package branches on a format's name.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Sequence

import numpy as np

from .errors import DeclensError, TaskError, TokenizationError
from .tasks import LETTERS, Item, TaskData, TaskSpec, check_fewshot

if TYPE_CHECKING:
    from .models import LoadedModel

def _passage_block(item: Item) -> str:
    return f"{item.passage}\n" if item.passage else ""


def _fields(item: Item) -> dict:
    """The fields a prompt template may name. ``question_stripped`` is the question without its
    surrounding whitespace, as lm-evaluation-harness' MMLU templates write it (``question.strip()``)."""
    subject = item.subject.replace("_", " ")
    return {"question": item.question, "question_stripped": item.question.strip(), "passage": item.passage,
            "passage_block": _passage_block(item), "subject": subject, "subject_title": subject}


def letter_prompt(spec: TaskSpec, item: Item, labels: str = LETTERS) -> str:
    """The letter-format prompt of one item (no few-shot examples, no header)."""
    if len(item.choices) > len(labels):
        raise TaskError(f"item {item.id!r} has {len(item.choices)} options but only {len(labels)} labels are defined")
    options = "".join(f"{labels[k]}. {c}\n" for k, c in enumerate(item.choices))
    return spec.letter_template.format(options=options, **_fields(item))


def cloze_pairs(spec: TaskSpec, item: Item) -> list[tuple[str, str]]:
    """(context, continuation) per option of one item."""
    if spec.cloze_mode == "partial":
        sentence = item.question
        if "_" not in sentence:
            raise TaskError(f"item {item.id!r}: partial scoring needs a blank '_' in the sentence")
        i = sentence.index("_")
        rest = " " + sentence[i + 1 :].strip()
        return [(sentence[:i] + c, rest) for c in item.choices]
    ctx = spec.cloze_context.format(**_fields(item))
    return [(ctx, " " + c) for c in item.choices]


def letter_text(data: TaskData, item: Item, num_fewshot: int = 0, seed: int = 0,
                labels: Sequence[str] = LETTERS, label_prefix: str = " ") -> str:
    """The whole letter-format prompt of one item: the task's header, ``num_fewshot`` solved
    examples (each ``prompt + label_prefix + gold label + "\\n\\n"``) and the item's prompt."""
    spec = data.spec
    shots = fewshot_examples(data, item, num_fewshot, seed)
    head = spec.letter_header.format(**_fields(item)) if spec.letter_header else ""
    body = "".join(letter_prompt(spec, s, labels) + f"{label_prefix}{labels[s.gold]}\n\n" for s in shots)
    return head + body + letter_prompt(spec, item, labels)


def cloze_texts(data: TaskData, item: Item, num_fewshot: int = 0, seed: int = 0) -> list[tuple[str, str]]:
    """(context, continuation) per option of one item, the context preceded by the task's cloze
    header and ``num_fewshot`` solved examples (each ``context + gold continuation + "\\n\\n"``), as
    lm-evaluation-harness joins them (``description``, ``target_delimiter`` " ",
    ``fewshot_delimiter`` "\\n\\n")."""
    spec = data.spec
    shots = fewshot_examples(data, item, num_fewshot, seed)
    head = spec.cloze_header.format(**_fields(item)) if spec.cloze_header else ""
    prefix = head + "".join("".join(cloze_pairs(spec, s)[s.gold]) + "\n\n" for s in shots)
    return [(prefix + c, x) for c, x in cloze_pairs(spec, item)]


def fewshot_examples(data: TaskData, item: Item, k: int, seed: int) -> list[Item]:
    """``k`` solved examples for ``item``: MMLU takes the first k dev rows of the same subject
    (as lm-evaluation-harness does), other tasks draw k rows of the few-shot split with a seed
    derived from ``seed`` and the item id."""
    if k <= 0:
        return []
    pool = data.fewshot_pool
    if not pool:
        raise TaskError(
            f"task {data.name!r} has no few-shot split (evaluating split {data.split!r}); use --num-fewshot 0"
        )
    if data.spec.has_subjects and item.subject:
        same = [p for p in pool if p.subject == item.subject]
        pool = same or pool
        return pool[:k]
    rng = random.Random(f"{seed}:{item.id}")
    return rng.sample(pool, min(k, len(pool)))


# --------------------------------------------------------------------------------------------
# Tokenization


class Encoder:
    """Tokenizes prompts the way lm-evaluation-harness does, for any tokenizer.

    The tokenizer's own special-token prefix (a BOS for Gemma/Llama-2, nothing for Qwen/SmolLM2)
    is detected, never assumed, and added once at the start of every sequence.

    A prompt longer than ``max_length`` (the model's context window) is refused with a
    :class:`TokenizationError`, unless ``truncate`` is set: then it loses the start of its context,
    as lm-evaluation-harness does, and ``truncated`` counts the prompts cut so.
    """

    def __init__(self, tokenizer, max_length: int | None = None, truncate: bool = False):
        self.tok = tokenizer
        probe = "hello"
        plain = tokenizer.encode(probe, add_special_tokens=False)
        full = tokenizer.encode(probe, add_special_tokens=True)
        start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
        self.prefix: list[int] = list(full[:start])
        self.max_length = max_length
        self.truncate = truncate
        self.truncated = 0

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    @property
    def pad_id(self) -> int:
        for cand in (self.tok.pad_token_id, self.tok.eos_token_id, 0):
            if cand is not None:
                return int(cand)
        return 0

    def _fallback_context(self) -> list[int]:
        for cand in (self.tok.bos_token_id, self.tok.eos_token_id):
            if cand is not None:
                return [int(cand)]
        raise TokenizationError("an empty context needs a BOS or EOS token, and this tokenizer has neither")

    def pair(self, context: str, continuation: str, where: str = "a prompt") -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation): trailing spaces of the context move to the
        continuation, the continuation's ids are what the joint encoding adds after the context's."""
        return self.pairs([(context, continuation)], [where])[0]

    def pairs(self, items: Sequence[tuple[str, str]], wheres: Sequence[str] | None = None
              ) -> list[tuple[list[int], list[int]]]:
        """:meth:`pair` for many (context, continuation) pairs in one batched tokenizer call (parallel in
        fast tokenizers; a context shared by several options is encoded once); ``wheres`` label each pair
        in an error message."""
        moved = []
        for context, continuation in items:
            n_sp = len(context) - len(context.rstrip())
            if n_sp:
                continuation, context = context[-n_sp:] + continuation, context[:-n_sp]
            moved.append((context, continuation))
        distinct = list(dict.fromkeys(c for c, _ in moved))
        ids = self._batch([c + x for c, x in moved] + distinct)
        whole_ids, ctx_ids = ids[: len(moved)], dict(zip(distinct, ids[len(moved):]))
        out = []
        for i, ((context, continuation), whole) in enumerate(zip(moved, whole_ids)):
            ctx = ctx_ids[context]
            cont = whole[len(ctx):]
            if whole[: len(ctx)] != ctx:  # the boundary merged into one token; fall back to separate encodings
                cont = self.encode(continuation)
            ctx = self.prefix + ctx
            if not ctx:
                ctx = self._fallback_context()
            if not cont:
                raise TokenizationError(f"the continuation {continuation!r} encodes to no tokens")
            out.append((self._fit(ctx, len(cont), wheres[i] if wheres else f"prompt {i + 1}"), cont))
        return out

    def _batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without special tokens, in one tokenizer call."""
        return [list(x) for x in self.tok(list(texts), add_special_tokens=False)["input_ids"]] if texts else []

    def prompt(self, text: str, where: str = "a prompt") -> list[int]:
        ids = self.prefix + self.encode(text)
        return self._fit(ids, 0, where)

    def prompts(self, texts: Sequence[str], names: Sequence[str] | None = None) -> list[list[int]]:
        """:meth:`prompt` for many texts in one batched tokenizer call (parallel in fast tokenizers);
        ``names`` label each text in an error message."""
        return [self._fit(self.prefix + ids, 0, names[i] if names else f"prompt {i + 1}")
                for i, ids in enumerate(self._batch(texts))]

    def _fit(self, ctx: list[int], n_cont: int, where: str = "a prompt") -> list[int]:
        if self.max_length and len(ctx) + n_cont > self.max_length:
            if not self.truncate:
                raise TokenizationError(
                    f"{where} is {len(ctx) + n_cont} tokens, longer than the model's {self.max_length}-token context "
                    "window; pass --allow-truncation to cut the start of long prompts as lm-evaluation-harness does "
                    "(the count is reported and recorded), or shorten the prompts (fewer few-shot examples, shorter rows)"
                )
            self.truncated += 1
            keep = self.max_length - n_cont
            if keep <= len(self.prefix):
                raise TokenizationError(f"a continuation of {n_cont} tokens does not fit the model's {self.max_length}-token window")
            ctx = self.prefix + ctx[len(ctx) - (keep - len(self.prefix)) :]
        return ctx


def option_token_ids(enc: Encoder, labels: Sequence[str], sample_prompt: str, prefix: str = " ") -> list[int]:
    """The single token id of each option label as it follows a prompt (``"Answer:" + " A"``).

    Raises:
        TokenizationError: when a label is not exactly one token after the prompt, or two labels
            share a token.
    """
    ids = []
    for lab in labels:
        _, cont = enc.pair(sample_prompt, prefix + lab)
        if len(cont) != 1:
            pieces = [enc.tok.decode([t]) for t in cont]
            raise TokenizationError(
                f"option label {prefix + lab!r} is {len(cont)} tokens for this tokenizer ({pieces}), not one; "
                "the letter format reads one decision token per option. Use other labels "
                "(--labels, e.g. 1,2,3,4) or a different --label-prefix, or use --format cloze."
            )
        ids.append(cont[0])
    if len(set(ids)) != len(ids):
        raise TokenizationError(f"option labels {list(labels)} share tokens ({ids}); use distinct labels")
    return ids


@dataclass
class LetterRequests:
    """Tokenized letter-format prompts.

    Attributes:
        prompts: one token-id list per item; the decision is read at its last position.
        option_ids: ``[K]`` token id of each option label.
        labels: the option labels.
        n_options: ``[N]`` number of options of each item.
        gold: ``[N]`` gold option index.
        texts: the prompt strings (for inspection and reports).
        truncated: prompts that lost their start to fit the context window (only with ``truncate``).
    """

    #: ``LayerScores.kind`` of these requests' scores
    score_kind: ClassVar[str] = "logit"

    prompts: list[list[int]]
    option_ids: list[int]
    labels: list[str]
    n_options: np.ndarray
    gold: np.ndarray
    texts: list[str] = field(repr=False, default_factory=list)
    truncated: int = 0

    def option_labels(self) -> list[str]:
        """``[K]`` the label of each option column of the scores."""
        return list(self.labels)

    def decision_rows(self) -> list[list[int]]:
        """``[N]`` one token sequence per item ending at its decision token: the prompt."""
        return [list(p) for p in self.prompts]

    def calibration_rows(self) -> list[list[int]]:
        """``[N]`` calibration token sequences: the prompts as they are."""
        return [list(p) for p in self.prompts]

    def answer_pairs(self) -> list[tuple[list[int], list[int]]]:
        """``[N]`` (prompt, answer) token ids to train on: the prompt and the gold label's token."""
        return [(list(p), [int(self.option_ids[int(g)])]) for p, g in zip(self.prompts, self.gold)]


@dataclass
class ClozeRequests:
    """Tokenized cloze requests, one (context, continuation) per option.

    Attributes:
        contexts: ``[N][K_i]`` context token ids.
        continuations: ``[N][K_i]`` continuation token ids.
        cont_chars: ``[N, K]`` character length of each option's text, without the ``" "`` that
            joins it to the context (``acc_norm`` divides the log-likelihood by it, as
            lm-evaluation-harness does with ``len(choice)``; 0 for absent options).
        n_options: ``[N]`` number of options.
        gold: ``[N]`` gold option index.
        truncated: (context, option) pairs whose context lost its start to fit the context window.
    """

    #: ``LayerScores.kind`` of these requests' scores
    score_kind: ClassVar[str] = "loglik"

    contexts: list[list[list[int]]]
    continuations: list[list[list[int]]]
    cont_chars: np.ndarray
    n_options: np.ndarray
    gold: np.ndarray
    texts: list[list[tuple[str, str]]] = field(repr=False, default_factory=list)
    truncated: int = 0

    @property
    def shared_context(self) -> bool:
        """True when every item's options share one context."""
        return all(all(c == ctxs[0] for c in ctxs) for ctxs in self.contexts)

    def option_labels(self) -> list[str]:
        """``[K]`` the label of each option column of the scores: its index (``"0"``, ``"1"``, ...)."""
        return [str(k) for k in range(self.cont_chars.shape[1])]

    def decision_rows(self) -> list[list[int]]:
        """``[N]`` one token sequence per item ending where the answer would follow: the context of the
        item's first option (WinoGrande's partial scoring has one context per option; the first is used)."""
        return [list(ctxs[0]) for ctxs in self.contexts]

    def calibration_rows(self) -> list[list[int]]:
        """``[N]`` calibration token sequences: each item's context and gold continuation."""
        return [list(ctxs[g]) + list(cs[g]) for ctxs, cs, g in zip(self.contexts, self.continuations, self.gold)]

    def answer_pairs(self) -> list[tuple[list[int], list[int]]]:
        """``[N]`` (prompt, answer) token ids to train on: the gold option's context and continuation."""
        return [(list(ctxs[int(g)]), list(cs[int(g)])) for ctxs, cs, g in zip(self.contexts, self.continuations, self.gold)]


def build_letter(data: TaskData, enc: Encoder, num_fewshot: int = 0, seed: int = 0,
                 labels: str | Sequence[str] = LETTERS, label_prefix: str = " ") -> LetterRequests:
    """Letter-format prompts of every selected item, with ``num_fewshot`` solved examples."""
    labels = list(labels)
    k_max = data.max_choices
    if k_max > len(labels):
        raise TaskError(f"task {data.name!r} has items with {k_max} options but only {len(labels)} labels ({labels})")
    check_fewshot(data, num_fewshot)  # never fewer solved examples than asked for
    cut0 = enc.truncated
    texts = [letter_text(data, it, num_fewshot, seed, labels, label_prefix) for it in data.items]
    prompts = enc.prompts(texts, [f"the prompt of item {it.id!r}" for it in data.items])
    truncated = enc.truncated - cut0  # counted before the label probe below re-encodes the first prompt
    option_ids = option_token_ids(enc, labels[:k_max], texts[0], label_prefix)
    return LetterRequests(
        prompts=prompts, option_ids=option_ids, labels=labels[:k_max],
        n_options=np.array([len(it.choices) for it in data.items]),
        gold=np.array([it.gold for it in data.items]), texts=texts, truncated=truncated,
    )


def build_cloze(data: TaskData, enc: Encoder, num_fewshot: int = 0, seed: int = 0) -> ClozeRequests:
    """Cloze requests of every selected item, with ``num_fewshot`` solved examples prepended."""
    check_fewshot(data, num_fewshot)  # never fewer solved examples than asked for
    cut0 = enc.truncated
    k_max = data.max_choices
    contexts, conts, texts = [], [], []
    cont_chars = np.zeros((len(data.items), k_max), dtype=np.int64)
    all_pairs, wheres, spans = [], [], []
    for i, it in enumerate(data.items):
        pairs = cloze_texts(data, it, num_fewshot, seed)
        spans.append((len(all_pairs), len(all_pairs) + len(pairs)))
        all_pairs += pairs
        wheres += [f"the prompt of item {it.id!r}"] * len(pairs)
        texts.append(pairs)
        for k, (_, x) in enumerate(pairs):  # the option text without the " " delimiter, as lm-eval counts it
            cont_chars[i, k] = max(len(x.removeprefix(" ")), 1)
    enc_pairs = enc.pairs(all_pairs, wheres)  # one batched tokenizer call for the whole task
    for a, b in spans:
        contexts.append([p[0] for p in enc_pairs[a:b]])
        conts.append([p[1] for p in enc_pairs[a:b]])
    return ClozeRequests(
        contexts=contexts, continuations=conts, cont_chars=cont_chars,
        n_options=np.array([len(it.choices) for it in data.items]),
        gold=np.array([it.gold for it in data.items]), texts=texts, truncated=enc.truncated - cut0,
    )


Requests = LetterRequests | ClozeRequests


def encoder_for(lm: "LoadedModel") -> Encoder:
    """A tokenizer wrapper for the model's context window: longer prompts are refused, or cut at their
    start when ``lm.truncate`` is set (see :class:`Encoder`)."""
    return Encoder(lm.tokenizer, max_length=getattr(lm.model.config, "max_position_embeddings", None),
                   truncate=getattr(lm, "truncate", False))


# --------------------------------------------------------------------------------------------
# The registry of formats


class Format:
    """A scoring format: how a task's items become tokenized requests, and which options apply to it.

    Subclass it, set the class attributes, implement :meth:`build` and decorate the class with
    :func:`register_format`; :func:`prepare`, ``--format`` and every check of format names then know it.
    The requests it builds decide how they are scored: :class:`declens.scoring.ScoringPlan` has a plan per
    requests class (letter prompts read option-token logits, cloze requests continuation log-likelihoods).

    Attributes:
        name: what ``--format`` / ``prepare(fmt=...)`` call it (a plain lower-case word).
        summary: one line on what it scores (docs, listings).
        requests: the requests class :meth:`build` returns.
        takes_labels: ``--labels`` / ``--label-prefix`` apply (the option labels are recorded in results).
        reports_norm: its scores come with per-character scores (``accuracy_norm``, ``--decision-score norm``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    requests: ClassVar[type] = LetterRequests
    takes_labels: ClassVar[bool] = False
    reports_norm: ClassVar[bool] = False

    def build(self, data: TaskData, enc: Encoder, num_fewshot: int = 0, seed: int = 0,
              labels: str | Sequence[str] = LETTERS, label_prefix: str = " ") -> "Requests":
        """The tokenized requests of every selected item, with ``num_fewshot`` solved examples (``labels`` and
        ``label_prefix`` only where :attr:`takes_labels`)."""
        raise NotImplementedError

    def recorded_labels(self, req: "Requests") -> list[str] | None:
        """The option labels a result records in its config (None where the format takes no labels)."""
        return req.option_labels() if self.takes_labels else None


#: name -> format class, in registration order; ``--format`` accepts exactly these names
FORMAT_REGISTRY: dict[str, type[Format]] = {}


def register_format(cls: type[Format]) -> type[Format]:
    """Class decorator: register a :class:`Format` under its ``name``.

    Raises:
        DeclensError: the name is taken or not a plain lower-case word (it is a comma-separated CLI value).
    """
    name = cls.name
    if name in FORMAT_REGISTRY:
        raise DeclensError(f"a format {name!r} is already registered; pick another name")
    if not name or not all(c.isalnum() or c in "_-" for c in name) or name != name.lower():
        raise DeclensError(f"format name {name!r}: use lower-case letters, digits, '-' or '_'")
    FORMAT_REGISTRY[name] = cls
    return cls


def format_named(fmt: str, option: str | None = None) -> Format:
    """The registered format ``fmt``.

    Raises:
        DeclensError: no format has this name (one line naming ``option``, when given, and the known names).
    """
    cls = FORMAT_REGISTRY.get(fmt) if isinstance(fmt, str) else None
    if cls is None:
        where = f" ({option})" if option else ""
        raise DeclensError(f"unknown format {fmt!r}{where}; use one of {', '.join(FORMAT_REGISTRY)}")
    return cls()


def score_kind(fmt: str | None) -> str:
    """``LayerScores.kind`` of a format's scores (``logit``, the letter format's, for a name not registered)."""
    cls = FORMAT_REGISTRY.get(fmt) if isinstance(fmt, str) else None
    return cls.requests.score_kind if cls is not None else LetterRequests.score_kind


@register_format
class LetterFormat(Format):
    """The paper's decision token: logits of the option-label tokens at the last prompt position."""

    name = "letter"
    summary = "logits of the option-label tokens (' A', ' B', ...) at the last prompt position"
    requests = LetterRequests
    takes_labels = True

    def build(self, data: TaskData, enc: Encoder, num_fewshot: int = 0, seed: int = 0,
              labels: str | Sequence[str] = LETTERS, label_prefix: str = " ") -> LetterRequests:
        return build_letter(data, enc, num_fewshot=num_fewshot, seed=seed, labels=labels, label_prefix=label_prefix)


@register_format
class ClozeFormat(Format):
    """lm-evaluation-harness style: the log-likelihood of each option as a continuation, and per character."""

    name = "cloze"
    summary = "log-likelihood of each option as a continuation (and per character: acc_norm)"
    requests = ClozeRequests
    reports_norm = True

    def build(self, data: TaskData, enc: Encoder, num_fewshot: int = 0, seed: int = 0,
              labels: str | Sequence[str] = LETTERS, label_prefix: str = " ") -> ClozeRequests:
        return build_cloze(data, enc, num_fewshot=num_fewshot, seed=seed)


def prepare(lm: "LoadedModel", data: TaskData, fmt: str = "letter", num_fewshot: int = 0, seed: int = 0,
            labels: str | Sequence[str] = LETTERS, label_prefix: str = " ") -> Requests:
    """Tokenized requests of a task in a registered format (reusable across pruned configurations); the
    analyses, pruning and fine-tuning all build their requests here."""
    form = format_named(fmt)
    req = form.build(data, encoder_for(lm), num_fewshot=num_fewshot, seed=seed, labels=labels, label_prefix=label_prefix)
    lm.truncated = getattr(lm, "truncated", 0) + req.truncated  # reported in provenance and on the console
    return req
