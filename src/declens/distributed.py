"""Data parallelism over ``torchrun`` ranks with PyTorch's own engine (NCCL on GPUs, gloo on CPU).

Batches are planned the same way on every rank and dealt out round-robin (the plan is sorted by
length, so every rank gets a similar share of work); each rank scores its batches, the filled rows
of the result arrays are gathered, and reductions (Block Influence sums) are all-reduced, so every
rank ends with the numbers a single process computes. Only rank 0 writes files.

Start with, e.g.::

    torchrun --nproc-per-node 2 -m declens analyze --model M --task arc_challenge
"""

from __future__ import annotations

import atexit
import os
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1); True if distributed."""
    if not dist.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        atexit.register(_leave)
    return True


def _leave() -> None:
    """At exit: wait for every rank, then leave the process group (a rank that exits while the others'
    collectives are still in flight otherwise aborts in the communication library's threads)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to wait for
            pass


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device() -> torch.device | None:
    """This rank's GPU under torchrun, else None."""
    if active() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return None


def my_batches(plan: Sequence[Sequence[int]]) -> list[int]:
    """Indices (into ``plan``) of the batches this rank runs: round-robin over the plan."""
    return list(range(rank(), len(plan), world()))


def merge_rows(arr: np.ndarray, rows: Sequence[int], axis: int = 1) -> np.ndarray:
    """Every rank filled ``arr`` along ``axis`` at its ``rows``; return the array with all ranks' rows."""
    if not active():
        return arr
    rows = np.asarray(list(rows), dtype=np.int64)
    mine = np.take(arr, rows, axis=axis)
    parts: list = [None] * world()
    dist.all_gather_object(parts, (rows, mine))
    out = arr.copy()
    for r, vals in parts:
        idx = [slice(None)] * arr.ndim
        idx[axis] = r
        out[tuple(idx)] = vals
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place on a copy placed on this rank's device for NCCL)."""
    if not active():
        return t
    dev = local_device() or torch.device("cpu")
    x = t.detach().to(dev, torch.float64).clone()
    dist.all_reduce(x)
    return x.to(t.device)


def gather_objects(obj) -> list:
    if not active():
        return [obj]
    parts: list = [None] * world()
    dist.all_gather_object(parts, obj)
    return parts
