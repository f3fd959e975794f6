"""Model surgery: run a model with a subset of its decoder layers.

:func:`layer_view` is a context manager that swaps the decoder's layer list for the kept layers
(no weight is copied) and keeps everything that depends on the layer count consistent while it
is active: ``config.num_hidden_layers``, per-layer config lists such as ``config.layer_types``
(Qwen2/3, Gemma2/3 sliding-window layers) and each attention module's ``layer_idx`` (the KV
cache slot). Everything is restored on exit. :func:`remove_layers` makes the same change
permanently, for export.

Layer ids are always the dense model's original 0-based ids.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from torch import nn

from .errors import LayerSpecError
from .models import DecoderParts

#: config attribute recording, on an exported pruned model, which original layers were removed.
REMOVED_ATTR = "declens_removed_layers"
ORIGINAL_LAYERS_ATTR = "declens_original_num_layers"


def validate_removal(remove: Sequence[int], num_layers: int) -> list[int]:
    """Check layer ids to remove; return them as a list of ints (order kept).

    Raises:
        LayerSpecError: ids out of range, repeated, or removing every layer.
    """
    remove = [int(i) for i in remove]
    bad = [i for i in remove if not 0 <= i < num_layers]
    if bad:
        raise LayerSpecError(f"layer id(s) {bad} out of range: the model has {num_layers} layers, ids 0..{num_layers - 1}")
    dup = sorted({i for i in remove if remove.count(i) > 1})
    if dup:
        raise LayerSpecError(f"layer id(s) {dup} given more than once; list each layer to remove once")
    if len(set(remove)) >= num_layers:
        raise LayerSpecError(f"removing all {num_layers} layers leaves no model; keep at least one layer")
    return remove


def parse_layer_ids(text: str | Sequence[int] | None) -> list[int]:
    """Parse ``"24,23,22"`` or ``"20-23,5"`` into a list of ints (order kept)."""
    if text is None or text == "":
        return []
    if not isinstance(text, str):
        return [int(i) for i in text]
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise LayerSpecError(f"bad layer range {part!r}: the end is before the start")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise LayerSpecError(f"bad layer id {part!r} in {text!r}; write comma-separated integers like 24,23,22 or ranges like 20-23") from None
    return out


def kept_layers(num_layers: int, remove: Sequence[int]) -> list[int]:
    """The original ids that remain after removing ``remove``, in order."""
    gone = set(validate_removal(remove, num_layers))
    return [i for i in range(num_layers) if i not in gone]


def _per_layer_config_lists(config, num_layers: int) -> dict[str, list]:
    """Top-level config attributes holding one entry per layer (``layer_types`` and the like)."""
    out = {}
    for key, value in vars(config).items():
        if key.startswith("_") or isinstance(value, (str, bytes)):
            continue
        if isinstance(value, (list, tuple)) and len(value) == num_layers:
            out[key] = list(value)
    return out


def _layer_idx_modules(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def _apply(parts: DecoderParts, layers: list[nn.Module], keep_positions: list[int]) -> None:
    """Install ``layers`` (currently at positions ``keep_positions``) as the decoder's layer list."""
    config = parts.config
    n_now = len(parts.layers)
    lists = _per_layer_config_lists(config, n_now)
    setattr(parts.decoder, parts.layers_attr, nn.ModuleList(layers))
    config.num_hidden_layers = len(layers)
    for key, values in lists.items():
        setattr(config, key, type(getattr(config, key))(values[p] for p in keep_positions))
    for new_idx, layer in enumerate(layers):
        for m in _layer_idx_modules(layer):
            m.layer_idx = new_idx


@contextmanager
def layer_view(parts: DecoderParts, keep: Sequence[int]) -> Iterator[DecoderParts]:
    """Run the model with only the layers ``keep`` (positions in the current layer list).

    Nothing is copied; on exit the original layer list, config values and ``layer_idx``
    attributes are restored, also when the body raises.

    Example:
        >>> with layer_view(parts, kept_layers(parts.num_layers, [24, 23])):
        ...     logits = parts.model(input_ids).logits
    """
    keep = list(keep)
    original = parts.layers
    n = len(original)
    if not keep:
        raise LayerSpecError("a layer view needs at least one layer")
    if any(not 0 <= k < n for k in keep):
        raise LayerSpecError(f"layer ids {keep} out of range 0..{n - 1}")
    config = parts.config
    saved_lists = _per_layer_config_lists(config, n)
    saved_types = {k: type(getattr(config, k)) for k in saved_lists}
    saved_num = config.num_hidden_layers
    saved_idx = [(m, m.layer_idx) for layer in original for m in _layer_idx_modules(layer)]
    try:
        _apply(parts, [original[k] for k in keep], keep)
        yield parts
    finally:
        setattr(parts.decoder, parts.layers_attr, original)
        config.num_hidden_layers = saved_num
        for key, values in saved_lists.items():
            setattr(config, key, saved_types[key](values))
        for m, idx in saved_idx:
            m.layer_idx = idx


def remove_layers(parts: DecoderParts, remove: Sequence[int]) -> list[int]:
    """Permanently remove layers (original ids) from the model in place; return the kept ids.

    The config records the removal (``declens_removed_layers``, ``declens_original_num_layers``)
    so that a saved model reports layers in the dense numbering.
    """
    n = len(parts.layers)
    keep = kept_layers(n, remove)
    already = list(getattr(parts.config, REMOVED_ATTR, []) or [])
    original_n = getattr(parts.config, ORIGINAL_LAYERS_ATTR, None) or n
    _apply(parts, [parts.layers[k] for k in keep], keep)
    # record removals in the dense model's numbering
    dense_ids = original_layer_ids(original_n, already)
    setattr(parts.config, REMOVED_ATTR, already + [dense_ids[i] for i in remove])
    setattr(parts.config, ORIGINAL_LAYERS_ATTR, original_n)
    return keep


def dense_layer_ids(parts: DecoderParts) -> list[int]:
    """Original (dense) id of each layer currently in the model.

    For an ordinary model this is ``0..L-1``; a pruned model saved by ``declens export`` records
    its removals in its config, so its layers keep their dense ids.
    """
    removed = getattr(parts.config, REMOVED_ATTR, None) or []
    n0 = getattr(parts.config, ORIGINAL_LAYERS_ATTR, None) or parts.num_layers
    ids = original_layer_ids(n0, removed)
    return ids if len(ids) == parts.num_layers else list(range(parts.num_layers))


def keep_positions(parts: DecoderParts, remove: Sequence[int]) -> list[int]:
    """Positions (in the current layer list) of the layers kept after removing dense ids ``remove``.

    Raises:
        LayerSpecError: ids out of range, repeated, already removed, or removing every layer.
    """
    dense = dense_layer_ids(parts)
    n0 = getattr(parts.config, ORIGINAL_LAYERS_ATTR, None) or parts.num_layers
    remove = validate_removal(remove, n0)
    gone = [i for i in remove if i not in dense]
    if gone:
        raise LayerSpecError(f"layer id(s) {gone} are already removed from this model (its layers are {dense})")
    keep = [p for p, d in enumerate(dense) if d not in set(remove)]
    if not keep:
        raise LayerSpecError(f"removing {sorted(remove)} removes every remaining layer; keep at least one layer")
    return keep


def original_layer_ids(num_original: int, removed: Sequence[int]) -> list[int]:
    """Dense-model ids of the layers that remain after ``removed`` (dense ids) are gone."""
    gone = set(removed)
    return [i for i in range(num_original) if i not in gone]
