"""Where a (quantized) model runs: the backends a user picks, and ONNX export.

``eager``        the model itself. For quantized layers this is the fake-quant reference: exact,
                 but slower than float (every call dequantizes the weights).
``inductor``     the model exported and compiled ahead of time by inductor (AOTInductor) with
                 freezing and static shapes: the quantize / dequantize patterns of
                 :class:`~torchslim.core.qlayers.QuantizedLayer` become oneDNN int8 convolutions
                 and matmuls (x86 VNNI), float layers get fused kernels. Each new input shape
                 compiles once (seconds to tens of seconds).
``onnxruntime``  the model exported to ONNX (QuantizeLinear / DequantizeLinear pairs) and run by
                 an ONNX Runtime session with every graph optimisation enabled.

The backends are thin: ``torch.export``, AOTInductor (or ``torch.compile``), ``torch.onnx.export``
and ONNX Runtime do the work.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.core.data import take_rows
from torchslim.core.task import call_model
from torchslim.errors import ConfigError

log = logging.getLogger(__name__)
BACKENDS = ("eager", "inductor", "onnxruntime")


def compile_model(
    model: nn.Module,
    backend: str,
    example: torch.Tensor,
    threads: int = 2,
    *,
    against: nn.Module | None = None,
    spin: bool = True,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable that runs ``model`` on ``backend``; compiled (and checked) on ``example``.

    ``spin=False`` makes ONNX Runtime's worker threads sleep between calls instead of spinning
    (they spin for tens of milliseconds by default: fastest for one model alone, but two
    sessions timed side by side, or other work on the same cores, lose those cores to it).

    With ``against`` (the float model a quantized ``model`` came from), int8 is first timed
    against float on ``backend`` at ``example``'s batch, and a copy of ``model`` with float
    where int8 is slower is compiled instead (:func:`torchslim.artifact.speed.keep_faster_`;
    ``model`` is not changed); the runner's ``speed`` attribute holds the figures.

    Example:
        >>> fast = compile_model(qmodel, "inductor", torch.zeros(64, 1, 28, 28))  # doctest: +SKIP
        >>> logits = fast(batch)  # doctest: +SKIP
        >>> fast = compile_model(qmodel, "onnxruntime", x, against=float_model)  # doctest: +SKIP
        >>> fast.speed.delivered  # doctest: +SKIP
        'int8'
    """
    if against is not None:
        from torchslim.artifact.speed import keep_faster_  # the speed check compiles through this function

        faster = copy.deepcopy(model)
        check = keep_faster_(faster, against, backend, example, threads)
        runner = compile_model(faster, backend, example, threads)
        runner.speed = check  # type: ignore[attr-defined]
        return runner
    model.eval()
    if backend == "eager":
        return _NoGrad(model)
    if not timeable(example, backend):
        raise ConfigError(
            f"backend={backend!r} compiles models that take one tensor; this one takes "
            f"{type(example).__name__} inputs: time it with backend='eager'"
        )
    if backend == "inductor":
        runner: Callable[[torch.Tensor], torch.Tensor] = _Frozen(model)
    elif backend == "onnxruntime":
        runner = OrtRunner(export_onnx(model, example, check=False), threads, spin)  # runs on the batch below
    else:
        raise ConfigError(f"backend={backend!r}: choose one of {list(BACKENDS)}")
    runner(example)  # compile now, not inside the first timed call
    return runner


class _NoGrad:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, x: Any) -> Any:
        with torch.no_grad():
            return call_model(self.model, x)


