"""The fine-tuning recipe as one typed, validated, recorded object.

Defaults follow the paper's supervised fine-tuning (Appendix A.1.2: 3 epochs, AdamW, effective
batch 8, sequences up to 512 tokens, "a learning rate adaptively selected" per model) and
Hugging Face ``Trainer``'s defaults where the paper says nothing (linear decay to 0, no warm-up,
no weight decay, gradient norm clipped at 1.0). The learning-rate rule the paper leaves open is
explicit here (see :class:`FinetuneConfig` and ``docs/METHOD.md``, "Fine-tuning recipe").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

from ..errors import DeclensError

METHODS = ("lora", "full")
SCHEDULES = ("linear", "cosine", "constant")
#: learning rate per method when neither ``lr`` nor ``lr_candidates`` is given
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}
#: the stated candidate set per method of the learning-rate selection (``declens compare``'s default)
DEFAULT_LR_CANDIDATES = {"lora": (1e-4, 2e-4, 5e-4), "full": (1e-5, 2e-5, 5e-5)}
#: the selection rule, recorded with every selection
LR_RULE = ("train a fresh copy of the model with each candidate for lr_search_steps optimizer steps on the "
           "training rows minus a held-out share (lr_heldout, drawn with the seed), measure the answer-token loss on "
           "the held-out rows, keep the lowest (ties: the smaller rate; a non-finite loss disqualifies), then train "
           "on all training rows with it")


@dataclass
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (every field is a CLI flag and is recorded).

    Attributes:
        method: ``lora`` (peft adapters, merged into the weights afterwards) or ``full``.
        epochs: passes over the training rows (the paper: 3).
        lr: fixed peak learning rate; None: selected from ``lr_candidates`` when given, else
            :data:`DEFAULT_LR` of the method.
        lr_candidates: the stated set the learning rate is selected from (rule: :data:`LR_RULE`).
        lr_heldout: share of the training rows held out to score the candidates (at least one row).
        lr_search_steps: optimizer steps of each candidate's short run.
        batch_size: sequences per forward pass per device.
        grad_accum: forward passes per optimizer step (effective batch = batch_size x grad_accum x devices).
        max_steps: stop after this many optimizer steps (None: run every epoch).
        lora_r, lora_alpha, lora_dropout: LoRA rank, scale numerator and dropout.
        target_modules: LoRA targets: ``all-linear`` or module names (``["q_proj", "v_proj"]``).
        weight_decay: AdamW decoupled weight decay.
        warmup_ratio: share of the steps with a linear warm-up from 0.
        schedule: ``linear`` (decay to 0), ``cosine`` (to 0) or ``constant`` after warm-up.
        max_grad_norm: clip the gradient norm to this (None: no clipping).
        seed: seeds the adapter initialisation, the data order, dropout and the held-out draw.
        max_length: longer training sequences lose the start of their prompt (never the answer).
        group_by_length: batch rows of similar length together (Trainer's ``group_by_length`` sampler).
    """

    method: str = "lora"
    epochs: int = 3
    lr: float | None = None
    lr_candidates: tuple[float, ...] | None = None
    lr_heldout: float = 0.1
    lr_search_steps: int = 20
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
        if self.lr_candidates is not None:
            self.lr_candidates = tuple(sorted({float(x) for x in self.lr_candidates}))
        cands = self.lr_candidates or ()
        checks = [("epochs", self.epochs, self.epochs >= 1), ("batch_size", self.batch_size, self.batch_size >= 1),
                  ("grad_accum", self.grad_accum, self.grad_accum >= 1),
                  ("max_steps", self.max_steps, self.max_steps is None or self.max_steps >= 1),
                  ("lr", self.lr, self.lr is None or (math.isfinite(self.lr) and self.lr > 0)),
                  ("lr_candidates", self.lr_candidates, self.lr_candidates is None
                   or (len(cands) >= 1 and all(math.isfinite(x) and x > 0 for x in cands))),
                  ("lr_heldout", self.lr_heldout, 0 < self.lr_heldout < 1),
                  ("lr_search_steps", self.lr_search_steps, self.lr_search_steps >= 1),
                  ("lora_r", self.lora_r, self.lora_r >= 1), ("lora_alpha", self.lora_alpha, self.lora_alpha > 0),
                  ("lora_dropout", self.lora_dropout, 0 <= self.lora_dropout < 1),
                  ("weight_decay", self.weight_decay, self.weight_decay >= 0),
                  ("warmup_ratio", self.warmup_ratio, 0 <= self.warmup_ratio < 1),
                  ("max_grad_norm", self.max_grad_norm, self.max_grad_norm is None or self.max_grad_norm > 0),
                  ("max_length", self.max_length, self.max_length >= 2)]
        bad = [f"{name}={value!r}" for name, value, ok in checks if not ok]
        if bad:
            raise DeclensError(f"invalid fine-tuning hyper-parameter(s): {', '.join(bad)} (epochs, batch sizes, steps, "
                               "rank and length must be positive; lr and lr candidates > 0; dropout, warm-up ratio and "
                               "held-out share in [0, 1))")
        if self.lr is not None and self.lr_candidates is not None:
            raise DeclensError("give a fixed learning rate (--lr) or a candidate set to select from (--lr-candidates), "
                               "not both")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules:
                raise DeclensError("target_modules is empty; use 'all-linear' or module names like q_proj,v_proj")
            self.target_modules = [str(t) for t in self.target_modules]

    @property
    def selects_lr(self) -> bool:
        """The learning rate is selected from ``lr_candidates`` on held-out training rows."""
        return self.lr is None and self.lr_candidates is not None

    @property
    def peak_lr(self) -> float:
        """The fixed learning rate (``lr`` or the method's default); see :attr:`selects_lr`."""
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def effective_batch(self) -> int:
        """Sequences per optimizer step on one device (times the number of data-parallel devices)."""
        return self.batch_size * self.grad_accum

    def with_lr(self, lr: float, **changes: Any) -> "FinetuneConfig":
        """A copy with a fixed learning rate (no selection) and other fields changed."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(lr=float(lr), lr_candidates=None, **changes)
        return type(self)(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lr"] = None if self.selects_lr else self.peak_lr
        d["lr_candidates"] = list(self.lr_candidates) if self.lr_candidates else None
        d["lr_rule"] = LR_RULE if self.selects_lr else None
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


def parse_floats(text: str | Sequence[float] | None, what: str) -> tuple[float, ...] | None:
    """``"1e-4,2e-4"`` -> ``(1e-4, 2e-4)``; a clear error naming ``what`` otherwise."""
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        return tuple(float(x) for x in text)
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DeclensError(f"bad {what} {text!r}; write comma-separated numbers like 1e-4,2e-4,5e-4") from None


__all__ = ["DEFAULT_LR", "DEFAULT_LR_CANDIDATES", "FinetuneConfig", "LR_RULE", "METHODS", "SCHEDULES", "parse_floats"]
