"""Dynamic int8 LSTM and GRU: int8 weights, each matmul's input quantized over its own range.

A :class:`QuantizedRNN` replaces an ``nn.LSTM`` or ``nn.GRU`` (any number of layers, one or two
directions, ``batch_first`` or not; no ``proj_size``). Every gate weight is stored as int8
with one symmetric scale per gate row; at run time the input projection of the whole sequence
is one dynamic-int8 matmul and the recurrent projection one per time step, written with the
same ``quantized_decomposed`` ops as :class:`~torchslim.core.qlayers.QuantizedLayer` so that
inductor and ONNX Runtime see integer matmuls. The gate arithmetic is PyTorch's own
(``i, f, g, o`` for LSTM, ``r, z, n`` for GRU) in float.

Hand-written because PyTorch's dynamic quantized LSTM lives in the deprecated
``torch.ao.nn.quantized`` namespace on quantized tensors, which do not save without pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core.linears import is_conv1d
from torchslim.core.qlayers import (
    ACTIVATIONS,
    FLOAT_TYPES,
    SCHEMES,
    SMOOTHABLE,
    QuantizedLayer,
    quantize_weight,
    weight_scales,
)
from torchslim.errors import ArtifactError, ShapeMismatchError

RNN_TYPES: dict[str, type] = {"LSTM": nn.LSTM, "GRU": nn.GRU}
_GATES = {"LSTM": 4, "GRU": 3}
_EPS = torch.finfo(torch.float32).eps
_qd = torch.ops.quantized_decomposed


def _dynamic_linear(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ dequant(w).T + bias`` with ``x`` quantized to uint8 over its own range first."""
    x_scale, x_zp = _qd.choose_qparams.tensor(x, 0, 255, _EPS, torch.uint8)
    x = _qd.dequantize_per_tensor.tensor(
        _qd.quantize_per_tensor.tensor(x, x_scale, x_zp, 0, 255, torch.uint8), x_scale, x_zp, 0, 255, torch.uint8
    )
    return F.linear(x, _qd.dequantize_per_channel(w, scale, zero, 0, -128, 127, torch.int8), bias)


