"""Model surgery: run a model with a subset of its decoder layers.

Two kinds of layer index exist and are kept apart by type:

- :class:`DenseIds`: a layer's 0-based id in the *dense* model it comes from. A model saved by
  ``declens export`` records its removals in its config, so its layers keep their dense ids.
  Every ``remove=`` / ``--remove`` of the API and the command line means dense ids, for dense and
  already-pruned models alike.
- :class:`Positions`: indices into the model's *current* layer list (what :func:`layer_view`
  and the runner take). On a dense model the two coincide; on a pruned one they do not.

Both are immutable tuples of ints; one cannot be built from the other, and comparing them raises,
so converting needs :func:`positions_of` / :func:`dense_ids_of`.

:func:`layer_view` is a context manager that swaps the decoder's layer list for the kept layers
(no weight is copied) and keeps everything that depends on the layer count consistent while it
is active: ``config.num_hidden_layers``, per-layer config lists such as ``config.layer_types``
(Qwen2/3, Gemma2/3 sliding-window layers), each attention module's ``layer_idx`` (the KV cache
slot) and the config's record of removed dense ids. Everything is restored on exit.
:func:`remove_layers` makes the same change permanently, for export.
"""

from __future__ import annotations

import operator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from torch import nn

from .errors import DeclensError, LayerSpecError
from .models import DecoderParts

#: config attribute recording, on an exported pruned model, which dense layers were removed.
REMOVED_ATTR = "declens_removed_layers"
#: config attribute recording, on an exported pruned model, the dense model's layer count.
ORIGINAL_LAYERS_ATTR = "declens_original_num_layers"


class _LayerIndices(tuple):
    """An immutable tuple of layer indices of one kind (see the module docstring)."""

    _other: str = ""
    _converter: str = ""

    def __new__(cls, values: Iterable[int] = ()):
        if isinstance(values, _LayerIndices) and not isinstance(values, cls):
            raise TypeError(f"{type(values).__name__} are not {cls.__name__}; convert with {cls._converter}")
        try:
            items = tuple(operator.index(v) for v in values)
        except TypeError:
            raise TypeError(f"{cls.__name__} holds integers, got {values!r}") from None
        return super().__new__(cls, items)

    def _check_kind(self, other) -> None:
        if isinstance(other, _LayerIndices) and type(other) is not type(self):
            raise TypeError(f"comparing {type(self).__name__} with {type(other).__name__}; convert one with "
                            f"{self._converter}")

    def __eq__(self, other) -> bool:  # equal to a plain list/tuple of the same ints
        self._check_kind(other)
        if isinstance(other, (list, tuple)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __ne__(self, other) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = tuple.__hash__

    def __add__(self, other):
        self._check_kind(other)
        return type(self)(tuple(self) + tuple(other))

    def __getitem__(self, key):
        got = tuple.__getitem__(self, key)
        return type(self)(got) if isinstance(key, slice) else got

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)})"


class DenseIds(_LayerIndices):
    """Layer ids in the dense model's numbering (what ``--remove`` and result files use)."""

    _converter = "dense_ids_of(parts, positions)"


class Positions(_LayerIndices):
    """Indices into a model's current layer list (what :func:`layer_view` and the runner take)."""

    _converter = "positions_of(parts, dense_ids)"