class _Frozen:
    """The inductor backend: per input shape, the model exported (``torch.export``), compiled
    ahead of time with inductor freezing (int8 weights prepacked once) and loaded as an
    AOTInductor package, which calls with less overhead than ``torch.compile``'s Python wrapper.
    A model ``torch.export`` cannot capture falls back to ``torch.compile`` (graph breaks allowed)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.runners: dict[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]] = {}
        self.folder = tempfile.TemporaryDirectory(prefix="torchslim-aoti-")  # removed with this object
        self.fallback: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.fallback is not None:
                return self.fallback(x)
            runner = self.runners.get(tuple(x.shape))
            if runner is None:
                runner = self.runners[tuple(x.shape)] = self._compile(x)
            return runner(x)

    def _compile(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            try:
                program = torch.export.export(self.model, (x,))
            except Exception as exc:  # noqa: BLE001 -- any capture failure: compile with graph breaks instead
                log.warning("torch.export cannot capture %s (%s); using torch.compile", type(self.model).__name__, exc)
                self.fallback = _Compiled(self.model)
                return self.fallback
            path = os.path.join(self.folder.name, f"{len(self.runners)}.pt2")
            package = torch._inductor.aoti_compile_and_package(program, package_path=path)
        return torch._inductor.aoti_load_package(package)


class _Compiled:
    """``torch.compile`` with inductor freezing; each new input shape compiles under freezing."""

    def __init__(self, model: nn.Module) -> None:
        self.compiled = torch.compile(model, dynamic=False)
        self.shapes: set[tuple[int, ...]] = set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) in self.shapes:
            return self.compiled(x)
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            out = self.compiled(x)
        self.shapes.add(tuple(x.shape))
        return out


SEQUENCE_LAYERS = (nn.RNNBase, nn.MultiheadAttention, nn.Embedding)
"""Layers whose presence means dimension 1 of the input is a sequence, exported as dynamic."""


def timeable(inputs: Any, backend: str) -> bool:
    """Whether ``backend`` runs a model on ``inputs``: eager takes any input; the compiled
    backends one tensor."""
    return backend == "eager" or isinstance(inputs, torch.Tensor)


def _lengthen(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` with dimension 1 (a sequence) repeated or cut to ``length`` steps."""
    return x.repeat(1, -(-length // x.shape[1]), *([1] * (x.dim() - 2)))[:, :length]


def export_onnx(model: nn.Module, example: torch.Tensor, *, check: bool = True) -> bytes:
    """The model as a self-contained ONNX file (weights inside) whose batch dimension is dynamic,
    and, for recurrent, attention and embedding models, the sequence dimension too.

    A size-1 dimension would be exported as fixed, so an example of batch (or length) 1 is
    repeated first. With ``check``, the exported graph is run on ONNX Runtime at two batch
    sizes (and two lengths) and must give outputs of the shapes the model gives.
    """
    model.eval()
    name = next(iter(inspect.signature(model.forward).parameters), "x")
    example = take_rows(example, max(2, example.shape[0]), cycle=True)
    sequence = example.dim() >= 2 and any(isinstance(m, SEQUENCE_LAYERS) for m in model.modules())
    if sequence and example.shape[1] < 2:
        example = _lengthen(example, 2)
    dims = {0: torch.export.Dim("batch", min=1, max=65536)}
    if sequence:
        dims[1] = torch.export.Dim("sequence", min=1, max=65536)
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
            dynamic_shapes={name: dims},
        )
    except Exception as exc:  # noqa: BLE001 -- reported with what to do
        raise ConfigError(
            f"cannot export {type(model).__name__} to ONNX ({type(exc).__name__}: {str(exc)[:300]}); use "
            "backend='inductor' or 'eager'"
        ) from exc
    proto = program.model_proto
    drop_noop_relus(proto)
    data = proto.SerializeToString()
    if check:
        _check_dynamic(data, model, example, sequence)
    return data


def _check_dynamic(data: bytes, model: nn.Module, example: torch.Tensor, sequence: bool) -> None:
    """Run the exported graph at two batch sizes (and lengths); its outputs must have the model's shapes."""
    runner = OrtRunner(data, threads=1)
    sizes = [(1, None), (3, None)] + ([(2, 1), (2, example.shape[1] + 3)] if sequence else [])
    for batch, length in sizes:
        x = take_rows(example, batch, cycle=True)
        if length is not None:
            x = _lengthen(x, length)
        with torch.no_grad():
            want = call_model(model, x)
        try:
            got = runner(x)
        except Exception as exc:  # noqa: BLE001 -- reported with what failed
            raise ConfigError(
                f"the ONNX export of {type(model).__name__} does not run at input shape {tuple(x.shape)} "
                f"({type(exc).__name__}: {str(exc)[:200]}); use backend='inductor' or 'eager'"
            ) from exc
        if tuple(got.shape) != tuple(logits_shape(want)):
            raise ConfigError(
                f"the ONNX export of {type(model).__name__} gives shape {tuple(got.shape)} at input shape "
                f"{tuple(x.shape)} where the model gives {tuple(logits_shape(want))}"
            )


def logits_shape(output: Any) -> torch.Size:
    """The shape of a model's first output tensor (what the ONNX graph returns first)."""
    while not isinstance(output, torch.Tensor):
        output = output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))
    return output.shape


def drop_noop_relus(proto) -> int:
    """Turn into Identity (which ONNX Runtime removes) every Relu fed by a DequantizeLinear whose
    zero point is the lowest value of its integer type: that output is never negative, so the
    Relu changes nothing. This is the ReLU after a layer whose output grid was calibrated after
    it (:func:`torchslim.transforms.calibrate.relu_fed`). Returns how many were changed."""
    from onnx import numpy_helper

    lowest = {"uint8": 0, "int8": -128, "uint16": 0, "int16": -32768}
    consts = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    producer = {out: node for node in proto.graph.node for out in node.output}
    changed = 0
    for node in proto.graph.node:
        dq = producer.get(node.input[0]) if node.op_type == "Relu" and node.domain in ("", "ai.onnx") else None
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or dq.input[2] not in consts:
            continue
        zero = numpy_helper.to_array(consts[dq.input[2]])
        if str(zero.dtype) in lowest and zero.size and (zero == lowest[str(zero.dtype)]).all():
            node.op_type = "Identity"
            changed += 1
    return changed


def exact_int8_kernels(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies uint8 activations by int8 weights without saturating.

    x86 CPUs with VNNI (AVX-512 or AVX) or AMX add the products in 32 bits. Without them (AVX2
    only), ONNX Runtime's fused integer kernels add pairs of products in 16 bits (``vpmaddubsw``),
    which saturates for full-range int8 weights: measured here, a static int8 ResNet gave a max
    output difference of 0.60 against the same graph run unfused. Other architectures and an
    unreadable ``cpuinfo`` count as exact.
    """
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return True
    if "avx2" not in flags:
        return True
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def _fused_int8_here() -> bool:
    """:func:`exact_int8_kernels` for this machine, read once; says once why it runs unfused."""
    exact = exact_int8_kernels()
    if not exact:
        log.warning(
            "this CPU has no VNNI or AMX: ONNX Runtime's fused int8 kernels would saturate on it, so quantized "
            "graphs run unfused (exact, float speed); on a CPU with AVX-512 VNNI they run int8 kernels"
        )
    return exact


class OrtRunner:
    """An ONNX Runtime CPU session behind a tensor-in, tensor-out call.

    A quantized graph runs on ONNX Runtime's fused integer kernels where they are exact
    (:func:`exact_int8_kernels`); on a CPU where they saturate it runs unfused (QDQ nodes around
    float kernels: the same numbers as PyTorch, at float speed), with a warning.
    """

    def __init__(self, onnx_bytes: bytes, threads: int = 2, spin: bool = True) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if b"QuantizeLinear" in onnx_bytes and not _fused_int8_here():
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out)
