"""Batched forward passes through the decoder with probes on every layer.

A :class:`Probe` sees each decoder layer's input and output during a forward pass (through
forward hooks on the layers, so the captured states are the raw residual stream) and may replace
the output (noise injection). Probes compute what they need on the fly (lens scores, Block
Influence, CKA features), so full hidden states are never kept unless a probe asks for them.

Sequences are right-padded, so every real token sees exactly the positions it would see alone,
and batched by similar length under a token budget.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

from . import distributed, fastpath
from .errors import DeviceMemoryError
from .models import DecoderParts
from .surgery import Positions, dense_layer_ids, layer_view

#: Most rows in one batch (a cap on top of the token budget: very short rows would otherwise make
#: batches so wide that per-row bookkeeping on the host dominates).
MAX_BATCH_ROWS = 256
#: Default per-batch cost of the planner, as a share of the token budget: ``max_tokens // 64`` padded
#: tokens (the fixed cost of launching a batch; ``ExecutionOptions.batch_cost`` overrides it).
BATCH_COST_DIVISOR = 64
#: Padded-token budget per batch on the CPU (fixed: keeps a batch's activations cache-friendly).
CPU_MAX_TOKENS = 4096
#: Share of the free device memory that the activations of one batch may take (the rest is headroom
#: for the lens' vocabulary rows, the allocator's fragmentation and other buffers).
DEVICE_MEMORY_SHARE = 0.5
#: Activations alive inside one decoder layer, in hidden-size units per token: ~6 d-wide tensors
#: (residual, normed input, q/k/v, attention output) and ~3 intermediate-wide ones (gate, up, their product).
LAYER_WIDTHS_D, LAYER_WIDTHS_INTER = 6, 3
#: Bytes per activation value (bf16 / fp16 on the GPU).
ACTIVATION_BYTES = 2
#: Bounds of the device-sized token budget: at least this many tokens per batch ...
MIN_DEVICE_MAX_TOKENS = 1024
#: ... and at most this many (beyond it batches are large enough to keep the GPU busy).
MAX_DEVICE_MAX_TOKENS = 65536


@dataclass
class Batch:
    """A padded batch of token sequences.

    Attributes:
        input_ids: ``[B, T]`` token ids, right-padded.
        attention_mask: ``[B, T]`` 1 for real tokens, or None (right-padded causal rows need none).
        lengths: ``[B]`` real length of each row.
        index: ``[B]`` position of each row in the caller's list of sequences.
        position_ids: ``[B, T]`` explicit positions (packed rows), else None (0, 1, 2, ...).
        mask4d: ``[B, 1, T, T]`` explicit attention mask (packed rows: True = may attend), else None.
        lengths_host: ``lengths`` on the CPU.
    """

    input_ids: Tensor
    attention_mask: Tensor | None
    lengths: Tensor
    index: Tensor
    position_ids: Tensor | None = None
    mask4d: Tensor | None = None
    lengths_host: Tensor | None = None

    @property
    def host_lengths(self) -> Tensor:
        """Row lengths on the CPU (reading them there never waits for the device)."""
        return self.lengths_host if self.lengths_host is not None else self.lengths.cpu()

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


class Probe:
    """Base class: override what you need. Called inside ``torch.inference_mode`` (or grad mode for training).

    A batch that runs out of device memory stops part-way and runs again in halves (:func:`split_on_oom`):
    a probe writes its results row by row, or commits what it sums over rows in :meth:`finish`.
    """

    #: True when the probe reads only each row's last position of the final layer's output (the letter
    #: format's decision token): when every probe of a pass says so, the fast path computes only those
    #: positions at the final layer (:func:`forward`'s ``trim_final``). The default is the safe False.
    last_position_only: bool = False

    def start(self, batch: Batch) -> None:
        """Called before the forward pass of a batch."""

    def layer(self, pos: int, layer_id: int, inputs: Tensor, output: Tensor) -> Tensor | None:
        """Called after each decoder layer.

        Args:
            pos: position of the layer in the running stack (0-based).
            layer_id: the layer's original (dense-model) id.
            inputs: ``[B, T, d]`` the layer's input hidden states.
            output: ``[B, T, d]`` the layer's output hidden states.

        Returns:
            None, or a tensor that replaces the layer's output.
        """
        return None

    def finish(self, batch: Batch) -> None:
        """Called after the forward pass of a batch."""

    def flush(self) -> None:
        """Make results of finished batches visible to the host (copies may still be in flight before)."""


def flush(probes: Sequence[Probe]) -> None:
    for p in probes:
        p.flush()


@dataclass
class PackedRow:
    """Several sequences that share prefixes, packed into one row as a token tree.

    Each token attends to its ancestors and itself (a tree-shaped causal mask) and sits at
    position ``depth`` (its distance from the root), so every packed sequence computes exactly
    what it would compute alone, while shared prefixes run once.

    Attributes:
        tokens: token ids in depth-first order.
        parents: index of each token's parent in ``tokens`` (-1 for a root).
    """

    tokens: list[int]
    parents: list[int]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def positions(self) -> list[int]:
        depth: list[int] = []
        for p in self.parents:
            depth.append(0 if p < 0 else depth[p] + 1)
        return depth

    def ancestor_mask(self) -> np.ndarray:
        """``[T, T]`` True where token ``t`` (row) may attend token ``s`` (column)."""
        T = len(self.tokens)
        m = np.zeros((T, T), dtype=bool)
        for t, p in enumerate(self.parents):
            if p >= 0:
                m[t] = m[p]
            m[t, t] = True
        return m


def pack_sequences(seqs: Sequence[Sequence[int]]) -> tuple[PackedRow, list[list[int]]]:
    """Pack sequences into a prefix tree; return the row and, per sequence, the row index of each of its tokens.

    Tokens are numbered in insertion order: each sequence reuses the path of the earlier sequence it
    shares the longest prefix with (the walk down a trie of the earlier sequences) and appends its
    remaining tokens as new nodes, so the result equals inserting the sequences one by one into a trie.
    """
    tokens: list[int] = []
    parents: list[int] = []
    where: list[list[int]] = []
    arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in seqs]
    for k, a in enumerate(arrays):
        depth, src = 0, -1
        for j in range(k):  # longest common prefix with any earlier sequence
            b = arrays[j]
            n = min(len(a), len(b))
            if n <= depth:
                continue
            diff = np.flatnonzero(a[:n] != b[:n])
            common = int(diff[0]) if len(diff) else n
            if common > depth:
                depth, src = common, j
        path = where[src][:depth] if depth else []
        first = len(tokens)
        new = a[depth:].tolist()
        if new:
            tokens += new
            parents.append(path[-1] if depth else -1)
            parents += range(first, first + len(new) - 1)
        where.append(path + list(range(first, first + len(new))))
    return PackedRow(tokens, parents), where


def plan_batches(lengths: Sequence[int], max_tokens: int, max_batch: int = MAX_BATCH_ROWS,
                 batch_cost: int | None = None) -> list[list[int]]:
    """Group sequence indices into batches of similar length, wasting as little padding as possible.

    Rows are sorted longest first (an out-of-memory error shows at once) and cut into consecutive
    batches by dynamic programming that minimises padded tokens plus ``batch_cost`` tokens per batch
    (the fixed cost of a launch: it keeps batches large enough to use the device well), under at most
    ``max_batch`` rows and ``max_tokens`` padded tokens (rows x longest row) per batch. Greedy filling
    would put the long tail of lengths into one wide batch (38% padding on ARC-Challenge at 64k tokens).
    The plan is deterministic: ties keep their input order. ``batch_cost`` None:
    ``max_tokens // BATCH_COST_DIVISOR`` (pass the model's ``options.batch_cost`` to override it).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = len(order)
    if n == 0:
        return []
    L = [int(lengths[i]) for i in order]
    cost = batch_cost if batch_cost is not None else max(1, max_tokens // BATCH_COST_DIVISOR)
    best = [0.0] + [float("inf")] * n  # best[i]: cheapest plan of the first i rows
    cut = [0] * (n + 1)
    prefix = [0]
    for x in L:
        prefix.append(prefix[-1] + x)
    for j in range(n):  # a batch starting at row j (its longest row, as rows are sorted)
        if best[j] == float("inf"):
            continue
        width = max(1, min(max_batch, max_tokens // max(L[j], 1)))
        for i in range(j + 1, min(n, j + width) + 1):
            c = best[j] + (i - j) * L[j] + cost
            if c < best[i]:
                best[i], cut[i] = c, j
    bounds = []
    i = n
    while i > 0:
        bounds.append((cut[i], i))
        i = cut[i]
    return [order[a:b] for a, b in reversed(bounds)]


def collate(seqs: Sequence[Sequence[int]] | Sequence[PackedRow], index: Sequence[int], pad_id: int,
            device: torch.device) -> Batch:
    """Right-pad the sequences ``seqs[i] for i in index`` into a :class:`Batch`."""
    rows = [seqs[i] for i in index]
    if isinstance(rows[0], PackedRow):
        return _collate_packed(rows, index, pad_id, device)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1
    # No padding mask: rows are right-padded and attention is causal, so a real token never sees a
    # pad token that follows it. Without a mask SDPA takes its fastest (causal flash) path; the pad
    # positions compute harmless garbage that no probe reads.
    lengths = mask.sum(1)
    return Batch(
        input_ids=to_device(ids, device),
        attention_mask=None,
        lengths=to_device(lengths, device),
        index=torch.as_tensor(list(index), dtype=torch.long),
        lengths_host=lengths,
    )


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a CPU tensor to ``device`` without blocking the host (pinned memory on CUDA)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _collate_packed(rows: list[PackedRow], index, pad_id: int, device) -> Batch:
    T = max(len(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    mask = np.zeros((B, 1, T, T), dtype=bool)
    mask[:, 0, np.arange(T), np.arange(T)] = True  # padding attends itself only (no empty softmax rows)
    lengths = torch.zeros(B, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r)
        ids[b, :n] = torch.as_tensor(r.tokens)
        pos[b, :n] = torch.as_tensor(r.positions)
        mask[b, 0, :n, :n] = r.ancestor_mask()
        lengths[b] = n
    return Batch(input_ids=to_device(ids, device), attention_mask=None, lengths=to_device(lengths, device),
                 index=torch.as_tensor(list(index), dtype=torch.long), position_ids=to_device(pos, device),
                 mask4d=to_device(torch.from_numpy(mask), device), lengths_host=lengths)


def _first_tensor(x):
    return x[0] if isinstance(x, tuple) else x


def forward(
    parts: DecoderParts,
    batch: Batch,
    probes: Sequence[Probe] = (),
    layers: Positions | Sequence[int] | None = None,
    start_hidden: Tensor | None = None,
    grad: bool = False,
    defer: bool = False,
    trim_final: bool = True,
) -> Tensor:
    """One forward pass of the decoder stack with probes on every layer.

    Args:
        parts: the model's decoder parts.
        batch: the batch to run.
        probes: probes called on every layer, in order.
        layers: positions (in the current layer list, not dense ids: a :class:`~declens.surgery.DenseIds`
            is refused) of the layers to run (a layer view); None runs all.
        start_hidden: ``[B, T, d]`` hidden states fed to the first layer in ``layers`` instead of
            the embeddings (reuse of a cached prefix).
        grad: run with autograd (training) instead of inference mode.
        defer: leave probes' device-to-host copies in flight (the caller calls :func:`flush`); by
            default results are on the host when this returns.
        trim_final: let the fast path compute only each row's last position at the final layer when
            every probe declares :attr:`Probe.last_position_only`; False computes every position (the
            final hidden states then round exactly like a pass without that optimisation).

    Returns:
        ``[B, T, d]`` the final normalised hidden states (the LM head's input).
    """
    n = parts.num_layers
    ids = Positions(range(n) if layers is None else layers)
    dense = dense_layer_ids(parts)
    if not grad and fastpath.supported(parts, int(batch.input_ids.shape[1])):
        with torch.inference_mode():
            out = fastpath.run(parts, batch, probes, ids, dense, start_hidden, trim_final=trim_final)
        if not defer:
            flush(probes)
        return out
    view = nullcontext() if ids == list(range(n)) else layer_view(parts, ids)
    mode = torch.enable_grad() if grad else torch.inference_mode()
    with mode, view, ExitStack() as stack:
        running = parts.layers
        for p in probes:
            p.start(batch)
        if probes:
            for pos, (layer, p) in enumerate(zip(running, ids)):
                stack.enter_context(_hook(layer, pos, dense[p], probes))
        if start_hidden is not None:
            stack.enter_context(_inject(running[0], start_hidden))
        mask = batch.attention_mask if batch.mask4d is None else _mask_for(parts, batch.mask4d)
        out = parts.decoder(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                            use_cache=False)
        for p in probes:
            p.finish(batch)
    if not defer:
        flush(probes)
    return out.last_hidden_state


def _mask_for(parts: DecoderParts, mask: Tensor) -> Tensor:
    """A boolean 4D mask in the form the model's attention kernel takes (additive float for eager)."""
    impl = getattr(parts.config, "_attn_implementation", "sdpa")
    if impl in ("sdpa", None):
        return mask
    if impl == "eager":
        dtype = parts.head.weight.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(f"packed rows need sdpa or eager attention, not {impl!r}")


class _hook:
    def __init__(self, layer, pos: int, layer_id: int, probes: Sequence[Probe]):
        self.layer, self.pos, self.layer_id, self.probes = layer, pos, layer_id, probes
        self.handle = None

    def __enter__(self):
        def fn(module, args, kwargs, output):
            inputs = args[0] if args else kwargs["hidden_states"]
            out = _first_tensor(output)
            if inputs.device != out.device:  # a model sharded over devices: the layer moved its input
                inputs = inputs.to(out.device)
            replaced = False
            for p in self.probes:
                new = p.layer(self.pos, self.layer_id, inputs, out)
                if new is not None:
                    out, replaced = new, True
            if not replaced:
                return None
            return (out, *output[1:]) if isinstance(output, tuple) else out

        self.handle = self.layer.register_forward_hook(fn, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class _inject:
    def __init__(self, layer, hidden: Tensor):
        self.layer, self.hidden, self.handle = layer, hidden, None

    def __enter__(self):
        def fn(module, args, kwargs):
            if args:
                return (self.hidden, *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = self.hidden
            return args, kwargs

        self.handle = self.layer.register_forward_pre_hook(fn, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------------------------------------
# Prefix reuse: keep layer states in one pass, start a later pass from one of them
#
# A model that differs from the dense one only from layer position m on (layers removed or merged there, or
# noise added to the output of layer m - 1) computes the dense states before m, so a pass over its layers
# from m on, fed the dense input of layer m, gives its numbers exactly: the pruning engine (and merging's
# calibration rows), cka and noise keep the states with LayerStates and start from them with run_from.

#: Where :class:`LayerStates` keeps the states: ``device`` (where they were computed), ``cpu`` (copied to
#: host memory: offload) or ``auto`` (on a CUDA device with more than ``room`` bytes free, else host memory).
STATE_PLACES = ("device", "cpu", "auto")


class LayerStates(Probe):
    """Keeps the input or the output hidden states of chosen layers during each batch's pass (prefix reuse).

    Args:
        side: ``input`` (the state entering the layer: what :func:`run_from` starts the layer from) or
            ``output`` (what the layer returns, after any earlier probe's replacement).
        positions: positions in the running stack (:meth:`Probe.layer`'s ``pos``: in a pass over every
            layer, the layer's position in the model) whose states are kept; None keeps every layer's;
            empty keeps none (the probe still takes part in the pass: the final layer computes every position).
        where: one of :data:`STATE_PLACES`: ``device`` keeps a copy where the state was computed, ``cpu``
            copies it to host memory, ``auto`` does the first on a CUDA device with more than ``room``
            bytes free when the batch starts, else the second.
        room: free device memory, in bytes, that ``auto`` asks for.

    Attributes:
        states: running position -> ``[B, T, d]`` the kept state of the last batch run (a new dict at
            each batch's start, so a caller may keep each batch's dict: ``[batch][position]``).
        on_device: whether the last batch's states stay on the device.
    """

    def __init__(self, side: str = "input", positions: Sequence[int] | None = None, where: str = "device",
                 room: int = 0):
        if side not in ("input", "output"):
            raise ValueError(f"side must be 'input' or 'output', not {side!r}")
        if where not in STATE_PLACES:
            raise ValueError(f"where must be one of {STATE_PLACES}, not {where!r}")
        self.side, self.where, self.room = side, where, int(room)
        self.positions = None if positions is None else frozenset(int(p) for p in positions)
        self.states: dict[int, Tensor] = {}
        self.on_device = where == "device"

    def start(self, batch: Batch) -> None:
        self.states = {}
        if self.where == "auto":
            dev = batch.input_ids.device
            self.on_device = dev.type == "cuda" and torch.cuda.mem_get_info(dev)[0] > self.room

    def layer(self, pos: int, layer_id: int, inputs: Tensor, output: Tensor) -> Tensor | None:
        if self.positions is None or pos in self.positions:
            h = inputs if self.side == "input" else output
            self.states[pos] = h.clone() if self.on_device else h.to("cpu", copy=True)
        return None

    def clear(self) -> None:
        """Drop the kept states (frees their memory)."""
        self.states = {}


def run_from(parts: DecoderParts, batch: Batch, probes: Sequence[Probe], start: Tensor | None,
             layers: Sequence[int], *, defer: bool = False, trim_final: bool = True) -> Tensor:
    """Run the layers at positions ``layers`` over ``batch``, the first of them fed ``start`` (prefix reuse).

    Args:
        parts, batch, probes: as in :func:`forward` (probes see running positions ``0 .. len(layers) - 1``).
        start: ``[B, T, d]`` the input of the layer at ``layers[0]`` (e.g. a state kept by
            :class:`LayerStates`; moved to the batch's device if it lies elsewhere), or None: the embeddings.
        layers: positions (in the current layer list) of the layers to run, in order.
        defer, trim_final: as in :func:`forward`.

    Returns:
        ``[B, T, d]`` the final normalised hidden states (the LM head's input).
    """
    if start is not None and start.device != batch.input_ids.device:
        start = start.to(batch.input_ids.device)
    return forward(parts, batch, probes, layers=layers, start_hidden=start, defer=defer, trim_final=trim_final)


def default_max_tokens(parts: DecoderParts) -> int:
    """A padded-token budget per batch that fits the device.

    On CUDA it is sized from free memory (activations of one layer plus the lens' vocabulary
    rows dominate); on CPU a fixed :data:`CPU_MAX_TOKENS` keeps batches cache-friendly.
    """
    dev = parts.head.weight.device
    if dev.type != "cuda":
        return CPU_MAX_TOKENS
    free, _ = torch.cuda.mem_get_info(dev)
    cfg = parts.config
    d = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", 4 * d)
    bytes_per_token = ACTIVATION_BYTES * (LAYER_WIDTHS_D * d + LAYER_WIDTHS_INTER * inter)
    budget = int(DEVICE_MEMORY_SHARE * free / max(bytes_per_token, 1))
    return max(MIN_DEVICE_MAX_TOKENS, min(budget, MAX_DEVICE_MAX_TOKENS))


@dataclass(frozen=True)
class BatchHooks:
    """Per-batch callbacks of :func:`run_batches`.

    Attributes:
        skip: predicate on a batch's indices: True skips the batch (already done: resume).
        after: called as ``after(indices, sync)`` once a batch has been launched (checkpointing). The
            batch's results may still be in flight on the device: ``sync()`` makes the results of every
            launched batch visible to the host, so call it before reading them (before saving a
            checkpoint). Not syncing per batch lets the host plan and collate the next batch while the
            device computes this one.
    """

    skip: Callable[[list[int]], bool] | None = None
    after: Callable[[list[int], Callable[[], None]], None] | None = None


def run_batches(
    parts: DecoderParts,
    seqs: Sequence[Sequence[int]],
    make_probes: Callable[[], Sequence[Probe]] | Sequence[Probe],
    pad_id: int,
    max_tokens: int | None = None,
    max_batch: int = MAX_BATCH_ROWS,
    layers: Sequence[int] | None = None,
    progress: str | None = None,
    hooks: BatchHooks | None = None,
    plan: list[list[int]] | None = None,
) -> list[list[int]]:
    """Run all sequences through the model in length-sorted batches with the given probes.

    On CUDA out-of-memory a batch is split in halves and retried (:func:`split_on_oom`: the
    out-of-memory policy).

    Args:
        seqs: token id lists.
        make_probes: the probes (or a factory returning them).
        pad_id: padding token id.
        max_tokens: padded-token budget per batch (default: :func:`default_max_tokens`).
        layers: positions of the layers to run (None: all).
        progress: progress-bar label (None: no bar).
        hooks: per-batch callbacks (resume and checkpointing, see :class:`BatchHooks`).
        plan: a precomputed batch plan (lists of indices) to follow instead of planning here.

    Under ``torchrun`` each rank runs its share of the batches (see :mod:`declens.distributed`);
    the caller merges the results.

    Returns:
        The batch plan that was used.
    """
    from tqdm.auto import tqdm

    device = parts.head.weight.device
    probes = make_probes() if callable(make_probes) else make_probes
    lengths = [len(s) for s in seqs]
    if plan is None:
        plan = plan_batches(lengths, max_tokens or default_max_tokens(parts), max_batch,
                            batch_cost=parts.options.batch_cost)
    todo = [plan[j] for j in distributed.my_batches(plan)]  # all of them in a single process
    hooks = hooks or BatchHooks()
    todo = [b for b in todo if not (hooks.skip and hooks.skip(b))]
    bar = tqdm(total=sum(len(b) for b in todo), desc=progress, unit="seq", disable=progress is None, leave=False)
    try:
        for idx in todo:
            split_on_oom(lambda rows: forward(parts, collate(seqs, rows, pad_id, device), probes, layers=layers,
                                              defer=True), idx, lengths)
            bar.update(len(idx))
            if hooks.after:
                hooks.after(idx, lambda: flush(probes))
    finally:
        bar.close()
    flush(probes)
    return plan


# ------------------------------------------------------------------------------------------------
# Out of memory: one policy for every batch loop that runs inference (docs/ARCHITECTURE.md, "Out of memory")
#
# On CUDA out-of-memory the device's cache is freed and the batch is split in halves, recursively down to
# one row (split_on_oom); a loop that keeps state per planned batch, or folds a batch's results while it
# runs, re-plans the whole pass with half the budget instead (replan_on_oom). A row that does not fit
# alone raises a one-line DeviceMemoryError. Either way the numbers are those of the smaller batches.

#: An out-of-memory back-off divides the batch (split) or the padded-token budget (re-plan) by this.
OOM_BACKOFF = 2


def free_device_memory() -> None:
    """Return the CUDA caching allocator's unused blocks to the device (a no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


T = TypeVar("T")


def _one_row_message(size: str) -> str:
    return (f"a batch of one row ({size}) does not fit in the device's free memory: spread the model over more "
            "GPUs with --device-map auto, or shorten the rows (fewer --num-fewshot); --max-tokens cannot split a row")


def split_on_oom(run: Callable[[list[int]], None], index: Sequence[int], lengths: Sequence[int] | None = None) -> None:
    """Run one batch, ``run(index)``, under the out-of-memory policy of loops without per-batch state.

    On CUDA out-of-memory the device cache is freed and the two halves of ``index`` run instead (in
    order, each again under this policy), down to batches of one row. ``run`` must leave a batch's results
    either row by row (the halves overwrite what a failed run wrote) or commit them when the batch has
    finished (a failed run commits nothing: :class:`Probe` s commit in :meth:`Probe.finish`), so the
    results are what the halves compute alone. Local to the process: under ``torchrun`` each rank splits
    its own batches (rows keep their plan order, so what is gathered by row is unchanged).

    Args:
        run: runs the rows ``index`` (indices into the caller's rows) as one batch.
        index: ``[B]`` the rows of the batch.
        lengths: ``[N]`` token count of each of the caller's rows (named in the error message), or None.

    Raises:
        DeviceMemoryError: a batch of one row does not fit.
    """
    index = list(index)
    try:
        run(index)
        return
    except torch.OutOfMemoryError:
        pass  # retried outside the handler: its traceback holds the failed pass's tensors
    if len(index) == 1:
        size = f"row {index[0]}" + ("" if lengths is None else f": {int(lengths[index[0]])} tokens")
        raise DeviceMemoryError(_one_row_message(size))
    free_device_memory()
    half = math.ceil(len(index) / OOM_BACKOFF)
    split_on_oom(run, index[:half], lengths)
    split_on_oom(run, index[half:], lengths)


def replan_on_oom(run: Callable[[int], T], max_tokens: int,
                  lengths: Sequence[int] | Callable[[], Sequence[int]]) -> T:
    """Run a whole pass, ``run(budget)``, under the out-of-memory policy of loops with per-batch state.

    For loops whose batches leave state that a split would change: prefix states kept per planned batch
    (the pruning engine), statistics folded batch by batch in plan order and checkpoints counted in
    batches (the noise study). On CUDA out-of-memory the device cache is freed and ``run`` starts again
    from nothing with half the padded-token budget (so the numbers are those of a run planned with that
    budget), until the budget is so small that every batch holds one row (:func:`plan_batches` batches
    two rows only under a budget of at least twice the shortest row).

    Args:
        run: runs the pass planned with the given budget and returns its result; it must drop whatever a
            failed call left behind.
        max_tokens: the first budget (padded tokens per batch).
        lengths: ``[N]`` token count of each row (or a function giving them, called only on out-of-memory).

    Returns:
        What the first call of ``run`` that fits returns.

    Raises:
        DeviceMemoryError: every batch already held one row; or under ``torchrun``, where one rank cannot
            re-plan alone (the ranks share one plan), with the budget to rerun with.
    """
    budget = int(max_tokens)
    while True:
        try:
            return run(budget)
        except torch.OutOfMemoryError:
            pass  # retried outside the handler: its traceback holds the failed pass's tensors
        if distributed.active():
            raise DeviceMemoryError(f"out of device memory at --max-tokens {budget} under torchrun, where a rank "
                                    f"cannot re-plan alone: rerun with --max-tokens {budget // OOM_BACKOFF}")
        rows = list(lengths() if callable(lengths) else lengths)
        if budget < OOM_BACKOFF * max(1, min(rows, default=0)):  # every batch held one row already
            raise DeviceMemoryError(_one_row_message(f"the longest has {max(rows, default=0)} tokens"))
        free_device_memory()
        budget //= OOM_BACKOFF
