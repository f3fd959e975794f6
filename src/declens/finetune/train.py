"""The fine-tuning loop: Hugging Face ``Trainer`` (gradient accumulation, mixed precision, several
GPUs under ``torchrun`` come from the library), LoRA through ``peft`` merged back, and the
learning-rate selection of the recipe.

Loss: the model's own causal-LM loss with prompt labels set to -100; ``Trainer`` passes the number
of answer tokens of the whole accumulated batch (``num_items_in_batch``), so a step's loss is the
mean over every answer token of its effective batch, whatever the split into micro-batches.

Data parallelism: under ``torchrun`` ``Trainer`` wraps the model in DDP (gradients all-reduced; the
answer-token count all-reduced too, ``average_tokens_across_devices``), and every rank takes its
``batch_size`` rows of each micro-batch (effective batch = ``batch_size`` x ``grad_accum`` x ranks).
The row order is drawn as one process with ``batch_size`` x ranks draws it (the length-grouped
sampler groups by the whole effective batch, see :func:`_trainer_class`), so a step trains on the same
rows and, without dropout, reaches one process's numbers up to the order of the gradient sums
(``tests/test_distributed.py``). Two differences remain: LoRA dropout masks are drawn per rank, and a
row count that the per-step batch does not divide is completed with rows from the start (accelerate's
``even_batches``). :func:`answer_loss` splits its batches over the ranks.

Precision: full fine-tuning of a 16-bit model keeps float32 master weights (AdamW updates of a
2e-5 learning rate vanish in bfloat16's 8-bit mantissa) and computes in the model's dtype under
``Trainer``'s autocast (``bf16``/``fp16``); the weights are cast back afterwards. LoRA keeps the
frozen base in its dtype and the adapters in float32 (peft's default).
"""

from __future__ import annotations

import functools
import math
import random
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .. import distributed
from ..errors import DeclensError
from ..models import LoadedModel, decoder_parts
from ..runner import split_on_oom
from .config import LR_RULE, FinetuneConfig
from .data import IGNORE_INDEX, TrainSeq
from .setup import copy_model, detach_inference_tensors, lora_model, merge_lora

#: Trainer's name for each schedule of :class:`FinetuneConfig` (constant keeps the warm-up)
_SCHEDULER = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


