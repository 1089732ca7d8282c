"""Low-rank factorisation of Linear layers by truncated SVD, the rank chosen per layer by the
energy it keeps.

A weight ``W`` (out x in) with singular values ``s_1 >= s_2 >= ...`` is replaced by its best
rank-``r`` approximation ``U_r S_r V_rᵀ`` (Eckart-Young: the smallest error in Frobenius norm).
Each layer's ``r`` is the smallest that keeps ``config.energy`` of ``Σ s_i²`` -- a fixed
fraction of the weight's squared norm, so layers whose spectrum decays fast get small ranks and
flat ones large ranks. The layer becomes a
:class:`~torchslim.core.lowrank.LowRankLinear`, ``up(down(x))`` with ``down = S_r^½ V_rᵀ``
``(r, in)`` and ``up = U_r S_r^½`` ``(out, r)``: the singular values split evenly, so both
factors have the same scale (what per-channel int8 / int4 quantization of the factors, applied
afterwards, wants). Factors cost ``r (in + out)`` weights against ``in x out``; a layer where
that does not save ``config.min_saving`` of its parameters is left dense, and the result says
why. GPT-2's ``Conv1D`` projections are factorised from their ``(out, in)`` matrix too.

The SVD runs in float32 on the layer's device (``torch.linalg.svd``); it needs no data.
Calibration batches, when given, only measure each layer's relative output error
``‖(W - Ŵ) X‖² / ‖W X‖²`` on the inputs the already-factorised blocks give it
(:mod:`~torchslim.transforms.layerwise`); the rank choice stays data-free.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from torchslim.core.data import Data
from torchslim.core.linears import weight_matrix
from torchslim.core.lowrank import LowRankLinear
from torchslim.core.plan import check_keys
from torchslim.errors import ConfigError
from torchslim.train.fit import Progress
from torchslim.transforms.gptq import relative_output_error
from torchslim.transforms.layerwise import (
    calibration_inputs,
    chosen_layers,
    each_layer,
    linear_layers,
    repeated_blocks,
)


@dataclass(frozen=True)
class LowRankConfig:
    """How to factorise.

    Attributes:
        energy: the fraction of each weight's ``Σ s_i²`` (sum of squared singular values) kept,
            in (0, 1]; 1.0 keeps every non-zero singular value.
        min_saving: the fraction of a layer's parameters (weight and bias) the factors must
            save, in [0, 1); a layer where they save less is left dense. ``None``: factorise
            every chosen layer, even where the factors are larger (to measure, not to compress).
        max_rank_ratio: cap each rank at this fraction of the layer's full rank
            ``min(in, out)`` (at least 1), in (0, 1]; ``None``: no cap.
        rank_multiple: round each rank up to a multiple of this (at most the full rank), e.g.
            the int4 group size of a later ``gptq_`` or ``quantize_``, which needs whole groups
            of the ``up`` factor's inputs.
        calib_batches: calibration batches used to report each layer's output error.
        layers: names or ``re:`` patterns of the Linear layers to factorise, relative to the
            model; ``None``: every Linear inside the repeated blocks (a transformer's layers).
    """

    energy: float = 0.9
    min_saving: float | None = 0.1
    max_rank_ratio: float | None = None
    rank_multiple: int = 1
    calib_batches: int = 16
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not _fraction(self.energy) or not 0 < self.energy <= 1:
            raise ConfigError(f"energy={self.energy!r}: use the fraction of squared singular values kept, in (0, 1]")
        if self.min_saving is not None and (not _fraction(self.min_saving) or not 0 <= self.min_saving < 1):
            raise ConfigError(
                f"min_saving={self.min_saving!r}: use the fraction of a layer's parameters the factors must save, "
                "in [0, 1) (e.g. 0.1), or None to factorise every chosen layer"
            )
        if self.max_rank_ratio is not None and (not _fraction(self.max_rank_ratio) or not 0 < self.max_rank_ratio <= 1):
            raise ConfigError(
                f"max_rank_ratio={self.max_rank_ratio!r}: use a fraction of the full rank in (0, 1], or None"
            )
        for key in ("rank_multiple", "calib_batches"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key}={v!r}: use a whole number >= 1")
        if self.layers is not None:
            object.__setattr__(self, "layers", _patterns(self.layers))


def _fraction(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _patterns(layers: object) -> tuple[str, ...]:
    if isinstance(layers, str) or not all(isinstance(p, str) for p in layers):
        raise ConfigError(f"layers={layers!r}: use a tuple of layer names or 're:' patterns, e.g. ('re:.*mlp.*',)")
    for p in layers:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise ConfigError(f"layers: {p!r} is not a valid regular expression ({exc})") from None
    return tuple(layers)


@dataclass
class LowRankLayer:
    """One layer's row of the report: the rank chosen (or that would have been, when left
    dense), its full rank ``min(in, out)``, the energy that rank keeps, the parameters before and
    after, and the relative output error over the calibration tokens (None without data)."""

    name: str
    rank: int
    full_rank: int
    energy: float
    params_before: int
    params_after: int
    factorised: bool
    output_error: float | None
    tokens: int
    note: str | None = None


@dataclass
class LowRankResult:
    """What ``lowrank_`` did."""

    layers: list[LowRankLayer]
    config: LowRankConfig

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "layers": [asdict(r) for r in self.layers]}

    def summary(self) -> str:
        done = [r for r in self.layers if r.factorised]
        before = sum(r.params_before for r in self.layers)
        after = sum(r.params_after for r in self.layers)
        errors = [r.output_error for r in done if r.output_error is not None]
        error = f"; mean relative output error {sum(errors) / len(errors):.3g}" if errors else ""
        return (
            f"{len(done)} of {len(self.layers)} Linear layers factorised at energy {self.config.energy:g}: "
            f"{before:,} -> {after:,} parameters ({after / max(before, 1):.1%}){error}"
        )


def choose_rank(singular: torch.Tensor, config: LowRankConfig) -> tuple[int, float]:
    """The rank ``config`` picks for singular values ``singular`` (descending), and the fraction
    of ``Σ s²`` it keeps: the smallest keeping ``config.energy``, capped, rounded up."""
    full = singular.numel()
    cumulative = singular.double().pow(2).cumsum(0)
    total = float(cumulative[-1])
    kept = cumulative / total if total > 0 else torch.ones_like(cumulative)  # a zero weight: rank 1
    rank = min(full, int((kept < config.energy).sum()) + 1)
    if config.max_rank_ratio is not None:
        rank = min(rank, max(1, math.floor(config.max_rank_ratio * full)))
    rank = min(full, -(-rank // config.rank_multiple) * config.rank_multiple)
    return rank, float(kept[rank - 1])


@torch.no_grad()
def factorise(layer: nn.Module, rank: int, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> LowRankLinear:
    """``layer`` (a Linear or ``Conv1D``) as a :class:`LowRankLinear` of ``rank`` from its SVD
    ``u`` ``(out, k)``, ``s`` ``(k,)``, ``vh`` ``(k, in)``, each factor given ``√s``."""
    root = s[:rank].sqrt()
    up = u[:, :rank] * root  # (out, rank)
    down = root.unsqueeze(1) * vh[:rank]  # (rank, in)
    w = layer.weight
    bias = None if layer.bias is None else layer.bias.detach()
    low = LowRankLinear.from_factors(up.to(w.dtype), down.to(w.dtype), bias).to(w.device)
    low.requires_grad_(w.requires_grad)  # a frozen layer's factors stay frozen
    return low


def lowrank_(
    model: nn.Module,
    config: LowRankConfig = LowRankConfig(),
    data: Data | list | None = None,
    *,
    progress: Progress | None = None,
) -> LowRankResult:
    """Replace the Linear layers of ``model``'s repeated blocks (a transformer's layers) by
    low-rank factors from a truncated SVD, each layer's rank chosen by the energy it keeps; in
    place. A failure leaves the model as it was.

    Args:
        model: a transformer (e.g. a Hugging Face causal language model).
        config: energy kept, the saving a layer must make, rank cap and rounding, layers.
        data: optional calibration batches (a :class:`~torchslim.core.data.Data` or a list of
            token-id tensors or dicts with ``input_ids``), used only to report each layer's
            output error.
        progress: called as ``progress(blocks done, blocks)``.

    Example:
        >>> result = ts.lowrank_(llm, ts.LowRankConfig(energy=0.9, layers=("re:.*mlp.*",)))  # doctest: +SKIP
        >>> print(result.summary())  # doctest: +SKIP
    """
    _check_patterns(model, config.layers)
    records: list[LowRankLayer] = []

    def change(block: nn.Module, prefix: str, name: str, layer: nn.Module, s: dict | None) -> None:
        row, replacement = _layer(f"{prefix}.{name}", layer, s, config)
        records.append(row)
        if replacement is not None:
            block.set_submodule(name, replacement)

    batches = None if data is None else calibration_inputs(data, config.calib_batches)
    each_layer(model, batches, _chooser(config), change, progress)  # a failure puts every layer back
    if not records:
        raise ConfigError("no Linear layer to factorise inside the model's repeated blocks")
    return LowRankResult(records, config)


def _layer(
    name: str, layer: nn.Module, stats: dict | None, config: LowRankConfig
) -> tuple[LowRankLayer, LowRankLinear | None]:
    """The report row of one layer and its low-rank replacement (None: left dense)."""
    w = weight_matrix(layer).float()  # (out, in)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    rank, kept = choose_rank(s, config)
    (out, inputs), bias = w.shape, 0 if layer.bias is None else layer.bias.numel()
    before, after = out * inputs + bias, rank * (inputs + out) + bias
    row = LowRankLayer(
        name, rank, s.numel(), kept, before, before, False, None, 0 if stats is None else stats["tokens"]
    )
    if config.min_saving is not None and after > (1 - config.min_saving) * before:
        row.note = (
            f"rank {rank} of {s.numel()} would keep {after:,} of {before:,} parameters, saving less than "
            f"min_saving={config.min_saving:g}: left dense"
        )
        return row, None
    replacement = factorise(layer, rank, u, s, vh)
    row.params_after, row.factorised = after, True
    if stats is not None:
        approx = (replacement.up.weight.detach().float() @ replacement.down.weight.detach().float()).cpu()  # (out, in)
        row.output_error = relative_output_error(w.cpu(), approx, stats["hessian"])
    return row, replacement


def _chooser(config: LowRankConfig):
    """The chosen Linear layers of a block, less the factors of layers already low-rank."""

    def choose(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
        factors = {f"{n}.{f}" for n, m in block.named_modules() if isinstance(m, LowRankLinear) for f in ("down", "up")}
        return {n: m for n, m in chosen_layers(block, prefix, config.layers).items() if n not in factors}

    return choose


def _check_patterns(model: nn.Module, patterns: tuple[str, ...] | None) -> None:
    """Every name or pattern in ``config.layers`` must match a Linear inside the repeated blocks."""
    if patterns is None:
        return
    prefix, blocks = repeated_blocks(model)
    names = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n in linear_layers(b)]
    check_keys(names, patterns, "config.layers", "Linear layer")
