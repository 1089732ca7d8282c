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


@torch.no_grad()
def paired_latency(
    first: Callable[[Any], Any], second: Callable[[Any], Any], example: Any, threads: int = 2, rounds: int = 7
) -> tuple[float, float]:
    """Median milliseconds of ``first(example)`` and ``second(example)``, timed call by call in
    turn so both see the same clock, caches and neighbours: each round times enough pairs to
    fill about 0.1 s and takes each side's median; the result is the median over ``rounds``.

    Example:
        >>> ms_int8, ms_float = paired_latency(int8_runner, float_runner, batch)  # doctest: +SKIP
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(3):
            first(example), second(example)
        start = time.perf_counter()
        for _ in range(3):
            first(example), second(example)
        pairs = max(5, min(2000, int(0.1 * 3 / max(time.perf_counter() - start, 1e-9))))
        medians: tuple[list[float], list[float]] = ([], [])
        for _ in range(rounds):
            times: tuple[list[float], list[float]] = ([], [])
            for _ in range(pairs):
                for fn, out in ((first, times[0]), (second, times[1])):
                    t = time.perf_counter()
                    fn(example)
                    out.append((time.perf_counter() - t) * 1e3)
            medians[0].append(statistics.median(times[0]))
            medians[1].append(statistics.median(times[1]))
    finally:
        torch.set_num_threads(previous)
    return statistics.median(medians[0]), statistics.median(medians[1])
