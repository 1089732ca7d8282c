"""Quantization: int8 (or int4 weight-only) layers that run on real integer kernels.

One config, one verb. ``quantize_`` folds each BatchNorm into the convolution before it,
calibrates the input and output grids of every Linear / Conv layer (static scheme,
:mod:`torchslim.transforms.calibrate`), replaces each layer by a
:class:`~torchslim.core.qlayers.QuantizedLayer` holding int8 weights (LSTM / GRU by a
:class:`~torchslim.core.qrnn.QuantizedRNN` in the dynamic scheme) and corrects the biases for
the mean error quantization leaves. With ``qat=TrainConfig(...)`` it first trains through fake
quantization (weights per channel with a straight-through estimator, inputs and outputs on
their calibrated grids), optionally against a teacher, and then converts to the same int8
layers. Layers it cannot quantize stay in float with the reason recorded. Which kernels run is chosen later, by :func:`torchslim.artifact.runtime.compile_model`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from torchslim.analysis.ranges import METHODS
from torchslim.core.attention import bfloat16_dot_products, set_attention_precision_
from torchslim.core.data import Data, take_rows
from torchslim.core.device import model_device
from torchslim.core.plan import CompressionPlan, check_keys, match_layer
from torchslim.core.qlayers import (
    ACTIVATIONS,
    FLOAT_TYPES,
    SCHEMES,
    QuantizedLayer,
    folded_batchnorm,
    read_directly,
    unfuse_transformer_layers_,
)
from torchslim.core.qrnn import RNN_TYPES, QuantizedRNN
from torchslim.core.task import move
from torchslim.core.ties import Ties
from torchslim.errors import ConfigError
from torchslim.train.fit import Progress, TrainConfig
from torchslim.transforms.calibrate import calibrated_ranges, calibration_batches, correct_biases_, inputs_of
from torchslim.transforms.guard import check_runs, rollback
from torchslim.transforms.qat import train_fake_quant
from torchslim.transforms.smoothing import smoothing_factors

log = logging.getLogger(__name__)
_WEIGHTED = (
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.RNNBase,
    nn.Embedding,
    nn.MultiheadAttention,
    nn.Bilinear,
)


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize.

    Attributes:
        scheme: ``"static"`` (int8 weights and inputs, input ranges from calibration),
            ``"dynamic"`` (int8 weights, input ranges measured per call; Linear layers) or
            ``"weight"`` (weight-only int8 or int4; float compute).
        bits: weight bits: 8, or 4 with ``scheme="weight"`` (Linear layers, per group).
        calibration: how the static grids' ranges are chosen: ``minmax``, ``percentile``,
            ``mse`` or ``entropy`` (see :mod:`torchslim.analysis.ranges`), or ``auto``: the
            one of those whose quantized model's outputs on the calibration batches are
            closest to the float model's.
        percentile: the percentile kept by ``calibration="percentile"``.
        calib_batches: calibration batches (of the data's evaluation batch size).
        group_size: inputs per int4 scale group (the last group of a row may be shorter).
        per_channel: one weight scale per output channel (``True``) or one per tensor
            (``False``: a little less accurate, but what ONNX Runtime's integer Gemm runs
            fastest). 8-bit weights only; int4 weights are scaled per group.
        activations: ``scheme="dynamic"`` only: ``"tensor"`` (one uint8 grid per call) or
            ``"token"`` (one symmetric int8 scale per token: what transformer activations,
            whose tokens differ widely in range, need; compiled by inductor into int8 GEMMs).
        smooth: ``scheme="dynamic"`` int8 Linear layers only: SmoothQuant's migration strength
            ``alpha`` in (0, 1] (0.5 in the paper), or ``None`` for none. Each input channel is
            divided by ``max|x| ** alpha / max|w| ** (1 - alpha)`` (largest input from the
            calibration batches, which it needs) and the weight's column multiplied by it, so
            outlier channels stop coarsening every token's int8 grid
            (:mod:`torchslim.transforms.smoothing`).
        attention: Hugging Face transformers only: ``"bfloat16"`` computes each attention's
            query-key scores, softmax and weighted values in bfloat16 (what is left in float32
            once the Linear layers run int8; twice the float32 rate on CPUs with AVX512-BF16 or
            AMX), recorded in the file; ``None`` keeps the model's own
            (:mod:`torchslim.core.attention`).
        fold_bn: fold each BatchNorm into the convolution feeding it before quantizing.
        bias_correction: after quantizing (static, post-training), shift each layer's bias by
            the mean error its output shows on the calibration batches against the float model
            (empirical bias correction, Nagel et al. 2019), layer by layer in model order.
        layers: the layers to quantize, as names or ``re:`` patterns (a plan's ``quantize``
            entries); ``None`` quantizes every layer the scheme covers.
        exclude: layer names or ``re:`` patterns kept in float (mixed precision).
        qat: quantization-aware training before conversion (``None``: post-training only).
    """

    scheme: str = "static"
    bits: int = 8
    calibration: str = "auto"
    percentile: float = 99.99
    calib_batches: int = 8
    group_size: int = 64
    per_channel: bool = True
    activations: str = "tensor"
    smooth: float | None = None
    attention: str | None = None
    fold_bn: bool = True
    bias_correction: bool = True
    layers: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    qat: TrainConfig | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme={self.scheme!r}: choose one of {list(SCHEMES)}")
        if self.bits not in (4, 8) or (self.bits == 4 and self.scheme != "weight"):
            raise ConfigError(f"bits={self.bits!r}: use 8, or 4 with scheme='weight' (int4 weight-only)")
        if self.calibration not in (*METHODS, "auto"):
            raise ConfigError(f"calibration={self.calibration!r}: choose one of {[*METHODS, 'auto']}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile={self.percentile!r}: use a number in (50, 100], e.g. 99.99")
        for key in ("calib_batches", "group_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key}={v!r}: use a whole number >= 1")
        if not isinstance(self.per_channel, bool) or (self.bits == 4 and not self.per_channel):
            raise ConfigError(
                f"per_channel={self.per_channel!r}: use True or False (int4 weights are always scaled per group)"
            )
        if self.activations not in ACTIVATIONS or (self.activations == "token" and self.scheme != "dynamic"):
            raise ConfigError(
                f"activations={self.activations!r}: use 'tensor', or 'token' with scheme='dynamic' (per-token int8 inputs)"
            )
        if self.activations == "token" and not self.per_channel:
            raise ConfigError("activations='token' runs per-channel weights: leave per_channel=True")
        if self.smooth is not None and (
            isinstance(self.smooth, bool)
            or not isinstance(self.smooth, (int, float))
            or not 0 < self.smooth <= 1
            or self.scheme != "dynamic"
            or self.bits != 8
        ):
            raise ConfigError(
                f"smooth={self.smooth!r}: use a migration strength in (0, 1] (0.5 is SmoothQuant's) with "
                "scheme='dynamic' and 8 bits, or None"
            )
        if self.qat is not None and self.scheme != "static":
            raise ConfigError("qat trains through static int8 quantization: use scheme='static'")
        if self.attention not in (None, "bfloat16"):
            raise ConfigError(f"attention={self.attention!r}: use 'bfloat16' (attention products in bfloat16) or None")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    def with_plan(self, plan: CompressionPlan) -> QuantizeConfig:
        """This config restricted to the layers ``plan`` quantizes, at the weight bits it gives
        (the plan's skips join ``exclude``)."""
        wanted = plan.field_map("quantize")
        chosen = {k: v for k, v in wanted.items() if v is not None}
        if not chosen:
            raise ConfigError("the plan quantizes no layer")
        bits = set(chosen.values())
        if len(bits) > 1:
            raise ConfigError(f"the plan mixes weight bits {sorted(bits)}; one quantize pass runs one bit width")
        skipped = tuple(k for k, v in wanted.items() if v is None)
        return replace(self, bits=bits.pop(), layers=tuple(chosen), exclude=self.exclude + skipped)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["exclude"] = list(self.exclude)
        out["layers"] = None if self.layers is None else list(self.layers)
        return out


