"""Magnitude pruning (weight trimming), one-shot or iterative, with fixed masks while fine-tuning.

Han et al. 2015 ("Learning both Weights and Connections"): remove the smallest-magnitude
weights, fine-tune the rest, repeat. Masks are parametrizations (``weight = original * mask``,
``torch.nn.utils.parametrize``), computed whenever the weight is read, so the fine-tuning loop
keeps pruned weights at zero without knowing about them -- also where a parent module reads a
layer's weight directly instead of calling it (``nn.MultiheadAttention``'s output projection).
A tied weight gets the one mask on every module that holds it. At the end of each round the
masks are made permanent (plain zeros in ``weight``), so the model carries no parametrization.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim.analysis.cost import sparse_layers, weight_names
from torchslim.core.data import Data
from torchslim.core.device import Device, place
from torchslim.core.plan import CompressionPlan, check_sparsity, layer_targets
from torchslim.core.ties import Ties, holders
from torchslim.errors import ConfigError
from torchslim.train.fit import Progress, TrainConfig, fit
from torchslim.transforms.guard import rollback

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MagnitudePruneConfig:
    """How much to prune, where, and how to recover.

    Attributes:
        sparsity: one fraction for every weight layer, or a map from module name or
            ``re:`` pattern to a fraction (layers no key names are left dense, with the
            reason recorded).
        scope: ``"layer"`` prunes each layer to its own target; ``"global"`` ranks all
            weights of the targeted layers together under one threshold (one sparsity).
        steps: prune in this many rounds with sparsity rising on a cubic schedule
            (Zhu & Gupta 2017), fine-tuning after each round (Han et al. 2015).
        finetune: training after each round; ``None`` or no data means one-shot, no training.

    Example:
        >>> cfg = MagnitudePruneConfig(sparsity={"fc1": 0.92, "re:fc[23]": 0.9}, steps=3)
    """

    sparsity: float | Mapping[str, float | None] = 0.9
    scope: Literal["layer", "global"] = "layer"
    steps: int = 1
    finetune: TrainConfig | None = field(default_factory=lambda: TrainConfig(epochs=2, lr=1e-3))

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, Mapping):
            for key, value in self.sparsity.items():
                if value is not None:  # None: leave that layer alone
                    check_sparsity(value, f"sparsity[{key!r}]")
            if self.scope == "global" and len({v for v in self.sparsity.values() if v is not None}) > 1:
                raise ConfigError(
                    "scope='global' ranks the named layers together under one sparsity: give one number "
                    "(or a map whose values are all equal)"
                )
        else:
            check_sparsity(self.sparsity, "sparsity")
        if self.scope not in ("layer", "global"):
            raise ConfigError(f"scope={self.scope!r}: use 'layer' or 'global'")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps={self.steps!r}: use a whole number >= 1")

    @classmethod
    def from_plan(cls, plan: CompressionPlan, **kwargs: object) -> MagnitudePruneConfig:
        """The per-layer sparsities of ``plan``; other fields from ``kwargs``."""
        sparsity = plan.field_map("sparsity")
        if not any(v is not None for v in sparsity.values()):
            raise ConfigError("the plan sets no sparsity for any layer")
        return cls(sparsity=sparsity, **kwargs)  # type: ignore[arg-type]

    def targets(self, model: nn.Module) -> tuple[dict[str, float], dict[str, str]]:
        """Final sparsity per layer, and why each other weight layer is skipped."""
        names = [name for name, _ in sparse_layers(model)]
        targets, skipped = layer_targets(names, self.sparsity, "sparsity")
        return {n: float(v) for n, v in targets.items()}, skipped


@dataclass(frozen=True)
class PruneResult:
    """What ``prune_`` did: the per-layer plan it realised and the loss after each round."""

    plan: CompressionPlan
    history: list[dict]


def schedule(final: float, steps: int) -> list[float]:
    """Cubic sparsity ramp ending at ``final``: ``final * (1 - (1 - i/steps)**3)``."""
    return [final * (1.0 - (1.0 - i / steps) ** 3) for i in range(1, steps + 1)]


def prune_(
    model: nn.Module,
    config: MagnitudePruneConfig,
    data: Data | None = None,
    *,
    teacher: nn.Module | None = None,
    progress: Progress | None = None,
    device: Device = None,
) -> PruneResult:
    """Prune ``model``'s Linear, Conv and recurrent weights by magnitude, in place, fine-tuning
    between rounds.

    With a ``teacher`` (typically the unpruned model), fine-tuning also matches its softened
    outputs (``config.finetune.distill_weight``, ``temperature``). ``device`` (``"auto"``,
    ``"cpu"``, ``"cuda:N"``) moves the model and teacher there first; batches follow the model.

    Example:
        >>> result = prune_(model, MagnitudePruneConfig(sparsity=0.9, steps=3), data=data)  # doctest: +SKIP
    """
    place(model, device)
    if teacher is not None:
        place(teacher, device)
    if isinstance(data, Data):
        data.check(model)
    targets, skipped = config.targets(model)
    layers = {n: m for n, m in sparse_layers(model) if n in targets}
    others = [m for n, m in sparse_layers(model) if n not in targets]
    with rollback(model), frozen_zeros(others):  # a failure leaves the model as it was
        history = _rounds(model, config, data, layers, targets, progress, teacher)
    plan = CompressionPlan()
    for name, m in layers.items():
        weights = [getattr(m, a) for a in weight_names(m)]
        zeros, total = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
        plan = plan.merged(name, sparsity=round(zeros / total, 6))
    for name, why in skipped.items():
        plan = plan.merged(name, skip=why)
    return PruneResult(plan, history)


def _rounds(model, config, data, layers, targets, progress, teacher) -> list[dict]:
    history, held, ties = [], [], Ties(model)
    try:
        for step in range(config.steps):
            _make_permanent(held)  # the masks so far become zeros; this round's masks cover them
            wanted = {n: schedule(t, config.steps)[step] for n, t in targets.items()}
            masks = _global_masks(layers, wanted) if config.scope == "global" else _layer_masks(layers, wanted)
            held = [
                pair for (name, attr), mask in masks.items() for pair in _mask_(model, name, attr, mask, layers, ties)
            ]
            losses = []
            if data is not None and config.finetune is not None:
                losses = fit(model, data, config.finetune, _overall(progress, step, config.steps), teacher)
            history.append({"step": step + 1, "sparsity": wanted, "losses": losses})
            log.info("prune round %d/%d done", step + 1, config.steps)
    finally:  # on an error too: the model keeps the rounds done so far, with no parametrization left
        _make_permanent(held)
    return history


class Mask(nn.Module):
    """Parametrization ``weight = original * mask``."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def _mask_(model: nn.Module, name: str, attr: str, mask: torch.Tensor, layers: Mapping, ties: Ties) -> list[tuple]:
    """Put ``mask`` on layer ``name``'s weight ``attr`` and on every module tied to it;
    ``(module, attr, first)`` triples."""
    layer = layers[name]
    param = Mask(mask.to(getattr(layer, attr).dtype))
    tied = holders(model, name, layer, ties) if attr == "weight" else [layer]
    held = []
    for i, module in enumerate(tied):  # a tied weight: one mask for all
        parametrize.register_parametrization(module, attr, param)
        held.append((module, attr, i == 0))
    return held


