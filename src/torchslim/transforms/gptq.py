"""GPTQ (Frantar et al., ICLR 2023): int4 weights that keep each layer's output, not its weight.

Rounding every weight to its nearest grid point (RTN) minimises the weight's error; what
matters is the layer's output ``W x`` on the inputs it sees. GPTQ quantizes a layer's input
columns one at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse of the inputs' second-moment matrix ``H = Σ x xᵀ`` (the
Hessian of the output's squared error), so later columns absorb what earlier ones lost. The
paper's refinements are here: columns in order of decreasing ``H`` diagonal ("act-order",
with each group's scale fixed from the float weight first), the inverse's Cholesky factor
computed once, updates applied lazily per block of columns, and ``H``'s diagonal damped by a
fraction of its mean (more when few tokens leave ``H`` singular, said in the report).

The result is the same int4 layer RTN gives (:class:`~torchslim.core.qlayers.QuantizedLayer`,
symmetric scales per group of inputs, stored packed in the `.tslim`), with other integers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from torchslim.core.data import Data
from torchslim.core.linears import in_features, weight_matrix
from torchslim.core.qlayers import QuantizedLayer, pack_int4, quantize_weight, weight_scales
from torchslim.errors import ConfigError
from torchslim.train.fit import Progress
from torchslim.transforms.layerwise import Chooser, calibration_inputs, chosen_layers, each_layer, output_head

log = logging.getLogger(__name__)

_BITS = 4  # the stored layout: int3 values are kept as int4 (runs on the same kernel)
_MAX_DAMP = 1.0  # the most damping tried (a fraction of H's mean diagonal) before giving up


@dataclass(frozen=True)
class GPTQConfig:
    """How to run GPTQ.

    Attributes:
        bits: 4, or 3 (values in [-4, 3], stored and run in the int4 layout).
        group_size: inputs per int4 scale; must divide every quantized layer's input features
            (128 in the paper; the CPU int4 kernels need whole groups).
        act_order: quantize columns in order of decreasing input energy (``H``'s diagonal).
        damp: added to ``H``'s diagonal, as a fraction of its mean (0.01 in the paper).
        calib_batches: calibration batches (token-id tensors or dicts with ``input_ids``).
        block: columns updated together (lazy batch updates); rounded to whole groups.
        layers: names or ``re:`` patterns of the Linear layers to quantize, relative to the
            model; ``None``: every Linear inside the repeated blocks (the embeddings stay as
            they are).
        head: quantize the output head too (``lm_head``), on the inputs the quantized blocks
            give it; a head tied to the input embeddings is untied (the table stays float).
            Off by default, as in the paper; on, it takes the largest float matrix out of each
            decoding step.
    """

    group_size: int = 128
    bits: int = 4
    act_order: bool = True
    damp: float = 0.01
    calib_batches: int = 16
    block: int = 128
    layers: tuple[str, ...] | None = None
    head: bool = False

    def __post_init__(self) -> None:
        for key in ("group_size", "calib_batches", "block"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key}={v!r}: use a whole number >= 1")
        if self.bits not in (3, 4) or isinstance(self.bits, bool):
            raise ConfigError(f"bits={self.bits!r}: use 4 or 3")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not 0 < self.damp <= _MAX_DAMP:
            raise ConfigError(f"damp={self.damp!r}: use a fraction in (0, {_MAX_DAMP}] of H's mean diagonal, e.g. 0.01")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))


@dataclass
class GPTQLayer:
    """What GPTQ did to one layer (a row of the report). Output errors are relative:
    ``‖(W - Ŵ) X‖² / ‖W X‖²`` over the calibration tokens, for GPTQ and for plain rounding."""

    name: str
    tokens: int
    damp: float
    output_error: float
    rtn_output_error: float
    note: str | None = None


@dataclass
class GPTQResult:
    """What ``gptq_`` did."""

    layers: list[GPTQLayer]
    config: GPTQConfig

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "layers": [asdict(r) for r in self.layers]}

    def summary(self) -> str:
        n = max(len(self.layers), 1)
        g = sum(r.output_error for r in self.layers) / n
        r = sum(r.rtn_output_error for r in self.layers) / n
        return (
            f"{len(self.layers)} Linear layers to int{self.config.bits} (groups of {self.config.group_size}): mean relative "
            f"output error {g:.3g} (round-to-nearest: {r:.3g})"
        )


def cholesky_inverse_factor(fresh: Callable[[], torch.Tensor], damp: float) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor of ``(H + λI)⁻¹`` and the damping fraction it took: ``damp``,
    or ten times more until ``H`` is positive definite. ``fresh()`` gives a new copy of ``H``
    (its dtype is the factor's), called again for each retry; the factor is computed in that
    copy's memory (LAPACK works in place), so besides the caller's ``H`` one matrix of its size
    is alive -- a large layer's ``H`` is the biggest thing these algorithms hold."""
    info = torch.zeros((), dtype=torch.int32)
    while True:
        h = fresh()
        h.diagonal().add_(damp * float(h.diagonal().mean()))
        torch.linalg.cholesky_ex(h, out=(h, info))
        if int(info) == 0:
            torch.cholesky_inverse(h, out=h)
            torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
            if int(info) == 0:
                return h, damp
        del h
        if damp * 10 > _MAX_DAMP:
            raise ConfigError(
                f"H stays singular with damping {damp:g} of its mean diagonal: calibrate on more tokens "
                "(at least the layer's input features)"
            )
        damp *= 10


@torch.no_grad()
def gptq_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    act_order: bool = True,
    damp: float = 0.01,
    block: int = 128,
    bits: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Signed int4 values ``(out, in)``, their float16-exact scales ``(out, groups)`` and the
    damping used, for ``weight`` given its inputs' ``hessian`` (``Σ x xᵀ``).

    A weight that is exactly zero stays zero (a pruned model, e.g. SparseGPT's 2:4, keeps its
    mask): its value after the earlier columns' updates is error like any rounding's, spread
    over the columns not yet quantized."""
    cols = weight.shape[1]
    dead = torch.diag(hessian) == 0  # inputs never non-zero: their weights cannot matter
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    live = weight.detach().float().masked_fill(dead, 0.0)
    scales = weight_scales(live, bits, group_size).half().float()  # (out, groups); act-order fixes them now
    del live
    perm = torch.argsort(torch.diag(hessian), descending=True) if act_order else torch.arange(cols)
    w = weight.detach().float()[:, perm].masked_fill_(dead[perm], 0.0)  # float32 throughout, as in the paper
    zero = w == 0

    def permuted() -> torch.Tensor:
        h = hessian[perm.unsqueeze(1), perm]  # one copy
        h.diagonal()[dead[perm]] = 1.0
        return h

    upper, used = cholesky_inverse_factor(permuted, damp)
    q = torch.zeros(w.shape, dtype=torch.int8)  # the integers alone: a vocabulary-sized head's copy stays small
    step = group_size * max(1, block // group_size)  # whole groups per block
    for b0 in range(0, cols, step):
        b1 = min(b0 + step, cols)
        w1 = w[:, b0:b1].clone()
        errors = torch.zeros_like(w1)
        for j in range(b1 - b0):
            c = int(perm[b0 + j])
            g = c // group_size
            if not act_order and c % group_size == 0:  # the group starts here: its scale from the updated weights
                kept = ~zero[:, b0 + j : b0 + j + group_size]
                peak = (w1[:, j : j + group_size].abs() * kept).amax(1)
                scales[:, g] = torch.where(peak > 0, peak / hi, torch.ones_like(peak)).half().float()
            s = scales[:, g]
            qc = torch.clamp(torch.round(w1[:, j] / s), lo, hi).masked_fill_(zero[:, b0 + j], 0.0)
            err = (w1[:, j] - qc * s) / upper[b0 + j, b0 + j]
            w1[:, j + 1 :] -= err.unsqueeze(1) * upper[b0 + j, b0 + j + 1 : b1].unsqueeze(0)
            errors[:, j] = err
            q[:, b0 + j] = qc.to(torch.int8)
        w[:, b1:] -= errors @ upper[b0:b1, b1:]
    inverse = torch.argsort(perm)
    return q[:, inverse], scales.float(), used


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """``‖(W - Ŵ) X‖² / ‖W X‖²`` over the calibration inputs, from their ``H = Σ x xᵀ`` (float32
    products summed in float64), a few hundred output rows at a time (a vocabulary-sized head
    stays small)."""
    h = hessian.float()
    num = den = 0.0
    for r0 in range(0, weight.shape[0], 512):
        w = weight[r0 : r0 + 512].float()
        d = w - approx[r0 : r0 + 512].float()
        num += float(((d @ h) * d).sum(dtype=torch.float64))
        den += float(((w @ h) * w).sum(dtype=torch.float64))
    return num / den if den > 0 else 0.0


def rtn_layer(layer: nn.Module, bits: int, group_size: int) -> QuantizedLayer:
    """Round-to-nearest at ``bits`` (3 or 4) with float16-exact group scales, in the int4 layout."""
    w = weight_matrix(layer).float().cpu()
    scales = weight_scales(w, bits, group_size).half().float()
    return int4_layer(layer, quantize_weight(w, scales, bits, group_size), scales, group_size)


def rtn_weight(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The float weight round-to-nearest gives ``w`` ``(out, in)`` (what :func:`rtn_layer` holds)."""
    scales = weight_scales(w, bits, group_size).half().float()
    return dequantized(quantize_weight(w, scales, bits, group_size), scales, group_size)


def dequantized(ints: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """``ints`` ``(out, in)`` times their group ``scales`` ``(out, in / group_size)``."""
    return (ints.reshape(ints.shape[0], -1, group_size) * scales.unsqueeze(-1)).reshape(ints.shape)


def int4_layer(
    layer: nn.Module,
    ints: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    smooth: torch.Tensor | None = None,
) -> QuantizedLayer:
    """The int4 layer holding ``ints`` ``(out, in)`` and group ``scales`` in place of ``layer``
    (dividing its input by ``smooth``, if given)."""
    q = QuantizedLayer.empty_like(layer, "weight", _BITS, group_size, smooth=smooth is not None)
    q.weight.copy_(pack_int4(ints))
    q.weight_scale.copy_(scales)
    if smooth is not None:
        q.input_smooth.copy_(smooth)
    if layer.bias is not None:
        q.bias.copy_(layer.bias.detach().float())
    return q.to(layer.weight.device)


def gptq_(
    model: nn.Module,
    config: GPTQConfig = GPTQConfig(),
    data: Data | list | None = None,
    *,
    progress: Progress | None = None,
) -> GPTQResult:
    """Quantize the Linear layers of ``model``'s repeated blocks (a transformer's layers) to
    int4 with GPTQ, block by block on calibration sequences; in place.

    Args:
        model: a transformer (e.g. a Hugging Face causal language model).
        config: group size, act-order, damping, calibration batches.
        data: a :class:`~torchslim.core.data.Data` (its calibration split) or a list of batches
            (token-id tensors or dicts with ``input_ids``).
        progress: called as ``progress(blocks done, blocks)``.

    Example:
        >>> result = ts.gptq_(llm, ts.GPTQConfig(group_size=128), data=calib)  # doctest: +SKIP
        >>> print(result.summary())  # doctest: +SKIP
    """
    if data is None:
        raise ConfigError("GPTQ measures each layer's inputs: pass data=<calibration batches>")
    records: list[GPTQLayer] = []

    def change(block: nn.Module, prefix: str, name: str, layer: nn.Module, s: dict) -> None:
        h = s["hessian"]
        w = weight_matrix(layer).float().cpu()
        ints, scales, used = gptq_weight(
            w, h, config.group_size, config.act_order, config.damp, config.block, config.bits
        )
        full = f"{prefix}.{name}" if prefix else name
        note = damping_note(s["tokens"], in_features(layer), used, config.damp, full)
        records.append(
            GPTQLayer(
                name=full,
                tokens=s["tokens"],
                damp=used,
                output_error=relative_output_error(w, dequantized(ints, scales, config.group_size), h),
                rtn_output_error=relative_output_error(w, rtn_weight(w, config.bits, config.group_size), h),
                note=note,
            )
        )
        block.set_submodule(name, int4_layer(layer, ints, scales, config.group_size))

    if config.head:
        name, head = output_head(model)
        check_groups({name: head}, "", config.group_size)
    each_layer(  # a failure leaves the float model as it was
        model,
        calibration_inputs(data, config.calib_batches),
        grouped_layers(config.layers, config.group_size),
        change,
        progress,
        config.head,
    )
    if not records:
        raise ConfigError("no Linear layer matched config.layers inside the model's repeated blocks")
    return GPTQResult(records, config)


def grouped_layers(patterns: tuple[str, ...] | None, group_size: int) -> Chooser:
    """The layers of a block that ``patterns`` name, each checked to take ``group_size``."""

    def choose(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
        layers = chosen_layers(block, prefix, patterns)
        check_groups(layers, prefix, group_size)
        return layers

    return choose


def check_groups(layers: dict[str, nn.Module], prefix: str, group_size: int) -> None:
    """A clear error when ``group_size`` does not divide a layer's input features."""
    for n, m in layers.items():
        if in_features(m) % group_size:
            raise ConfigError(
                f"group_size={group_size} does not divide {prefix + '.' if prefix else ''}{n}'s {in_features(m)} input features: "
                f"use a divisor of it (e.g. {_divisor(in_features(m), group_size)})"
            )


def damping_note(tokens: int, inputs: int, used: float, asked: float, name: str) -> str | None:
    """What the report says when ``H`` had to be damped more than asked, or was fed fewer
    tokens than the layer has inputs (logged as a warning too)."""
    if tokens >= inputs and used <= asked:
        return None
    note = f"{tokens} calibration tokens for {inputs} inputs: H damped by {used:g} of its mean diagonal"
    log.warning("%s: %s", name, note)
    return note


def _divisor(n: int, near: int) -> int:
    return max(d for d in range(1, min(n, near) + 1) if n % d == 0)
