"""Latency with warm-up and medians, at a stated batch size and thread count."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from torchslim.core.data import batch_rows
from torchslim.core.task import call_model


@dataclass(frozen=True)
class Latency:
    """Median and spread of one forward pass. Times in milliseconds."""

    batch: int
    threads: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    backend: str = "eager"

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def measure_latency(
    model: nn.Module | Callable[[Any], Any],
    example: Any,
    threads: int = 2,
    warmup: int = 10,
    repeats: int = 50,
) -> Latency:
    """Time ``model(example)`` after ``warmup`` calls; report the median of ``repeats`` calls.
    ``example`` is a tensor, or for a module a tuple of positional or a dict of keyword inputs.

    Example:
        >>> lat = measure_latency(model, torch.zeros(64, 1, 28, 28))  # doctest: +SKIP
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if isinstance(model, nn.Module):
            model.eval()
            model = partial(call_model, model)
        for _ in range(warmup):
            model(example)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(example)
            times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous)
    deciles = statistics.quantiles(times, n=10)
    return Latency(batch_rows(example), threads, statistics.median(times), deciles[0], deciles[-1], repeats)
