"""Quantized Linear and Conv layers: integer weights stored as integers, one flat class.

A :class:`QuantizedLayer` holds what an int8 (or int4) layer is: the integer weight, its
per-channel (or per-group) scales, the float bias and, for static quantization, the input's
scale and zero point. Its forward is the *reference* computation written with PyTorch's
``quantized_decomposed`` quantize / dequantize ops -- the same ops torchao's PT2E flow emits --
so that

* run eagerly, it is the exact fake-quant reference every backend is checked against;
* compiled by inductor with freezing (AOTInductor or ``torch.compile``), its x86 passes match the pattern
  ``dequantize(quantize(x)) -> conv/linear(dequantize(int8 weight)) -> quantize`` and run
  oneDNN int8 kernels (:mod:`torchslim.artifact.runtime`);
* exported to ONNX, the ops become QuantizeLinear / DequantizeLinear pairs that ONNX Runtime
  fuses into its integer kernels.

Weights are symmetric int8 per output channel, or with ``per_channel=False`` one scale for the
whole tensor (which ONNX Runtime's integer Gemm runs faster; inductor's int8 patterns match
per-channel weights only).

Schemes:
  ``static``: int8 weights; the input and the output on uint8
    grids (per tensor, affine) whose scale and zero point calibration fixed. Quantizing the
    output too gives ONNX Runtime its ``DQ -> Conv -> Q`` pattern (QLinearConv) and lets the
    inductor kernels write uint8. An output that only feeds a ReLU and then quantized layers is
    left float: the next layers' input grid quantizes it after the ReLU, which both backends
    fuse into the layer (a ReLU post-op writing uint8). The grid of the model's own outputs
    (the logits) spans their whole calibrated range: clipping them can change the top class.
  ``dynamic``: int8 weights; each input's range is measured on the fly (Linear only): one
    uint8 grid per call (``activations="tensor"``), or one symmetric int8 scale per token
    (``"token"``: per row of the flattened input, as transformer activations need, with
    outlier tokens kept from crushing the others). Compiled, the per-token form runs as an
    integer matmul with both scales applied after it, which inductor's x86 passes turn into a
    oneDNN int8 GEMM (uint8 inputs shifted by 128 on VNNI and AMX CPUs, ``torch._int_mm``
    elsewhere); eagerly and in ONNX export it is the fake-quant reference. A dynamic Linear
    may divide its input by a per-channel ``input_smooth`` first (SmoothQuant: the stored
    weight was multiplied by it, so outlier channels move from activations into weights).
  ``weight``: weight-only int8 (per channel) or int4 (per group of inputs, the last group
    padded; two values packed in a byte); inputs stay float. Smaller files, float compute.

Hand-written because torchao's tensor subclasses do not save to safetensors without pickle and
PT2E's output is a traced graph, not the user's module tree; the numerics follow PT2E's x86
defaults (symmetric int8 weights in [-128, 127], uint8 activations in [0, 255]).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import nn

from torchslim.core.linears import is_conv1d, weight_matrix
from torchslim.errors import ArtifactError

SCHEMES = ("static", "dynamic", "weight")
ACTIVATIONS = ("tensor", "token")
"""How a dynamic layer scales its input: one uint8 grid per call, or one int8 scale per token."""
_REFERENCE = [False]  # set while exporting to ONNX: the integer matmul has no ONNX form


_U8_GEMM = torch.cpu._is_vnni_supported()
"""Whether compiled per-token layers feed oneDNN's int8 GEMM uint8 inputs: on x86 CPUs with
VNNI (AMX included), where inductor's int8 x int8 pattern lands on oneDNN's reference kernel."""


@contextlib.contextmanager
def reference_forward() -> Iterator[None]:
    """Run quantized layers as their fake-quant reference even when compiled (ONNX export)."""
    before, _REFERENCE[0] = _REFERENCE[0], True
    try:
        yield
    finally:
        _REFERENCE[0] = before


FLOAT_TYPES: dict[str, type] = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d}
"""The float layers that can be quantized, by the class name the manifest records."""
SMOOTHABLE = {("dynamic", "Linear", 8), ("weight", "Linear", 4)}
"""The quantized layers that may divide their input by per-channel factors (SmoothQuant, AWQ)."""
_CONV_ARGS = ("stride", "padding", "dilation", "groups")
_SIZE = {
    "Linear": ("in_features", "out_features"),
    "Conv1d": ("in_channels", "out_channels", "groups"),
    "Conv2d": ("in_channels", "out_channels", "groups"),
}
_EPS = torch.finfo(torch.float32).eps
# PyTorch's CPU int4 weight-only GEMM: weights repacked once, dequantized inside the kernel
_INT4_MM = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
_INT4_GROUPS = (32, 64, 128, 256)  # the group sizes it takes
_qd = torch.ops.quantized_decomposed


def _float_type(layer: nn.Module) -> str | None:
    if is_conv1d(layer):  # GPT-2's transposed Linear
        return "Linear"
    for name, cls in FLOAT_TYPES.items():
        if type(layer) is cls:
            return name
    return None


def weight_scales(weight: torch.Tensor, bits: int = 8, group_size: int = 0, per_channel: bool = True) -> torch.Tensor:
    """Symmetric scales: per output channel (``group_size`` 0), per group of that many inputs,
    or one for the whole tensor (``per_channel=False``, shape ``(1,)``).

    An all-zero channel gets scale 1 (its integers are all 0, so the scale never matters).
    """
    w = weight.detach().float()  # (out, ...)
    qmax = 2 ** (bits - 1) - 1
    if group_size:
        w = _grouped(w, group_size)  # (out, groups, group_size)
    if not per_channel:
        amax = w.abs().amax().reshape(1)
    else:
        amax = w.abs().amax(dim=-1) if group_size else w.flatten(1).abs().amax(dim=1)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize_weight(weight: torch.Tensor, scales: torch.Tensor, bits: int = 8, group_size: int = 0) -> torch.Tensor:
    """The signed integers ``round(w / scale)`` clamped to ``bits`` bits, as int8."""
    w = weight.detach().float()
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if group_size:
        q = torch.round(_grouped(w, group_size) / scales.unsqueeze(-1))  # (out, groups, group_size)
        return q.clamp(lo, hi).flatten(1)[:, : w.shape[1]].to(torch.int8)  # (out, in)
    return torch.round(w / scales.reshape(-1, *[1] * (w.dim() - 1))).clamp(lo, hi).to(torch.int8)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(out, in)`` -> ``(out, groups, group_size)``, the last group padded with zeros."""
    pad = -w.shape[1] % group_size
    return F.pad(w, (0, pad)).reshape(w.shape[0], -1, group_size)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit values per byte along the last dimension: low nibble first."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)  # (out, in)
    if u.shape[-1] % 2:
        u = F.pad(u, (0, 1))
    return u[..., 0::2] | (u[..., 1::2] << 4)  # (out, ceil(in / 2))


