"""The layers of a Hugging Face BERT-style encoder, read from its module tree.

BERT, RoBERTa, ELECTRA, XLM-R and the MiniLM sentence encoders share one layer layout: a
self-attention module whose ``query``, ``key`` and ``value`` Linears each write
``num_attention_heads`` blocks of ``attention_head_size`` features, the attention's output
projection (``attention.output.dense``) that reads them, and a feed-forward pair
(``intermediate.dense`` -> ``output.dense``). A head is a coupled slice of all four attention
Linears; an FFN neuron a row of the first feed-forward Linear and a column of the second. The
layers sit in one ``nn.ModuleList``, which is what dropping a layer shortens.

Read by attribute and name rather than traced: the layout is fixed across the family and the
attention's ``view(..., -1, head_size)`` infers the head count from the projections' width,
so slicing whole heads keeps the Hugging Face module running unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchslim.core.task import call_model, token_mask
from torchslim.errors import ConfigError

HEAD_ATTRS = ("num_attention_heads", "attention_head_size", "all_head_size")
"""The size attributes of a Hugging Face self-attention module (its head count and width)."""


def is_attention(m: nn.Module) -> bool:
    """Whether ``m`` is a BERT-style self-attention module: Linear ``query``, ``key``, ``value``
    and integer head attributes."""
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in ("query", "key", "value")) and all(
        isinstance(getattr(m, a, None), int) for a in HEAD_ATTRS
    )


@dataclass(frozen=True)
class Block:
    """One encoder layer: the module names of its parts and its sizes."""

    index: int  # position in the layer list
    name: str  # the layer module
    attention: str  # the self-attention module (query / key / value)
    out: str  # the attention's output projection
    ffn_in: str
    ffn_out: str
    heads: int
    head_size: int
    neurons: int

    def qkv(self) -> tuple[str, str, str]:
        return tuple(f"{self.attention}.{p}" for p in ("query", "key", "value"))  # type: ignore[return-value]


@dataclass(frozen=True)
class Encoder:
    """Where an encoder's layers are: the ``ModuleList`` holding them and each layer's parts."""

    layers: str  # the ModuleList's name
    blocks: tuple[Block, ...]


def find_encoder(model: nn.Module) -> Encoder:
    """The model's BERT-style layers; a :class:`~torchslim.errors.ConfigError` when it has none."""
    modules = dict(model.named_modules())
    for list_name, m in modules.items():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        blocks = [_block(i, f"{list_name}.{i}" if list_name else str(i), modules) for i in range(len(m))]
        if all(b is not None for b in blocks):
            return Encoder(list_name, tuple(blocks))  # type: ignore[arg-type]
    raise ConfigError(
        f"{type(model).__name__} has no BERT-style encoder layers (a ModuleList of layers with "
        "attention.self.query/key/value, attention.output.dense, intermediate.dense and output.dense): "
        "prune its Linear layers with channel_prune_ instead"
    )


def _block(index: int, name: str, modules: dict[str, nn.Module]) -> Block | None:
    names = {
        "attention": f"{name}.attention.self",
        "out": f"{name}.attention.output.dense",
        "ffn_in": f"{name}.intermediate.dense",
        "ffn_out": f"{name}.output.dense",
    }
    attn = modules.get(names["attention"])
    parts = [modules.get(names[k]) for k in ("out", "ffn_in", "ffn_out")]
    if attn is None or not is_attention(attn) or not all(isinstance(p, nn.Linear) for p in parts):
        return None
    out, ffn_in, ffn_out = parts
    width = attn.num_attention_heads * attn.attention_head_size
    if not (attn.all_head_size == width == attn.query.out_features == out.in_features):
        raise ConfigError(
            f"{names['attention']}: {attn.num_attention_heads} heads of {attn.attention_head_size} features do not "
            f"match its projections ({attn.query.out_features} wide, output reads {out.in_features})"
        )
    if ffn_in.out_features != ffn_out.in_features:
        raise ConfigError(
            f"{name}: the feed-forward Linears do not chain ({ffn_in.out_features} -> {ffn_out.in_features})"
        )
    return Block(
        index,
        name,
        heads=attn.num_attention_heads,
        head_size=attn.attention_head_size,
        neurons=ffn_in.out_features,
        **names,
    )


@torch.no_grad()
def part_scores(
    model: nn.Module, encoder: Encoder, calib: list
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per layer, each head's and each FFN neuron's mean contribution over real tokens: the norm
    of what it writes through the output projection (for a neuron, ``|a_j| ||W_out[:, j]||``)."""
    modules = dict(model.named_modules())
    heads = {b.index: torch.zeros(b.heads) for b in encoder.blocks}
    neurons = {b.index: torch.zeros(b.neurons) for b in encoder.blocks}

    def head(b: Block) -> Callable[[torch.Tensor], None]:
        w = modules[b.out].weight.detach().float()  # (D, H * dh)

        def add(a: torch.Tensor) -> None:
            for h in range(b.heads):
                part = slice(h * b.head_size, (h + 1) * b.head_size)
                heads[b.index][h] += (a[:, part] @ w[:, part].T).norm(dim=-1).sum().cpu()

        return add

    def neuron(b: Block) -> Callable[[torch.Tensor], None]:
        col = modules[b.ffn_out].weight.detach().float().norm(dim=0)  # (F,)
        return lambda a: neurons[b.index].add_((a.abs().sum(0) * col).cpu())

    readers = {}
    for b in encoder.blocks:
        readers[modules[b.out]], readers[modules[b.ffn_out]] = head(b), neuron(b)
    model.eval()
    read_inputs(model, readers, calib, torch.float32)
    return heads, neurons


@torch.no_grad()
def refit_sums(
    model: nn.Module, linear: nn.Linear, cols: torch.Tensor, calib: list
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X_k^T X_k, X_k^T Y)`` over the real tokens of the calibration batches, where ``X`` is
    ``linear``'s input, ``X_k`` its columns ``cols`` and ``Y = X W^T`` what the layer computes
    now (bias left out: it stays); float64, on the CPU."""
    w = linear.weight.detach().double().cpu()
    k = len(cols)
    sums = [torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, w.shape[0], dtype=torch.float64)]

    def add(x: torch.Tensor) -> None:
        x = x.cpu()
        kept = x[:, cols]
        sums[0] += kept.T @ kept
        sums[1] += kept.T @ (x @ w.T)

    read_inputs(model, {linear: add}, calib, torch.float64)
    return sums[0], sums[1]


def read_inputs(
    model: nn.Module, readers: dict[nn.Module, Callable[[torch.Tensor], None]], calib: list, dtype: torch.dtype
) -> None:
    """Run the calibration batches; each reader gets its module's input rows of real (unpadded)
    tokens, ``(N, width)`` in ``dtype``."""
    state: dict[str, Any] = {}

    def hook(read: Callable[[torch.Tensor], None]):
        def pre(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            read(x[token_mask(state["batch"], x)].to(dtype))

        return pre

    handles = [m.register_forward_pre_hook(hook(read)) for m, read in readers.items()]
    try:
        for batch in calib:
            state["batch"] = batch
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
