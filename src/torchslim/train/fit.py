"""One training loop: Adam with a one-cycle learning-rate schedule and the task's loss.

Pruning masks (``torch.nn.utils.prune``) and weight-sharing parametrizations live on the
modules themselves, so this loop needs no special cases for them: whatever is masked or
shared stays so while it trains.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchslim.core.data import Data
from torchslim.core.task import Task, forward, move
from torchslim.errors import ConfigError, DataError
from torchslim.train.checkpoint import Resumed, for_fit
from torchslim.train.distributed import average_gradients, broadcast_, mean_over_ranks, shard, world
from torchslim.train.losses import check_alpha, check_temperature

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each optimiser step."""
Objective = Callable[[Any, "torch.Tensor | None"], torch.Tensor]
"""``objective(batch, rows)``: the loss of one training batch (``rows``: its rows in an
in-memory training split, else ``None``)."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run.

    Attributes:
        epochs: passes over the training split (0 trains nothing).
        lr: peak learning rate of the one-cycle schedule.
        weight_decay: Adam's L2 penalty.
        seed: seeds shuffling and dropout.
        distill_weight: with a teacher, the weight of the soft-target loss (Hinton et al.
            2015); the hard-label loss gets ``1 - distill_weight``.
        temperature: softmax temperature of the soft targets; the KL term is scaled by T**2.
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` to run forward passes under
            ``torch.autocast`` (weights and optimiser state stay fp32; fp16 needs CUDA and
            scales the loss against underflow).
    """

    epochs: int = 15
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    distill_weight: float = 0.7
    temperature: float = 4.0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: use one of {sorted(PRECISIONS)}")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs!r}: use a whole number >= 0")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr={self.lr!r}: use a positive learning rate such as 3e-3")
        check_alpha(self.distill_weight, "distill_weight")
        check_temperature(self.temperature)


def fit(
    model: nn.Module,
    data: Data,
    config: TrainConfig,
    progress: Progress | None = None,
    teacher: nn.Module | None = None,
    *,
    objective: Objective | None = None,
    extra_params: list[nn.Parameter] | tuple = (),
) -> list[float]:
    """Train ``model`` in place on ``data.train``; return the mean loss of each epoch.

    The loss is the task's (``data.task.loss``: cross-entropy for classification); with a
    ``teacher`` (run in eval mode, without gradients) it is ``data.task.teacher_loss``, which
    for classification mixes the labels with the teacher's soft targets at
    ``config.temperature`` and ``alpha = config.distill_weight`` (Hinton et al. 2015).
    ``objective`` replaces that loss altogether (it runs the model itself); ``extra_params``
    (e.g. its projections) are trained along. Each batch is moved to the device of the
    model's parameters.

    Under torchrun each rank trains on its slice of every batch and the gradients are averaged
    over the ranks (:mod:`torchslim.train.distributed`); inside
    :func:`~torchslim.train.checkpoint.checkpoints` each epoch is checkpointed and a rerun resumes.

    Example:
        >>> losses = fit(model, data, TrainConfig(epochs=2))  # doctest: +SKIP
    """
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params)
    if config.epochs == 0 or not params:
        return []
    torch.manual_seed(config.seed)
    steps_per_epoch = data.train_steps()
    total = steps_per_epoch * config.epochs if steps_per_epoch else None
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = _schedule(opt, config, total)
    losses, done, first = [], 0, 0
    if objective is None:
        objective = _default_objective(model, data.task, config, teacher)
    device = params[0].device
    autocast, scaler = _mixed_precision(config.precision, device)
    rank, size = world()
    broadcast_([*params, *model.buffers()])  # every rank starts from rank 0's model
    extra = list(extra_params)
    checkpoint = for_fit(model, extra, config)
    if checkpoint is not None and (resumed := checkpoint.resume(model, extra, opt, sched)) is not None:
        losses, done, first = resumed.losses, resumed.steps, resumed.epochs
        log.warning("resumed training from %s after epoch %d of %d", checkpoint.path, first, config.epochs)
    model.train()
    if teacher is not None:
        teacher.eval()
    for epoch in range(first, config.epochs):
        running, steps = 0.0, 0
        for batch, rows in data.train_batches(epoch_seed=config.seed * 1000 + epoch):
            weight = 1.0
            if size > 1:  # this rank's rows of the global batch
                (batch, rows), weight = shard((batch, rows), rank, size)
            with autocast():
                loss = objective(move(batch, device), rows)
            if weight != 1.0:
                loss = loss * weight
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                average_gradients(params)
                opt.step()
            else:
                scaler.scale(loss).backward()
                average_gradients(params)
                scaler.step(opt)
                scaler.update()
            sched.step()
            running += loss.item()
            done, steps = done + 1, steps + 1
            if progress is not None:
                progress(done, total or done)
        if steps == 0:
            raise DataError("the training loader yielded no batches; give it at least one batch")
        losses.append(mean_over_ranks(running / steps))
        log.info("epoch %d/%d loss %.4f", epoch + 1, config.epochs, losses[-1])
        if checkpoint is not None:
            checkpoint.save(model, extra, opt, sched, Resumed(epoch + 1, losses, done, epoch + 1 == config.epochs))
    broadcast_(model.buffers())  # BatchNorm statistics: rank 0's everywhere
    model.eval()
    return losses


def _mixed_precision(precision: str, device: torch.device):
    """A context factory for the forward pass and, for fp16, a gradient scaler."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext, None
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError(f"precision='fp16' trains on CUDA only (the model is on {device}); use 'bf16' on a CPU")
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _schedule(opt: torch.optim.Optimizer, config: TrainConfig, total: int | None):
    """One-cycle over ``total`` steps; a loader without a length gets a constant rate."""
    if total:
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total)
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)


def _default_objective(model: nn.Module, task: Task, config: TrainConfig, teacher: nn.Module | None) -> Objective:
    """The task's loss, or with a teacher its loss against the teacher's outputs."""

    def objective(batch: Any, _rows: torch.Tensor | None) -> torch.Tensor:
        out = forward(model, task, batch)
        if teacher is None:
            return task.loss(out, batch)
        with torch.no_grad():
            target = forward(teacher, task, batch)
        return task.teacher_loss(out, target, batch, config.temperature, config.distill_weight)

    return objective
