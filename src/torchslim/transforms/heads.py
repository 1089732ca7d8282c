"""Structured pruning of a Hugging Face encoder: whole attention heads, FFN neurons and layers.

``encoder_prune_`` physically removes parts of a BERT-style encoder
(:mod:`torchslim.analysis.blocks`): a head's rows of ``query``, ``key`` and ``value`` and its
columns of the attention's output projection go together and the module's head count is
updated, so the Hugging Face forward runs unchanged; an FFN neuron is a row of the first
feed-forward Linear and a column of the second; a dropped layer leaves the layer list.

Importance comes from calibration batches. A head or a neuron scores what it writes into the
residual stream: the mean norm over real (unpadded) tokens of its contribution to the output
projection, ``||W_out[:, part] a_part||``, so heads and neurons of every layer are measured in
one unit. Layers are dropped greedily, each time the one whose removal moves the model's
output least (1 - cosine of the mean-pooled token states on the calibration batches).

With ``reconstruct`` (the default), each layer's output projections are then refitted, layer
by layer in order, so that the pruned layer reproduces what the whole layer wrote: with the
inputs the already-pruned model gives it, the kept columns of the attention's output
projection (and of the second FFN Linear) are the ridge least-squares solution of
``X_kept W_kept^T = X_all W_all^T`` over the calibration tokens (Kwon et al. 2022 refit their
masks this way). It costs two passes over the calibration batches per layer and no training.
Further recovery: distil the pruned model from the original on unlabeled text
(:func:`torchslim.transforms.distill.distill` with ``"relation"`` feature pairs).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.analysis.blocks import Block, Encoder, find_encoder, part_scores, refit_sums
from torchslim.core.data import Data
from torchslim.core.device import model_device
from torchslim.core.plan import CompressionPlan, LayerDecision
from torchslim.core.task import Embedding, call_model, move
from torchslim.errors import ConfigError
from torchslim.transforms.calibrate import calibration_batches, inputs_of

log = logging.getLogger(__name__)

HeadSpec = float | Mapping[int, int | Sequence[int]] | None


@dataclass(frozen=True)
class EncoderPruneConfig:
    """What to remove from a BERT-style encoder. Leave a field ``None`` to keep that part whole.

    Attributes:
        heads: the fraction of each layer's attention heads to keep (e.g. 0.5), or a map from
            layer index to the number of heads it keeps (an int) or the heads it loses (a list
            of head indices, as Hugging Face's ``prune_heads`` takes them).
        neurons: the fraction of each layer's FFN neurons to keep.
        layers: how many layers to keep (the least important are dropped), or which (indices).
        scope: ``"layer"`` keeps the same share in every layer; ``"global"`` ranks the heads
            (and the neurons) of all layers together, at least ``min_heads`` per layer.
        round_to: kept neuron counts are multiples of this (SIMD-friendly widths).
        min_heads: no layer keeps fewer heads than this.
        calib_batches: calibration batches for importance, layer choice and reconstruction.
        reconstruct: refit each pruned layer's output projections by least squares so the
            layer's output matches the unpruned layer's on the calibration tokens.
        ridge: the least-squares regulariser, relative to the mean of the Gram matrix's diagonal.
    """

    heads: HeadSpec = None
    neurons: float | None = None
    layers: int | tuple[int, ...] | None = None
    scope: str = "layer"
    round_to: int = 8
    min_heads: int = 1
    calib_batches: int = 8
    reconstruct: bool = True
    ridge: float = 1e-3

    def __post_init__(self) -> None:
        if self.heads is None and self.neurons is None and self.layers is None:
            raise ConfigError("give heads=..., neurons=... or layers=...: there is nothing to prune")
        for key in ("neurons",) + (() if isinstance(self.heads, Mapping) else ("heads",)):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
                raise ConfigError(f"{key}={v!r}: the fraction to keep must be in (0, 1], e.g. 0.5 keeps half")
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.scope not in ("layer", "global"):
            raise ConfigError(f"scope={self.scope!r}: use 'layer' or 'global'")
        for key in ("round_to", "min_heads", "calib_batches"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)!r}: use a whole number >= 1")


@dataclass
class LayerRecord:
    """What happened to one encoder layer (indices are the original ones)."""

    layer: int
    heads: tuple[int, int]  # before, after
    neurons: tuple[int, int]
    dropped: bool = False
    removed_heads: list[int] = field(default_factory=list)


@dataclass
class EncoderPruneResult:
    """What ``encoder_prune_`` did, per layer, and the parameters before and after."""

    layers: list[LayerRecord]
    params_before: int
    params_after: int
    names: dict[int, str]  # original layer index -> its module name after pruning

    @property
    def plan(self) -> CompressionPlan:
        """Per kept layer: the fraction of heads (on the attention module) and of FFN neurons
        (on the first feed-forward Linear) removed; a dropped layer is recorded as skipped."""
        rules = []
        for r in self.layers:
            if r.dropped:
                continue
            name = self.names[r.layer]
            if r.heads[1] < r.heads[0]:
                rules.append((f"{name}.attention.self", LayerDecision(channels=round(1 - r.heads[1] / r.heads[0], 6))))
            if r.neurons[1] < r.neurons[0]:
                frac = round(1 - r.neurons[1] / r.neurons[0], 6)
                rules.append((f"{name}.intermediate.dense", LayerDecision(channels=frac)))
        return CompressionPlan(tuple(rules))

    def to_dict(self) -> dict:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "dropped": [r.layer for r in self.layers if r.dropped],
            "layers": [
                {"layer": r.layer, "heads": list(r.heads), "neurons": list(r.neurons), "dropped": r.dropped}
                for r in self.layers
            ],
        }

    def summary(self) -> str:
        kept = [r for r in self.layers if not r.dropped]
        heads = sum(r.heads[1] for r in kept), sum(r.heads[0] for r in self.layers)
        neurons = sum(r.neurons[1] for r in kept), sum(r.neurons[0] for r in self.layers)
        return (
            f"{len(kept)} of {len(self.layers)} layers, {heads[0]} of {heads[1]} heads, {neurons[0]} of {neurons[1]} "
            f"FFN neurons; {self.params_after:,} of {self.params_before:,} parameters"
        )


def encoder_prune_(
    model: nn.Module, config: EncoderPruneConfig, data: Data | None = None, *, batches: Sequence[Any] | None = None
) -> EncoderPruneResult:
    """Remove heads, FFN neurons and layers of a BERT-style encoder in place.

    Importance is measured on calibration batches: ``data``'s calibration split or
    ``batches`` (dicts of ``input_ids`` / ``attention_mask``, as
    :func:`torchslim.core.encoders.tokenize` makes them). Explicit head lists and layer
    indices need no data.

    Raises :class:`~torchslim.errors.ConfigError` when the model has no BERT-style layers, a
    layer index or head does not exist, or a layer would keep no heads.

    Example:
        >>> res = encoder_prune_(model, EncoderPruneConfig(heads=0.5, neurons=0.5, layers=3), batches=calib)  # doctest: +SKIP
        >>> res.summary()  # doctest: +SKIP
        '3 of 6 layers, 18 of 72 heads, 2304 of 9216 FFN neurons; ...'
    """
    encoder = find_encoder(model)
    records = {b.index: LayerRecord(b.index, (b.heads, b.heads), (b.neurons, b.neurons)) for b in encoder.blocks}
    explicit = _explicit_heads(config.heads, encoder)
    calib = _batches(model, config, data, batches, explicit)
    before = sum(p.numel() for p in model.parameters())
    every = list(model.get_submodule(encoder.layers))
    kept = _keep_layers(model, encoder, config.layers, calib)
    for i in range(len(encoder.blocks)):
        records[i].dropped = i not in kept
    _set_layers(model, encoder, every, kept)
    encoder = find_encoder(model)
    originals = dict(enumerate(kept))  # new index -> original index
    modules = dict(model.named_modules())
    head_scores, neuron_scores = part_scores(model, encoder, calib) if calib else ({}, {})
    head_keep = _head_keep(config, encoder, head_scores, explicit, originals)
    neuron_keep = _neuron_keep(config, encoder, neuron_scores)
    refit = config.reconstruct and bool(calib)
    for b in encoder.blocks:  # in order: a layer is refitted on what the pruned layers before it give
        rec = records[originals[b.index]]
        if b.index in head_keep:
            keep = head_keep[b.index]
            rec.removed_heads = [h for h in range(b.heads) if h not in keep]
            cols = torch.cat([torch.arange(h * b.head_size, (h + 1) * b.head_size) for h in keep])
            stats = refit_sums(model, modules[b.out], cols, calib) if refit and len(keep) < b.heads else None
            _slice_heads(modules, b, keep)
            if stats is not None:
                _refit(modules[b.out], stats, config.ridge)
        if b.index in neuron_keep:
            cols = torch.tensor(neuron_keep[b.index])
            stats = refit_sums(model, modules[b.ffn_out], cols, calib) if refit and len(cols) < b.neurons else None
            _slice_neurons(modules, b, neuron_keep[b.index])
            if stats is not None:
                _refit(modules[b.ffn_out], stats, config.ridge)
    for b in find_encoder(model).blocks:
        rec = records[originals[b.index]]
        rec.heads, rec.neurons = (rec.heads[0], b.heads), (rec.neurons[0], b.neurons)
    result = EncoderPruneResult(
        [records[i] for i in sorted(records)],
        before,
        sum(p.numel() for p in model.parameters()),
        {originals[b.index]: b.name for b in find_encoder(model).blocks},
    )
    log.info("encoder_prune_: %s", result.summary())
    return result


def _explicit_heads(heads: HeadSpec, encoder: Encoder) -> dict[int, list[int]] | None:
    """An explicit head map as the heads each named layer keeps; checked against the model."""
    if not isinstance(heads, Mapping):
        return None
    n = len(encoder.blocks)
    out: dict[int, list[int]] = {}
    for layer, spec in heads.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise ConfigError(f"heads names layer {layer!r}, but the encoder has layers 0 to {n - 1}")
        have = encoder.blocks[layer].heads
        if isinstance(spec, int) and not isinstance(spec, bool):
            if not 1 <= spec <= have:
                raise ConfigError(f"heads[{layer}]={spec}: layer {layer} has {have} heads; keep between 1 and {have}")
            out[layer] = list(range(spec))  # which ones: decided by importance below
            continue
        drop = list(spec) if isinstance(spec, (list, tuple)) else None
        if drop is None or not all(isinstance(h, int) and not isinstance(h, bool) for h in drop):
            raise ConfigError(f"heads[{layer}]={spec!r}: give a number of heads to keep or a list of head indices")
        bad = [h for h in drop if not 0 <= h < have]
        if bad:
            raise ConfigError(f"heads[{layer}] removes head {bad[0]}, but layer {layer} has heads 0 to {have - 1}")
        if len(set(drop)) >= have:
            raise ConfigError(
                f"heads[{layer}] removes all {have} heads of layer {layer}: keep at least one (or drop the layer)"
            )
        out[layer] = [h for h in range(have) if h not in set(drop)]
    return out


def _needs_data(config: EncoderPruneConfig, explicit: dict[int, list[int]] | None) -> bool:
    counted = isinstance(config.heads, Mapping) and any(isinstance(v, int) for v in config.heads.values())
    return (
        (config.heads is not None and explicit is None)
        or counted
        or config.neurons is not None
        or isinstance(config.layers, int)
    )


def _batches(
    model: nn.Module, config: EncoderPruneConfig, data: Data | None, batches: Sequence[Any] | None, explicit
) -> list:
    if batches is None and data is None:
        if not _needs_data(config, explicit):
            return []  # explicit heads and layers: sliced without reconstruction
        raise ConfigError(
            "importance is measured on calibration text: pass data=... or batches=<tokenized batches> "
            "(or name the heads and layers to remove)"
        )
    source = list(batches) if batches is not None else calibration_batches(data, config.calib_batches)
    task = data.task if data is not None else None
    out = [inputs_of(b, task) for b in source[: config.calib_batches]]
    if not out:
        raise ConfigError("no calibration batches: give at least one batch of tokenized text")
    where = model_device(model)
    return [move(b, where) for b in out]


@torch.no_grad()
def _pooled(model: nn.Module, batches: list) -> list[torch.Tensor]:
    task = Embedding()
    return [F.normalize(task.embed(call_model(model, b), b).float(), dim=-1) for b in batches]


def _keep_layers(model: nn.Module, encoder: Encoder, layers: Any, calib: list) -> list[int]:
    n = len(encoder.blocks)
    every = list(model.get_submodule(encoder.layers))
    if layers is None:
        return list(range(n))
    if isinstance(layers, tuple):
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
        if bad or not layers:
            raise ConfigError(f"layers={layers!r}: name the layers to keep, indices from 0 to {n - 1}")
        return sorted(set(layers))
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= n:
        raise ConfigError(f"layers={layers!r}: the encoder has {n} layers; keep between 1 and {n}")
    model.eval()
    full = _pooled(model, calib)
    kept = list(range(n))
    while len(kept) > layers:
        harm = {}
        for i in kept:
            _set_layers(model, encoder, every, [j for j in kept if j != i])
            try:
                harm[i] = sum(float((1 - (a * b).sum(-1)).mean()) for a, b in zip(_pooled(model, calib), full))
            finally:
                _set_layers(model, encoder, every, list(range(n)))
        worst = min(harm, key=harm.get)
        log.info("dropping layer %d (output moves by %.4f without it)", worst, harm[worst] / len(calib))
        kept.remove(worst)
    return kept


def _set_layers(model: nn.Module, encoder: Encoder, layers: list[nn.Module], keep: list[int]) -> None:
    """Make the layer list hold ``layers[i]`` for each ``i`` in ``keep``, in order (a Hugging
    Face config's layer count follows)."""
    holder = model.get_submodule(encoder.layers)
    del holder[:]
    holder.extend(layers[i] for i in keep)
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "num_hidden_layers", None), int):
        config.num_hidden_layers = len(keep)


