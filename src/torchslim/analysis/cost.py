"""Per-layer inventory: which layers hold compressible weights, their sizes and sparsity."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layer types whose ``weight`` the unstructured transforms (prune, share) work on."""


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Linear / Conv layer, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


@dataclass(frozen=True)
class LayerCost:
    """Size facts of one weight layer."""

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    nonzero: int
    distinct: int

    @property
    def density(self) -> float:
        return self.nonzero / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "density": self.density}


@torch.no_grad()
def layer_costs(model: nn.Module) -> list[LayerCost]:
    """One :class:`LayerCost` per weight layer; ``distinct`` counts distinct non-zero values."""
    out = []
    for name, m in weight_layers(model):
        w = m.weight.detach()
        nz = w[w != 0]
        out.append(
            LayerCost(name, type(m).__name__, tuple(w.shape), w.numel(), int(nz.numel()), int(nz.unique().numel()))
        )
    return out


def count_params(model: nn.Module) -> int:
    """All parameters and buffers that a state_dict would hold."""
    return sum(t.numel() for t in model.state_dict().values())
