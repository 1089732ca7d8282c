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
    first: Callable[[Any], Any],
    second: Callable[[Any], Any],
    example: Any,
    threads: int = 2,
    rounds: int = 7,
    block_s: float = 0.05,
) -> tuple[float, float]:
    """Milliseconds of ``first(example)`` and ``second(example)``, timed in alternating blocks.

    Each round times a block of calls of one (about ``block_s`` seconds), then of the other,
    the order swapped every round. ``first``'s figure is the median of its block medians;
    ``second``'s is that times the median, over rounds, of the ratio of the two blocks of a
    round, so a slow spell of the machine (they last seconds on a shared host) moves both
    sides alike instead of deciding the comparison.

    Each block starts after a short pause and a few untimed calls. A runtime's worker threads
    keep spinning for a while after a call (ONNX Runtime's by default, OpenMP's in PyTorch): timed
    call by call in turn, two models on two thread pools would take each other's cores on a
    small machine (on 2 cores, ONNX Runtime paired with itself ran 1.4-2.5x slower than alone).

    Example:
        >>> ms_int8, ms_float = paired_latency(int8_runner, float_runner, batch)  # doctest: +SKIP
    """
    sides = (first, second)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _run_for(first, example, _WARM_S), _run_for(second, example, _WARM_S)
        start = time.perf_counter()
        for _ in range(3):
            first(example), second(example)
        calls = max(5, min(2000, int(block_s * 6 / max(time.perf_counter() - start, 1e-9))))
        firsts, ratios = [], []
        for r in range(rounds):
            ms = [0.0, 0.0]
            for side in (0, 1) if r % 2 == 0 else (1, 0):
                ms[side] = _block(sides[side], example, calls)
            firsts.append(ms[0])
            ratios.append(ms[1] / ms[0])
    finally:
        torch.set_num_threads(previous)
    first_ms = statistics.median(firsts)
    return first_ms, first_ms * statistics.median(ratios)


_WARM_S = 0.1  # untimed calls of each side before the first round
_PAUSE_S = 0.03  # lets the other side's spinning threads go idle
_LEAD_S = 0.02  # untimed calls that wake this side's threads


def _run_for(fn: Callable[[Any], Any], example: Any, seconds: float) -> None:
    """Call ``fn(example)`` at least once, and until ``seconds`` have passed."""
    start = time.perf_counter()
    fn(example)
    while time.perf_counter() - start < seconds:
        fn(example)


def _block(fn: Callable[[Any], Any], example: Any, calls: int) -> float:
    """Median ms of ``calls`` timed calls, after a pause and an untimed lead-in."""
    time.sleep(_PAUSE_S)
    _run_for(fn, example, _LEAD_S)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn(example)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)
