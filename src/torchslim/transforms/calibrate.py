"""Calibration for static quantization: checked batches, and the grids of every int8 layer.

``calibrated_ranges`` observes every target layer's input and output once
(:func:`torchslim.analysis.ranges.observe`) and turns the statistics into ranges with the
configured method. ``"auto"`` scores quantized copies of the model by how far their outputs on
the calibration batches are (mean squared error) from the float model's: it starts from the
best single method for all layers, then sweeps the layers once, keeping for each the method
that lowers the error -- no labels, no test set. A layer whose input is already on a 256-level
grid (8-bit pixels) thus keeps ``minmax``, which reproduces it exactly, while deeper layers
may clip. ``correct_biases_`` shifts each quantized layer's bias by the mean per-channel error
it measures on the same batches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from torchslim.analysis.ranges import METHODS, choose_range, observe, run_with_hooks
from torchslim.core.data import Data, batch_rows, take_rows
from torchslim.core.qlayers import QuantizedLayer
from torchslim.core.task import Task, call_model, check_finite, logits_of
from torchslim.errors import DataError

AUTO_ROWS = 512
"""Calibration rows on which ``calibration="auto"`` scores each candidate's output error."""

Ranges = dict[str, tuple[tuple[float, float], tuple[float, float] | None]]
"""Layer -> (input range, output range or None when the next layers' input grid takes the output)."""


def calibration_batches(
    data: Data | Iterable, count: int, example: torch.Tensor | None = None, *, batch_size: int | None = None
) -> list:
    """Up to ``count`` calibration batches: the calibration split of a :class:`Data`, or the
    items of any iterable of input batches or ``(input, target)`` pairs, cut into batches of
    ``batch_size`` rows when given. Each is checked for emptiness, non-finite values and, for
    tensor inputs, its shape against ``example`` (or the first batch). Items come back as they
    came (pairs stay pairs); :func:`inputs_of` takes the input of one."""
    task = data.task if isinstance(data, Data) else None
    source = data.calib_loader() if isinstance(data, Data) else data
    batches: list = []
    for i, item in enumerate(_cut(source, batch_size)):
        x = inputs_of(item, task)
        if not isinstance(x, (torch.Tensor, Mapping, tuple, list)):
            raise DataError(
                f"calibration batch {i} is {type(x).__name__}: yield tensors, (input, target) pairs or dicts of tensors"
            )
        check_finite(x, f"calibration batch {i}")
        ref = example if isinstance(example, torch.Tensor) else (inputs_of(batches[0], task) if batches else x)
        if isinstance(x, torch.Tensor) and isinstance(ref, torch.Tensor) and x.shape[1:] != ref.shape[1:]:
            raise DataError(
                f"calibration batch {i} has shape {tuple(x.shape)} but the model's input is {tuple(ref.shape)}: "
                "calibrate on batches shaped like the example input (only the batch size may differ)"
            )
        batches.append(item)
        if len(batches) == count:
            break
    if not batches:
        raise DataError("the calibration loader yielded no batches; give it at least one batch of inputs")
    return batches


def inputs_of(item: Any, task: Task | None = None) -> Any:
    """The model input of a calibration item: what ``task`` feeds the model, else the first
    element of an ``(input, target)`` pair."""
    if task is not None:
        return task.split(item)[0]
    return item[0] if isinstance(item, (tuple, list)) else item


def _cut(source: Iterable, size: int | None) -> Iterator:
    """The items of ``source``, each cut into pieces of at most ``size`` rows (``None``: as they
    are). Only tensors and tuples of tensors are cut; other structures come whole."""
    for item in source:
        parts = item if isinstance(item, (tuple, list)) else (item,)
        if size is None or not all(isinstance(p, torch.Tensor) and p.dim() for p in parts):
            yield item
            continue
        for start in range(0, len(parts[0]), size):
            piece = tuple(p[start : start + size] for p in parts)
            yield piece if isinstance(item, (tuple, list)) else piece[0]