def _head_keep(
    config: EncoderPruneConfig,
    encoder: Encoder,
    scores: dict[int, torch.Tensor],
    explicit: dict[int, list[int]] | None,
    originals: dict[int, int],
) -> dict[int, list[int]]:
    """Per (new) layer index, the heads it keeps, in order."""
    if config.heads is None:
        return {}
    by_original = {originals[b.index]: b for b in encoder.blocks}
    if explicit is not None:
        out = {}
        counted = config.heads
        for layer, keep in explicit.items():
            b = by_original.get(layer)
            if b is None:
                raise ConfigError(f"heads names layer {layer}, which layers=... drops")
            spec = counted[layer]  # type: ignore[index]
            if isinstance(spec, int):
                keep = sorted(scores[b.index].topk(spec).indices.tolist())
            out[b.index] = keep
        return out
    frac = float(config.heads)  # type: ignore[arg-type]
    if config.scope == "layer":
        return {
            b.index: sorted(scores[b.index].topk(max(config.min_heads, round(b.heads * frac))).indices.tolist())
            for b in encoder.blocks
        }
    return _global(encoder, scores, frac, config.min_heads, lambda b: b.heads, 1)


def _neuron_keep(config: EncoderPruneConfig, encoder: Encoder, scores: dict[int, torch.Tensor]) -> dict[int, list[int]]:
    if config.neurons is None:
        return {}
    if config.scope == "global":
        return _global(encoder, scores, config.neurons, config.round_to, lambda b: b.neurons, config.round_to)
    out = {}
    for b in encoder.blocks:
        n = min(b.neurons, max(config.round_to, config.round_to * round(b.neurons * config.neurons / config.round_to)))
        out[b.index] = sorted(scores[b.index].topk(n).indices.tolist())
    return out


