"""Execution options: how the model is run, never what is computed (up to rounding).

:class:`ExecutionOptions` holds every switch of the execution layer. It travels with the model
(``LoadedModel.options``, stored on its :class:`~declens.models.DecoderParts`), is set by the command
line (``--fastpath``, ``--batch-cost``, ``--checkpoint-every``, ``--fused-lse``, declared once in
:mod:`declens.cli`) or by :func:`declens.models.load_model`, and is recorded in every result's
provenance (``provenance.execution``), since the lean decoder loop and the fused log-normaliser
round differently from transformers' own layers and plain float32 reductions.

The environment variables of earlier versions (``DECLENS_FASTPATH``, ``DECLENS_BATCH_COST``,
``DECLENS_CHECKPOINT_EVERY``, ``DECLENS_FUSED_LSE``) are a deprecated fallback, read once, when the
model loads (:meth:`ExecutionOptions.from_environment`), never in the hot paths; an explicit option wins.
The padded-token budget per batch (``--max-tokens``) stays an argument of each analysis, which records
it in its own ``config``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import DeclensError

#: the lean decoder loop (:mod:`declens.fastpath`): ``auto`` where it applies, ``off`` never (transformers'
#: own layers through hooks), ``compile`` where it applies, with the layer function ``torch.compile``-d
FASTPATH_MODES = ("auto", "off", "compile")
#: the compiled log-normaliser (:mod:`declens.kernels`): ``auto`` on CUDA and large CPU vocabularies
FUSED_LSE_MODES = ("auto", "on", "off")
#: deprecated environment variables, read once at load time, by field
ENVIRONMENT = {"fastpath": "DECLENS_FASTPATH", "batch_cost": "DECLENS_BATCH_COST",
               "checkpoint_every": "DECLENS_CHECKPOINT_EVERY", "fused_lse": "DECLENS_FUSED_LSE"}


class ExecutionOptionError(DeclensError):
    """An execution option with a value it cannot take."""


@dataclass(frozen=True)
class ExecutionOptions:
    """The execution layer's switches (see the module docstring).

    Attributes:
        fastpath: ``auto`` (default), ``off`` or ``compile`` (see :data:`FASTPATH_MODES`).
        batch_cost: tokens charged per batch by the batch planner (:func:`declens.runner.plan_batches`);
            None: ``max_tokens // BATCH_COST_DIVISOR``.
        checkpoint_every: seconds between checkpoint writes of partial scores; None: the default
            :data:`declens.scoring.CHECKPOINT_EVERY_S`.
        fused_lse: ``auto`` (default), ``on`` or ``off``: the compiled log-normaliser of the cloze lens.
    """

    fastpath: str = "auto"
    batch_cost: int | None = None
    checkpoint_every: float | None = None
    fused_lse: str = "auto"

    def __post_init__(self) -> None:
        if self.fastpath not in FASTPATH_MODES:
            raise ExecutionOptionError(f"--fastpath {self.fastpath!r} is not a mode; use one of {', '.join(FASTPATH_MODES)}")
        if self.fused_lse not in FUSED_LSE_MODES:
            raise ExecutionOptionError(f"--fused-lse {self.fused_lse!r} is not a mode; use one of {', '.join(FUSED_LSE_MODES)}")
        if self.batch_cost is not None and (int(self.batch_cost) != self.batch_cost or self.batch_cost < 1):
            raise ExecutionOptionError(f"--batch-cost must be a whole number of tokens >= 1, got {self.batch_cost}")
        if self.checkpoint_every is not None and not self.checkpoint_every >= 0:
            raise ExecutionOptionError(f"--checkpoint-every must be >= 0 seconds, got {self.checkpoint_every}")

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-ready values (what results record)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExecutionOptions":
        """Options from :meth:`to_dict` output (unknown keys are refused)."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ExecutionOptionError(f"unknown execution option(s) {bad}; known: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_environment(cls, **explicit: Any) -> "ExecutionOptions":
        """Options from ``explicit`` values, the deprecated environment variables for the rest, else defaults.

        Called once, when a model loads; ``explicit`` values that are None count as not given.
        """
        values: dict[str, Any] = {}
        for name, var in ENVIRONMENT.items():
            if explicit.get(name) is not None:
                values[name] = explicit[name]
                continue
            raw = os.environ.get(var)
            if raw is None or raw.strip() == "":
                continue
            warnings.warn(f"{var} is deprecated; use the --{name.replace('_', '-')} option (or ExecutionOptions)",
                          DeprecationWarning, stacklevel=2)
            values[name] = _parse(name, var, raw.strip())
        return cls(**values)


def _parse(name: str, var: str, raw: str) -> Any:
    """An environment variable's text as the value of field ``name`` (``DECLENS_FASTPATH=on`` meant ``auto``)."""
    try:
        if name == "fastpath":
            return "auto" if raw.lower() == "on" else raw.lower()
        if name == "fused_lse":
            return raw.lower()
        if name == "batch_cost":
            return int(raw) or None  # 0 meant "the default"
        return float(raw)
    except ValueError:
        raise ExecutionOptionError(f"{var}={raw!r} is not a number; unset it or use --{name.replace('_', '-')}") from None