class QuantizedRNN(nn.Module):
    """An LSTM or GRU with int8 weights and dynamic int8 activations (see the module docstring)."""

    def __init__(self, float_type: str, sizes: dict[str, Any]) -> None:
        super().__init__()
        if float_type not in RNN_TYPES:
            raise ValueError(f"cannot quantize {float_type} as a recurrent layer")
        self.float_type, self.scheme, self.bits, self.group_size = float_type, "dynamic", 8, 0
        for key, value in sizes.items():
            setattr(self, key, value)
        rows = _GATES[float_type] * self.hidden_size
        for name, shape in self.weight_shapes().items():
            self.register_buffer(name, torch.zeros(shape, dtype=torch.int8))
            self.register_buffer(f"{name}_scale", torch.ones(rows))
            self.register_buffer(f"{name}_zero_point", torch.zeros(rows, dtype=torch.int64), persistent=False)
        for name in self.bias_names():
            self.register_buffer(name, torch.zeros(rows))
        self.register_load_state_dict_post_hook(_match_zero_points)

    def suffixes(self) -> list[tuple[int, str]]:
        return [(k, sfx) for k in range(self.num_layers) for sfx in ("", "_reverse")[: 2 if self.bidirectional else 1]]

    def weight_shapes(self) -> dict[str, tuple[int, int]]:
        rows, dirs = _GATES[self.float_type] * self.hidden_size, 2 if self.bidirectional else 1
        out = {}
        for k, sfx in self.suffixes():
            width = self.input_size if k == 0 else self.hidden_size * dirs
            out[f"weight_ih_l{k}{sfx}"], out[f"weight_hh_l{k}{sfx}"] = (rows, width), (rows, self.hidden_size)
        return out

    def bias_names(self) -> list[str]:
        return [f"bias_{p}_l{k}{sfx}" for k, sfx in self.suffixes() for p in ("ih", "hh")] if self.bias else []

    @staticmethod
    def sizes_of(rnn: nn.Module) -> dict[str, Any]:
        keys = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "bidirectional")
        return {k: getattr(rnn, k) for k in keys}

    @classmethod
    def empty_like(cls, rnn: nn.Module) -> QuantizedRNN:
        kind = next((n for n, t in RNN_TYPES.items() if type(rnn) is t), None)
        if kind is None or getattr(rnn, "proj_size", 0):
            raise ValueError(f"{type(rnn).__name__} cannot be quantized as a recurrent layer")
        return cls(kind, cls.sizes_of(rnn))

    @classmethod
    def from_float(cls, rnn: nn.Module) -> QuantizedRNN:
        q = cls.empty_like(rnn)
        for name in q.weight_shapes():
            w = getattr(rnn, name).detach().float()
            scales = weight_scales(w)
            getattr(q, name).copy_(quantize_weight(w, scales))
            getattr(q, f"{name}_scale").copy_(scales)
        for name in q.bias_names():
            getattr(q, name).copy_(getattr(rnn, name).detach().float())
        return q

    def dequantized_weights(self) -> dict[str, torch.Tensor]:
        """The float weights the integers stand for, by name."""
        return {n: getattr(self, n).float() * getattr(self, f"{n}_scale").unsqueeze(1) for n in self.weight_shapes()}

    def _project(self, x: torch.Tensor, name: str, bias: str) -> torch.Tensor:
        w = getattr(self, name)
        return _dynamic_linear(
            x,
            w,
            getattr(self, f"{name}_scale"),
            getattr(self, f"{name}_zero_point"),
            getattr(self, bias) if self.bias else None,
        )

    def _direction(self, x: torch.Tensor, k: int, sfx: str, h: torch.Tensor, c: torch.Tensor | None):
        """One layer, one direction over ``x`` (B, T, F); returns the outputs (B, T, H) and final state."""
        gates_x = self._project(x, f"weight_ih_l{k}{sfx}", f"bias_ih_l{k}{sfx}")  # (B, T, G * H)
        steps = range(x.shape[1] - 1, -1, -1) if sfx else range(x.shape[1])
        outs: list[torch.Tensor] = []
        for t in steps:
            gates_h = self._project(h, f"weight_hh_l{k}{sfx}", f"bias_hh_l{k}{sfx}")  # (B, G * H)
            if self.float_type == "LSTM":
                i, f, g, o = (gates_x[:, t] + gates_h).chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                xr, xz, xn = gates_x[:, t].chunk(3, dim=1)
                hr, hz, hn = gates_h.chunk(3, dim=1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                h = (1 - z) * torch.tanh(xn + r * hn) + z * h
            outs.append(h)
        if sfx:
            outs.reverse()
        return torch.stack(outs, dim=1), h, c

    def forward(self, x: torch.Tensor, hx: Any = None) -> tuple[torch.Tensor, Any]:
        x = x if self.batch_first else x.transpose(0, 1)  # (B, T, F)
        dirs, batch = 2 if self.bidirectional else 1, x.shape[0]
        zeros = x.new_zeros(self.num_layers * dirs, batch, self.hidden_size)
        h0, c0 = (hx if isinstance(hx, tuple) else (hx, None)) if hx is not None else (zeros, None)
        c0 = c0 if c0 is not None else zeros
        h_n, c_n = [], []
        for k in range(self.num_layers):
            outs = []
            for d, sfx in enumerate(("", "_reverse")[:dirs]):
                out, h, c = self._direction(x, k, sfx, h0[k * dirs + d], c0[k * dirs + d])
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, dim=2) if dirs == 2 else outs[0]  # (B, T, dirs * H)
        out = x if self.batch_first else x.transpose(0, 1)
        if self.float_type == "LSTM":
            return out, (torch.stack(h_n), torch.stack(c_n))
        return out, torch.stack(h_n)

    def extra_repr(self) -> str:
        return f"{self.float_type}({self.input_size}, {self.hidden_size}, layers={self.num_layers}), dynamic int8"

    def describe(self) -> dict[str, Any]:
        """The manifest entry that lets a loader rebuild this layer from the float one."""
        return {"of": self.float_type, "scheme": "dynamic", "bits": 8, "group_size": 0}


def _match_zero_points(module: QuantizedRNN, _keys: Any) -> None:
    """After a load (which may have resized the layer), one zero point per gate row again."""
    for name in module.weight_shapes():
        setattr(module, f"{name}_zero_point", torch.zeros(getattr(module, f"{name}_scale").shape[0], dtype=torch.int64))


