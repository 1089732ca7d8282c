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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.core.data import take_rows
from torchslim.core.qlayers import reference_forward
from torchslim.core.task import call_model
from torchslim.errors import ConfigError

log = logging.getLogger(__name__)
BACKENDS = ("eager", "inductor", "onnxruntime")
REALIZE_OPS = 4
"""Inductor's ``realize_opcount_threshold`` when compiling per-token int8 models (its default is
30): an activation feeding a per-token quantize is read twice (its row maximum, then the
quantize), and inductor recomputes anything cheaper than the threshold instead of storing it.
For BERT's erf GELU that recompute cost more than the store: on MiniLM at batch 32 x 128 (AMD
EPYC, 2 threads) the GELU-quantize kernel went from 43 to 24 ms a call of the model, the
whole model from 270 to 257 ms."""


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
    if not compilable(example, backend):
        raise ConfigError(
            f"backend={backend!r} compiles models that take tensors (one, a tuple or a dict of them); this one takes "
            f"{type(example).__name__} inputs: time it with backend='eager'"
        )
    if backend == "inductor":
        runner: Callable[[torch.Tensor], torch.Tensor] = _Compiled(model) if _per_token(model) else _Frozen(model)
    elif backend == "onnxruntime":
        runner = OrtRunner(export_onnx(model, example, check=False), threads, spin)  # runs on the batch below
    else:
        raise ConfigError(f"backend={backend!r}: choose one of {list(BACKENDS)}")
    runner(example)  # compile now, not inside the first timed call
    return runner


def _per_token(model: nn.Module) -> bool:
    """Whether ``model`` has per-token int8 layers: ``torch.compile`` matches their integer
    matmul to oneDNN's int8 GEMM, the AOTInductor path does not (it would run the slow fallback)."""
    return any(getattr(m, "activations", None) == "token" for m in model.modules())


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

    def __call__(self, x: Any) -> torch.Tensor:
        with torch.no_grad():
            if self.fallback is not None:
                return self.fallback(x)
            key = _shapes_of(x)
            runner = self.runners.get(key)
            if runner is None:
                runner = self.runners[key] = self._compile(x)
                if self.fallback is not None:
                    return self.fallback(x)
            args, kwargs = _call_args(x)
            return runner(*args, **kwargs)

    def _compile(self, x: Any) -> Callable[..., torch.Tensor]:
        import torch._inductor.config as inductor_config

        args, kwargs = _call_args(x)
        with inductor_config.patch(freezing=True):
            try:
                program = torch.export.export(self.model, args, kwargs)
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

    @torch.no_grad()
    def __call__(self, x: Any) -> torch.Tensor:
        args, kwargs = _call_args(x)
        if _shapes_of(x) in self.shapes:
            return self.compiled(*args, **kwargs)
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True, realize_opcount_threshold=REALIZE_OPS):
            out = self.compiled(*args, **kwargs)
        self.shapes.add(_shapes_of(x))
        return out


SEQUENCE_LAYERS = (nn.RNNBase, nn.MultiheadAttention, nn.Embedding)
"""Layers whose presence means dimension 1 of the input is a sequence, exported as dynamic."""


def timeable(inputs: Any, backend: str) -> bool:
    """Whether the speed checks and the search can time a model on ``inputs`` on ``backend``:
    whatever :func:`compile_model` runs there (eager: any input; compiled: a tensor, a tuple or
    a dict of tensors)."""
    return compilable(inputs, backend)


def compilable(inputs: Any, backend: str) -> bool:
    """Whether :func:`compile_model` runs a model on ``inputs`` on ``backend``: eager takes any
    input; the compiled backends a tensor, a tuple of tensors (positional arguments) or a dict
    of tensors (keyword arguments, e.g. a tokenizer's ``input_ids`` and ``attention_mask``)."""
    if backend == "eager" or isinstance(inputs, torch.Tensor):
        return True
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else None
    return bool(values) and all(isinstance(v, torch.Tensor) for v in values)