@dataclass
class LayerRecord:
    """What quantization did to one layer (a row of the report)."""

    name: str
    type: str
    scheme: str | None = None
    bits: int | None = None
    input_range: list[float] | None = None  # calibrated [lo, hi]
    input_scale: float | None = None
    input_zero_point: int | None = None
    output_range: list[float] | None = None
    output_scale: float | None = None
    output_zero_point: int | None = None
    weight_error: float | None = None  # ||w - dequant(quant(w))|| / ||w||
    bias_shift: float | None = None  # largest bias change made by bias correction
    note: str | None = None
    skip: str | None = None


@dataclass
class QuantizeResult:
    """What ``quantize_`` did."""

    layers: list[LayerRecord]
    folded: list[str]  # BatchNorm modules folded into their convolution (now Identity)
    config: QuantizeConfig
    history: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)  # the method used (and, for "auto", each one's output error)

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "folded": self.folded,
            "history": self.history,
            "calibration": self.calibration,
            "layers": [asdict(r) for r in self.layers],
        }

    @property
    def plan(self) -> CompressionPlan:
        """The weight bits of every quantized layer, and why each other weight layer stays float."""
        plan = CompressionPlan()
        for r in self.layers:
            plan = plan.merged(r.name, skip=r.skip) if r.skip else plan.merged(r.name, quantize=r.bits)
        return plan


