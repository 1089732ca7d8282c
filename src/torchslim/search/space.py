"""What the search may choose for each layer, and how a chosen plan is applied to a copy.

A candidate is a :class:`~torchslim.core.plan.CompressionPlan`: per coupling group a fraction
of channels removed (structured pruning), per weight layer a sparsity (unstructured magnitude
pruning) and a precision -- float, a k-means codebook of ``bits`` (weight sharing), or static
int8 -- and, when the space offers ``tables`` codebook sizes, per embedding table a precision:
float or a codebook (a text encoder's word table is most of its file). Optuna sees the same
choices as categorical parameters named ``channels:<root>``, ``sparsity:<layer>`` and
``precision:<layer>``; :func:`plan_from_params` and
:func:`params_from_plan` translate between the two, so a plan can seed the study.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim.analysis.cost import weight_layers
from torchslim.analysis.coupling import analyse
from torchslim.core.data import Data, TensorBatches, batch_rows
from torchslim.core.plan import CompressionPlan, LayerDecision
from torchslim.core.task import Task
from torchslim.errors import ConfigError
from torchslim.train.fit import TrainConfig
from torchslim.transforms.channels import ChannelPruneConfig
from torchslim.transforms.compress import CompressResult, CompressSettings, compress
from torchslim.transforms.prune import MagnitudePruneConfig
from torchslim.transforms.quantize import QuantizeConfig
from torchslim.transforms.share import ShareConfig

FLOAT, INT8 = "float", "int8"


@dataclass(frozen=True)
class SearchSpace:
    """The per-layer choices.

    Attributes:
        sparsity: fractions of a layer's weights set to zero (0 keeps them all).
        bits: codebook sizes for weight sharing (empty: no sharing).
        channels: fractions of a coupling group's channels removed (empty or ``(0,)``: none).
        int8: whether a layer may run in static int8.
        tables: codebook sizes for embedding tables (``nn.Embedding`` of at least
            :data:`MIN_TABLE` values; empty: tables keep their floats).
        round_to: kept channel counts are multiples of this.
        min_channels: no group keeps fewer channels.
    """

    sparsity: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
    bits: tuple[int, ...] = (8, 6, 5, 4, 3, 2)
    channels: tuple[float, ...] = (0.0, 0.25, 0.5)
    int8: bool = True
    tables: tuple[int, ...] = ()
    round_to: int = 8
    min_channels: int = 8

    def __post_init__(self) -> None:
        for s in (*self.sparsity, *self.channels):
            LayerDecision(sparsity=s)  # range checks with a clear message
        for b in (*self.bits, *self.tables):
            LayerDecision(bits=b)
        if 0.0 not in self.sparsity:
            raise ConfigError(f"sparsity={self.sparsity}: include 0.0 so a layer can keep all its weights")
        if self.channels and 0.0 not in self.channels:
            raise ConfigError(f"channels={self.channels}: include 0.0 so a group can keep all its channels")

    @classmethod
    def default_for(cls, objective: str) -> SearchSpace:
        """Every technique for ``size``; for ``latency`` channel fractions and int8 only: sparsity
        and codebooks cost accuracy without making dense kernels any faster."""
        return cls(sparsity=(0.0,), bits=()) if objective == "latency" else cls()

    def precisions(self) -> list[str]:
        """The precision choices: ``float``, ``int8`` and ``share<bits>``."""
        return [FLOAT] + ([INT8] if self.int8 else []) + [f"share{b}" for b in self.bits]

    def table_precisions(self) -> list[str]:
        """An embedding table's choices: ``float`` and ``share<bits>`` of ``tables``."""
        return [FLOAT] + [f"share{b}" for b in self.tables]


MIN_TABLE = 1 << 16
"""Embedding tables with fewer values are left out of the search: their codebook would save
under 64 kB."""


@dataclass(frozen=True)
class Layers:
    """The model's weight layers and the coupling groups structured pruning can shrink."""

    weights: tuple[str, ...]
    groups: tuple[str, ...]  # root layer of each prunable coupling group
    skipped: dict[str, str] = field(default_factory=dict)  # group root -> why it cannot shrink
    tables: tuple[str, ...] = ()  # embedding tables the search may share

    @classmethod
    def of(cls, model: nn.Module, example: torch.Tensor, space: SearchSpace) -> Layers:
        names = tuple(n for n, _ in weight_layers(model))
        if not names:
            raise ConfigError(f"{type(model).__name__} has no Linear or Conv layer to compress")
        modules = model.named_modules() if space.tables else ()
        tables = tuple(n for n, m in modules if isinstance(m, nn.Embedding) and m.weight.numel() >= MIN_TABLE)
        if not any(c > 0 for c in space.channels):
            return cls(names, (), tables=tables)
        coupling = analyse(model, example, min_channels=space.min_channels)
        groups = tuple(g.root for g in coupling.prunable())
        return cls(names, groups, {g.root: g.skip for g in coupling.groups if g.skip}, tables)


