"""Bounded recovery: fine-tune pruned models and compare their decision lens before and after.

The paper's Section 4.3.3 fine-tunes heavily pruned models (LoRA or full, 3 epochs, AdamW,
effective batch 8, sequences up to 512 tokens) and compares the Decision Margin curves before and
after: fine-tuning lifts DM but cannot restore the Transition Point beyond about 40% pruning.
:func:`recover_study` reproduces that experiment for any model, task and set of pruned
configurations (explicit removal lists, or the per-ratio best states of a ``declens prune`` run).

Training data
    The rows of a task's *training* split (ARC: ``train``; MMLU: ``dev``), written in exactly the
    format that is evaluated, through the same prompt builders (:func:`declens.analyses.decision.prepare`):

    - ``letter``: the letter prompt (question, lettered options, ``Answer:``) followed by the gold
      option's label token (``" A"``), i.e. the very decision token the lens reads;
    - ``cloze``: the item's context followed by the gold option as continuation.

    The loss is the next-token cross-entropy **on the answer tokens only** (the prompt tokens are
    masked with -100, as in standard supervised fine-tuning on prompt/response pairs): the model is
    taught to answer, not to model the questions, which is what the decision lens measures. The
    reported loss of a step is the mean over all answer tokens of its (effective) batch.

Pruned model
    A fresh copy of the model with the layers removed permanently (:func:`declens.surgery.remove_layers`);
    its config records the removed dense ids, so the lens and every saved file speak dense layer ids.

Fine-tuning
    A plain PyTorch loop: AdamW, linear (or cosine / constant) schedule with optional warm-up,
    gradient clipping, optional gradient accumulation, deterministic for a seed. ``lora`` wraps the
    model with ``peft`` (``LoraConfig`` + ``get_peft_model``) and merges the adapters back with
    ``merge_and_unload()`` after training, so the recovered model is an ordinary transformers model
    that exports like any other. ``full`` trains every parameter.

Restoration
    ``restored`` is True when the pruned model has **no** Transition Point before fine-tuning and
    has one after. A Transition Point exists exactly when the last layer's mean DM is positive
    (:func:`declens.metrics.transition_point`), so ``restored`` means that fine-tuning moved the final
    mean Decision Margin from <= 0 to > 0. ``tp_before`` / ``tp_after`` (dense ids, or None) and the
    dense model's TP are reported alongside.

Example:
    >>> lm = load_model("smollm2-135m", dtype="float32")
    >>> data = load_task("arc_easy", limit=100)
    >>> res = recover_study(lm, data, "arc_easy", [[20, 21, 22]], fmt="cloze", method="lora",
    ...                     epochs=1, train_samples=256, out_dir="runs/recover")
    >>> res.runs[0].restored, res.runs[0].after["final_dm"]
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeclensError
from ..formats import FORMATS, ClozeRequests, LetterRequests
from ..models import DecoderParts, LoadedModel, decoder_parts
from ..results import AnalysisResult, atomic_write_json, atomic_write_text, provenance, read_result_file
from ..surgery import ORIGINAL_LAYERS_ATTR, REMOVED_ATTR, keep_positions, remove_layers
from ..tasks import LETTERS, TaskData, TaskSpec, get_spec, load_task
from .decision import analyze, encoder_for, prepare

RECOVER_FILE = "recover.json"
RECOVER_CSV = "recover.csv"
METHODS = ("lora", "full")
SCHEDULES = ("linear", "cosine", "constant")
#: default learning rate per method when ``lr`` is not given
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}
IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------------
# Hyper-parameters


@dataclass
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run.

    Defaults follow the paper's setup where it states one (3 epochs, AdamW, effective batch 8,
    sequences up to 512 tokens) and Hugging Face ``Trainer``'s defaults where it does not (linear
    decay, no warm-up, no weight decay, gradient norm clipped at 1.0). The paper selects the
    learning rate per model; the defaults here are the usual ones: 2e-4 for LoRA, 2e-5 for full
    fine-tuning. LoRA: rank 16, alpha 32 (scale 2), dropout 0.05, on every linear layer of the
    decoder (``all-linear``: attention and MLP projections, not the LM head).

    Attributes:
        method: ``lora`` or ``full``.
        epochs: passes over the training rows.
        lr: peak learning rate (None: :data:`DEFAULT_LR` of the method).
        batch_size: sequences per forward pass.
        grad_accum: forward passes per optimizer step (effective batch = batch_size x grad_accum).
        max_steps: stop after this many optimizer steps (None: run every epoch).
        lora_r, lora_alpha, lora_dropout: LoRA rank, scale numerator and dropout.
        target_modules: LoRA targets: ``all-linear`` or module names (``["q_proj", "v_proj"]``).
        weight_decay: AdamW decoupled weight decay.
        warmup_ratio: share of the steps with a linear warm-up from 0.
        schedule: ``linear`` (decay to 0), ``cosine`` (to 0) or ``constant`` after warm-up.
        max_grad_norm: clip the gradient norm to this (None: no clipping).
        seed: seeds the adapter initialisation, the data order and dropout.
        max_length: longer training sequences lose the start of their prompt (never the answer).
        group_by_length: batch rows of similar length together (less padding; see :func:`batch_groups`).
    """

    method: str = "lora"
    epochs: int = 3
    lr: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    max_length: int = 512
    group_by_length: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DeclensError(f"unknown fine-tuning method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.schedule not in SCHEDULES:
            raise DeclensError(f"unknown learning-rate schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        checks = [("epochs", self.epochs, self.epochs >= 1), ("batch_size", self.batch_size, self.batch_size >= 1),
                  ("grad_accum", self.grad_accum, self.grad_accum >= 1),
                  ("max_steps", self.max_steps, self.max_steps is None or self.max_steps >= 1),
                  ("lr", self.lr, self.lr is None or (math.isfinite(self.lr) and self.lr > 0)),
                  ("lora_r", self.lora_r, self.lora_r >= 1), ("lora_alpha", self.lora_alpha, self.lora_alpha > 0),
                  ("lora_dropout", self.lora_dropout, 0 <= self.lora_dropout < 1),
                  ("weight_decay", self.weight_decay, self.weight_decay >= 0),
                  ("warmup_ratio", self.warmup_ratio, 0 <= self.warmup_ratio < 1),
                  ("max_grad_norm", self.max_grad_norm, self.max_grad_norm is None or self.max_grad_norm > 0),
                  ("max_length", self.max_length, self.max_length >= 2)]
        bad = [f"{name}={value!r}" for name, value, ok in checks if not ok]
        if bad:
            raise DeclensError(f"invalid fine-tuning hyper-parameter(s): {', '.join(bad)} (epochs, batch sizes, steps, "
                               "rank and length must be positive; lr > 0; dropout and warm-up ratio in [0, 1))")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules:
                raise DeclensError("target_modules is empty; use 'all-linear' or module names like q_proj,v_proj")
            self.target_modules = [str(t) for t in self.target_modules]

    @property
    def peak_lr(self) -> float:
        """The learning rate used (``lr`` or the method's default)."""
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lr"] = self.peak_lr
        d["effective_batch"] = self.effective_batch
        return d

    @classmethod
    def make(cls, **kwargs: Any) -> "FinetuneConfig":
        """Build from keyword arguments, with a clear error for an unknown name."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise DeclensError(f"unknown fine-tuning hyper-parameter(s) {unknown}; known: {', '.join(names)}")
        return cls(**kwargs)


# ------------------------------------------------------------------------------------------------
# Training data


@dataclass(frozen=True)
class TrainSeq:
    """One training sequence: prompt tokens followed by answer tokens (the loss is on the answer only).

    Attributes:
        input_ids: the token ids (prompt, then answer).
        n_prompt: how many leading tokens are prompt (masked out of the loss).
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
        "task that has one (--train-task arc_easy or arc_challenge), or name a split with --train-split "
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


def training_sequences(lm: LoadedModel, data: TaskData, fmt: str = "letter", max_length: int = 512,
                       labels: str | Sequence[str] = LETTERS, label_prefix: str = " ") -> list[TrainSeq]:
    """Tokenized training sequences, built by the evaluation's own prompt builders.

    ``letter``: prompt + gold label token (the decision token the lens reads); ``cloze``: context +
    gold continuation. No few-shot examples. A sequence longer than ``max_length`` keeps the
    tokenizer's special prefix (BOS) and the end of the prompt, and its whole answer.
    """
    if fmt not in FORMATS:
        raise DeclensError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    req = prepare(lm, data, fmt, labels=labels, label_prefix=label_prefix)
    prefix = len(encoder_for(lm).prefix)
    pairs: list[tuple[list[int], list[int]]] = []
    if isinstance(req, LetterRequests):
        for prompt, g in zip(req.prompts, req.gold):
            pairs.append((list(prompt), [int(req.option_ids[int(g)])]))
    else:
        assert isinstance(req, ClozeRequests)
        for ctxs, conts, g in zip(req.contexts, req.continuations, req.gold):
            pairs.append((list(ctxs[int(g)]), list(conts[int(g)])))
    out = []
    for prompt, answer in pairs:
        trunc = False
        if len(prompt) + len(answer) > max_length:
            keep = max_length - len(answer)
            if keep <= prefix:
                raise DeclensError(f"an answer of {len(answer)} tokens does not fit max_length={max_length}; raise --max-length")
            prompt = prompt[:prefix] + prompt[len(prompt) - (keep - prefix) :]
            trunc = True
        out.append(TrainSeq(tuple(prompt + answer), len(prompt), trunc))
    return out


# ------------------------------------------------------------------------------------------------
# Pruned copies


def _detach_inference_tensors(model: nn.Module) -> None:
    """Replace tensors created under ``torch.inference_mode`` (they cannot enter autograd) by normal clones.

    Parameters and buffers are normally never inference tensors, but a model loaded, copied or
    run (buffers updated in place, e.g. dynamic RoPE) inside inference mode may hold some.
    """
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_inference():
                    module._parameters[name] = nn.Parameter(p.clone(), requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_inference():
                    module._buffers[name] = b.clone()
            for name, v in list(vars(module).items()):
                if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.is_inference():
                    setattr(module, name, v.clone())


def pruned_copy(lm: LoadedModel, remove: Sequence[int]) -> LoadedModel:
    """A deep copy of ``lm`` with the layers ``remove`` (dense ids) permanently removed.

    The original model is untouched. The copy's config records the removal (dense numbering), so
    the lens, result files and saved models report dense layer ids.

    Raises:
        LayerSpecError: ids out of range, repeated, already removed, or removing every layer.
    """
    keep = keep_positions(lm.parts, remove)  # validates the dense ids against this model
    positions = [p for p in range(lm.num_layers) if p not in set(keep)]
    model = copy.deepcopy(lm.model)
    _detach_inference_tensors(model)
    if positions:
        remove_layers(decoder_parts(model), positions)
    model.eval()
    source = {**lm.source, "pruned_from": lm.spec, "removed": sorted(int(i) for i in remove)}
    return LoadedModel(model=model, tokenizer=lm.tokenizer, spec=lm.spec, source=source)


def original_num_layers(lm: LoadedModel) -> int:
    """Layer count of the dense model ``lm`` comes from (itself unless it is a saved pruned model)."""
    return int(getattr(lm.model.config, ORIGINAL_LAYERS_ATTR, None) or lm.num_layers)


# ------------------------------------------------------------------------------------------------
# Fine-tuning


@dataclass
class TrainLog:
    """What a fine-tuning run did.

    Attributes:
        config: the hyper-parameters (``FinetuneConfig.to_dict()``, learning rate resolved).
        losses: mean answer-token loss of every optimizer step (before that step's update).
        lrs: learning rate of every step.
        grad_norms: gradient norm of every step (before clipping).
        steps: optimizer steps taken; epochs: passes over the data (fractional when ``max_steps`` stops early).
        examples: training sequences; answer_tokens: answer tokens in them; truncated: sequences cut to ``max_length``.
        trainable_params / total_params: parameters trained (LoRA: the adapters) / in the model.
        seconds: wall time of the loop; device, dtype: where it ran and the model's dtype; precision: how
            (``float32 master weights, autocast bfloat16`` for full fine-tuning of a 16-bit model).
        merged: LoRA adapters were merged into the weights (always for ``full``).
    """

    config: dict
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    steps: int = 0
    epochs: float = 0.0
    examples: int = 0
    answer_tokens: int = 0
    truncated: int = 0
    trainable_params: int = 0
    total_params: int = 0
    seconds: float = 0.0
    device: str = ""
    dtype: str = ""
    precision: str = ""
    merged: bool = False
    peft_model: Any = field(default=None, repr=False, compare=False)

    @property
    def method(self) -> str:
        return self.config["method"]

    def mean_loss(self, part: str = "first", n: int | None = None) -> float:
        """Mean loss of the first or last ``n`` steps (default: a quarter of them, at least one)."""
        if not self.losses:
            return float("nan")
        n = n or max(1, len(self.losses) // 4)
        xs = self.losses[:n] if part == "first" else self.losses[-n:]
        return float(np.mean(xs))

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "peft_model"}
        d["first_loss"] = self.mean_loss("first")
        d["last_loss"] = self.mean_loss("last")
        d["examples_per_s"] = self.steps and round(self.epochs * self.examples / max(self.seconds, 1e-9), 3)
        return d


def _collate(seqs: Sequence[TrainSeq], idx: Sequence[int], pad_id: int, device: torch.device):
    rows = [seqs[i] for i in idx]
    T = max(len(r.input_ids) for r in rows)
    if device.type == "cuda":  # fewer distinct shapes: attention kernels plan once per shape
        T = -(-T // 8) * 8
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    tgt = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        ids[b, :n] = torch.as_tensor(r.input_ids, dtype=torch.long)
        mask[b, :n] = 1
        tgt[b, r.n_prompt : n] = ids[b, r.n_prompt : n]
    return ids.to(device), mask.to(device), tgt.to(device)


def _answer_nll(parts: DecoderParts, ids: torch.Tensor, mask: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over the answer tokens, and their count.

    The LM head runs only at the positions that predict an answer token (position ``j - 1`` for
    answer token ``j``), which saves the vocabulary projection of every prompt position.
    """
    h = parts.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    sel = tgt[:, 1:] != IGNORE_INDEX
    hs = h[:, :-1][sel]
    y = tgt[:, 1:][sel]
    logits = parts.head(hs).float()
    if parts.softcap:
        logits = torch.tanh(logits / parts.softcap) * parts.softcap
    return F.cross_entropy(logits, y, reduction="sum"), int(y.numel())


def answer_loss(lm: LoadedModel, seqs: Sequence[TrainSeq], batch_size: int = 16) -> float:
    """Mean cross-entropy of ``lm`` over the answer tokens of ``seqs`` (no gradient, eval mode)."""
    if not seqs:
        raise DeclensError("no training sequences to measure a loss on")
    parts = decoder_parts(lm.model)
    pad = encoder_for(lm).pad_id
    total, count = 0.0, 0
    was_training = lm.model.training
    lm.model.eval()
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].input_ids))  # less padding
    with torch.no_grad():
        for s in range(0, len(seqs), batch_size):
            nll, n = _answer_nll(parts, *_collate(seqs, order[s : s + batch_size], pad, lm.device))
            total += float(nll)
            count += n
    lm.model.train(was_training)
    return total / count


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _lora_model(model: nn.Module, cfg: FinetuneConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DeclensError("LoRA fine-tuning needs the peft package: pip install 'declens[finetune]' "
                           "(or use --method full)") from None
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls transformers' deprecated is_gradient_checkpointing
            return get_peft_model(model, lcfg)
    except ValueError as e:
        raise DeclensError(f"LoRA cannot target {cfg.target_modules!r} on this model ({str(e).splitlines()[0]}); "
                           "use 'all-linear' or names of its linear layers (e.g. q_proj,v_proj)") from None


def merge_lora(peft_model) -> nn.Module:
    """Merge LoRA adapters into the base weights; return the plain transformers model (eval mode)."""
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged


def finetune(
    lm: LoadedModel,
    train_seqs: Sequence[TrainSeq],
    method: str = "lora",
    *,
    epochs: int = 3,
    lr: float | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_steps: int | None = None,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: str | Sequence[str] = "all-linear",
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.0,
    schedule: str = "linear",
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    max_length: int = 512,
    group_by_length: bool = True,
    progress: bool = True,
    merge: bool = True,
) -> TrainLog:
    """Fine-tune ``lm`` in place on answer-masked sequences; see :class:`FinetuneConfig` for the arguments.

    The loop: shuffle the rows each epoch (seeded; similar lengths batched together unless
    ``group_by_length=False``), batches of ``batch_size`` right-padded rows,
    loss = mean cross-entropy over the answer tokens of the ``grad_accum`` batches of a step,
    AdamW, gradient clipping, learning-rate schedule. Runs under ``torch.enable_grad()`` (safe to
    call from inside ``torch.inference_mode``: it switches inference mode off for the loop, and
    replaces any inference-mode parameter or buffer by a normal copy) and leaves the model in eval mode.

    With ``method="lora"`` and ``merge=True`` (default) the adapters are merged into the weights and
    ``lm.model`` is an ordinary model again; with ``merge=False`` ``lm.model`` keeps the LoRA layers
    and the ``PeftModel`` is in ``TrainLog.peft_model`` (merge it with :func:`merge_lora`).

    Returns:
        The :class:`TrainLog` with the per-step losses.
    """
    cfg = FinetuneConfig(method=method, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                         max_steps=max_steps, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
                         weight_decay=weight_decay, warmup_ratio=warmup_ratio, schedule=schedule,
                         max_grad_norm=max_grad_norm, seed=seed, max_length=max_length,
                         group_by_length=group_by_length)
    return run_finetune(lm, train_seqs, cfg, progress=progress, merge=merge)


def run_finetune(lm: LoadedModel, train_seqs: Sequence[TrainSeq], cfg: FinetuneConfig, progress: bool = True,
                 merge: bool = True) -> TrainLog:
    """:func:`finetune` with a :class:`FinetuneConfig`."""
    if not train_seqs:
        raise DeclensError("no training rows: the training selection is empty")
    seqs = list(train_seqs)
    too_long = sum(len(s.input_ids) > cfg.max_length for s in seqs)
    if too_long:
        raise DeclensError(f"{too_long} training sequence(s) exceed max_length={cfg.max_length}; build them with "
                           "training_sequences(..., max_length=...) of the same value")
    device = lm.device
    devices = [device.index or 0] if device.type == "cuda" else []
    # inference mode off (the caller may be inside it: its tensors cannot enter autograd); the RNG is
    # seeded here and the caller's RNG state is restored afterwards
    with torch.inference_mode(False), torch.random.fork_rng(devices=devices):
        _detach_inference_tensors(lm.model)
        torch.manual_seed(cfg.seed)
        return _train(lm, seqs, cfg, progress, merge)


def batch_groups(lengths: Sequence[int], effective_batch: int, gen: torch.Generator,
                 group_by_length: bool = True) -> list[list[int]]:
    """One epoch's optimizer-step groups of row indices (seeded by ``gen``).

    A random permutation cut into groups of ``effective_batch`` rows. With ``group_by_length``
    (as Hugging Face's ``LengthGroupedSampler``), the permutation is cut into mega-batches of 50
    groups, each sorted by length before it is cut, and the groups are shuffled: every row is still
    seen once per epoch in random company, with far less padding.
    """
    n = len(lengths)
    perm = torch.randperm(n, generator=gen).tolist()
    if group_by_length:
        mega = 50 * effective_batch
        perm = [i for c in range(0, n, mega) for i in sorted(perm[c : c + mega], key=lambda i: -lengths[i])]
    groups = [perm[i : i + effective_batch] for i in range(0, n, effective_batch)]
    if group_by_length:
        groups = [groups[j] for j in torch.randperm(len(groups), generator=gen).tolist()]
    return groups


def _train(lm: LoadedModel, seqs: list[TrainSeq], cfg: FinetuneConfig, progress: bool, merge: bool) -> TrainLog:
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    device = lm.device
    model = lm.model
    dtype = lm.dtype
    was_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    peft_model = None
    # Full fine-tuning of a 16-bit model keeps float32 master weights (AdamW updates of a 2e-5 learning
    # rate vanish in bfloat16's 8-bit mantissa) and computes in the model's dtype under autocast; the
    # weights are cast back afterwards. LoRA keeps the frozen base in its dtype and the adapters in
    # float32 (peft's default), so it needs neither.
    mixed = cfg.method == "full" and dtype in (torch.float16, torch.bfloat16)
    if cfg.method == "lora":
        peft_model = _lora_model(model, cfg)  # injects LoRA layers into ``model`` in place, freezes the base
    else:
        param_dtypes = {n: p.dtype for n, p in model.named_parameters()}
        if mixed:  # parameters only: buffers (RoPE inv_freq ...) keep the dtype the model was built with
            with torch.no_grad():
                for p in model.parameters():
                    p.data = p.data.float()
        for p in model.parameters():
            p.requires_grad_(True)
    parts = decoder_parts(model)
    params = [p for p in model.parameters() if p.requires_grad]
    log = TrainLog(config=cfg.to_dict(), examples=len(seqs), answer_tokens=sum(s.n_answer for s in seqs),
                   truncated=sum(s.truncated for s in seqs), trainable_params=sum(p.numel() for p in params),
                   total_params=sum(p.numel() for p in model.parameters()), device=str(device),
                   dtype=str(dtype).replace("torch.", ""))
    log.precision = ("float32 master weights, autocast " if mixed else "") + log.dtype
    opt = torch.optim.AdamW(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    per_epoch = math.ceil(len(seqs) / cfg.effective_batch)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    warmup = int(cfg.warmup_ratio * total)
    pad = encoder_for(lm).pad_id
    lengths = [len(x.input_ids) for x in seqs]
    gen = torch.Generator().manual_seed(cfg.seed)
    amp = torch.autocast(device.type, dtype=dtype) if mixed else nullcontext()
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"fine-tune ({cfg.method})", unit="step", disable=not progress, leave=False)
    seen = 0
    try:
        with torch.enable_grad():
            model.train()
            step = 0
            for _epoch in range(cfg.epochs):
                for group in batch_groups(lengths, cfg.effective_batch, gen, cfg.group_by_length):
                    if step >= total:
                        break
                    micro = [group[i : i + cfg.batch_size] for i in range(0, len(group), cfg.batch_size)]
                    n_tok = sum(seqs[i].n_answer for i in group)
                    for g in opt.param_groups:
                        g["lr"] = cfg.peak_lr * _lr_factor(step, total, warmup, cfg.schedule)
                    step_loss = 0.0
                    for idx in micro:
                        with amp:
                            nll, _ = _answer_nll(parts, *_collate(seqs, idx, pad, device))
                        (nll / n_tok).backward()
                        step_loss += float(nll.detach())
                    if cfg.max_grad_norm is not None:
                        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    else:
                        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
                    loss = step_loss / n_tok
                    if not math.isfinite(loss):
                        raise DeclensError(f"the training loss became {loss} at step {step + 1}; lower the learning "
                                           f"rate (now {cfg.peak_lr:g}) or use float32 (--dtype float32)")
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    log.losses.append(loss)
                    log.lrs.append(opt.param_groups[0]["lr"])
                    log.grad_norms.append(float(norm))
                    seen += len(group)
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
    finally:
        bar.close()
        model.eval()
        if mixed:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.data = p.data.to(param_dtypes[n])
                    p.grad = None
    log.steps = len(log.losses)
    log.epochs = seen / len(seqs)
    log.seconds = round(time.perf_counter() - t0, 3)
    del opt
    if peft_model is not None:
        if merge:
            lm.model = merge_lora(peft_model)
            log.merged = True
        else:
            log.peft_model = peft_model
    else:
        log.merged = True
    for n, p in lm.model.named_parameters():
        if n in was_grad:
            p.requires_grad_(was_grad[n])
    lm.__dict__.pop("parts", None)  # the cached DecoderParts may point at replaced modules
    lm.model.eval()
    return log


# ------------------------------------------------------------------------------------------------
# Export


def export_model(lm: LoadedModel, out_dir: str | Path, check: bool = True) -> dict:
    """Save a (recovered) model and its tokenizer so ``AutoModelForCausalLM.from_pretrained`` loads it.

    Checks that the config is consistent (``num_hidden_layers``, per-layer lists such as
    ``layer_types`` and the removed-layer record all agree with the layer count); with ``check``,
    reloads the folder and compares logits with the in-memory model.

    Returns:
        ``{"out_dir", "num_layers", "removed", "max_abs_logit_diff"}``.
    """
    from transformers import AutoModelForCausalLM

    from ..presets import clear_quantizer

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DeclensError(f"{str(out)!r} exists and is not empty; choose a new export folder")
    if _has_lora(lm.model):
        raise DeclensError("the model still holds LoRA layers; merge them (merge_lora) before exporting")
    parts = decoder_parts(lm.model)
    cfg = lm.model.config
    n = parts.num_layers
    problems = []
    if cfg.num_hidden_layers != n:
        problems.append(f"num_hidden_layers={cfg.num_hidden_layers} but {n} layers")
    lt = getattr(cfg, "layer_types", None)
    if lt is not None and len(lt) != n:
        problems.append(f"layer_types has {len(lt)} entries for {n} layers")
    removed = list(getattr(cfg, REMOVED_ATTR, None) or [])
    n0 = getattr(cfg, ORIGINAL_LAYERS_ATTR, None)
    if removed and n0 is not None and n0 - len(removed) != n:
        problems.append(f"{len(removed)} removed of {n0} does not leave {n}")
    if problems:
        raise DeclensError(f"inconsistent pruned config ({'; '.join(problems)}); this is a declens bug, please report it")
    probe = torch.tensor([lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. Question: why?")]).to(lm.device)
    with torch.inference_mode():
        ref = lm.model(probe).logits.float().cpu()
    clear_quantizer(lm.model)
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    info: dict[str, Any] = {"out_dir": str(out), "num_layers": n, "removed": removed, "max_abs_logit_diff": None}
    if check:
        back = AutoModelForCausalLM.from_pretrained(out, dtype=lm.dtype).to(lm.device).eval()
        with torch.inference_mode():
            got = back(probe).logits.float().cpu()
        info["max_abs_logit_diff"] = float((got - ref).abs().max())
        del back
    return info


def _has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_modules())


# ------------------------------------------------------------------------------------------------
# Configurations to recover


@dataclass(frozen=True)
class PrunedConfig:
    """A pruned configuration to fine-tune: removed dense ids and where they came from."""

    removed: tuple[int, ...]
    source: str = "remove"


def configs_from_prune(prune: Any, ratios: Sequence[float] | None = None, method: str = "ip",
                       num_layers: int | None = None) -> list[PrunedConfig]:
    """The best removed set per pruning ratio of a ``declens prune`` run.

    Args:
        prune: a folder or ``prune.json`` written by ``declens prune``, or a loaded ``PruneResult``.
        ratios: pruning ratios to take (each mapped to ``floor(ratio x L)`` removed layers); None: every
            ratio of the run.
        method: which method's states (``ip``, ``shortgpt``, ...).
        num_layers: the model's dense layer count, checked against the run's.
    """
    from ..pruning.run import PruneResult, max_removed_for

    res = prune if isinstance(prune, PruneResult) else PruneResult.load(prune)
    if method not in res.runs:
        raise DeclensError(f"the prune run has no method {method!r}; it ran: {', '.join(res.runs)}")
    L = int(res.config["num_layers"])
    if num_layers is not None and num_layers != L:
        raise DeclensError(f"the prune run is of a {L}-layer model but this model has {num_layers} layers; "
                           "recover with the model that was pruned")
    best = {k: r for k, r in res.runs[method].best_by_k().items() if k > 0}
    if ratios is None:
        ks = list(best)
    else:
        ks = []
        for r in ratios:
            k = max_removed_for(float(r), L)
            if k not in best:
                avail = ", ".join(f"{kk / L:.3f} ({kk} layers)" for kk in best) or "none"
                raise DeclensError(f"ratio {r} ({k} of {L} layers) is not in the prune run; its ratios: {avail}")
            if k not in ks:
                ks.append(k)
    if not ks:
        raise DeclensError("the prune run holds no pruned state (k > 0); run 'declens prune' with a larger --max-ratio")
    return [PrunedConfig(tuple(int(i) for i in best[k].removed), f"prune:{method}") for k in ks]


# ------------------------------------------------------------------------------------------------
# The study


def _layer_block(res: AnalysisResult) -> dict:
    m = res.metrics
    out = {"layer_ids": list(m.layer_ids), "dm": [float(x) for x in m.dm], "acc": [float(x) for x in m.acc],
           "kl": [float(x) for x in m.kl], "dm_q25": [float(x) for x in m.dm_q25], "dm_q75": [float(x) for x in m.dm_q75],
           "option_frequency": [[float(v) for v in row] for row in m.option_frequency]}
    if m.acc_norm is not None:
        out["acc_norm"] = [float(x) for x in m.acc_norm]
    return out


@dataclass
class RecoveryRun:
    """One pruned configuration, before and after fine-tuning.

    Attributes:
        removed: dense ids of the removed layers; k: how many; ratio: ``k / L`` (dense L).
        source: ``remove`` (given explicitly) or ``prune:<method>`` (from a prune run).
        before, after: headline numbers (``LayerMetrics.summary()``: final accuracy, final DM, TP ...).
        layers_before, layers_after: per-layer ``layer_ids``, ``dm``, ``acc``, ``kl``, DM quartiles, OF.
        tp_before, tp_after: dense id of the Transition Point (None: no TP).
        restored: no TP before and a TP after (see the module docstring).
        train: the :class:`TrainLog` as a dict.
        train_loss_before, train_loss_after: answer-token loss on the training rows (when measured).
        export: what :func:`export_model` returned, when the model was saved.
        timing: seconds for evaluating before, training, evaluating after.
    """

    removed: list[int]
    k: int
    ratio: float
    source: str
    before: dict
    after: dict
    layers_before: dict
    layers_after: dict
    tp_before: int | None
    tp_after: int | None
    restored: bool
    train: dict
    train_loss_before: float | None = None
    train_loss_after: float | None = None
    export: dict | None = None
    timing: dict = field(default_factory=dict)
    analyses: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def dm_gain(self) -> float:
        """Change of the final mean Decision Margin."""
        return float(self.after["final_dm"] - self.before["final_dm"])

    @property
    def acc_gain(self) -> float:
        return float(self.after["final_accuracy"] - self.before["final_accuracy"])

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "analyses"}
        d["dm_gain"] = self.dm_gain
        d["accuracy_gain"] = self.acc_gain
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RecoveryRun":
        names = {f.name for f in fields(cls)} - {"analyses"}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RecoveryResult:
    """A recovery study: the dense reference and every pruned configuration before / after fine-tuning."""

    config: dict
    provenance: dict
    runs: list[RecoveryRun]
    dense: dict | None = None

    def table(self) -> list[dict]:
        """One row per configuration (the CSV rows)."""
        rows = []
        for r in self.runs:
            rows.append({"k": r.k, "ratio": r.ratio, "removed": r.removed, "source": r.source,
                         "acc_before": r.before["final_accuracy"], "acc_after": r.after["final_accuracy"],
                         "dm_before": r.before["final_dm"], "dm_after": r.after["final_dm"],
                         "tp_before": r.tp_before, "tp_after": r.tp_after, "restored": r.restored,
                         "first_loss": r.train.get("first_loss"), "last_loss": r.train.get("last_loss"),
                         "steps": r.train.get("steps"), "train_s": r.train.get("seconds")})
        return rows

    def to_dict(self) -> dict:
        return {"kind": "recover", "config": self.config, "provenance": self.provenance, "dense": self.dense,
                "table": self.table(), "runs": [r.to_dict() for r in self.runs]}

    def save(self, out_dir: str | Path, plots: bool = True) -> Path:
        """Write ``recover.json``, ``recover.csv`` and (with ``plots``) ``recover_dm.png``, ``recover_loss.png``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RECOVER_FILE, self.to_dict())
        rows = self.table()
        buf = io.StringIO()
        if rows:
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            for row in rows:
                w.writerow({k: (json.dumps(v) if isinstance(v, list) else f"{v:.6g}" if isinstance(v, float) else v)
                            for k, v in row.items()})
        atomic_write_text(out / RECOVER_CSV, buf.getvalue())
        if plots:
            plot_recovery(self, out)
        return out

    @classmethod
    def load(cls, path: str | Path) -> "RecoveryResult":
        """Read a folder (or ``recover.json``) written by :meth:`save`."""
        p, d = read_result_file(path, RECOVER_FILE, "recover")
        if d.get("kind") != "recover":
            raise DeclensError(f"{str(p)!r} is not a recovery result (kind={d.get('kind')!r})")
        return cls(config=d["config"], provenance=d["provenance"], runs=[RecoveryRun.from_dict(r) for r in d["runs"]],
                   dense=d.get("dense"))


def recover_study(
    lm: LoadedModel,
    eval_data: TaskData,
    train: str | TaskSpec | TaskData,
    removals: Sequence[Sequence[int]] | None = None,
    *,
    prune: Any = None,
    ratios: Sequence[float] | None = None,
    prune_method: str = "ip",
    fmt: str = "letter",
    method: str = "lora",
    train_split: str | None = None,
    train_samples: int | None = None,
    train_seed: int = 0,
    measure_train_loss: bool = False,
    dense: bool = True,
    labels: str | Sequence[str] = LETTERS,
    label_prefix: str = " ",
    max_tokens: int | None = None,
    out_dir: str | Path | None = None,
    export_dir: str | Path | None = None,
    progress: bool = True,
    plots: bool = True,
    **hparams: Any,
) -> RecoveryResult:
    """Fine-tune pruned configurations of ``lm`` and compare the decision lens before and after.

    For each configuration: copy the model, remove the layers, analyse it on ``eval_data`` (per-layer
    DM, accuracy, TP), fine-tune it on the training rows, analyse it again, and (optionally) save it.
    ``lm`` itself is never modified.

    Args:
        lm: the dense model.
        eval_data: the evaluated rows (e.g. ``load_task("arc_challenge", limit=200)``).
        train: the training task (name or spec: rows from its training split, see :func:`training_split`),
            or a preloaded :class:`TaskData`, used as is (``train_split`` / ``train_samples`` ignored).
        removals: explicit configurations, each a list of dense layer ids to remove.
        prune: a ``declens prune`` folder / ``prune.json`` / ``PruneResult``: take its best removed set
            per ratio (``ratios``, default all) of ``prune_method``. Exclusive with ``removals``.
        fmt: ``letter`` or ``cloze``, for evaluation and for the training sequences alike.
        method: ``lora`` or ``full``.
        train_split, train_samples, train_seed: which training rows (default: the whole training split).
        measure_train_loss: also measure the answer loss on the training rows before and after.
        dense: also analyse the dense model (the reference DM curve).
        labels, label_prefix: letter-format option labels.
        max_tokens: padded tokens per batch for the analyses.
        out_dir: write ``recover.json``, ``recover.csv`` and the figures here (``recover.json`` is also
            written after every finished configuration but the last, marked ``"partial": true``).
        export_dir: save every recovered model (``save_pretrained`` + tokenizer) in a subfolder here
            (``00_k12``: configuration index and number of removed layers).
        progress: progress bars.
        plots: with ``out_dir``, draw the figures.
        **hparams: fine-tuning hyper-parameters (:class:`FinetuneConfig` fields: ``epochs``, ``lr``,
            ``batch_size``, ``grad_accum``, ``max_steps``, ``lora_r``, ``lora_alpha``, ...).

    Returns:
        The :class:`RecoveryResult`.
    """
    if fmt not in FORMATS:
        raise DeclensError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    hp = FinetuneConfig.make(method=method, **hparams)
    n_dense = original_num_layers(lm)
    if (removals is None) == (prune is None):
        raise DeclensError("give the pruned configurations either as removal lists (--remove) or as a prune run "
                           "(--from-prune), not both and not neither")
    prune_info = None
    if prune is not None:
        from ..pruning.run import PruneResult

        pres = prune if isinstance(prune, PruneResult) else PruneResult.load(prune)
        configs = configs_from_prune(pres, ratios, prune_method, num_layers=n_dense)
        if pres.config.get("model") != lm.spec:
            warnings.warn(f"the prune run was made with model {pres.config.get('model')!r}, this study uses "
                          f"{lm.spec!r}; make sure they are the same model", stacklevel=2)
        prune_info = {"path": str(prune) if isinstance(prune, (str, Path)) else None, "method": prune_method,
                      "ratios": None if ratios is None else [float(r) for r in ratios],
                      "model": pres.config.get("model"), "task": pres.config.get("task"),
                      "format": pres.config.get("format"),
                      "model_fingerprint": (pres.provenance.get("model") or {}).get("fingerprint")}
    else:
        if not removals:
            raise DeclensError("no configuration to recover; give at least one removal list, e.g. --remove 20,21,22")
        configs = []
        for rem in removals:
            rem = [int(i) for i in rem]
            if not rem:
                raise DeclensError("an empty removal list is the dense model; list the layers to remove")
            keep_positions(lm.parts, rem)  # fail early on bad ids, before any training
            configs.append(PrunedConfig(tuple(rem), "remove"))
    train_data = load_training_data(train, train_split, train_samples, train_seed)
    if train_data.name == eval_data.name:
        overlap = {it.id for it in train_data.items} & {it.id for it in eval_data.items}
        if overlap:
            raise DeclensError(
                f"{len(overlap)} training row(s) are also evaluation rows ({train_data.name!r}, split "
                f"{train_data.split!r}); fine-tune on the training split, not the evaluated one")
    seqs = training_sequences(lm, train_data, fmt, hp.max_length, labels, label_prefix)
    req = prepare(lm, eval_data, fmt, labels=labels, label_prefix=label_prefix)
    config = {
        "model": lm.spec, "task": eval_data.name, "format": fmt, **eval_data.selection, "num_layers": n_dense,
        "train": {"task": train_data.name, **train_data.selection, "fingerprint": train_data.fingerprint(),
                  "sequences": len(seqs), "answer_tokens": sum(s.n_answer for s in seqs),
                  "truncated": sum(s.truncated for s in seqs),
                  "mean_length": float(np.mean([len(s.input_ids) for s in seqs])),
                  "loss": "cross-entropy on the answer tokens only (prompt masked with -100)"},
        "finetune": hp.to_dict(),
        "configurations": [{"removed": list(c.removed), "source": c.source} for c in configs],
        "prune": prune_info,
        "restored_definition": "no Transition Point before fine-tuning (final mean DM <= 0) and one after (final mean DM > 0)",
        "labels": list(req.labels) if isinstance(req, LetterRequests) else None,
        "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
    }
    t_all = time.perf_counter()
    akw = dict(requests=req, max_tokens=max_tokens, progress=progress, labels=labels, label_prefix=label_prefix)
    dense_block = None
    if dense:
        if progress:
            print("analysing the dense model ...", flush=True)
        d = analyze(lm, eval_data, fmt, **akw)
        dense_block = {"summary": d.metrics.summary(), **_layer_block(d)}
    runs: list[RecoveryRun] = []
    export_root = Path(export_dir) if export_dir is not None else None
    if export_root is not None:  # refuse now, not after hours of training
        taken = [str(p) for p in (export_root / _export_name(n, c) for n, c in enumerate(configs))
                 if p.exists() and any(p.iterdir())]
        if taken:
            raise DeclensError(f"export folder(s) {taken} exist and are not empty; choose a new --export-dir")
    for n, c in enumerate(configs):
        removed = list(c.removed)
        k = len(removed)
        if progress:
            print(f"[{n + 1}/{len(configs)}] removing {k} of {n_dense} layers ({k / n_dense:.1%}): {removed}", flush=True)
        t0 = time.perf_counter()
        pm = pruned_copy(lm, removed)
        before = analyze(pm, eval_data, fmt, **akw)
        loss_before = answer_loss(pm, seqs, hp.batch_size) if measure_train_loss else None
        t1 = time.perf_counter()
        log = run_finetune(pm, seqs, hp, progress=progress)
        t2 = time.perf_counter()
        after = analyze(pm, eval_data, fmt, **akw)
        loss_after = answer_loss(pm, seqs, hp.batch_size) if measure_train_loss else None
        t3 = time.perf_counter()
        tp_b, tp_a = before.metrics.transition_layer, after.metrics.transition_layer
        exp = None
        if export_root is not None:
            exp = export_model(pm, export_root / _export_name(n, c))
        runs.append(RecoveryRun(
            removed=removed, k=k, ratio=k / n_dense, source=c.source, before=before.metrics.summary(),
            after=after.metrics.summary(), layers_before=_layer_block(before), layers_after=_layer_block(after),
            tp_before=tp_b, tp_after=tp_a, restored=tp_b is None and tp_a is not None, train=log.to_dict(),
            train_loss_before=loss_before, train_loss_after=loss_after, export=exp,
            timing={"before_s": round(t1 - t0, 3), "train_s": round(t2 - t1, 3), "after_s": round(t3 - t2, 3)},
            analyses=(before, after)))
        del pm
        if out_dir is not None and n + 1 < len(configs):  # finished configurations survive a killed run
            RecoveryResult(config=config, provenance=provenance(lm, eval_data, partial=True), runs=runs,
                           dense=dense_block).save(out_dir, plots=False)
    prov = provenance(lm, eval_data, timing={"total_s": round(time.perf_counter() - t_all, 2)})
    res = RecoveryResult(config=config, provenance=prov, runs=runs, dense=dense_block)
    if out_dir is not None:
        res.save(out_dir, plots=plots)
    return res


def _export_name(n: int, c: PrunedConfig) -> str:
    return f"{n:02d}_k{len(c.removed)}"


# ------------------------------------------------------------------------------------------------
# Figures and printing


def plot_recovery(res: RecoveryResult, out_dir: str | Path) -> list[Path]:
    """``recover_dm.png`` (per configuration: DM per layer before vs after, dense for reference) and
    ``recover_loss.png`` (training loss per step of every configuration)."""
    from ..plots import TP_COLOR, plt, save_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    n = max(1, len(res.runs))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, res.runs):
        if res.dense:
            ax.plot(res.dense["layer_ids"], res.dense["dm"], "-", color="0.6", lw=1.2, label="dense")
        lb, la = r.layers_before, r.layers_after
        ax.plot(lb["layer_ids"], lb["dm"], "-o", ms=2.5, color="#d62728", lw=1.3, label="pruned, before")
        ax.plot(la["layer_ids"], la["dm"], "-o", ms=2.5, color="#1f77b4", lw=1.3, label="pruned, after fine-tuning")
        for x in r.removed:
            ax.axvline(x, color="0.85", lw=2, zorder=0)
        if r.tp_before is not None:
            ax.axvline(r.tp_before, color="#d62728", ls=":", lw=1, label=f"TP before ({r.tp_before})")
        if r.tp_after is not None:
            ax.axvline(r.tp_after, color=TP_COLOR, ls="--", lw=1, label=f"TP after ({r.tp_after})")
        ax.axhline(0, color="k", lw=0.8)
        state = "restored" if r.restored else ("TP kept" if r.tp_before is not None else "not restored")
        ax.set_title(f"{r.k} removed ({r.ratio:.1%}): {state}", fontsize=9)
        ax.set_xlabel("layer (dense id; grey bars: removed)")
        ax.set_ylabel("mean Decision Margin")
        ax.legend(fontsize=6, loc="best")
    cfg = res.config
    fig.suptitle(f"{Path(str(cfg.get('model'))).name} · {cfg.get('task')} · {cfg.get('format')} · "
                 f"{cfg['finetune']['method']} fine-tuning on {cfg['train']['task']} ({cfg['train']['sequences']} rows)",
                 fontsize=10)
    fig.tight_layout()
    paths.append(save_figure(fig, out / "recover_dm.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(res.runs):
        losses = r.train.get("losses") or []
        ax.plot(range(1, len(losses) + 1), losses, "-", lw=1.2, color=cmap(i / max(1, n - 1)),
                label=f"{r.k} removed ({r.ratio:.1%})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token loss")
    ax.set_title("Fine-tuning loss")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "recover_loss.png"))
    return paths


def print_recovery(res: RecoveryResult, console=None) -> None:
    """A table: per configuration, accuracy / final DM / TP before -> after, ``restored`` and the loss."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    hp = res.config["finetune"]
    t = Table(title=f"{hp['method']} fine-tuning on {res.config['train']['task']} ({res.config['train']['sequences']} rows, "
                    f"{hp['epochs']} epoch(s), lr {hp['lr']:g}, batch {hp['effective_batch']}): before → after",
              header_style="bold", box=box.SIMPLE_HEAD)
    wide = console.width >= 100  # else the layer ids are listed below the table
    for col in ("ratio (k)", "accuracy", "final DM", "TP", "restored", "train loss"):
        t.add_column(col, justify="right", no_wrap=True)
    if wide:
        t.add_column("removed layer ids", overflow="fold")
    tp = lambda x: "none" if x is None else str(x)  # noqa: E731
    if res.dense:
        s = res.dense["summary"]
        t.add_row("dense", f"{s['final_accuracy']:.3f}", f"{s['final_dm']:+.2f}", tp(s["transition_layer"]), "", "",
                  *([""] if wide else []))
    for r in res.runs:
        ids = ",".join(map(str, r.removed))
        t.add_row(f"{r.ratio:.1%} ({r.k})", f"{r.before['final_accuracy']:.3f}→{r.after['final_accuracy']:.3f}",
                  f"{r.before['final_dm']:+.2f}→{r.after['final_dm']:+.2f}", f"{tp(r.tp_before)}→{tp(r.tp_after)}",
                  "yes" if r.restored else "no", f"{r.train['first_loss']:.2f}→{r.train['last_loss']:.2f}",
                  *([ids] if wide else []))
    console.print(t)
    if not wide:
        for r in res.runs:
            console.print(f"  {r.ratio:.1%} ({r.k}) removed layers: {','.join(map(str, r.removed))}")
    console.print("TP: Transition Point (dense layer id); restored: no TP before fine-tuning, a TP after")


__all__ = ["DEFAULT_LR", "FinetuneConfig", "PrunedConfig", "RecoveryResult", "RecoveryRun", "TrainLog", "TrainSeq",
           "answer_loss", "batch_groups", "configs_from_prune", "export_model", "finetune", "load_training_data",
           "merge_lora", "original_num_layers", "plot_recovery", "print_recovery", "pruned_copy", "recover_study",
           "run_finetune", "training_sequences", "training_split"]