def quantized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The manifest's ``quant`` map: every quantized layer's name -> how it was quantized."""
    return {n: m.describe() for n, m in model.named_modules() if isinstance(m, (QuantizedLayer, QuantizedRNN))}


MAX_GROUP = 65536
"""Largest int4 group size a file may declare."""


@dataclass(frozen=True)
class QuantEntry:
    """One entry of the manifest's ``quant`` map, read back and checked (docs/format.md): the
    reader of what :meth:`QuantizedLayer.describe` / :meth:`QuantizedRNN.describe` write.

    Example:
        >>> QuantEntry.parse({"of": "Linear", "scheme": "dynamic", "bits": 8, "group_size": 0}, "fc").scheme
        'dynamic'
    """

    of: str
    scheme: str
    bits: int
    group_size: int
    per_channel: bool = True  # absent before format version 4
    input: tuple[float, int] | None = None  # static scheme: the uint8 grids
    output: tuple[float, int] | None = None
    activations: str = "tensor"  # dynamic Linear: "token" for per-token int8 inputs (absent: "tensor")
    smooth: bool = False  # dynamic int8 Linear: the input is divided by input_smooth (absent: false)

    @classmethod
    def parse(cls, spec: Any, name: str, where: Any = "file") -> QuantEntry:
        """Every check that needs no model; a fault is an :class:`ArtifactError` naming the layer."""
        of, scheme, bits, group = (
            (spec.get(k) for k in ("of", "scheme", "bits", "group_size")) if isinstance(spec, dict) else (None,) * 4
        )
        described = isinstance(of, str) and isinstance(scheme, str) and type(bits) is int and type(group) is int
        if not described or of not in {**FLOAT_TYPES, **RNN_TYPES} or scheme not in SCHEMES or bits not in (4, 8):
            raise ArtifactError(f"{where}: quantized layer {name!r} has an unknown description {str(spec)[:120]}")
        if (bits == 4) != (group > 0) or not 0 <= group <= MAX_GROUP or (bits == 4 and of != "Linear"):
            raise ArtifactError(f"{where}: quantized layer {name!r}: bits={bits} with group_size={group} is not valid")
        if of in RNN_TYPES:
            if scheme != "dynamic" or bits != 8:
                raise ArtifactError(f"{where}: quantized layer {name!r}: an {of} is stored dynamic int8 only")
            return cls(of, scheme, bits, group)
        per_channel = spec.get("per_channel", True)
        if type(per_channel) is not bool or (bits == 4 and not per_channel):
            raise ArtifactError(
                f"{where}: quantized layer {name!r}: per_channel must be true or false (true for 4 bits), "
                f"got {per_channel!r}"
            )
        activations = spec.get("activations", "tensor")
        token_ok = (scheme, of, per_channel) == ("dynamic", "Linear", True)
        if activations not in ACTIVATIONS or (activations == "token" and not token_ok):
            raise ArtifactError(
                f"{where}: quantized layer {name!r}: activations must be 'tensor', or 'token' for a dynamic "
                f"per-channel Linear, got {str(activations)[:40]!r}"
            )
        smooth = spec.get("smooth", False)
        if type(smooth) is not bool or (smooth and (scheme, of, bits) not in SMOOTHABLE):
            raise ArtifactError(
                f"{where}: quantized layer {name!r}: smooth must be false, or true for a dynamic int8 or int4 "
                "weight-only Linear, "
                f"got {str(smooth)[:40]!r}"
            )
        if scheme != "static":
            return cls(of, scheme, bits, group, per_channel, activations=activations, smooth=smooth)
        output = None if spec.get("output") is None else _grid(spec.get("output"), name, where)
        return cls(of, scheme, bits, group, per_channel, input=_grid(spec.get("input"), name, where), output=output)

    def empty_like(self, layer: nn.Module, name: str, where: Any = "file") -> nn.Module:
        """An empty quantized layer of ``layer``'s shapes, to be filled by ``load_state_dict``."""
        linear = self.of == "Linear" and layer is not None and is_conv1d(layer)  # GPT-2's transposed Linear
        if type(layer) is not {**FLOAT_TYPES, **RNN_TYPES}[self.of] and not linear:
            raise ShapeMismatchError(
                f"{where}: the file quantized a {self.of} at {name!r} but the model has "
                f"{type(layer).__name__ if layer is not None else 'nothing'} there; pass the builder of the model "
                "that was saved"
            )
        if self.of in RNN_TYPES:
            if getattr(layer, "proj_size", 0):
                raise ArtifactError(f"{where}: quantized layer {name!r}: an {self.of} with proj_size is not stored")
            return QuantizedRNN.empty_like(layer)
        q = QuantizedLayer.empty_like(
            layer, self.scheme, self.bits, self.group_size, self.per_channel, self.activations, self.smooth
        )
        if self.scheme == "static":
            q.input_q, q.output_q = self.input, self.output
        return q


def _grid(value: Any, name: str, where: Any) -> tuple[float, int]:
    """A uint8 grid ``[scale, zero_point]`` from the manifest, checked."""
    ok = isinstance(value, list) and len(value) == 2 and type(value[0]) is float and type(value[1]) is int
    if not ok or not (0 < value[0] < 1e30 and 0 <= value[1] <= 255):
        raise ArtifactError(
            f"{where}: quantized layer {name!r}: a grid must be [scale > 0, zero point 0..255], got {str(value)[:60]}"
        )
    return float(value[0]), int(value[1])
