"""Per-layer inventory: which layers hold compressible weights, their sizes and sparsity."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from torchslim.core.data import batch_rows
from torchslim.core.qlayers import QuantizedLayer
from torchslim.core.qrnn import QuantizedRNN
from torchslim.core.task import call_model

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layer types whose ``weight`` the unstructured transforms (prune, share) work on."""


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Linear / Conv layer, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


RECURRENT_LAYERS = (nn.RNN, nn.LSTM, nn.GRU)
"""Layer types whose ``weight_ih_l*`` / ``weight_hh_l*`` matrices pruning and sharing also treat."""


def sparse_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every layer whose weights magnitude pruning and weight sharing
    treat: Linear / Conv (``weight``), RNN / LSTM / GRU (every layer and direction's input and
    hidden matrices) and MultiheadAttention (its query/key/value projection; its ``out_proj``
    is a Linear of its own), in registration order."""
    kinds = (*WEIGHT_LAYERS, *RECURRENT_LAYERS, nn.MultiheadAttention)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def weight_names(layer: nn.Module) -> tuple[str, ...]:
    """The weight tensors of a :func:`sparse_layers` layer, by attribute name."""
    if isinstance(layer, RECURRENT_LAYERS):
        return tuple(n for n in layer._flat_weights_names if n.startswith("weight_"))
    if isinstance(layer, nn.MultiheadAttention):
        packed = layer.in_proj_weight is not None
        return ("in_proj_weight",) if packed else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    return ("weight",)


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


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _macs(module: nn.Module, inp: tuple, kwargs: dict, out: object) -> int:
    """Multiply-accumulates of one call of ``module`` for the whole batch."""
    if isinstance(module, _CONVS):
        k = module.in_channels // module.groups * math.prod(module.kernel_size)
        return out.numel() * k  # type: ignore[union-attr]
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features  # type: ignore[union-attr]
    if isinstance(module, QuantizedLayer):
        return out.numel() * math.prod(module.weight_shape()[1:])  # type: ignore[union-attr]
    if isinstance(module, (nn.LSTM, nn.GRU, nn.RNN, QuantizedRNN)):
        seq = out[0]  # (B, T, D * H) or (T, B, D * H)
        steps = seq.numel() // (seq.shape[-1])
        kind = getattr(module, "float_type", type(module).__name__)
        gates = (
            4
            if isinstance(module, nn.LSTM) or kind == "LSTM"
            else 3
            if isinstance(module, nn.GRU) or kind == "GRU"
            else 1
        )
        dirs = 2 if module.bidirectional else 1
        h, i = module.hidden_size, module.input_size
        per_step = gates * h * (i + h) + (gates * h * (dirs * h + h) * (module.num_layers - 1))
        return steps * dirs * per_step
    if isinstance(module, nn.MultiheadAttention):
        args = list(inp) + [kwargs.get(k) for k in ("query", "key", "value")[len(inp) :]]
        q, k = args[0], args[1]  # (L, B, E) or (B, L, E); k: (S, B, kdim) or (B, S, kdim)
        e, tokens = module.embed_dim, q.numel() // q.shape[-1]
        keys = k.numel() // k.shape[-1]  # batch * source length
        source = k.shape[1] if module.batch_first else k.shape[0]
        projections = tokens * 2 * e * e + keys * (module.kdim + module.vdim) * e  # q and out; k and v
        return projections + tokens * 2 * source * e  # + scores and weighted sum
    return 0


@torch.no_grad()
def layer_macs(model: nn.Module, example: Any) -> dict[str, int]:
    """Multiply-accumulates per input sample of every Conv, Linear, recurrent and attention layer.

    Counted with forward hooks on one run over ``example``; element-wise work (activations,
    BatchNorm, adds) is not counted, as is usual for MAC figures.
    """
    batch = max(1, batch_rows(example))
    counts: dict[str, int] = {}
    kinds = (*_CONVS, nn.Linear, QuantizedLayer, QuantizedRNN, nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention)

    def hook(name: str):
        return lambda m, inp, kw, out: counts.__setitem__(name, counts.get(name, 0) + _macs(m, inp, kw, out) // batch)

    handles = [
        m.register_forward_hook(hook(n), with_kwargs=True) for n, m in model.named_modules() if isinstance(m, kinds)
    ]
    was_training = model.training
    try:
        model.eval()
        call_model(model, example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts
