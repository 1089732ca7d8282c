"""int8 against float on the backend that runs the model, and float kept where int8 is slower.

An int8 layer beats its float twin only where the backend has an int8 kernel that is faster at
that shape than its float one, and the quantize / dequantize steps around it cost less than the
kernel saves: a small layer at batch 1, a depthwise convolution, a graph a backend compiles
better in float can all come out slower in int8. :func:`keep_faster_` times the quantized model
against the float model it came from, both compiled on the same backend at the same batches, in
alternating blocks (:func:`~torchslim.evaluate.latency.paired_latency`). When int8 is faster it
is kept. When not, each quantized layer is timed alone (int8 against float, on the input it
sees in the model); the layers whose int8 is no faster go back to float, and the whole model is
timed again: kept if it now beats float, else every layer goes back to float. The model
delivered is thus never slower than the float model compiled on that backend, as measured, and
:class:`SpeedCheck` states the figures that decided.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from torchslim.artifact.runtime import compile_model, timeable
from torchslim.core.data import batch_rows
from torchslim.core.plan import CompressionPlan
from torchslim.core.qlayers import QuantizedLayer, folded_names
from torchslim.core.qrnn import QuantizedRNN
from torchslim.core.task import call_model
from torchslim.errors import ConfigError
from torchslim.evaluate.latency import paired_latency
from torchslim.transforms.quantize import fold_batchnorm_

log = logging.getLogger(__name__)


@dataclass
class SpeedCheck:
    """What decided between int8 and float on one backend. Times are milliseconds, summed over
    the batches timed (one figure per batch size in ``batches``)."""

    backend: str
    batches: list[int]
    float_ms: float  # the float model, compiled on the backend
    int8_ms: float  # the model as quantized
    delivered_ms: float  # the model handed back (a mix: float_ms times its ratio to float, timed in a pair)
    delivered: str  # "int8", "mixed" (some layers back to float) or "float"
    kept_float: list[str] = field(default_factory=list)
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # timed alone: int8_ms, float_ms

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        head = f"on {self.backend} (batch {', '.join(map(str, self.batches))}): float {self.float_ms:.3f} ms, int8 {self.int8_ms:.3f} ms"
        if self.delivered == "int8":
            return f"{head}: int8 kept"
        return f"{head}: {len(self.kept_float)} layers back to float, {self.delivered_ms:.3f} ms ({self.delivered})"

    def plan(self) -> CompressionPlan:
        """Each layer handed back to float, with the figures that sent it back."""
        plan = CompressionPlan()
        for name in self.kept_float:
            alone = self.layers.get(name)
            why = (
                f"kept in float: int8 {alone['int8_ms']:.3f} ms against float {alone['float_ms']:.3f} ms on {self.backend}"
                if alone and self.delivered == "mixed"
                else f"kept in float: the int8 model ({self.int8_ms:.3f} ms) is slower than float ({self.float_ms:.3f} ms) on {self.backend}"
            )
            plan = plan.merged(name, skip=why)
        return plan


def quantized_names(model: nn.Module) -> list[str]:
    """The model's int8 / int4 layers, in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, (QuantizedLayer, QuantizedRNN))]