def _global(encoder: Encoder, scores: dict, frac: float, floor: int, size, step: int) -> dict[int, list[int]]:
    """Rank the parts of every layer together (scores as measured: one unit across layers)."""
    total = sum(size(b) for b in encoder.blocks)
    budget = round(total * frac)
    flat = torch.cat([scores[b.index] for b in encoder.blocks])
    order = flat.argsort(descending=True)[:budget]
    counts = {b.index: 0 for b in encoder.blocks}
    offsets, start = {}, 0
    for b in encoder.blocks:
        offsets[b.index] = (start, start + size(b))
        start += size(b)
    for i in order.tolist():
        for idx, (lo, hi) in offsets.items():
            if lo <= i < hi:
                counts[idx] += 1
    out = {}
    for b in encoder.blocks:
        n = min(size(b), max(floor, step * round(counts[b.index] / step)))
        out[b.index] = sorted(scores[b.index].topk(n).indices.tolist())
    return out


def _refit(linear: nn.Linear, stats: tuple[torch.Tensor, torch.Tensor], ridge: float) -> None:
    """Set the (already sliced) weight to the ridge least-squares fit of the full layer's output."""
    xx, xy = stats
    damp = ridge * float(xx.diagonal().mean().clamp_min(1e-12))
    solved = torch.linalg.solve(xx + damp * torch.eye(len(xx), dtype=xx.dtype), xy)  # (k, out)
    with torch.no_grad():
        linear.weight.copy_(solved.T.to(linear.weight.dtype))


def _rows(linear: nn.Linear, idx: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[idx].clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[idx].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features = len(idx)


def _columns(linear: nn.Linear, idx: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[:, idx].clone(), requires_grad=linear.weight.requires_grad)
    linear.in_features = len(idx)


def _slice_heads(modules: dict[str, nn.Module], b: Block, keep: list[int]) -> None:
    if len(keep) == b.heads:
        return
    idx = torch.cat([torch.arange(h * b.head_size, (h + 1) * b.head_size) for h in keep])
    idx = idx.to(modules[b.out].weight.device)
    for name in b.qkv():
        _rows(modules[name], idx)
    _columns(modules[b.out], idx)
    attn = modules[b.attention]
    attn.num_attention_heads, attn.all_head_size = len(keep), len(keep) * b.head_size


def _slice_neurons(modules: dict[str, nn.Module], b: Block, keep: list[int]) -> None:
    if len(keep) == b.neurons:
        return
    idx = torch.tensor(keep, device=modules[b.ffn_in].weight.device)
    _rows(modules[b.ffn_in], idx)
    _columns(modules[b.ffn_out], idx)