def int4_padding_is_zero(packed: torch.Tensor, width: int) -> bool:
    """Whether the bits past the last of ``width`` int4 values in each packed row are zero, as
    :func:`pack_int4` writes them (a declared width that disagrees with the rows fails this)."""
    return width % 2 == 0 or packed.numel() == 0 or bool(((packed[..., -1] >> 4) == 0).all())


def unpack_int4(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: signed int8 values, ``width`` per row."""
    lo, hi = (packed & 0xF).to(torch.int8), (packed >> 4).to(torch.int8)
    q = torch.stack((lo, hi), dim=-1).flatten(-2)[..., :width]  # (out, in)
    return torch.where(q > 7, q - 16, q)


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of a uint8 affine range covering ``[lo, hi]`` and 0.

    A constant input (``lo == hi``) gets a range that still represents it exactly enough: from
    0 to the value, or a unit range when the value is 0.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= _EPS:
        return float(torch.tensor(1.0 / 255)), 0
    scale = float(torch.tensor((hi - lo) / 255))  # a float32 value: what the kernels use, exact in JSON
    return scale, int(min(255, max(0, round(-lo / scale))))


def _match_zero_points(module: QuantizedLayer, _keys: Any) -> None:
    """After a load (which may have resized the layer), one zero point per scale again, and the
    per-tensor scale as the number compiled graphs bake in."""
    module.weight_zero_point = torch.zeros(module.weight_scale.shape[0], dtype=torch.int64)
    if not module.per_channel:
        module.tensor_scale = float(module.weight_scale[0])


class QuantizedLayer(nn.Module):
    """A Linear or Conv layer with integer weights (see the module docstring)."""

    def __init__(
        self,
        float_type: str,
        sizes: dict[str, Any],
        scheme: str,
        bits: int = 8,
        group_size: int = 0,
        bias: bool = True,
        per_channel: bool = True,
        activations: str = "tensor",
        smooth: bool = False,
    ) -> None:
        super().__init__()
        token = activations == "token"
        if (
            float_type not in FLOAT_TYPES
            or scheme not in SCHEMES
            or (bits == 4 and not per_channel)
            or activations not in ACTIVATIONS
            or (token and (scheme != "dynamic" or float_type != "Linear" or not per_channel))
            or (smooth and (scheme, float_type, bits) not in SMOOTHABLE)
        ):
            raise ValueError(
                f"cannot quantize {float_type} with scheme {scheme!r}, bits {bits}, per_channel {per_channel}, "
                f"activations {activations!r}, smooth {smooth}"
            )
        self.float_type, self.scheme, self.bits, self.group_size = float_type, scheme, bits, group_size
        self.activations = activations
        self.per_channel = per_channel
        self.tensor_scale = 1.0  # per_channel=False: weight_scale[0] as a Python number
        for key, value in sizes.items():
            setattr(self, key, value)
        out = self.out_features if float_type == "Linear" else self.out_channels
        shape = self.weight_shape()
        if bits == 4:  # packed nibbles; float16 scales, as int4 weight-only kernels take them
            self.register_buffer("weight", torch.zeros(out, math.ceil(shape[1] / 2), dtype=torch.uint8))
            self.register_buffer("weight_scale", torch.ones(out, -(-shape[1] // group_size), dtype=torch.float16))
        else:
            self.register_buffer("weight", torch.zeros(shape, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.ones(out if per_channel else 1))
        self.register_buffer("bias", torch.zeros(out) if bias else None)
        # SmoothQuant: each input channel is divided by this (the weight's columns were multiplied)
        self.register_buffer("input_smooth", torch.ones(shape[1]) if smooth else None)
        # the weights' zero points (symmetric: all 0); a constant that compiled graphs freeze
        self.register_buffer(
            "weight_zero_point", torch.zeros(len(self.weight_scale), dtype=torch.int64), persistent=False
        )
        self.register_load_state_dict_post_hook(_match_zero_points)
        # static only: the (scale, zero point) of the input's and the output's uint8 grids, kept as
        # Python numbers (compiled graphs bake them in; the file keeps them in its manifest)
        self.input_q: tuple[float, int] | None = activation_qparams(0.0, 0.0) if scheme == "static" else None
        self.output_q: tuple[float, int] | None = activation_qparams(0.0, 0.0) if scheme == "static" else None

    def weight_shape(self) -> tuple[int, ...]:
        if self.float_type == "Linear":
            return (self.out_features, self.in_features)
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @staticmethod
    def sizes_of(layer: nn.Module) -> dict[str, Any]:
        """The constructor arguments that rebuild ``layer``'s shapes and its conv arithmetic."""
        kind = _float_type(layer)
        if is_conv1d(layer):
            return {"in_features": layer.nx, "out_features": layer.nf}
        keys = _SIZE[kind] + (() if kind == "Linear" else ("kernel_size",) + _CONV_ARGS)
        return {k: getattr(layer, k) for k in dict.fromkeys(keys)}

    @classmethod
    def empty_like(
        cls,
        layer: nn.Module,
        scheme: str,
        bits: int = 8,
        group_size: int = 0,
        per_channel: bool = True,
        activations: str = "tensor",
        smooth: bool = False,
    ) -> QuantizedLayer:
        """A zero-filled quantized layer of ``layer``'s shapes, to be filled by ``load_state_dict``."""
        kind = _float_type(layer)
        if kind is None:
            raise ValueError(f"{type(layer).__name__} cannot be quantized")
        sizes = cls.sizes_of(layer)
        return cls(kind, sizes, scheme, bits, group_size, layer.bias is not None, per_channel, activations, smooth)

    @classmethod
    def from_float(
        cls,
        layer: nn.Module,
        scheme: str,
        bits: int = 8,
        group_size: int = 0,
        ranges: tuple[tuple[float, float], tuple[float, float]] | None = None,
        per_channel: bool = True,
        activations: str = "tensor",
        smooth: torch.Tensor | None = None,
    ) -> QuantizedLayer:
        """Quantize ``layer``'s weight; ``static`` needs the calibrated ``(input, output)`` ranges
        (output ``None``: the output stays float because the next layer's input grid takes it);
        ``smooth`` (one positive factor per input channel) is multiplied into the weight's
        columns before quantizing, and the layer divides its input by it."""
        q = cls.empty_like(layer, scheme, bits, group_size, per_channel, activations, smooth is not None)
        w = weight_matrix(layer).float()  # a GPT-2 Conv1D's transposed; any other layer's as it is
        if smooth is not None:
            q.input_smooth.copy_(smooth)
            w = w * q.input_smooth
        if bits == 4:
            w = w.reshape(w.shape[0], -1)  # (out, in)
        scales = weight_scales(w, bits, group_size, per_channel)
        if bits == 4:
            scales = scales.half().float()  # quantize with the scales that are stored
        ints = quantize_weight(w, scales, bits, group_size)
        q.weight.copy_(pack_int4(ints) if bits == 4 else ints)
        q.weight_scale.copy_(scales)
        _match_zero_points(q, None)
        if layer.bias is not None:
            q.bias.copy_(layer.bias.detach().float())
        if scheme == "static":
            if ranges is None:
                raise ValueError("static quantization needs the calibrated input and output ranges")
            q.input_q, q.output_q = (activation_qparams(*rng) if rng is not None else None for rng in ranges)
        return q

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the integers stand for."""
        if self.bits == 4:
            width = self.weight_shape()[1]
            q = _grouped(unpack_int4(self.weight, width).float(), self.group_size)  # (out, groups, group_size)
            return (q * self.weight_scale.float().unsqueeze(-1)).flatten(1)[:, :width]  # (out, in)
        if not self.per_channel:
            return _qd.dequantize_per_tensor(self.weight, self.tensor_scale, 0, -128, 127, torch.int8)
        return _qd.dequantize_per_channel(
            self.weight, self.weight_scale, self.weight_zero_point, 0, -128, 127, torch.int8
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_smooth is not None:  # a product, not a division: frozen graphs fold the reciprocal
            x = x * (1.0 / self.input_smooth)
        if self.scheme == "static":
            scale, zp = self.input_q
            x = _qd.quantize_per_tensor(x, scale, zp, 0, 255, torch.uint8)
            x = _qd.dequantize_per_tensor(x, scale, zp, 0, 255, torch.uint8)
        elif self.activations == "token":
            return self._per_token(x)
        elif self.scheme == "dynamic":
            scale_t, zp_t = _qd.choose_qparams.tensor(x, 0, 255, _EPS, torch.uint8)
            x = _qd.quantize_per_tensor.tensor(x, scale_t, zp_t, 0, 255, torch.uint8)
            x = _qd.dequantize_per_tensor.tensor(x, scale_t, zp_t, 0, 255, torch.uint8)
        if self._int4_kernel(x):
            return self._int4_mm(x)
        w = self.dequantized_weight()
        if self.float_type == "Linear":
            y = F.linear(x, w, self.bias)
        else:
            conv = F.conv1d if self.float_type == "Conv1d" else F.conv2d
            y = conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.output_q is not None:  # the output on its own grid: int8 kernels write uint8, ONNX Runtime fuses Q
            scale, zp = self.output_q
            y = _qd.dequantize_per_tensor(
                _qd.quantize_per_tensor(y, scale, zp, 0, 255, torch.uint8), scale, zp, 0, 255, torch.uint8
            )
        return y

    def _int4_kernel(self, x: torch.Tensor) -> bool:
        """Whether this call runs on PyTorch's CPU int4 kernel: an int4 Linear in eager mode on
        a CPU float32 or bfloat16 input, its groups a size the kernel takes and its outputs a
        multiple of 16 (else the dequantized weight and ``F.linear``)."""
        return (
            _INT4_MM
            and self.bits == 4
            and self.float_type == "Linear"
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16)
            and self.group_size in _INT4_GROUPS
            and self.in_features % self.group_size == 0
            and self.out_features % 16 == 0
            and not _REFERENCE[0]
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and not torch.onnx.is_in_onnx_export()
        )

    def release_kernel_cache(self) -> None:
        """Drop the int4 kernel's copy of the weight (made again on the next call): a
        calibration pass that runs the layer once per batch need not keep it."""
        self._int4_cache = None

    def _int4_mm(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ + b`` on ``_weight_int4pack_mm_for_cpu``, in bfloat16: the kernel's only fast
        path (its float32 path is a reference loop, a hundred times slower than a dense float32
        GEMM). The input is rounded to bfloat16, the products accumulate in float32, the output
        comes back in the input's dtype. The kernel's layout (unsigned nibbles ``q + 8``, tiled)
        and its ``(groups, out, 2)`` bfloat16 scales and zeros are made from the stored weight on
        first use and kept beside it until the weight changes (they are not in the state_dict
        or the file)."""
        w, scale = self.weight, self.weight_scale
        key = (w.data_ptr(), w._version, scale.data_ptr(), scale._version)
        cache = getattr(self, "_int4_cache", None)
        if cache is None or cache[0] != key:
            ints = unpack_int4(w, self.in_features).to(torch.int32) + 8
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ints, 1)
            s = scale.to(torch.bfloat16).T  # (groups, out); zero 0: w = (q + 8 - 8) * s
            cache = (key, packed, torch.stack([s, torch.zeros_like(s)], -1).contiguous())
            self._int4_cache = cache
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, cache[1], self.group_size, cache[2]).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _per_token(self, x: torch.Tensor) -> torch.Tensor:
        """Dynamic int8 with one symmetric scale per token (row of the flattened input)."""
        peak = x.detach().abs().amax(-1, keepdim=True).clamp_min(_EPS)  # (..., 1)
        ints = torch.round(x * (127.0 / peak)).clamp(-127, 127)  # a product: vector division is slow
        scale = peak / 127.0
        if not torch.compiler.is_compiling() or _REFERENCE[0]:  # the reference: float arithmetic on the grids
            return F.linear(ints * scale, self.dequantized_weight(), self.bias)
        if _U8_GEMM:
            # oneDNN's VNNI int8 GEMM takes uint8 inputs: the int8 grid shifted by 128 (a grid of
            # scale 1 and zero point 128) gives the same integer sums, and inductor matches the
            # dequantize -> linear pattern to that GEMM with the weight prepacked once. Given
            # int8 inputs it runs its reference kernel, hundreds of times slower.
            shifted = _qd.quantize_per_tensor(ints, 1.0, 128, 0, 255, torch.uint8)
            rows = F.linear(
                _qd.dequantize_per_tensor(shifted, 1.0, 128, 0, 255, torch.uint8), self.dequantized_weight()
            )
            y = rows * scale
        else:
            # inductor's pattern: reshape -> _int_mm -> float -> * input scale -> * weight scale (-> + bias)
            rows = torch._int_mm(ints.to(torch.int8).reshape(-1, x.shape[-1]), self.weight.t())
            y = (rows.float() * scale.reshape(-1, 1) * self.weight_scale).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        kind = (
            f"int{self.bits}"
            + (f" groups of {self.group_size}" if self.group_size else "")
            + ("" if self.per_channel else " per tensor")
            + (" per-token activations" if self.activations == "token" else "")
            + (" smoothed" if self.input_smooth is not None else "")
        )
        return f"{self.float_type} {tuple(self.weight_shape())}, {self.scheme} {kind}"

    def describe(self) -> dict[str, Any]:
        """The manifest entry that lets a loader rebuild this layer from the float one."""
        entry = {
            "of": self.float_type,
            "scheme": self.scheme,
            "bits": self.bits,
            "group_size": self.group_size,
            "per_channel": self.per_channel,
        }
        if self.scheme == "static":
            entry |= {"input": list(self.input_q), "output": list(self.output_q) if self.output_q else None}
        if self.activations != "tensor":
            entry["activations"] = self.activations
        if self.input_smooth is not None:
            entry["smooth"] = True
        return entry