def distributions(space: SearchSpace, layers: Layers) -> dict[str, Any]:
    """Optuna's categorical distribution for every parameter, in a fixed order."""
    from optuna.distributions import CategoricalDistribution

    out: dict[str, Any] = {}
    if any(c > 0 for c in space.channels):
        out |= {f"channels:{g}": CategoricalDistribution(list(space.channels)) for g in layers.groups}
    out |= {f"sparsity:{n}": CategoricalDistribution(list(space.sparsity)) for n in layers.weights}
    out |= {f"precision:{n}": CategoricalDistribution(space.precisions()) for n in layers.weights}
    out |= {f"precision:{n}": CategoricalDistribution(space.table_precisions()) for n in layers.tables}
    return out


def plan_from_params(params: Mapping[str, Any]) -> CompressionPlan:
    """The plan that Optuna parameters describe; choices that change nothing are left out."""
    decisions: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        kind, _, layer = key.partition(":")
        entry = decisions.setdefault(layer, {})
        if kind in ("channels", "sparsity") and value:
            entry[kind] = float(value)
        elif kind == "precision" and value == INT8:
            entry["quantize"] = 8
        elif kind == "precision" and str(value).startswith("share"):
            entry["bits"] = int(str(value)[5:])
    return CompressionPlan.from_dict({k: v for k, v in decisions.items() if v})


def params_from_plan(plan: CompressionPlan, space: SearchSpace, layers: Layers) -> dict[str, Any]:
    """Optuna parameters for ``plan``, each value snapped to the nearest choice of ``space``."""

    def near(options: tuple, value: float) -> Any:
        return min(options, key=lambda o: abs(o - value))

    params: dict[str, Any] = {}
    for key in distributions(space, layers):
        kind, _, layer = key.partition(":")
        d = plan.resolve(layer) or LayerDecision()
        if kind == "channels":
            params[key] = near(space.channels, d.channels or 0.0)
        elif kind == "sparsity":
            params[key] = near(space.sparsity, d.sparsity or 0.0)
        elif layer in layers.tables:
            params[key] = f"share{near(space.tables, d.bits)}" if d.bits else FLOAT
        elif d.quantize and space.int8:
            params[key] = INT8
        elif d.bits and space.bits:
            params[key] = f"share{near(space.bits, d.bits)}"
        else:
            params[key] = FLOAT
    return params


@dataclass(frozen=True)
class Recovery:
    """Training that recovers a candidate's accuracy, with the uncompressed model as teacher.

    Attributes:
        samples: training samples used (a seeded subset, or a loader's first batches; 0: all).
        epochs: passes over them after pruning (0: no recovery).
        lr: peak learning rate.
        share_epochs: passes that train the shared layers' centroids.
        distill_weight: weight of the teacher's soft targets (the labels get the rest).
        temperature: softmax temperature of the soft targets.
    """

    samples: int = 16384
    epochs: int = 1
    lr: float = 2e-3
    share_epochs: int = 1
    distill_weight: float = 0.7
    temperature: float = 4.0

    def train(self, epochs: int, lr: float, seed: int) -> TrainConfig:
        return TrainConfig(epochs, lr, 0.0, seed, self.distill_weight, self.temperature)

    def settings(self, space: SearchSpace, seed: int) -> CompressSettings:
        """How ``compress`` applies a candidate: channels sliced to the space's widths, pruning
        without its own fine-tuning, this recovery after both, centroids trained at a tenth of
        its learning rate, static int8."""
        share = self.train(self.share_epochs, self.lr / 10, seed) if self.share_epochs else None
        return CompressSettings(
            channels=ChannelPruneConfig(ratio={}, round_to=space.round_to, min_channels=space.min_channels, seed=seed),
            prune=MagnitudePruneConfig(finetune=None),
            recover=self.train(self.epochs, self.lr, seed) if self.epochs else None,
            share=ShareConfig(finetune=share),
            quantize=QuantizeConfig(),
        )


def subset(data: Data, samples: int, seed: int) -> Data:
    """``data`` whose training split holds ``samples`` samples (0: all): a seeded subset of an
    in-memory split (:class:`TensorBatches`); the first batches of any other loader, up to
    ``samples`` (a shuffling loader draws other batches each pass)."""
    if samples <= 0:
        return data
    if not isinstance(data.train, TensorBatches):
        return dataclasses.replace(data, train=FirstSamples(data.train, samples, data.task))
    if samples >= data.train.rows:
        return data
    rows = torch.randperm(data.train.rows, generator=torch.Generator().manual_seed(seed))[:samples]
    return dataclasses.replace(data, train=data.train.subset(rows))


class FirstSamples:
    """The batches of ``source`` until they hold ``samples`` samples; re-iterable."""

    def __init__(self, source: Iterable, samples: int, task: Task) -> None:
        self.source, self.samples, self.task = source, samples, task

    def __iter__(self) -> Iterator:
        seen = 0
        for batch in self.source:
            yield batch
            seen += batch_rows(self.task.split(batch)[0]) or 1
            if seen >= self.samples:
                return


def apply_plan(
    model: nn.Module, plan: CompressionPlan, data: Data, recovery: Recovery, space: SearchSpace, seed: int = 0
) -> CompressResult:
    """A compressed copy of ``model`` and the plan it realised: :func:`~torchslim.transforms.compress.compress`
    with the search's settings -- no fine-tuning per technique, one recovery with ``model`` as
    teacher after channels and pruning, trained centroids, static int8."""
    return compress(
        model.eval(), plan, subset(data, recovery.samples, seed), settings=recovery.settings(space, seed), teacher=model
    )
