"""One training loop: Adam with a one-cycle learning-rate schedule and cross-entropy.

Pruning masks (``torch.nn.utils.prune``) and weight-sharing parametrizations live on the
modules themselves, so this loop needs no special cases for them: whatever is masked or
shared stays so while it trains.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from torchslim.core.data import Data
from torchslim.errors import ConfigError
from torchslim.train.losses import SoftTargetLoss, check_alpha, check_temperature, logits_of

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each optimiser step."""
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``objective(x, y, rows)``: the loss of one training batch (``rows``: its rows in the training split)."""


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
    """

    epochs: int = 15
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    distill_weight: float = 0.7
    temperature: float = 4.0

    def __post_init__(self) -> None:
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

    The loss is cross-entropy on the labels; with a ``teacher`` (run in eval mode, without
    gradients) it mixes the labels with the teacher's soft targets
    (:class:`~torchslim.train.losses.SoftTargetLoss` with ``config.temperature`` and
    ``alpha = config.distill_weight``). ``objective`` replaces that loss altogether (it runs
    the model itself); ``extra_params`` (e.g. its projections) are trained along.

    Example:
        >>> losses = fit(model, data, TrainConfig(epochs=2))  # doctest: +SKIP
    """
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params)
    if config.epochs == 0 or not params:
        return []
    torch.manual_seed(config.seed)
    steps_per_epoch = len(data.train_loader())
    total = steps_per_epoch * config.epochs
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total)
    losses, done = [], 0
    if objective is None:
        objective = _default_objective(model, config, teacher)
    model.train()
    if teacher is not None:
        teacher.eval()
    for epoch in range(config.epochs):
        running = 0.0
        for x, y, rows in data.train_batches(epoch_seed=config.seed * 1000 + epoch):
            loss = objective(x, y, rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            done += 1
            if progress is not None:
                progress(done, total)
        losses.append(running / steps_per_epoch)
        log.info("epoch %d/%d loss %.4f", epoch + 1, config.epochs, losses[-1])
    model.eval()
    return losses


def _default_objective(model: nn.Module, config: TrainConfig, teacher: nn.Module | None) -> Objective:
    """Cross-entropy, or with a teacher its soft targets mixed with the labels."""
    soft = SoftTargetLoss(config.temperature, config.distill_weight) if teacher is not None else None

    def objective(x: torch.Tensor, y: torch.Tensor, _rows: torch.Tensor) -> torch.Tensor:
        out = model(x)
        if soft is None or teacher is None:
            return nn.functional.cross_entropy(logits_of(out), y)
        with torch.no_grad():
            target = teacher(x)
        return soft(out, target, y)

    return objective