@dataclass
class TrainLog:
    """What a fine-tuning run did.

    Attributes:
        config: the hyper-parameters (``FinetuneConfig.to_dict()``, learning rate resolved).
        losses: mean answer-token loss of every optimizer step (before that step's update).
        lrs: learning rate of every step; grad_norms: gradient norm of every step (before clipping).
        steps: optimizer steps taken; epochs: passes over the data (fractional when ``max_steps`` stops early).
        examples: training sequences; answer_tokens: answer tokens in them; truncated: sequences cut to ``max_length``.
        trainable_params / total_params: parameters trained (LoRA: the adapters) / in the model.
        seconds: wall time of the loop; device, dtype: where it ran and the model's dtype; precision: how.
        world_size: data-parallel processes; effective_batch: rows per optimizer step over all of them
            (``batch_size`` x ``grad_accum`` x ``world_size``); backend: the library loop.
        merged: LoRA adapters were merged into the weights (always for ``full``).
        lr_search: the learning-rate selection (candidates, held-out losses, choice, rule), when one ran.
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
    world_size: int = 1
    effective_batch: int = 0
    backend: str = ""
    merged: bool = False
    lr_search: dict | None = None
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


# ------------------------------------------------------------------------------------------------
# Loss measurement (no gradient)


def _collate(rows: Sequence[TrainSeq], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding)."""
    T = max(len(r.input_ids) for r in rows)
    T = -(-T // multiple) * multiple
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    tgt = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        ids[b, :n] = torch.as_tensor(r.input_ids, dtype=torch.long)
        mask[b, :n] = 1
        tgt[b, r.n_prompt : n] = ids[b, r.n_prompt : n]
    return {"input_ids": ids, "attention_mask": mask, "labels": tgt}


class Collator:
    """``Trainer``'s data collator: :class:`TrainSeq` rows -> padded tensors (to a multiple of 8 on GPU)."""

    def __init__(self, pad_id: int, multiple: int = 1):
        self.pad_id, self.multiple = pad_id, multiple

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return _collate([r["seq"] for r in rows], self.pad_id, self.multiple)


def answer_loss(lm: LoadedModel, seqs: Sequence[TrainSeq], batch_size: int = 16) -> float:
    """Mean cross-entropy of ``lm`` over the answer tokens of ``seqs`` (no gradient, eval mode).

    The LM head runs only at the positions that predict an answer token (position ``j - 1`` for
    answer token ``j``), which saves the vocabulary projection of every prompt position. Under
    ``torchrun`` every rank runs its round-robin share of the batches (all ranks must call it); the
    per-batch sums are gathered and added in batch order, as one process adds them. Out of device
    memory, a batch runs as two halves (:func:`~declens.runner.split_on_oom`) whose sums are added.

    Raises:
        DeviceMemoryError: one sequence alone does not fit.
    """
    from ..formats import encoder_for

    if not seqs:
        raise DeclensError("no training sequences to measure a loss on")
    parts = decoder_parts(lm.model)
    pad = encoder_for(lm).pad_id
    was_training = lm.model.training
    lm.model.eval()
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].input_ids))  # less padding
    lengths = [len(seqs[i].input_ids) for i in order]  # of the rows in ``order``, named on out-of-memory
    starts = list(range(0, len(seqs), batch_size))
    sums: dict[int, tuple[float, int]] = {}  # batch index -> (summed cross-entropy, answer tokens)

    def run(rows: list[int], into: list[tuple[float, int]]) -> None:  # rows: indices into ``order``
        b = {k: v.to(lm.device) for k, v in _collate([seqs[order[i]] for i in rows], pad).items()}
        h = parts.decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).last_hidden_state
        sel = b["labels"][:, 1:] != IGNORE_INDEX
        logits = parts.logit_transform(parts.head(h[:, :-1][sel]).float())
        y = b["labels"][:, 1:][sel]
        into.append((float(torch.nn.functional.cross_entropy(logits, y, reduction="sum")), int(y.numel())))

    with torch.no_grad():
        for j in distributed.my_batches(starts):
            got: list[tuple[float, int]] = []  # a batch split on out-of-memory adds its halves' sums
            split_on_oom(lambda rows: run(rows, got), range(starts[j], min(starts[j] + batch_size, len(seqs))), lengths)
            sums[j] = (sum(g[0] for g in got), sum(g[1] for g in got))
    lm.model.train(was_training)
    sums = {j: v for part in distributed.gather_objects(sums) for j, v in part.items()}
    total, count = 0.0, 0
    for j in range(len(starts)):
        total += sums[j][0]
        count += sums[j][1]
    return total / count


# ------------------------------------------------------------------------------------------------
# The Trainer run


@contextmanager
def _own_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch, numpy and ``random`` for the run and give the caller its RNG states back afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _callback(log: TrainLog, progress: bool):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        """Keeps every step's loss, learning rate and gradient norm; stops on a non-finite loss."""

        bar = None

        def on_train_begin(self, args, state, control, **kw):
            log.world_size = int(args.world_size)
            log.effective_batch = int(args.train_batch_size * args.gradient_accumulation_steps * args.world_size)
            if progress and args.process_index == 0:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, desc=f"fine-tune ({log.method})", unit="step", leave=False)

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            loss = float(logs["loss"])
            log.losses.append(loss)
            log.lrs.append(float(logs.get("learning_rate", float("nan"))))
            if logs.get("grad_norm") is not None:
                log.grad_norms.append(float(logs["grad_norm"]))
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{loss:.4f}")
            if not math.isfinite(loss):
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    return Recorder()


@functools.cache
def _trainer_class() -> type:
    """``transformers.Trainer`` whose length-grouped row order does not depend on how the effective batch is
    split over ``torchrun`` ranks.

    ``Trainer`` groups rows of similar length in mega-batches sized from the per-device batch
    (``batch_size`` x ``grad_accum``); sized from the whole effective batch (x ranks) instead, the
    order is the one a single process with ``batch_size`` x ranks rows per forward pass draws, and the
    ranks' shards of a step hold exactly that process's rows. One process is unchanged (x 1).
    """
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class DataParallelTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, LengthGroupedSampler):
                sampler.batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return sampler

    return DataParallelTrainer


