"""Where a (quantized) model runs: the backends a user picks, and ONNX export.

``eager``        the model itself. For quantized layers this is the fake-quant reference: exact,
                 but slower than float (every call dequantizes the weights).
``inductor``     ``torch.compile`` with inductor freezing, the C++ wrapper and static shapes: the quantize /
                 dequantize patterns of :class:`~torchslim.core.qlayers.QuantizedLayer` become
                 oneDNN int8 convolutions and matmuls (x86 VNNI), float layers get fused kernels.
                 Each new input shape compiles once (tens of seconds for the first).
``onnxruntime``  the model exported to ONNX (QuantizeLinear / DequantizeLinear pairs) and run by
                 an ONNX Runtime session with every graph optimisation enabled.

The backends are thin: ``torch.compile``, ``torch.onnx.export`` and ONNX Runtime do the work.
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable

import torch
from torch import nn

from torchslim.errors import ConfigError

log = logging.getLogger(__name__)
BACKENDS = ("eager", "inductor", "onnxruntime")


def compile_model(model: nn.Module, backend: str, example: torch.Tensor, threads: int = 2) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable that runs ``model`` on ``backend``; compiled (and checked) on ``example``.

    Example:
        >>> fast = compile_model(qmodel, "inductor", torch.zeros(64, 1, 28, 28))  # doctest: +SKIP
        >>> logits = fast(batch)  # doctest: +SKIP
    """
    model.eval()
    if backend == "eager":
        return _NoGrad(model)
    if backend == "inductor":
        runner: Callable[[torch.Tensor], torch.Tensor] = _Frozen(model)
    elif backend == "onnxruntime":
        runner = OrtRunner(export_onnx(model, example), threads)
    else:
        raise ConfigError(f"backend={backend!r}: choose one of {list(BACKENDS)}")
    runner(example)  # compile now, not inside the first timed call
    return runner


class _NoGrad:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)


class _Frozen:
    """``torch.compile`` with inductor freezing (weights become constants, so int8 weights are
    prepacked once) and the C++ wrapper (less Python per call). The first call of each input
    shape compiles under those settings; later calls of that shape skip setting them."""

    def __init__(self, model: nn.Module) -> None:
        self.compiled = torch.compile(model, dynamic=False)
        self.shapes: set[tuple[int, ...]] = set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if tuple(x.shape) in self.shapes:
                return self.compiled(x)
            import torch._inductor.config as inductor_config

            with inductor_config.patch(freezing=True, cpp_wrapper=True, size_asserts=False):
                out = self.compiled(x)
            self.shapes.add(tuple(x.shape))
            return out


def export_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """The model as a self-contained ONNX file (weights inside, batch dimension dynamic)."""
    model.eval()
    name = next(iter(inspect.signature(model.forward).parameters), "x")
    try:
        program = torch.onnx.export(
            model, (example,), dynamo=True, external_data=False, optimize=True, verbose=False,
            dynamic_shapes={name: {0: torch.export.Dim("batch", min=1, max=65536)}},
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 -- reported with what to do
        raise ConfigError(
            f"cannot export {type(model).__name__} to ONNX ({type(exc).__name__}: {str(exc)[:300]}); use "
            "backend='inductor' or 'eager'"
        ) from exc
    return program.model_proto.SerializeToString()


class OrtRunner:
    """An ONNX Runtime CPU session behind a tensor-in, tensor-out call."""

    def __init__(self, onnx_bytes: bytes, threads: int = 2) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out)
