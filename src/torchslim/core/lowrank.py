"""Low-rank Linear layers: a weight ``W`` (out x in) stored as two factors, ``W ≈ U V``.

A :class:`LowRankLinear` computes ``up(down(x))`` with ``down`` an ``nn.Linear(in, rank)``
without bias and ``up`` an ``nn.Linear(rank, out)`` holding the replaced layer's bias. Both are
plain ``nn.Linear`` modules, so everything that handles Linear layers (int8 and int4
quantization, the layer-wise verbs, coded storage) handles the factors as they are.

The manifest's ``lowrank`` map (docs/format.md, section 2.5) records every such layer and its
rank: :func:`lowrank_layers` writes it, :func:`parse_lowrank` reads it back without a model,
:func:`lowrank_layers_in_` puts empty low-rank layers into a freshly built model before it is
resized and filled, and :func:`check_ranks` checks the resized factors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchslim.core.linears import is_linear, weight_matrix
from torchslim.errors import ArtifactError, ShapeMismatchError


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a Linear layer of rank at most ``rank``.

    Example:
        >>> layer = LowRankLinear(64, 32, rank=8)
        >>> layer(torch.zeros(3, 64)).shape, layer.rank
        (torch.Size([3, 32]), 8)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @classmethod
    @torch.no_grad()
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None) -> LowRankLinear:
        """The layer holding ``up`` ``(out, rank)``, ``down`` ``(rank, in)`` and ``bias`` ``(out,)``
        (copied, in ``up``'s dtype and device)."""
        (out, rank), inputs = up.shape, down.shape[1]
        layer = cls(inputs, out, rank, bias is not None, device=up.device, dtype=up.dtype)
        layer.down.weight.copy_(down)
        layer.up.weight.copy_(up)
        if bias is not None:
            layer.up.bias.copy_(bias)
        return layer

    @classmethod
    @torch.no_grad()
    def empty_like(cls, layer: nn.Module, rank: int) -> LowRankLinear:
        """A zero-filled layer of ``layer``'s (a Linear's or GPT-2 ``Conv1D``'s) sizes, dtype,
        device and bias, at ``rank``; built without initialising random weights."""
        out, inputs = weight_matrix(layer).shape
        empty = cls(inputs, out, rank, layer.bias is not None, device="meta", dtype=layer.weight.dtype)
        empty = empty.to_empty(device=layer.weight.device)
        for p in empty.parameters():
            p.zero_()
        return empty

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def lowrank_layers(model: nn.Module) -> dict[str, dict[str, int]]:
    """The manifest's ``lowrank`` map: every low-rank layer's name -> ``{"rank": r}``."""
    return {n: {"rank": m.rank} for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def parse_lowrank(spec: Any, where: Any = "file") -> dict[str, int]:
    """The manifest's ``lowrank`` map read back (absent: ``{}``), as layer name -> rank: every
    check that needs no model; a fault is an :class:`ArtifactError` naming the layer."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise ArtifactError(f"{where}: the manifest's 'lowrank' must map layer names to {{\"rank\": r}} objects")
    ranks = {}
    for name, entry in spec.items():
        rank = entry.get("rank") if isinstance(entry, dict) else None
        if not name or not isinstance(entry, dict) or set(entry) != {"rank"} or type(rank) is not int or rank < 1:
            raise ArtifactError(
                f'{where}: low-rank layer {name[:80]!r} has {str(entry)[:80]}; an entry must be {{"rank": r}} '
                "with r an integer from 1"
            )
        ranks[name] = rank
    for name in ranks:
        outer = next((o for o in ranks if name.startswith(f"{o}.")), None)
        if outer is not None:
            raise ArtifactError(f"{where}: low-rank layer {name[:80]!r} lies inside low-rank layer {outer[:80]!r}")
    return ranks


def lowrank_layers_in_(model: nn.Module, ranks: Mapping[str, int], where: Any = "file") -> None:
    """Replace each layer ``ranks`` names by an empty :class:`LowRankLinear` of its rank, every
    layer checked first (a Linear or ``Conv1D`` with ``rank <= min(in, out)``), so that a
    refusal changes nothing."""
    owned = dict(model.named_modules())
    for name, rank in ranks.items():
        layer = owned.get(name)
        if layer is None or not is_linear(layer):
            raise ShapeMismatchError(
                f"{where}: the file factorises a Linear at {name[:80]!r} but the model has "
                f"{type(layer).__name__ if layer is not None else 'nothing'} there; pass the builder of the "
                "model that was saved"
            )
        out, inputs = weight_matrix(layer).shape
        if rank > min(out, inputs):
            raise ShapeMismatchError(
                f"{where}: low-rank layer {name[:80]!r} has rank {rank} but the model's layer is {out} x {inputs}: "
                f"a rank is at most {min(out, inputs)}; the file is inconsistent or for another model"
            )
    for name, rank in ranks.items():
        model.set_submodule(name, LowRankLinear.empty_like(owned[name], rank))


def check_ranks(model: nn.Module, ranks: Mapping[str, int], where: Any = "file") -> None:
    """After resizing: each low-rank layer's factors have the rank the file gives, and it is at
    most ``min(in, out)`` of the resized layer."""
    for name, rank in ranks.items():
        m = model.get_submodule(name)
        if not m.rank == m.up.in_features == rank or rank > min(m.in_features, m.out_features):
            raise ShapeMismatchError(
                f"{where}: low-rank layer {name[:80]!r} has rank {rank} in 'lowrank' but factors of "
                f"{m.in_features} -> {m.rank} and {m.up.in_features} -> {m.out_features} in 'modules'; "
                "the file is inconsistent"
            )