def quantize_(
    model: nn.Module,
    config: QuantizeConfig = QuantizeConfig(),
    data: Data | Iterable | None = None,
    *,
    example: torch.Tensor | None = None,
    progress: Progress | None = None,
    teacher: nn.Module | None = None,
) -> QuantizeResult:
    """Quantize ``model``'s Linear and Conv layers in place.

    Args:
        model: the trained float model; its layers are replaced in place.
        config: the scheme, bits and calibration method.
        data: a :class:`~torchslim.core.data.Data` (its calibration split is used, and its
            training split for QAT) or any iterable of input batches / ``(input, target)``
            pairs to calibrate on. Required for the static scheme.
        example: an input batch; calibration batches must match its shape after the batch
            dimension. Defaults to the first calibration batch.
        progress: called as ``progress(done, total)`` while ``calibration="auto"`` scores its
            candidates, then during QAT.
        teacher: soft targets for QAT (e.g. the float model).

    Example:
        >>> result = ts.quantize_(model, ts.QuantizeConfig(calibration="mse"), data=data)  # doctest: +SKIP
    """
    if isinstance(data, Data):
        data.check(model)
    if config.qat is not None and not isinstance(data, Data):
        raise ConfigError("qat trains the model: pass data=<a torchslim Data> with a training split")
    names = [n for n, _ in model.named_modules() if n]
    check_keys(names, config.exclude, "exclude")
    check_keys(names, config.layers or (), "layers")
    if data is None and config.scheme == "static":
        raise ConfigError("static quantization calibrates input ranges: pass data=<calibration batches>")
    if data is None and config.smooth is not None:
        raise ConfigError("smooth measures each input channel's largest value: pass data=<calibration batches>")
    task = data.task if isinstance(data, Data) else None
    where = model_device(model)  # calibration runs where the model is
    batches = (
        [move(inputs_of(b, task), where) for b in calibration_batches(data, config.calib_batches, example)]
        if data is not None
        else []
    )
    example = example if example is not None else (take_rows(batches[0], 2) if batches else None)
    if example is None:
        raise ConfigError("pass data=... (calibration batches) or example=<one input batch>")
    with rollback(model):  # a failure leaves the float model as it was
        return _quantize(model, config, data, batches, example, progress, teacher)


