"""One trial: apply a plan to a copy of the model, recover it, and measure it for real.

Accuracy is measured on the *search split*, a seeded half of the evaluation set; the other
half (the *held-out split*) is never seen by the search and judges the delivered file. Bytes
are those of the `.tslim` file the candidate saves to; latency is measured on the configured
backend, batch size and threads.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.artifact.runtime import compile_model
from torchslim.artifact.tslim import save
from torchslim.core.data import Data, TensorBatches
from torchslim.core.plan import CompressionPlan
from torchslim.errors import DataError, TorchslimError
from torchslim.evaluate.latency import measure_latency
from torchslim.evaluate.metrics import accuracy, file_bytes, fp32_safetensors_bytes
from torchslim.search.config import LatencySetting, SearchConfig
from torchslim.search.space import apply_plan, plan_from_params

log = logging.getLogger(__name__)


def split_eval(data: Data, seed: int) -> tuple[list, list]:
    """The evaluation set cut into two seeded halves: (search split, held-out split) batches."""
    if not isinstance(data.eval, TensorBatches):
        raise DataError(
            "the search splits the evaluation set into a search half and a held-out half, which needs it in "
            "memory: pass eval=TensorBatches((inputs, labels), batch_size)"
        )
    x, y = data.eval.tensors
    rows = torch.randperm(len(y), generator=torch.Generator().manual_seed(10_000 + seed))
    half, size = len(y) // 2, data.eval.batch_size

    def batches(idx: torch.Tensor) -> list:
        idx = idx.sort().values
        return [(x[idx[i : i + size]], y[idx[i : i + size]]) for i in range(0, len(idx), size)]

    return batches(rows[:half]), batches(rows[half:])


def latency_ms(model: nn.Module, example: torch.Tensor, setting: LatencySetting) -> float:
    """Median milliseconds of one call on ``setting``'s backend, batch size and threads."""
    batch = example[: setting.batch]
    if batch.shape[0] < setting.batch:  # fewer evaluation images than the batch: repeat them
        batch = batch.repeat(-(-setting.batch // batch.shape[0]), *([1] * (batch.dim() - 1)))[: setting.batch]
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
        self.search_batches, self.holdout_batches = split_eval(self.data, self.config.seed)
        self.base_accuracy = accuracy(self.model, self.search_batches)

    @cached_property
    def base_holdout(self) -> float:
        """The uncompressed model's accuracy on the held-out split (measured once, when asked)."""
        return accuracy(self.model, self.holdout_batches)

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
        acc = accuracy(model, self.search_batches)
        with tempfile.TemporaryDirectory(prefix="torchslim-trial-") as tmp:  # the file a delivery would write
            path = save(model, Path(tmp) / "candidate.tslim", plan=done.plan.to_dict(), zoo=self.zoo)
            nbytes = file_bytes(path)
        return {
            "plan": plan.to_dict(),
            "accuracy": round(acc, 6),
            "drop": round(self.base_accuracy - acc, 6),
            "bytes": nbytes,
            "latency_ms": round(latency_ms(model, self.data.eval.tensors[0], cfg.latency), 4),
        }