def _make_permanent(held: Iterable[tuple[nn.Module, str, bool]]) -> None:
    """Fold the masks into the weights and drop the parametrizations; pruned entries become +0.0.
    The first holder of a tied weight writes it; the others take the same (now masked) tensor."""
    for m, attr, first in held:
        if parametrize.is_parametrized(m, attr):
            parametrize.remove_parametrizations(m, attr, leave_parametrized=first)
            if first:
                with torch.no_grad():
                    getattr(m, attr).add_(0.0)  # original * 0 is -0.0 for negative weights; -0.0 + 0.0 is +0.0


def _overall(progress: Progress | None, step: int, steps: int) -> Progress | None:
    """Report one round's training progress as progress over all rounds."""
    if progress is None:
        return None
    return lambda done, total: progress(step * total + done, steps * total)


@contextlib.contextmanager
def frozen_zeros(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Keep the zero weights of ``modules`` at zero while the block trains the model."""
    held = []
    for m in modules:
        for attr in weight_names(m):
            w = getattr(m, attr)
            if bool((w == 0).any()) and not parametrize.is_parametrized(m, attr):
                parametrize.register_parametrization(m, attr, Mask((w != 0).to(w.dtype)))
                held.append((m, attr, True))
    try:
        yield
    finally:
        _make_permanent(held)


def _tensors(layers: Mapping[str, nn.Module]) -> list[tuple[str, str, torch.Tensor]]:
    """``(layer, attribute, weight)`` for every weight tensor of ``layers``, in order."""
    return [(n, a, getattr(m, a)) for n, m in layers.items() for a in weight_names(m)]


@torch.no_grad()
def _layer_masks(layers: Mapping[str, nn.Module], wanted: Mapping[str, float]) -> dict[tuple[str, str], torch.Tensor]:
    return {(n, a): _smallest_off(w.abs().flatten(), wanted[n]).view_as(w) for n, a, w in _tensors(layers)}


@torch.no_grad()
def _global_masks(layers: Mapping[str, nn.Module], wanted: Mapping[str, float]) -> dict[tuple[str, str], torch.Tensor]:
    if not layers:
        raise ConfigError("scope='global' needs at least one Linear/Conv layer to rank")
    tensors = _tensors(layers)
    scores = torch.cat([w.abs().flatten() for _, _, w in tensors])
    flat = _smallest_off(scores, next(iter(wanted.values())))
    masks, start = {}, 0
    for n, a, w in tensors:
        masks[n, a] = flat[start : start + w.numel()].view_as(w)
        start += w.numel()
    return masks


def _smallest_off(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """A 0/1 mask turning off the ``fraction`` smallest scores (ties broken by position)."""
    k = int(round(fraction * scores.numel()))
    mask = torch.ones_like(scores)
    mask[torch.argsort(scores, stable=True)[:k]] = 0.0
    return mask