def _quantize(
    model: nn.Module,
    config: QuantizeConfig,
    data: Data | Iterable | None,
    batches: list[torch.Tensor],
    example: torch.Tensor,
    progress: Progress | None,
    teacher: nn.Module | None,
) -> QuantizeResult:
    model.eval()
    folded = fold_batchnorm_(model) if config.fold_bn else []
    records, targets = _select(model, config)
    if not targets:
        raise ConfigError(
            f"{type(model).__name__} has no layer this scheme can quantize ({_summary(records)}); "
            "static int8 covers nn.Linear and nn.Conv1d/2d, dynamic int8 nn.Linear, nn.LSTM and nn.GRU, int4 nn.Linear"
        )
    unfuse_transformer_layers_(model, targets)  # the fused encoder kernel would bypass the layers
    ranges, calibration = calibrated_ranges(model, targets, batches, config, progress)
    smooth = {}
    if config.smooth is not None:
        linears = {n: m for n, m in targets.items() if isinstance(m, nn.Linear)}
        smooth = smoothing_factors(model, linears, batches, float(config.smooth))
    history: list[dict] = []
    if config.qat is not None:
        assert isinstance(data, Data)  # checked above
        history = train_fake_quant(
            model, targets, ranges, config.qat, data, per_channel=config.per_channel, progress=progress, teacher=teacher
        )
        targets = {n: model.get_submodule(n) for n in targets}
    correct = config.bias_correction and config.scheme == "static" and config.qat is None
    reference = copy.deepcopy(model) if correct else None
    for name, layer in targets.items():
        q = quantize_layer(layer, config, ranges.get(name), smooth.get(name))
        model.set_submodule(name, q)
        _record(records[name], layer, q, ranges.get(name))
    if reference is not None:
        for name, shift in correct_biases_(model, reference, list(targets), batches, progress).items():
            records[name].bias_shift = round(shift, 6)
    if config.attention is not None:
        set_attention_precision_(model, config.attention)  # undone with the rest if the check below fails
        if not bfloat16_dot_products() and model_device(model).type == "cpu":
            log.warning(
                "attention='bfloat16': this CPU has no bfloat16 dot products (AVX512-BF16 or AMX), so the "
                "attention runs emulated and slower than float32; leave attention out for this machine"
            )
    hint = "a layer's weight may be used outside its forward (exclude it, e.g. exclude=('fc',))"
    check_runs(model, example, "quantized", hint)
    return QuantizeResult(list(records.values()), folded, config, history, calibration)


def _record(rec: LayerRecord, layer: nn.Module, q: nn.Module, ranges: tuple | None) -> None:
    """Fill one layer's report row from its float and quantized versions."""
    rec.scheme, rec.bits = q.scheme, q.bits
    if isinstance(q, QuantizedRNN):
        weights = q.dequantized_weights()
        rec.weight_error = _relative_error(
            torch.cat([getattr(layer, n).flatten() for n in weights]),
            torch.cat([w.flatten() for w in weights.values()]),
        )
        return
    dq = q.dequantized_weight()
    if q.input_smooth is not None:  # the stored weight carries the smoothing factors
        dq = dq / q.input_smooth
        s = q.input_smooth
        rec.note = f"input smoothed: channels divided by {float(s.min()):.3g} to {float(s.max()):.3g}"
    rec.weight_error = _relative_error(layer.weight, dq)
    if ranges is not None:
        rec.input_range, rec.output_range = ([round(v, 6) for v in r] if r else None for r in ranges)
        rec.input_scale, rec.input_zero_point = q.input_q
        if q.output_q is None:
            rec.note = "output quantized after the ReLU by the next layers' input grid"
        else:
            rec.output_scale, rec.output_zero_point = q.output_q
    if not layer.weight.detach().any():
        rec.note = "all-zero weight: stored as zeros (scale 1)"


def quantize_layer(
    layer: nn.Module, config: QuantizeConfig, ranges: tuple | None = None, smooth: torch.Tensor | None = None
) -> nn.Module:
    """The quantized replacement of one target layer: an LSTM / GRU becomes a dynamic
    :class:`QuantizedRNN`, a Linear / Conv a :class:`QuantizedLayer` of the config's scheme
    (its input divided by ``smooth``, if given)."""
    if isinstance(layer, nn.RNNBase):
        return QuantizedRNN.from_float(layer)
    group = config.group_size if config.bits == 4 else 0
    return QuantizedLayer.from_float(
        layer, config.scheme, config.bits, group, ranges, config.per_channel, config.activations, smooth
    )


