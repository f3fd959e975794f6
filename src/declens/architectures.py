"""Architectures declared explicitly: one adapter per model family, keyed by ``config.model_type``.

The lens reads a layer's hidden state through the model's own final norm, LM head and output
transform (logit scaling, final-logit soft-capping). Which modules those are, and what the output
layer does to the head's product, differs by family and cannot be guessed from attribute names
safely: a family whose output layer rescales its logits (Cohere multiplies by ``logit_scale``,
Granite divides by ``logits_scaling``) would otherwise get lens logits that differ from the model's
own, and silently wrong letter and cloze scores. So each supported family is declared here, and a
model of any other ``model_type`` is refused with a message naming the supported ones.

Embedding scaling (Gemma's ``sqrt(hidden_size)``, Granite's ``embedding_multiplier``) and
in-layer multipliers (Granite's ``residual_multiplier``) happen inside the decoder's own forward,
which declens always runs, so adapters need not declare them; the lean decoder loop of
:mod:`declens.fastpath` is limited to families without them.

Adding a family (after checking in transformers' ``modeling_<family>.py`` what its ``*ForCausalLM``
does after the LM head)::

    from declens.architectures import ArchitectureAdapter, register_architecture
    register_architecture(ArchitectureAdapter("olmo2"))  # Llama layout, plain logits

:func:`declens.models.load_model` then checks on a few tokens that the lens at the last layer
reproduces the model's own logits (:func:`declens.models.check_lens`), and refuses the model if not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

from torch import nn

from .errors import ModelError
from .kernels import LogitTransform


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where a family's lens parts are and what its output layer does to logits.

    Attributes:
        model_type: transformers' ``config.model_type`` of the family (the registry key).
        decoder: dotted path from the ``*ForCausalLM`` module to its base model (embeddings ->
            layers -> final norm).
        layers: attribute of the base model holding the decoder layer ``nn.ModuleList``.
        norm: attribute of the base model holding the final norm.
        head: dotted path from the ``*ForCausalLM`` module to the LM head (``nn.Linear``, ``[V, d]``).
        softcap_attr: config attribute with the final-logit soft-capping value (``tanh(z / c) * c``;
            None or 0 in the config: none), or None for a family without soft-capping.
        logit_scale_attr: config attribute the logits are multiplied by (Cohere), or None.
        logit_divisor_attr: config attribute the logits are divided by (Granite), or None.
    """

    model_type: str
    decoder: str = "model"
    layers: str = "layers"
    norm: str = "norm"
    head: str = "lm_head"
    softcap_attr: str | None = None
    logit_scale_attr: str | None = None
    logit_divisor_attr: str | None = None

    def logit_transform(self, config) -> LogitTransform:
        """The output transform of a model of this family with ``config``.

        Raises:
            ModelError: a declared config attribute is missing, or a scale that is zero or not finite.
        """
        scale = 1.0
        if self.logit_scale_attr:
            scale *= self._config_number(config, self.logit_scale_attr)
        if self.logit_divisor_attr:
            scale /= self._config_number(config, self.logit_divisor_attr)
        cap = getattr(config, self.softcap_attr, None) if self.softcap_attr else None
        return LogitTransform(scale=scale, cap=float(cap) if cap else None)

    def _config_number(self, config, attr: str) -> float:
        value = getattr(config, attr, None)
        try:
            x = float(value)
        except (TypeError, ValueError):
            x = float("nan")
        if not x == x or x in (0.0, float("inf"), float("-inf")):  # NaN, zero or infinite
            raise ModelError(f"the {self.model_type} model's config has {attr}={value!r}; the {self.model_type} "
                             f"adapter needs a finite non-zero number there; fix the model's config.json")
        return x


#: The supported families (all laid out like transformers' Llama: ``model.layers``, ``model.norm``,
#: ``lm_head``). Each is tested on a tiny random config (tests/test_architectures.py).
ARCHITECTURES: dict[str, ArchitectureAdapter] = {a.model_type: a for a in (
    ArchitectureAdapter("llama"),
    ArchitectureAdapter("mistral"),
    ArchitectureAdapter("qwen2"),
    ArchitectureAdapter("qwen3"),
    ArchitectureAdapter("phi3"),
    ArchitectureAdapter("gemma"),
    ArchitectureAdapter("gemma2", softcap_attr="final_logit_softcapping"),
    ArchitectureAdapter("gemma3_text", softcap_attr="final_logit_softcapping"),
    ArchitectureAdapter("cohere", logit_scale_attr="logit_scale"),
    ArchitectureAdapter("granite", logit_divisor_attr="logits_scaling"),
)}


def register_architecture(adapter: ArchitectureAdapter, replace: bool = False) -> ArchitectureAdapter:
    """Declare a family (see the module docstring). Returns ``adapter``.

    Raises:
        ModelError: ``adapter.model_type`` is already declared and ``replace`` is False.
    """
    if adapter.model_type in ARCHITECTURES and not replace:
        raise ModelError(f"an adapter for model_type {adapter.model_type!r} is already registered; "
                         "pass replace=True to override it")
    ARCHITECTURES[adapter.model_type] = adapter
    return adapter


def adapter_for(model_type: str | None) -> ArchitectureAdapter:
    """The registered adapter of ``model_type``.

    Raises:
        ModelError: no adapter is registered for it (names the supported families and how to add one).
    """
    adapter = ARCHITECTURES.get(model_type or "")
    if adapter is None:
        raise ModelError(
            f"model_type {model_type!r} has no declens architecture adapter, so its lens logits cannot be trusted; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}. Load the text-only *ForCausalLM of a supported family, "
            "or declare this one with declens.architectures.register_architecture(ArchitectureAdapter(...)) "
            "(see that module's docstring)")
    return adapter


def resolve_module(root: nn.Module, path: str) -> nn.Module | None:
    """``root.a.b`` for ``path="a.b"`` (None when an attribute is missing or not a module)."""
    try:
        got = reduce(getattr, path.split("."), root) if path else root
    except AttributeError:
        return None
    return got if isinstance(got, nn.Module) else None