def _trainer_run(lm: LoadedModel, seqs: list[TrainSeq], cfg: FinetuneConfig, progress: bool, merge: bool) -> TrainLog:
    from transformers import PrinterCallback, ProgressCallback, TrainingArguments

    from ..formats import encoder_for

    device, dtype, model = lm.device, lm.dtype, lm.model
    was_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    mixed = cfg.method == "full" and dtype in (torch.float16, torch.bfloat16)
    peft_model = None
    if cfg.method == "lora":
        peft_model = lora_model(model, cfg)  # injects LoRA layers into ``model`` in place, freezes the base
    else:
        param_dtypes = {n: p.dtype for n, p in model.named_parameters()}
        if mixed:  # parameters only: buffers (RoPE inv_freq ...) keep the dtype the model was built with
            with torch.no_grad():
                for p in model.parameters():
                    p.data = p.data.float()
        for p in model.parameters():
            p.requires_grad_(True)
    trained = peft_model if peft_model is not None else model
    log = TrainLog(config=cfg.to_dict(), examples=len(seqs), answer_tokens=sum(s.n_answer for s in seqs),
                   truncated=sum(s.truncated for s in seqs),
                   trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                   total_params=sum(p.numel() for p in model.parameters()), device=str(device),
                   dtype=str(dtype).replace("torch.", ""), backend="transformers.Trainer")
    log.precision = ("float32 master weights, autocast " if mixed else "") + log.dtype
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="declens-ft-") as tmp:
            args = TrainingArguments(
                output_dir=tmp, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
                num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1, learning_rate=cfg.peak_lr,
                weight_decay=cfg.weight_decay, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                lr_scheduler_type=_SCHEDULER[cfg.schedule], warmup_steps=float(cfg.warmup_ratio) if cfg.warmup_ratio else 0,
                max_grad_norm=cfg.max_grad_norm or 0.0, seed=cfg.seed, data_seed=cfg.seed,
                train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
                logging_strategy="steps", logging_steps=1, logging_nan_inf_filter=False, save_strategy="no",
                average_tokens_across_devices=True, report_to="none", disable_tqdm=True, remove_unused_columns=False,
                dataloader_num_workers=0,
                dataloader_pin_memory=device.type == "cuda", use_cpu=device.type == "cpu",
                bf16=mixed and dtype == torch.bfloat16, fp16=mixed and dtype == torch.float16)
            trainer = _trainer_class()(model=trained, args=args,
                                       train_dataset=[{"seq": s, "input_ids": s.input_ids} for s in seqs],
                                       data_collator=Collator(encoder_for(lm).pad_id, 8 if device.type == "cuda" else 1),
                                       callbacks=[_callback(log, progress)])
            for cb in (PrinterCallback, ProgressCallback):
                trainer.remove_callback(cb)
            trainer.train()
            log.epochs = float(trainer.state.epoch or 0.0)
            del trainer
    finally:
        model.eval()
        if mixed:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.data = p.data.to(param_dtypes[n])
                    p.grad = None
    log.steps = len(log.losses)
    log.seconds = round(time.perf_counter() - t0, 3)
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
            p.grad = None
    lm.__dict__.pop("parts", None)  # the cached DecoderParts may point at replaced modules
    lm.model.eval()
    bad = [x for x in log.losses if not math.isfinite(x)]
    if bad:
        raise DeclensError(f"the training loss became {bad[0]} at step {log.losses.index(bad[0]) + 1}; lower the "
                           f"learning rate (now {cfg.peak_lr:g}) or use float32 (--dtype float32)")
    return log


def _check(seqs: Sequence[TrainSeq], cfg: FinetuneConfig) -> list[TrainSeq]:
    if not seqs:
        raise DeclensError("no training rows: the training selection is empty")
    too_long = sum(len(s.input_ids) > cfg.max_length for s in seqs)
    if too_long:
        raise DeclensError(f"{too_long} training sequence(s) exceed max_length={cfg.max_length}; build them with "
                           "training_sequences(..., max_length=...) of the same value")
    return list(seqs)


def _fixed(lm: LoadedModel, seqs: list[TrainSeq], cfg: FinetuneConfig, progress: bool, merge: bool) -> TrainLog:
    # inference mode off (the caller may be inside it: its tensors cannot enter autograd); the RNGs are
    # seeded here and the caller's RNG states are restored afterwards
    with torch.inference_mode(False), _own_rng(cfg.seed, lm.device):
        detach_inference_tensors(lm.model)
        return _trainer_run(lm, seqs, cfg, progress, merge)


# ------------------------------------------------------------------------------------------------
# Learning-rate selection