def fold_batchnorm_(model: nn.Module) -> list[str]:
    """Fold every BatchNorm that directly follows a Conv (whose output feeds nothing else) into it.

    The convolution gets the folded weight and bias, the BatchNorm becomes ``nn.Identity``.
    Returns the names of the folded BatchNorm modules. Models ``torch.fx`` cannot trace are
    left as they are (logged): their BatchNorms then run in float between int8 layers.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return []  # nothing to fold: no trace (and no warning for models fx cannot trace)
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 -- any tracing failure means "do not fold"
        log.warning("BatchNorm not folded: torch.fx cannot trace %s (%s)", type(model).__name__, exc)
        return []
    modules = dict(model.named_modules())
    folded = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or not bn.track_running_stats:
            continue
        prev = node.args[0] if node.args else None
        conv = modules.get(prev.target) if isinstance(prev, torch.fx.Node) and prev.op == "call_module" else None
        if type(conv) not in (nn.Conv1d, nn.Conv2d) or len(prev.users) != 1 or conv.out_channels != bn.num_features:
            continue
        model.set_submodule(prev.target, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        model.set_submodule(node.target, folded_batchnorm(type(bn).__name__, prev.target))
        folded.append(node.target)
    return folded


def _select(model: nn.Module, config: QuantizeConfig) -> tuple[dict[str, LayerRecord], dict[str, nn.Module]]:
    """A record for every weight layer, and the layers to quantize (the others carry a skip)."""
    records, targets, ties, direct = {}, {}, Ties(model), read_directly(model)
    for name, m in model.named_modules():
        kind = type(m).__name__
        if type(m) not in (*FLOAT_TYPES.values(), *RNN_TYPES.values()):
            if isinstance(m, _WEIGHTED):
                records[name] = LayerRecord(name, kind, skip=f"no int8 kernel for {kind} in torchslim; kept in float")
            continue
        rec = records[name] = LayerRecord(name, kind)
        rec.skip = _why_not(name, m, config) or direct.get(name) or _tied(name, m, ties)
        if rec.skip is None:
            targets[name] = m
    return records, targets


def _tied(name: str, m: nn.Module, ties: Ties) -> str | None:
    """Why a layer whose parameters are tied to another module's stays float: its int8 copy
    would be a second tensor, breaking the tie and storing the weight twice."""
    for pname in sorted(m._parameters, key=lambda k: k != "weight"):  # the weight named first
        others = ties.members(f"{name}.{pname}" if name else pname)
        if others:
            return f"{pname} is tied to {others[0]}; an int8 copy would break the tie and store it twice: kept in float"
    return None


def _why_not(name: str, m: nn.Module, config: QuantizeConfig) -> str | None:
    if match_layer(config.exclude, name):
        return "excluded (kept in float)"
    if config.layers is not None and not match_layer(config.layers, name):
        return "not among the layers to quantize (kept in float)"
    if getattr(m, "padding_mode", "zeros") != "zeros":
        return f"padding_mode={m.padding_mode!r} has no int8 kernel; kept in float"
    if isinstance(m, nn.RNNBase):
        if config.scheme != "dynamic":
            return f"{type(m).__name__} layers are quantized by scheme='dynamic'; kept in float"
        if m.proj_size:
            return f"{type(m).__name__} with proj_size has no int8 path here; kept in float"
        return None
    if config.scheme == "dynamic" and not isinstance(m, nn.Linear):
        return "dynamic quantization covers Linear, LSTM and GRU layers; use scheme='static' for convolutions"
    if config.bits == 4:
        if not isinstance(m, nn.Linear):
            return "int4 weight-only covers Linear layers; kept in float"
    return None


def _summary(records: dict[str, LayerRecord]) -> str:
    return "; ".join(f"{r.name}: {r.skip}" for r in records.values())[:300] or "no weight layers"


def _relative_error(w: torch.Tensor, dq: torch.Tensor) -> float:
    w = w.detach().float()
    norm = float(w.norm())
    return round(float((w - dq.reshape(w.shape)).norm()) / norm, 6) if norm > 0 else 0.0