def validate_removal(remove: Sequence[int], num_layers: int) -> list[int]:
    """Check layer ids to remove from a model of ``num_layers`` layers; return them as ints (order kept).

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


# ------------------------------------------------------------------------------------------------
# Dense ids <-> positions


def original_layer_ids(num_original: int, removed: Sequence[int]) -> list[int]:
    """Dense-model ids of the layers that remain after ``removed`` (dense ids) are gone."""
    gone = set(removed)
    return [i for i in range(num_original) if i not in gone]


def removed_dense_ids(parts: DecoderParts) -> DenseIds:
    """Dense ids already removed from this model (recorded in its config; empty for a dense model)."""
    return DenseIds(getattr(parts.config, REMOVED_ATTR, None) or [])


def original_num_layers(parts: DecoderParts) -> int:
    """Layer count of the dense model this model comes from (its own count unless it is pruned)."""
    return int(getattr(parts.config, ORIGINAL_LAYERS_ATTR, None) or parts.num_layers)


def dense_layer_ids(parts: DecoderParts) -> DenseIds:
    """Dense id of each layer currently in the model, in order (``[L]``).

    For an ordinary model this is ``0..L-1``; a pruned model saved by ``declens export`` (or a model
    inside a :func:`layer_view`) records its removals in its config, so its layers keep their dense ids.

    Raises:
        DeclensError: the config's removal record does not match the layer count.
    """
    removed = removed_dense_ids(parts)
    n0 = original_num_layers(parts)
    ids = original_layer_ids(n0, removed)
    if len(ids) != parts.num_layers:
        raise DeclensError(f"the model's config records {len(removed)} of {n0} layers removed ({list(removed)}) but it "
                           f"has {parts.num_layers} layers; re-export it with declens export from the dense model")
    return DenseIds(ids)


def positions_of(parts: DecoderParts, dense_ids: Sequence[int]) -> Positions:
    """Positions in the current layer list of the layers with dense ids ``dense_ids`` (order kept).

    Raises:
        LayerSpecError: an id out of the dense model's range, or one this model no longer has.
        TypeError: ``dense_ids`` is a :class:`Positions`.
    """
    dense_ids = DenseIds(dense_ids)
    present = dense_layer_ids(parts)
    n0 = original_num_layers(parts)
    bad = [i for i in dense_ids if not 0 <= i < n0]
    if bad:
        raise LayerSpecError(f"layer id(s) {bad} out of range: the dense model has {n0} layers, ids 0..{n0 - 1}")
    _refuse_removed(parts, dense_ids)
    where = {d: p for p, d in enumerate(present)}
    return Positions(where[i] for i in dense_ids)


def dense_ids_of(parts: DecoderParts, positions: Sequence[int]) -> DenseIds:
    """Dense ids of the layers at ``positions`` of the current layer list (order kept).

    Raises:
        LayerSpecError: a position out of range. TypeError: ``positions`` is a :class:`DenseIds`.
    """
    positions = Positions(positions)
    dense = dense_layer_ids(parts)
    bad = [p for p in positions if not 0 <= p < len(dense)]
    if bad:
        raise LayerSpecError(f"layer position(s) {bad} out of range 0..{len(dense) - 1}")
    return DenseIds(dense[p] for p in positions)


def ids_text(ids: Sequence[int]) -> str:
    """Sorted ids with runs shortened: ``[0, 1, 2, 3, 5, 7, 8]`` -> ``"0-3, 5, 7-8"``."""
    out: list[str] = []
    last: int | None = None
    for i in sorted(ids):
        if last is not None and i == last + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
        last = i
    return ", ".join(out)


def _refuse_removed(parts: DecoderParts, dense_ids: Sequence[int]) -> None:
    gone = removed_dense_ids(parts)
    hit = [i for i in dense_ids if i in set(gone)]
    if hit:
        raise LayerSpecError(
            f"layer id(s) {hit} are already removed from this model (it lacks dense layers {sorted(gone)}); layer ids "
            f"are dense ids, so give only ids it still has: {ids_text(dense_layer_ids(parts))}")


def check_removal(parts: DecoderParts, remove: Sequence[int]) -> DenseIds:
    """Validate dense ids to remove from this (dense or pruned) model; return them (order kept).

    Checked against the dense model's layer count and the layers this model still has.

    Raises:
        LayerSpecError: ids out of range, repeated, already removed, or removing every remaining layer.
        TypeError: ``remove`` is a :class:`Positions`.
    """
    remove = DenseIds(remove)
    n0 = original_num_layers(parts)
    gone = removed_dense_ids(parts)
    bad = [i for i in remove if not 0 <= i < n0]
    if bad:
        what = f"the dense model has {n0} layers" if gone else f"the model has {n0} layers"
        raise LayerSpecError(f"layer id(s) {bad} out of range: {what}, ids 0..{n0 - 1}")
    dup = sorted({i for i in remove if remove.count(i) > 1})
    if dup:
        raise LayerSpecError(f"layer id(s) {dup} given more than once; list each layer to remove once")
    _refuse_removed(parts, remove)
    if len(remove) >= parts.num_layers:
        left = f"all {parts.num_layers} remaining layers" if gone else f"all {n0} layers"
        raise LayerSpecError(f"removing {left} leaves no model; keep at least one layer")
    return remove


def keep_positions(parts: DecoderParts, remove: Sequence[int]) -> Positions:
    """Positions (in the current layer list) of the layers kept after removing dense ids ``remove``.

    Raises:
        LayerSpecError: see :func:`check_removal`.
    """
    gone = set(check_removal(parts, remove))
    return Positions(p for p, d in enumerate(dense_layer_ids(parts)) if d not in gone)


@dataclass(frozen=True)
class Suffix:
    """Which layers of a pruned (or merged) model must run when the dense prefix is reused.

    Every kept layer before the first removed or changed one computes exactly what the dense model
    computes, so a run can start from the dense state entering position ``start`` (the input of the
    first removed or changed layer is the input of the first kept layer after it).

    Attributes:
        keep: positions (in the current layer list) of the kept layers.
        run: positions that must run, in order: ``keep`` itself when nothing is reused, else the kept
            positions from ``start`` on (empty when only trailing layers were removed).
        start: the position whose dense input feeds ``run[0]``; None: nothing is reused (run from the
            embeddings).
    """

    keep: Positions
    run: Positions
    start: int | None

    @property
    def skipped(self) -> Positions:
        """Kept positions that need not run (their states are the dense ones)."""
        return Positions(p for p in self.keep if self.start is not None and p < self.start)

    def starting_at(self, start: int) -> "Suffix":
        """The same kept layers run from position ``start`` (a state known further in than the dense prefix)."""
        return Suffix(self.keep, Positions(p for p in self.keep if p >= start), start)


def suffix_to_run(parts: DecoderParts, remove: Sequence[int], changed: Sequence[int] = (),
                  reuse: bool = True) -> Suffix:
    """The kept positions, and those that must run from the dense prefix, after removing dense ids
    ``remove`` and changing the weights of the kept dense ids ``changed`` (e.g. a merged layer).

    ``reuse=False`` (or nothing removed or changed): every kept position runs from the embeddings.

    Raises:
        LayerSpecError: see :func:`check_removal`.
    """
    keep = keep_positions(parts, remove)
    touched = [*remove, *changed]
    if not touched or not reuse:
        return Suffix(keep, keep, None)
    dense = dense_layer_ids(parts)
    return Suffix(keep, keep, None).starting_at(min(dense.index(int(i)) for i in touched))


# ------------------------------------------------------------------------------------------------
# Views and removal


def _per_layer_config_lists(config, num_layers: int) -> dict[str, list]:
    """Top-level config attributes holding one entry per layer (``layer_types`` and the like)."""
    out = {}
    for key, value in vars(config).items():
        if key.startswith("_") or key == REMOVED_ATTR or isinstance(value, (str, bytes)):
            continue
        if isinstance(value, (list, tuple)) and len(value) == num_layers:
            out[key] = list(value)
    return out


def _layer_idx_modules(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def _apply(parts: DecoderParts, keep: Positions, order: DenseIds | None = None) -> None:
    """Keep only the layers at ``keep``: layer list, config lists, removal record and ``layer_idx``.

    ``order``: the removed dense ids in the order to record them (default: dense order).
    """
    config = parts.config
    dense = dense_layer_ids(parts)
    n0 = original_num_layers(parts)
    lists = _per_layer_config_lists(config, parts.num_layers)
    layers = [parts.layers[p] for p in keep]
    kept = {dense[p] for p in keep}
    setattr(parts.decoder, parts.layers_attr, nn.ModuleList(layers))
    config.num_hidden_layers = len(layers)
    for key, values in lists.items():
        setattr(config, key, type(getattr(config, key))(values[p] for p in keep))
    for new_idx, layer in enumerate(layers):
        for m in _layer_idx_modules(layer):
            m.layer_idx = new_idx
    # removal record in the dense numbering: earlier removals first, then these
    new = list(order) if order is not None else [d for d in dense if d not in kept]
    setattr(config, REMOVED_ATTR, [int(i) for i in (getattr(config, REMOVED_ATTR, None) or [])] + new)
    setattr(config, ORIGINAL_LAYERS_ATTR, n0)


_MISSING = object()


@contextmanager
def layer_view(parts: DecoderParts, keep: Positions) -> Iterator[DecoderParts]:
    """Run the model with only the layers at positions ``keep`` of the current layer list.

    Nothing is copied; on exit the original layer list, config values (including the removal
    record, so :func:`dense_layer_ids` is right inside the view) and ``layer_idx`` attributes are
    restored, also when the body raises.

    Args:
        keep: a :class:`Positions` (from :func:`keep_positions` or :func:`positions_of`); plain lists
            are refused so that dense ids cannot be passed by mistake.

    Example:
        >>> with layer_view(parts, keep_positions(parts, [24, 23])):
        ...     logits = parts.model(input_ids).logits
    """
    if not isinstance(keep, Positions):
        raise TypeError(f"layer_view takes Positions, not {type(keep).__name__}; build them with "
                        "keep_positions(parts, remove) or positions_of(parts, dense_ids)")
    original = parts.layers
    n = len(original)
    if not keep:
        raise LayerSpecError("a layer view needs at least one layer")
    if any(not 0 <= k < n for k in keep):
        raise LayerSpecError(f"layer positions {list(keep)} out of range 0..{n - 1}")
    config = parts.config
    saved_lists = _per_layer_config_lists(config, n)
    saved_types = {k: type(getattr(config, k)) for k in saved_lists}
    saved_num = config.num_hidden_layers
    saved_record = {a: getattr(config, a, _MISSING) for a in (REMOVED_ATTR, ORIGINAL_LAYERS_ATTR)}
    saved_idx = [(m, m.layer_idx) for layer in original for m in _layer_idx_modules(layer)]
    try:
        _apply(parts, keep)
        yield parts
    finally:
        setattr(parts.decoder, parts.layers_attr, original)
        config.num_hidden_layers = saved_num
        for key, values in saved_lists.items():
            setattr(config, key, saved_types[key](values))
        for attr, value in saved_record.items():
            if value is _MISSING:
                if attr in vars(config):
                    delattr(config, attr)
            else:
                setattr(config, attr, value)
        for m, idx in saved_idx:
            m.layer_idx = idx


def remove_layers(parts: DecoderParts, remove: Sequence[int]) -> DenseIds:
    """Permanently remove the layers with dense ids ``remove`` from the model, in place.

    Works on dense and already-pruned models alike: ids are validated against the dense model's
    layer count and the layers this model still has (:func:`check_removal`). The config records the
    whole removal in the dense numbering (``declens_removed_layers``: earlier removals + these;
    ``declens_original_num_layers``), so a saved model reports its layers by dense id.

    Returns:
        The dense ids of the layers kept, in order.

    Raises:
        LayerSpecError: see :func:`check_removal`. TypeError: ``remove`` is a :class:`Positions`.
    """
    remove = check_removal(parts, remove)
    _apply(parts, keep_positions(parts, remove), order=remove)
    return dense_layer_ids(parts)