def heldout_split(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(search, heldout)`` of ``n`` training rows: ``max(1, round(share x n))`` held out, drawn with ``seed``."""
    k = max(1, round(share * n))
    if n - k < 1:
        raise DeclensError(f"{n} training row(s) cannot be split into search and held-out rows (--lr-heldout {share}); "
                           "give more training rows or a fixed --lr")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def choose_lr(losses: dict[float, float]) -> float:
    """The rule: the candidate with the lowest held-out loss; ties go to the smaller rate; non-finite losses lose.

    Raises:
        DeclensError: every candidate diverged.
    """
    finite = {lr: v for lr, v in losses.items() if math.isfinite(v)}
    if not finite:
        raise DeclensError(f"every learning-rate candidate diverged ({sorted(losses)}); give smaller --lr-candidates "
                           "or use float32 (--dtype float32)")
    return min(finite, key=lambda lr: (finite[lr], lr))


def select_lr(lm: LoadedModel, seqs: Sequence[TrainSeq], cfg: FinetuneConfig, progress: bool = True) -> dict:
    """Score every candidate of ``cfg.lr_candidates`` (see :data:`~declens.finetune.config.LR_RULE`).

    ``lm`` is not modified: each candidate trains a fresh copy.

    Returns:
        ``{"rule", "candidates", "losses" (held-out loss per candidate, None when it diverged),
        "chosen", "heldout_rows", "search_rows", "steps", "heldout_loss_before", "seconds"}``.
    """
    if not cfg.lr_candidates:
        raise DeclensError("no learning-rate candidates to select from; give --lr-candidates")
    seqs = _check(seqs, cfg)
    search, held = heldout_split(len(seqs), cfg.lr_heldout, cfg.seed)
    s_rows, h_rows = [seqs[i] for i in search], [seqs[i] for i in held]
    t0 = time.perf_counter()
    losses: dict[float, float] = {}
    for lr in cfg.lr_candidates:
        trial = copy_model(lm)
        try:
            _fixed(trial, s_rows, cfg.with_lr(lr, max_steps=cfg.lr_search_steps), progress, merge=True)
            losses[lr] = answer_loss(trial, h_rows)
        except DeclensError:  # diverged: a non-finite training loss
            losses[lr] = float("inf")
        del trial
    chosen = choose_lr(losses)
    return {"rule": LR_RULE, "candidates": list(cfg.lr_candidates),
            "losses": [None if not math.isfinite(losses[lr]) else losses[lr] for lr in cfg.lr_candidates],
            "chosen": chosen, "heldout_rows": len(h_rows), "search_rows": len(s_rows), "steps": cfg.lr_search_steps,
            "heldout_loss_before": answer_loss(lm, h_rows), "seconds": round(time.perf_counter() - t0, 3)}


# ------------------------------------------------------------------------------------------------
# Entry points


def run_finetune(lm: LoadedModel, train_seqs: Sequence[TrainSeq], cfg: FinetuneConfig, progress: bool = True,
                 merge: bool = True) -> TrainLog:
    """Fine-tune ``lm`` in place on answer-masked sequences with the recipe ``cfg``.

    When ``cfg`` selects the learning rate (``lr_candidates`` and no ``lr``), :func:`select_lr`
    runs first and the chosen rate trains on all ``train_seqs``; the selection is in ``TrainLog.lr_search``.
    Safe to call from inside ``torch.inference_mode``; leaves the model in eval mode and the
    caller's RNG states as they were. With ``method="lora"`` and ``merge=True`` the adapters are
    merged and ``lm.model`` is an ordinary model again; with ``merge=False`` the ``PeftModel`` is in
    ``TrainLog.peft_model`` (merge it with :func:`~declens.finetune.setup.merge_lora`).
    """
    seqs = _check(train_seqs, cfg)
    search = None
    if cfg.selects_lr:
        search = select_lr(lm, seqs, cfg, progress)
        cfg = cfg.with_lr(search["chosen"])
    log = _fixed(lm, seqs, cfg, progress, merge)
    log.lr_search = search
    return log


def finetune(lm: LoadedModel, train_seqs: Sequence[TrainSeq], method: str = "lora", *, progress: bool = True,
             merge: bool = True, **hparams: Any) -> TrainLog:
    """:func:`run_finetune` with the recipe given as keyword arguments (:class:`FinetuneConfig` fields)."""
    return run_finetune(lm, train_seqs, FinetuneConfig.make(method=method, **hparams), progress=progress, merge=merge)


__all__ = ["Collator", "TrainLog", "answer_loss", "choose_lr", "finetune", "heldout_split", "run_finetune", "select_lr"]
