"""Structured pruning: remove whole channels, neurons and hidden units so tensors really shrink.

One config, one verb. ``channel_prune_`` analyses the coupling groups
(:mod:`torchslim.analysis.coupling`), scores their channels with a criterion
(:mod:`torchslim.analysis.importance`), decides how many channels each group keeps (per-group
ratios, or a MAC / parameter target met by search: :mod:`torchslim.transforms.channel_counts`), slices the model with Torch-Pruning's
graph, and fine-tunes it (with a teacher if given) after every step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from torchslim.analysis.cost import count_params, layer_macs
from torchslim.analysis.coupling import analyse
from torchslim.analysis.importance import CRITERIA, NEEDS_DATA
from torchslim.core.data import Data
from torchslim.core.device import Device, model_device, place
from torchslim.core.plan import CompressionPlan, LayerDecision, check_keys
from torchslim.core.task import move
from torchslim.errors import ConfigError
from torchslim.train.fit import Progress, TrainConfig, fit
from torchslim.transforms.calibrate import calibration_batches
from torchslim.transforms.channel_counts import Target, decide
from torchslim.transforms.guard import check_runs, rollback

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelPruneConfig:
    """How to remove channels. Give exactly one of ``macs``, ``params`` or ``ratio``.

    Attributes:
        macs: fraction of the model's multiply-accumulates to keep, e.g. 0.5 for 2x fewer.
        params: fraction of the parameters to keep.
        ratio: fraction of channels removed from every group, or a map from group root layer
            name (or ``re:`` pattern) to a ratio (``None`` skips); groups the map does not name
            are skipped.
        criterion: one of ``l1``, ``l2``, ``taylor``, ``bn_scale``, ``activation``, ``apoz``,
            ``random``.
        scope: ``"layer"`` removes the same fraction from every group; ``"global"`` ranks
            channels of all groups together (scores normalised per group) to meet the target.
        steps: pruning rounds; the target is approached geometrically, with fine-tuning after
            each round.
        round_to: kept channel counts are multiples of this (SIMD-friendly widths run faster).
        min_channels: no group keeps fewer channels than this (or its width, if smaller).
        exclude: layer names or ``re:`` patterns whose output channels must stay.
        calib_batches: calibration batches for the data-driven criteria.
        finetune: recovery training after every round (``None``: no training).
        seed: seeds the random criterion.
    """

    macs: float | None = None
    params: float | None = None
    ratio: float | Mapping[str, float | None] | None = None
    criterion: str = "l2"
    scope: str = "layer"
    steps: int = 1
    round_to: int = 8
    min_channels: int = 8
    exclude: tuple[str, ...] = ()
    calib_batches: int = 4
    finetune: TrainConfig | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        given = [k for k in ("macs", "params", "ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"give exactly one of macs, params or ratio (got {given or 'none'})")
        for key in ("macs", "params"):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ConfigError(f"{key}={v!r}: the fraction to keep must be in (0, 1], e.g. 0.5 for 2x fewer")
        ratios = (
            self.ratio.values() if isinstance(self.ratio, Mapping) else [self.ratio] if self.ratio is not None else []
        )
        for r in (r for r in ratios if r is not None):
            if not (isinstance(r, (int, float)) and 0 <= r < 1):
                raise ConfigError(
                    f"ratio={r!r}: the fraction of channels removed must be in [0, 1); 1 would empty the layer"
                )
        if self.criterion not in CRITERIA:
            raise ConfigError(f"criterion={self.criterion!r}: choose one of {sorted(CRITERIA)}")
        if self.scope not in ("layer", "global"):
            raise ConfigError(f"scope={self.scope!r}: use 'layer' or 'global'")
        for key in ("steps", "round_to", "min_channels", "calib_batches"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)!r}: use a whole number >= 1")

    @classmethod
    def from_plan(cls, plan: CompressionPlan, **kwargs: object) -> ChannelPruneConfig:
        """The per-layer channel ratios of ``plan``; other fields from ``kwargs``."""
        ratio = plan.field_map("channels")
        if not any(v is not None for v in ratio.values()):
            raise ConfigError("the plan sets no channel ratio for any layer")
        return cls(ratio=ratio, **kwargs)  # type: ignore[arg-type]


@dataclass
class GroupRecord:
    """What happened to one coupling group."""

    root: str
    members: list[str]
    before: int
    after: int
    criterion: str
    skip: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ChannelPruneResult:
    """What ``channel_prune_`` did: per group, per layer, and the cost before and after."""

    groups: list[GroupRecord]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    layers: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    @property
    def plan(self) -> CompressionPlan:
        rules = []
        for g in self.groups:
            if g.skip:
                rules.append((g.root, LayerDecision(skip=g.skip)))
            else:
                rules.append((g.root, LayerDecision(channels=round(1 - g.after / g.before, 6))))
        return CompressionPlan(tuple(rules))

    def to_dict(self) -> dict:
        return {
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "groups": [g.to_dict() for g in self.groups],
            "layers": self.layers,
            "history": self.history,
        }


def channel_prune_(
    model: nn.Module,
    config: ChannelPruneConfig,
    data: Data | None = None,
    *,
    example: torch.Tensor | None = None,
    progress: Progress | None = None,
    teacher: nn.Module | None = None,
    device: Device = None,
) -> ChannelPruneResult:
    """Remove channels from ``model`` in place and fine-tune it.

    Args:
        model: the model; its modules are resized in place.
        config: what to remove and how.
        data: needed for data-driven criteria, for fine-tuning, and to trace when ``example``
            is not given.
        example: one input batch for tracing; defaults to the first calibration batch.
        progress: called as ``progress(done, total)`` during fine-tuning.
        teacher: soft targets for fine-tuning (e.g. the unpruned model).
        device: where to run (``"auto"``, ``"cpu"``, ``"cuda:N"``); the model (and teacher)
            move there. ``None``: where the model is.

    Example:
        >>> cfg = ts.ChannelPruneConfig(macs=0.5, criterion="taylor", round_to=16)
        >>> result = ts.channel_prune_(model, cfg, data=data)  # doctest: +SKIP
    """
    place(model, device)
    if teacher is not None:
        place(teacher, device)
    if isinstance(data, Data):
        data.check(model)
    if config.finetune is not None and config.finetune.epochs > 0 and data is None:
        raise ConfigError("fine-tuning after pruning needs data=...; pass data or finetune=None")
    where = model_device(model)
    batches = [move(b, where) for b in _calibration(config, data, example)]
    example = move(example, where) if example is not None else batches[0][0][:8]
    _check_names(model, config)
    macs0, params0 = sum(layer_macs(model, example).values()), count_params(model)
    layers0 = _layer_shapes(model, example)
    original: dict[str, int] = {}
    records: dict[str, GroupRecord] = {}
    history = []
    for step in range(1, config.steps + 1):
        with rollback(model):  # a failed step leaves the model as it was
            _prune_step(model, config, batches, example, step, Target(0.0, macs0, params0, original), records)
        macs = sum(layer_macs(model, example).values())
        entry = {"step": step, "macs": macs, "params": count_params(model)}
        if config.finetune is not None and config.finetune.epochs > 0:
            assert data is not None  # checked above
            entry["loss"] = fit(model, data, config.finetune, progress, teacher=teacher)
        history.append(entry)
        log.info("channel pruning step %d/%d: %s", step, config.steps, entry)
    macs1 = sum(layer_macs(model, example).values())
    layers = _layer_table(layers0, _layer_shapes(model, example))
    return ChannelPruneResult(list(records.values()), macs0, macs1, params0, count_params(model), layers, history)


def _prune_step(
    model: nn.Module,
    config: ChannelPruneConfig,
    batches: list,
    example: torch.Tensor,
    step: int,
    base: Target,
    records: dict[str, GroupRecord],
) -> None:
    """One round: analyse, score, decide the widths, slice; records what happened per group."""
    original = base.original
    coupling = analyse(model, example, config.exclude, config.min_channels)
    for g in coupling.groups:
        original.setdefault(g.root, g.channels)
    keep, scores = decide(model, coupling, config, batches, example, base._replace(frac=step / config.steps), step)
    modules = dict(model.named_modules())
    for g in coupling.groups:
        members = [str(m) for m in g.members]
        rec = records.setdefault(g.root, GroupRecord(g.root, members, original[g.root], g.channels, config.criterion))
        if g.root in keep and keep[g.root] < g.channels:
            g.handle.prune(g.lowest(scores[g.root], g.channels - keep[g.root]))
        rec.after = int(coupling.graph.get_out_channels(modules[g.root]))
        if rec.after != keep.get(g.root, g.channels):
            raise ConfigError(
                f"group {g.root}: asked to keep {keep.get(g.root, g.channels)} channels, {rec.after} remain"
            )
        rec.skip = g.skip if g.skip and rec.after == rec.before else None  # pruned in an earlier step: not a skip
    hint = "its forward probably hard-codes a width (a reshape or view with fixed sizes): exclude that layer"
    check_runs(model, example, "pruned", hint)


def _check_names(model: nn.Module, config: ChannelPruneConfig) -> None:
    """A ratio or exclude key that names no layer is a typo; say which names exist."""
    names = [n for n, _ in model.named_modules() if n]
    keys = [k for k, v in config.ratio.items() if v is not None] if isinstance(config.ratio, Mapping) else []
    check_keys(names, keys + list(config.exclude), "ratio and exclude keys")


def _calibration(config: ChannelPruneConfig, data: Data | None, example: torch.Tensor | None) -> list:
    """Calibration batches of the training batch size (empty when neither needed nor available)."""
    if data is None:
        if config.criterion in NEEDS_DATA:
            raise ConfigError(f"criterion {config.criterion!r} scores channels on data: pass data=...")
        if example is None:
            raise ConfigError("pass data=... or example=<one input batch> so the model can be traced")
        return []
    return calibration_batches(data, config.calib_batches, example, batch_size=getattr(data.train, "batch_size", None))


_SIZES = {
    nn.Conv1d: ("in_channels", "out_channels"),
    nn.Conv2d: ("in_channels", "out_channels"),
    nn.Conv3d: ("in_channels", "out_channels"),
    nn.Linear: ("in_features", "out_features"),
    nn.LSTM: ("input_size", "hidden_size"),
    nn.GRU: ("input_size", "hidden_size"),
    nn.BatchNorm1d: ("num_features", "num_features"),
    nn.BatchNorm2d: ("num_features", "num_features"),
}


def _layer_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple]:
    macs = layer_macs(model, example)
    return {
        n: (type(m).__name__, getattr(m, _SIZES[type(m)][0]), getattr(m, _SIZES[type(m)][1]), macs.get(n, 0))
        for n, m in model.named_modules()
        if type(m) in _SIZES
    }


def _layer_table(before: dict[str, tuple], after: dict[str, tuple]) -> list[dict]:
    rows = []
    for name, (kind, i0, o0, m0) in before.items():
        _, i1, o1, m1 = after.get(name, (kind, 0, 0, 0))
        rows.append({"layer": name, "kind": kind, "in": [i0, i1], "out": [o0, o1], "macs": [m0, m1]})
    return rows
