"""One trial: apply a plan to a copy of the model, recover it, and measure it for real.

The task's metric (accuracy for classification; in the records it keeps the key ``accuracy``)
is measured on the *search split*, a seeded half of the evaluation set; the other half (the
*held-out split*) is never seen by the search and judges the delivered file. A trial's ``drop``
is the quality it lost in the metric's own direction (a rise, for perplexity or MSE). Bytes are
those of the `.tslim` file the candidate saves to; latency is measured on the configured
backend, batch size and threads.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.artifact.runtime import compile_model, timeable
from torchslim.artifact.tslim import save
from torchslim.core.data import Data, TensorBatches, take_rows
from torchslim.core.plan import CompressionPlan
from torchslim.errors import TorchslimError
from torchslim.evaluate.latency import measure_latency
from torchslim.evaluate.metrics import evaluate, file_bytes, fp32_safetensors_bytes
from torchslim.search.config import LatencySetting, SearchConfig
from torchslim.search.space import apply_plan, plan_from_params

log = logging.getLogger(__name__)


def split_eval(data: Data, seed: int) -> tuple[Iterable, Iterable]:
    """The evaluation set cut into two seeded halves: (search split, held-out split).

    An in-memory set (:class:`TensorBatches`) is split by rows, drawn at random with the seed;
    any other loader by batches, alternately (the seed picks which half starts), so nothing is
    read into memory. Each half can be iterated again and again."""
    if not isinstance(data.eval, TensorBatches):
        first = seed % 2
        return _Alternate(data.eval, first), _Alternate(data.eval, 1 - first)
    tensors = data.eval.tensors
    rows = torch.randperm(data.eval.rows, generator=torch.Generator().manual_seed(10_000 + seed))
    half, size = data.eval.rows // 2, data.eval.batch_size

    def batches(idx: torch.Tensor) -> list:
        idx = idx.sort().values
        return [tuple(t[idx[i : i + size]] for t in tensors) for i in range(0, len(idx), size)]

    return batches(rows[:half]), batches(rows[half:])


class _Alternate:
    """Every other batch of a loader, starting with batch ``first`` (0 or 1); re-iterable."""

    def __init__(self, source: Iterable, first: int) -> None:
        self.source, self.first = source, first

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.source), self.first, None, 2)


def latency_ms(model: nn.Module, example: Any, setting: LatencySetting) -> float | None:
    """Median milliseconds of one call on ``setting``'s backend, batch size and threads; ``None``
    when the backend cannot take the model's input (see :func:`timeable`)."""
    if not timeable(example, setting.backend):
        return None
    batch = take_rows(example, setting.batch, cycle=True)  # fewer evaluation samples than the batch: repeated
    previous = torch.get_num_threads()
    try:
        runner = compile_model(model, setting.backend, batch, setting.threads)
        return measure_latency(runner, batch, setting.threads, setting.warmup, setting.repeats).median_ms
    finally:
        torch.set_num_threads(previous)


@dataclass
class Evaluator:
    """Runs trials: everything a worker needs, built once per process."""

    model: nn.Module
    data: Data
    config: SearchConfig
    zoo: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        self.model.eval()
        self.task = self.data.task
        self.search_batches, self.holdout_batches = split_eval(self.data, self.config.seed)
        self.base_accuracy = self.score(self.model, self.search_batches)
        self.example = self.data.example_input(max(self.config.latency.batch, 1))

    def score(self, model: nn.Module, batches: Iterable) -> float:
        """The task's metric of ``model`` on ``batches`` (accuracy for classification)."""
        return evaluate(model, batches, self.task)

    def drop(self, before: float, after: float) -> float:
        """The quality lost from ``before`` to ``after`` in the metric's own direction."""
        return self.task.metric.drop(before, after)

    @cached_property
    def base_holdout(self) -> float:
        """The uncompressed model's metric on the held-out split (measured once, when asked)."""
        return self.score(self.model, self.holdout_batches)

    @cached_property
    def base_bytes(self) -> int:
        """Bytes of the uncompressed model as fp32 safetensors."""
        return fp32_safetensors_bytes(self.model)

    def __call__(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Metrics of the plan ``params`` describe, or ``{"error": ...}`` when it cannot be built."""
        start = time.perf_counter()
        plan = plan_from_params(params)
        try:
            return self.measure(plan) | {"seconds": round(time.perf_counter() - start, 3)}
        except TorchslimError as exc:  # e.g. a group that cannot lose that many channels
            log.warning("trial failed: %s", exc)
            return {"error": f"{type(exc).__name__}: {exc}", "seconds": round(time.perf_counter() - start, 3)}

    def measure(self, plan: CompressionPlan) -> dict[str, Any]:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        done = apply_plan(self.model, plan, self.data, cfg.recovery, cfg.space, cfg.seed)
        model = done.model
        acc = self.score(model, self.search_batches)
        with tempfile.TemporaryDirectory(prefix="torchslim-trial-") as tmp:  # the file a delivery would write
            path = save(model, Path(tmp) / "candidate.tslim", plan=done.plan.to_dict(), zoo=self.zoo)
            nbytes = file_bytes(path)
        ms = latency_ms(model, self.example, cfg.latency)
        return {
            "plan": plan.to_dict(),
            "accuracy": round(acc, 6),
            "drop": round(self.drop(self.base_accuracy, acc), 6),
            "bytes": nbytes,
            "latency_ms": None if ms is None else round(ms, 4),
        }