def folded_batchnorm(kind: str, conv: str) -> nn.Identity:
    """What a ``kind`` BatchNorm folded into the convolution ``conv`` becomes: an Identity that
    remembers the fold, so files record it and loads repeat it."""
    identity = nn.Identity()
    identity.folded_batchnorm = (kind, conv)
    return identity


def folded_names(model: nn.Module) -> dict[str, str]:
    """Each BatchNorm folded away in ``model`` -> the convolution it was folded into."""
    return {
        n: m.folded_batchnorm[1]
        for n, m in model.named_modules()
        if isinstance(getattr(m, "folded_batchnorm", None), tuple)
    }


def parse_folds(folded: Any, where: Any = "file") -> dict[str, str]:
    """The manifest's ``folded`` map read back: the reader of what :func:`folded_names` writes.
    Whether the model has those modules is checked on load, against the model."""
    if not isinstance(folded, dict) or not all(isinstance(c, str) for c in folded.values()):
        raise ArtifactError(f"{where}: the manifest's 'folded' must map BatchNorm names to convolution names")
    return dict(folded)


def read_directly(model: nn.Module) -> dict[str, str]:
    """Layers whose weight a parent reads itself instead of calling the layer, so no quantized
    layer can stand in for them: name -> why. ``nn.MultiheadAttention`` passes
    ``out_proj.weight`` to its attention function."""
    return {
        f"{name}.out_proj" if name else "out_proj": (
            "MultiheadAttention reads out_proj's float weight itself (its attention kernel): kept in float"
        )
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }


def unfuse_transformer_layers_(model: nn.Module, names: Iterable[str]) -> None:
    """Turn off PyTorch's fused encoder-layer kernel (taken in eval mode) on every
    ``nn.TransformerEncoderLayer`` holding one of the layers ``names``: that kernel reads the
    layers' float weights directly, so a quantized layer (or one being calibrated) would never
    run. The layer then runs its submodules one by one; it computes the same function."""
    names = list(names)
    for lname, layer in model.named_modules():
        prefix = f"{lname}." if lname else ""
        if isinstance(layer, nn.TransformerEncoderLayer) and any(n.startswith(prefix) for n in names):
            layer.activation_relu_or_gelu = 0  # one of the fused path's conditions: it is then skipped
