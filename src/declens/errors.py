"""Exceptions raised for bad input.

Every user-facing error is a :class:`DeclensError` whose message names the problem and
the fix; the CLI prints the message without a traceback and exits with status 2.
"""

from __future__ import annotations


class DeclensError(Exception):
    """Base class of every error caused by the user's input or environment."""


class ModelError(DeclensError):
    """A model cannot be found, fetched, loaded or handled."""


class TaskError(DeclensError):
    """A task, its data file, one of its rows or a selection is invalid."""


class TokenizationError(DeclensError):
    """Prompts or option labels do not tokenize the way a format needs."""


class LayerSpecError(DeclensError):
    """Requested layer ids are out of range, repeated, or remove every layer."""


class CKAError(DeclensError):
    """Representations that CKA cannot compare (shapes, non-finite values) or a bad CKA request."""


class NoiseSpecError(DeclensError):
    """A bad noise study request: negative or non-finite scales, repeats below 1, and the like."""


class DeviceMemoryError(DeclensError):
    """The device ran out of memory where the out-of-memory policy cannot back off any further
    (a batch of one row; a re-plan under ``torchrun``), see :mod:`declens.runner`."""