def calibrated_ranges(
    model: nn.Module,
    targets: dict[str, nn.Module],
    batches: list,
    config: Any,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Ranges, dict[str, Any]]:
    """The ranges of every target layer, and what was chosen: ``{"method": ...}``, and for
    ``"auto"`` also each layer's method and the output error of each whole-model method.
    ``"auto"`` scores its candidates on the first :data:`AUTO_ROWS` rows of the batches (the
    statistics come from all of them); ``progress(done, total)`` is called after each candidate."""
    if config.scheme != "static":
        return {}, {}
    graph = _trace(model)
    stats = observe(model, targets, batches, config.calibration != "minmax", relu_fed(model, targets, graph))
    consumers = grid_consumers(model, targets, graph)
    outputs = model_outputs(model, targets, graph)
    chosen: dict[tuple[str, str, str], tuple[float, float]] = {}

    def choose(name: str, end: str, method: str) -> tuple[float, float]:  # each range worked out once
        if (name, end, method) not in chosen:
            chosen[name, end, method] = choose_range(stats[name, end], method, config.percentile)
        return chosen[name, end, method]

    if config.calibration != "auto":
        methods = dict.fromkeys(targets, config.calibration)
        return _pick(choose, methods, consumers, outputs), {"method": config.calibration}
    trial = copy.deepcopy(model)  # one working copy; each trial swaps in freshly quantized layers
    scoring = first_rows(batches, AUTO_ROWS)
    total, done = len(METHODS) + len(targets) * (len(METHODS) - 1), 0
    scored: dict[tuple, float] = {}  # the error of each distinct set of grids: a method that picks
    with torch.no_grad():  # the same ranges as another builds the same model, and is not run again
        reference = [logits_of(call_model(model, x)) for x in scoring]

        def error(methods: dict[str, str]) -> float:
            nonlocal done
            done += 1
            ranges = _pick(choose, methods, consumers, outputs)
            key = tuple(ranges.items())
            if key not in scored:
                for name, layer in targets.items():
                    q = QuantizedLayer.from_float(layer, "static", ranges=ranges[name], per_channel=config.per_channel)
                    trial.set_submodule(name, q)
                outs = (logits_of(call_model(trial, x)) for x in scoring)
                scored[key] = sum(float(((out - ref) ** 2).mean()) for out, ref in zip(outs, reference)) / len(scoring)
            if progress is not None:
                progress(done, total)
            return scored[key]

        whole = {m: error(dict.fromkeys(targets, m)) for m in METHODS}
        best = min(METHODS, key=lambda m: (whole[m], METHODS.index(m)))
        methods, current = dict.fromkeys(targets, best), whole[best]
        for name in targets:  # one sweep, layer by layer: keep another method where it lowers the error
            for m in METHODS:  # each other method once (the starting one is the model already scored)
                if m != best and (err := error(methods | {name: m})) < current:
                    methods, current = methods | {name: m}, err
    return _pick(choose, methods, consumers, outputs), {
        "method": "auto",
        "start": best,
        "layers": methods,
        "output_mse": whole,
        "final_output_mse": current,
    }


def first_rows(batches: list, rows: int) -> list:
    """The leading batches holding the first ``rows`` samples (the last one cut to fit)."""
    out, seen = [], 0
    for x in batches:
        if seen >= rows:
            break
        n = batch_rows(x)
        out.append(x if seen + n <= rows or not n else take_rows(x, rows - seen))
        seen += n or rows
    return out


def _pick(
    choose: Callable[[str, str, str], tuple[float, float]], methods: dict[str, str], consumers: dict, outputs: set[str]
) -> Ranges:
    """Each layer's input and output range by its method, then one grid per producer/consumers.

    The layers that produce the model's outputs take their whole observed range (``minmax``)
    whatever their method: a clipped logit can change the top class. (Left float, the last
    layer would not fuse into ONNX Runtime's integer Gemm, which needs a quantized output.)
    """
    out: dict[str, list] = {
        n: [
            choose(n, "input", m),
            choose(n, "output", "minmax" if n in outputs else m),
        ]
        for n, m in methods.items()
    }
    for producer, (users, relu, direct) in consumers.items():
        # one grid for the producer's output and its consumers' input: no double rounding. After a
        # ReLU the grid starts at 0 (zero point 0 clamps negatives exactly as the ReLU does); with
        # the ReLU right before the consumers the producer's output stays float, so the backends
        # fuse conv/linear + ReLU + quantize into one int8 kernel
        lo = 0.0 if relu else min(out[u][0][0] for u in users)
        shared = (lo, max(out[u][0][1] for u in users))
        out[producer][1] = None if relu and direct else shared
        for u in users:
            out[u][0] = shared
    return {n: (r[0], r[1]) for n, r in out.items()}


_RELU_FUNCTIONS = (torch.relu, torch.relu_, nn.functional.relu)
_POOL_FUNCTIONS = (
    torch.max_pool1d,
    torch.max_pool2d,
    nn.functional.max_pool1d,
    nn.functional.max_pool2d,
    torch.flatten,
)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Identity)
_POOL_METHODS = ("flatten", "view", "reshape")


def _is_relu(node: torch.fx.Node, modules: dict) -> bool:
    return (
        (node.op == "call_module" and isinstance(modules.get(node.target), nn.ReLU))
        or (node.op == "call_function" and node.target in _RELU_FUNCTIONS)
        or (node.op == "call_method" and node.target in ("relu", "relu_"))
    )


def _keeps_values(node: torch.fx.Node, modules: dict) -> bool:
    """Max pooling, flattening and reshaping: the output's values are some of the input's."""
    return (
        (node.op == "call_module" and isinstance(modules.get(node.target), _POOL_MODULES))
        or (node.op == "call_function" and node.target in _POOL_FUNCTIONS)
        or (node.op == "call_method" and node.target in _POOL_METHODS)
    )


def _trace(model: nn.Module) -> torch.fx.Graph | None:
    """The model's FX graph, or ``None`` when it cannot be traced symbolically."""
    try:
        return torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 -- untraceable: every layer keeps its own grids
        return None