def _call_args(inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` that feed a model ``inputs``: a tensor, a tuple of them or a dict of them."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return (tuple(inputs), {}) if isinstance(inputs, (tuple, list)) else ((inputs,), {})


def _shapes_of(inputs: Any) -> tuple:
    args, kwargs = _call_args(inputs)
    return tuple(tuple(a.shape) for a in args) + tuple((k, tuple(v.shape)) for k, v in kwargs.items())


def _each(inputs: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``inputs`` with ``fn`` applied to every tensor."""
    if isinstance(inputs, Mapping):
        return {k: fn(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(fn(v) for v in inputs)
    return fn(inputs)


def _first(inputs: Any) -> torch.Tensor:
    args, kwargs = _call_args(inputs)
    return args[0] if args else next(iter(kwargs.values()))


def _lengthen(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` with dimension 1 (a sequence) repeated or cut to ``length`` steps."""
    return x.repeat(1, -(-length // x.shape[1]), *([1] * (x.dim() - 2)))[:, :length]


def export_onnx(model: nn.Module, example: Any, *, check: bool = True) -> bytes:
    """The model as a self-contained ONNX file (weights inside) whose batch dimension is dynamic,
    and, for recurrent, attention and embedding models, the sequence dimension too.

    ``example`` is one input tensor, a tuple of them (positional arguments) or a dict of them
    (keyword arguments, which become the graph's input names: a tokenizer's ``input_ids`` and
    ``attention_mask``). A size-1 dimension would be exported as fixed, so an example of batch
    (or length) 1 is repeated first. With ``check``, the exported graph is run on ONNX Runtime
    at two batch sizes (and two lengths) and must give outputs of the shapes the model gives.
    Quantized layers export as their fake-quant reference (QuantizeLinear / DequantizeLinear).
    """
    model.eval()
    example = take_rows(example, max(2, _first(example).shape[0]), cycle=True)
    sequence = _first(example).dim() >= 2 and any(isinstance(m, SEQUENCE_LAYERS) for m in model.modules())
    if sequence and _first(example).shape[1] < 2:
        example = _each(example, lambda t: _lengthen(t, 2) if t.dim() >= 2 else t)
    batch = torch.export.Dim("batch", min=1, max=65536)
    length = torch.export.Dim("sequence", min=1, max=65536)

    def dims(t: torch.Tensor) -> dict:
        return {0: batch} | ({1: length} if sequence and t.dim() >= 2 else {})

    args, kwargs = _call_args(example)
    names = list(inspect.signature(model.forward).parameters)
    dynamic = {names[i] if i < len(names) else f"arg{i}": dims(a) for i, a in enumerate(args)}
    dynamic |= {k: dims(v) for k, v in kwargs.items()}
    try:
        with reference_forward():
            program = torch.onnx.export(
                model,
                args,
                kwargs=kwargs or None,
                dynamo=True,
                external_data=False,
                optimize=True,
                verbose=False,
                dynamic_shapes=dynamic,
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


def _check_dynamic(data: bytes, model: nn.Module, example: Any, sequence: bool) -> None:
    """Run the exported graph at two batch sizes (and lengths); its outputs must have the model's shapes."""
    runner = OrtRunner(data, threads=1)
    steps = _first(example).shape[1] if sequence else 0
    sizes = [(1, None), (3, None)] + ([(2, 1), (2, steps + 3)] if sequence else [])
    for rows, length in sizes:
        x = take_rows(example, rows, cycle=True)
        if length is not None:
            x = _each(x, lambda t, n=length: _lengthen(t, n) if t.dim() >= 2 else t)
        with torch.no_grad():
            want = call_model(model, x)
        shape = _shapes_of(x)
        try:
            got = runner(x)
        except Exception as exc:  # noqa: BLE001 -- reported with what failed
            raise ConfigError(
                f"the ONNX export of {type(model).__name__} does not run at input shape {shape} "
                f"({type(exc).__name__}: {str(exc)[:200]}); use backend='inductor' or 'eager'"
            ) from exc
        if tuple(got.shape) != tuple(logits_shape(want)):
            raise ConfigError(
                f"the ONNX export of {type(model).__name__} gives shape {tuple(got.shape)} at input shape "
                f"{shape} where the model gives {tuple(logits_shape(want))}"
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
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, x: Any) -> torch.Tensor:
        """Run on one tensor, a tuple of tensors (the graph's inputs in order) or a dict of them
        (by name; names the graph dropped as unused are ignored)."""
        if isinstance(x, Mapping):
            feed = {k: v for k, v in x.items() if k in self.inputs}
        else:
            feed = dict(zip(self.inputs, x if isinstance(x, (tuple, list)) else (x,)))
        out = self.session.run(None, {k: v.detach().cpu().numpy() for k, v in feed.items()})[0]
        return torch.from_numpy(out)
