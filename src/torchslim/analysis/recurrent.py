"""Structured pruning of recurrent layers: slicing LSTM / GRU hidden units and input features,
and tracing them as one autograd node.

Torch-Pruning's LSTM slicer handles neither GRU nor the recurrent weight's columns, nor stacks
or both directions; :func:`recurrent_pruner` is the slicing function torchslim registers for
both layer types. :func:`opaque_recurrent` makes each layer one node of the traced graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn


def gates(layer: nn.Module) -> int:
    """Gate blocks stacked in a recurrent layer's weights: LSTM i, f, g, o; GRU r, z, n."""
    return 4 if isinstance(layer, nn.LSTM) else 3


def recurrent_pruner() -> Any:
    import torch_pruning as tp

    class RecurrentPruner(tp.pruner.function.BasePruningFunc):
        """Slices the hidden units of an LSTM or GRU (every layer, direction and gate) and its
        input features. A bidirectional layer's channels are its output features, the forward
        units then the backward ones; both directions must lose as many."""

        def prune_out_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
            h, count, dirs = layer.hidden_size, layer.num_layers, _directions(layer)
            drops = [[i - d * h for i in idxs if d * h <= i < (d + 1) * h] for d in range(dirs)]
            if len({len(d) for d in drops}) > 1:
                raise ValueError(f"both directions must lose as many units (asked {[len(d) for d in drops]})")
            keeps = [[_keep(h, drop) for drop in drops] for _ in range(count)]  # the last layer's: the group's
            for depth in range(count - 1):  # inner layers' units are internal: keep their strongest
                keeps[depth] = [_strongest(layer, depth, d, len(keeps[-1][0])) for d in range(dirs)]
            for depth, per_direction in enumerate(keeps):
                below = torch.cat([k + d * h for d, k in enumerate(keeps[depth - 1])]) if depth else None
                for d, keep in enumerate(per_direction):
                    rows = torch.cat([keep + g * h for g in range(gates(layer))])  # gate blocks
                    for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        name = f"{kind}_l{depth}{_SUFFIX[d]}"
                        if hasattr(layer, name):
                            p = getattr(layer, name).data[rows]  # (G * H_kept, ...)
                            if kind == "weight_hh":
                                p = p[:, keep]  # (G * H_kept, H_kept)
                            elif kind == "weight_ih" and below is not None:
                                p = p[:, below]  # the layer below's units kept, each direction
                            setattr(layer, name, nn.Parameter(p.contiguous()))
            layer.hidden_size = len(keeps[-1][0])
            layer.flatten_parameters()
            return layer

        def prune_in_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
            keep = _keep(layer.input_size, idxs)
            for name in (f"weight_ih_l0{sfx}" for sfx in suffixes(layer)):
                setattr(layer, name, nn.Parameter(getattr(layer, name).data[:, keep].contiguous()))  # (G * H, I_kept)
            layer.input_size = len(keep)
            layer.flatten_parameters()
            return layer

        def get_out_channels(self, layer: nn.RNNBase) -> int:
            return layer.hidden_size * _directions(layer)

        def get_in_channels(self, layer: nn.RNNBase) -> int:
            return layer.input_size

    return RecurrentPruner()


class _Recurrent(torch.autograd.Function):
    """A recurrent layer's forward as one autograd node, for tracing only.

    On the CPU a GRU records every gate of every time step as separate autograd ops;
    Torch-Pruning would walk through them (splits, stacks) and fail. As one node whose inputs
    are the layer's input, initial state and weights, the layer is a leaf of the traced graph,
    like a convolution.
    """

    @staticmethod
    def forward(ctx: Any, forward: Any, states: int, x: torch.Tensor, *tensors: torch.Tensor) -> tuple:
        hx = None if states == 0 else tensors[0] if states == 1 else tuple(tensors[:states])
        out, state = forward(x, hx)
        return (out, *(state if isinstance(state, tuple) else (state,)))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        raise RuntimeError("a recurrent layer traced for structured pruning is not differentiated")


@contextlib.contextmanager
def opaque_recurrent(model: nn.Module) -> Iterator[None]:
    """While tracing, each LSTM / GRU of ``model`` runs as one :class:`_Recurrent` node."""
    layers = [m for m in model.modules() if isinstance(m, (nn.LSTM, nn.GRU))]

    def opaque(layer: nn.RNNBase, forward: Any) -> Any:
        def run(x: Any, hx: Any = None) -> Any:
            if not isinstance(x, torch.Tensor):  # a PackedSequence: traced as it is
                return forward(x, hx)
            hs = () if hx is None else tuple(hx) if isinstance(hx, tuple) else (hx,)
            out, *state = _Recurrent.apply(forward, len(hs), x, *hs, *layer._flat_weights)
            return out, (tuple(state) if isinstance(layer, nn.LSTM) else state[0])

        return run

    own = {layer: layer.__dict__.get("forward") for layer in layers}  # a forward set on the instance, if any
    for layer in layers:
        layer.forward = opaque(layer, layer.forward)  # an instance attribute over the class's forward
    try:
        yield
    finally:
        for layer, forward in own.items():
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


_SUFFIX = ("", "_reverse")


def _directions(layer: nn.RNNBase) -> int:
    return 2 if layer.bidirectional else 1


def suffixes(layer: nn.RNNBase) -> tuple[str, ...]:
    """The parameter-name suffix of each direction: ``("",)`` or ``("", "_reverse")``."""
    return _SUFFIX[: _directions(layer)]


def _strongest(layer: nn.RNNBase, depth: int, direction: int, count: int) -> torch.Tensor:
    """The ``count`` hidden units of an inner layer's direction with the largest weights (L2
    over their gate rows, their recurrent column and the next layer's input columns), in order."""
    h, sfx = layer.hidden_size, _SUFFIX[direction]
    w = [getattr(layer, f"{k}_l{depth}{sfx}").detach() for k in ("weight_ih", "weight_hh")]
    score = sum(m.pow(2).reshape(gates(layer), h, -1).sum((0, 2)) for m in w)  # (H,): gate rows
    score = score + w[1].pow(2).sum(0)  # the recurrent column
    for above in suffixes(layer):  # every direction of the next layer reads this one
        score = score + getattr(layer, f"weight_ih_l{depth + 1}{above}").detach()[
            :, direction * h : (direction + 1) * h
        ].pow(2).sum(0)
    return torch.sort(torch.topk(score, count).indices).values


def _keep(n: int, idxs: Sequence[int]) -> torch.Tensor:
    drop = set(int(i) for i in idxs)
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)