def _walks(graph: torch.fx.Graph, targets: dict[str, nn.Module], through: Callable[[torch.fx.Node], bool]):
    """For each target layer's node: its name, and the last node reached from it by following
    single users that ``through`` accepts."""
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in targets:
            continue
        producer = node.target
        while len(node.users) == 1 and through(user := next(iter(node.users))):
            node = user
        yield producer, node


def model_outputs(model: nn.Module, targets: dict[str, nn.Module], graph: torch.fx.Graph | None) -> set[str]:
    """Target layers whose output is one of the model's outputs (directly or through max
    pooling / reshaping only): their output grid never clips."""
    if graph is None:
        return set()
    modules = dict(model.named_modules())
    walks = _walks(graph, targets, lambda user: _keeps_values(user, modules) and user.op != "output")
    return {producer for producer, node in walks if any(u.op == "output" for u in node.users)}


def relu_fed(model: nn.Module, targets: dict[str, nn.Module], graph: torch.fx.Graph | None) -> set[str]:
    """Target layers whose output goes (through a folded BatchNorm) into one ReLU and nowhere else.

    Their output grid is chosen from the ReLU's output, so it starts at 0: with zero point 0 it
    clamps negatives exactly as the ReLU does, no grid step is spent on values the ReLU drops,
    and the exported graph's ReLU after that grid is a no-op that the export removes. (When
    target layers take that output, :func:`grid_consumers` decides its grid instead.)
    """
    if graph is None:
        return set()
    modules = dict(model.named_modules())
    walks = _walks(
        graph, targets, lambda user: user.op == "call_module" and isinstance(modules.get(user.target), nn.Identity)
    )
    return {producer for producer, node in walks if len(node.users) == 1 and _is_relu(next(iter(node.users)), modules)}


def grid_consumers(
    model: nn.Module, targets: dict[str, nn.Module], graph: torch.fx.Graph | None
) -> dict[str, tuple[list[str], bool, bool]]:
    """Target layers whose output reaches only target layers, through nothing but (a folded
    BatchNorm,) at most one ReLU and then max pooling / flattening / reshaping.

    Returns ``producer -> (consumers, through a ReLU, directly)``: the consumers' input is a
    subset of the producer's (ReLU-clamped) output values, so one grid serves both.
    """
    if graph is None:
        return {}
    modules = dict(model.named_modules())
    out = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in targets:
            continue
        producer, relu, direct = node.target, False, True
        while len(node.users) == 1:
            user = next(iter(node.users))
            if user.op == "call_module" and user.target in targets:
                break
            if not relu and (isinstance(modules.get(user.target), nn.Identity) or _is_relu(user, modules)):
                relu = relu or _is_relu(user, modules)
            elif _keeps_values(user, modules):
                direct = False
            else:
                break
            node = user
        users = list(node.users)
        if users and all(u.op == "call_module" and u.target in targets and u.args[:1] == (node,) for u in users):
            out[producer] = ([u.target for u in users], relu, direct)
    return out


def correct_biases_(
    model: nn.Module,
    reference: nn.Module,
    names: list[str],
    batches: list,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Empirical bias correction: in model order, add to each quantized layer's bias the mean
    per-channel difference between the float model's output of that layer and the quantized
    model's (output grid off while measuring), over the calibration batches. Returns the
    largest shift per corrected layer. Each measuring pass stops at the layer it measures
    (when every layer runs once per forward pass); ``progress(done, total)`` follows the layers."""
    target, calls = _channel_means(reference, names, batches)
    stop = all(c == len(batches) for c in calls.values())  # no layer reused within one pass
    shifts = {}
    for i, name in enumerate(names, 1):
        layer = model.get_submodule(name)
        if isinstance(layer, QuantizedLayer) and layer.bias is not None:
            kept, layer.output_q = layer.output_q, None
            try:
                delta = target[name] - _channel_means(model, [name], batches, stop)[0][name]
            finally:
                layer.output_q = kept
            layer.bias += delta
            shifts[name] = float(delta.abs().max())
        if progress is not None:
            progress(i, len(names))
    return shifts


def _channel_means(
    model: nn.Module, names: list[str], batches: list, stop: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per output channel, the mean output of each named layer over the batches, and how many
    times each layer ran. With ``stop`` (one name), each pass ends after that layer."""
    layers = {n: model.get_submodule(n) for n in names}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    calls = dict.fromkeys(names, 0)

    def record(key: tuple[str, str], out: torch.Tensor) -> None:
        name, end = key
        if end == "output":
            conv = getattr(layers[name], "float_type", type(layers[name]).__name__) != "Linear"
            y = out.detach().movedim(1 if conv else -1, 0).flatten(1)  # (channels, samples)
            sums[name] = sums.get(name, 0) + y.sum(1)
            counts[name] = counts.get(name, 0) + y.shape[1]
            calls[name] += 1

    run_with_hooks(model, layers, batches, record, stop_after=names[0] if stop and len(names) == 1 else None)
    return {n: sums[n] / counts[n] for n in sums}, calls
