"""Data-parallel training across processes: ``torchrun`` (or ``torchslim compress --nproc N``).

Every process runs the same program on the same data. :func:`~torchslim.train.fit.fit` gives
each rank a contiguous slice of every global batch, weights its loss by its share of the rows,
and averages the gradients over the ranks (one all-reduce of all of them per step) before the
optimiser steps, so each step is the step one process takes on the whole batch, up to the order
of float sums: the semantics of ``DistributedDataParallel`` at the same global batch, for any
objective (distillation projections included) and whatever masks or parametrizations the model
carries. Buffers (BatchNorm statistics) follow rank 0's at the end of training. Rank 0 alone
writes files and prints; the others wait for it.

The process group is joined from the environment ``torchrun`` sets (:func:`init_from_env`):
gloo on CPU, NCCL when the model trains on CUDA. Without one, everything here is a no-op for a
single process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from torchslim.core.data import batch_rows

TIMEOUT_S = float(os.environ.get("TORCHSLIM_DIST_TIMEOUT_S", "600"))
"""How long a rank waits for the others at a collective before failing (a dead rank)."""


def _dist():
    import torch.distributed as dist

    return dist


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment);
    True when this process is one of several. gloo on CPU, NCCL where CUDA is present."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist = _dist()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))
    return True


def world() -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` outside a process group."""
    if not torch.distributed.is_available():
        return 0, 1
    dist = _dist()
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def local_processes() -> int:
    """Processes of this run on this machine (``LOCAL_WORLD_SIZE``, set by torchrun; else 1)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that writes files and prints."""
    return world()[0] == 0


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if world()[1] > 1:
        _dist().barrier()


def shard(batch: Any, rank: int, size: int) -> tuple[Any, float]:
    """This rank's contiguous slice of a global ``batch`` (every tensor whose first dimension is
    the batch's rows is sliced; nested tuples, lists and dicts are walked) and the weight of its
    loss, ``rows here * size / rows``, that makes the averaged gradient the whole batch's. A
    batch with fewer rows than ranks leaves some ranks none: they run the whole batch at weight
    0, so every rank still takes part in each step."""
    rows = batch_rows(batch)
    start, end = rank * rows // size, (rank + 1) * rows // size
    if end == start:
        return batch, 0.0
    return _rows(batch, start, end, rows), (end - start) * size / rows


def _rows(obj: Any, start: int, end: int, rows: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[start:end] if obj.dim() and obj.shape[0] == rows else obj
    if isinstance(obj, Mapping):
        return {k: _rows(v, start, end, rows) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        items = [_rows(v, start, end, rows) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ranks in place (one flat all-reduce). A
    parameter that got a gradient on some rank gets one on all (zeros where it had none)."""
    size = world()[1]
    if size == 1 or not params:
        return
    dist = _dist()
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not live:
        return
    flat = torch.cat([p.grad.reshape(-1).float() for p in live])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for p in live:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def broadcast_(tensors: Iterable[torch.Tensor]) -> None:
    """Give every rank rank 0's values of ``tensors`` (parameters at the start, buffers at the end)."""
    if world()[1] == 1:
        return
    dist = _dist()
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def mean_over_ranks(value: float) -> float:
    """``value`` averaged over the ranks (itself in a single process)."""
    size = world()[1]
    if size == 1:
        return value
    dist = _dist()
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t) / size