def keep_faster_(
    model: nn.Module,
    reference: nn.Module,
    backend: str,
    examples: torch.Tensor | list[torch.Tensor],
    threads: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> SpeedCheck:
    """Hand ``model``'s quantized layers back to float, in place, where int8 is slower on ``backend``.

    Args:
        model: the quantized model (changed in place when int8 loses).
        reference: the float model it was quantized from (not changed); its layers (with
            BatchNorm folded in, as the quantized model has it) are the ones handed back.
        backend: ``"inductor"`` or ``"onnxruntime"``.
        examples: an input batch, or several (e.g. batch 1 and batch 64): the times are summed.
        threads: intra-op threads while timing.
        progress: ``progress(done, total)`` over the layers timed alone.

    Example:
        >>> check = keep_faster_(qmodel, float_model, "onnxruntime", torch.zeros(1, 1, 28, 28))  # doctest: +SKIP
        >>> check.delivered  # doctest: +SKIP
        'mixed'
    """
    if backend not in ("inductor", "onnxruntime"):
        raise ConfigError(
            f"backend={backend!r}: int8 is timed against float on 'inductor' or 'onnxruntime' (eager int8 is the "
            "fake-quant reference, slower than float by design)"
        )
    examples = examples if isinstance(examples, list) else [examples]
    names = quantized_names(model)
    if not names:
        raise ConfigError(f"{type(model).__name__} has no quantized layer: quantize it first (ts.quantize_)")
    float_model = _float_twin(model, reference, names)
    int8_ms, float_ms = _time(model, float_model, backend, examples, threads)
    check = SpeedCheck(backend, [batch_rows(x) for x in examples], float_ms, int8_ms, int8_ms, "int8")
    if int8_ms < float_ms:
        log.info("int8 %s", check.summary())
        return check
    check.layers = _alone(model, float_model, names, backend, examples, threads, progress)
    slower = [n for n in names if n in check.layers and check.layers[n]["int8_ms"] >= check.layers[n]["float_ms"]]
    if slower and len(slower) < len(names):
        candidate = copy.deepcopy(model)
        _to_float(candidate, float_model, slower)
        mixed_ms, float_again = _time(candidate, float_model, backend, examples, threads)
        if mixed_ms < float_again:
            _to_float(model, float_model, slower)
            # in the frame of the first measurement: float_ms times the ratio measured in this pair
            check.delivered, check.delivered_ms, check.kept_float = "mixed", float_ms * mixed_ms / float_again, slower
            log.info("int8 %s", check.summary())
            return check
    _to_float(model, float_model, names)
    check.delivered, check.delivered_ms, check.kept_float = "float", float_ms, names
    log.warning("int8 %s", check.summary())
    return check


def _float_twin(model: nn.Module, reference: nn.Module, names: list[str]) -> nn.Module:
    """The float model as the quantized one sees it: BatchNorm folded when ``model``'s was."""
    twin = copy.deepcopy(reference).eval()
    if folded_names(model):
        fold_batchnorm_(twin)
    for name in names:
        try:
            layer = twin.get_submodule(name)
        except AttributeError:
            layer = None
        if layer is None or isinstance(layer, (QuantizedLayer, QuantizedRNN)):
            raise ConfigError(
                f"reference has no float layer {name!r}: pass the float model the quantized one was made from"
            )
    return twin


def _time(
    model: nn.Module, float_model: nn.Module, backend: str, examples: list, threads: int, rounds: int = 7
) -> tuple[float, float]:
    """Summed over the examples, the paired median ms of ``model`` and ``float_model`` on ``backend``."""
    total = [0.0, 0.0]
    for x in examples:
        torch._dynamo.reset()
        ms = paired_latency(  # sessions that do not spin: two side by side would take each other's cores
            compile_model(model, backend, x, threads, spin=False),
            compile_model(float_model, backend, x, threads, spin=False),
            x,
            threads,
            rounds,
        )
        total = [total[0] + ms[0], total[1] + ms[1]]
    return total[0], total[1]


def _alone(
    model: nn.Module,
    float_model: nn.Module,
    names: list[str],
    backend: str,
    examples: list,
    threads: int,
    progress: Callable[[int, int], None] | None,
) -> dict[str, dict[str, float]]:
    """Each quantized layer timed alone against its float twin, on the inputs it sees in the model."""
    inputs: dict[str, list] = {n: [] for n in names}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, args, n=n: inputs[n].append(args[0])) for n in names
    ]
    try:
        with torch.no_grad():
            for x in examples:
                call_model(model, x)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for i, name in enumerate(names, 1):
        seen = inputs[name]
        if seen and all(timeable(x, backend) for x in seen):
            try:
                ms = _time(model.get_submodule(name), float_model.get_submodule(name), backend, seen, threads, 3)
                out[name] = {"int8_ms": ms[0], "float_ms": ms[1]}
            except Exception as exc:  # noqa: BLE001 -- a layer the backend cannot take alone is judged with the model
                log.info("%s not timed alone on %s: %s", name, backend, exc)
        if progress is not None:
            progress(i, len(names))
    return out


def _to_float(model: nn.Module, float_model: nn.Module, names: list[str]) -> None:
    for name in names:
        model.set_submodule(name, copy.deepcopy(float_model.get_submodule(name)))
