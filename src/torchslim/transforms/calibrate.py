"""Calibration for static quantization: checked batches, and the grids of every int8 layer.

``calibrated_ranges`` observes every target layer's input and output once
(:func:`torchslim.analysis.ranges.observe`) and turns the statistics into ranges with the
configured method. ``"auto"`` tries each method on those same statistics, quantizes a copy of
the model with each, and keeps the method whose outputs on the calibration batches are closest
(mean squared error) to the float model's -- chosen per model, without labels and without the
test set.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from torchslim.analysis.ranges import METHODS, choose_range, observe
from torchslim.core.data import Data
from torchslim.core.qlayers import QuantizedLayer
from torchslim.errors import ConfigError, DataError

Ranges = dict[str, tuple[tuple[float, float], tuple[float, float] | None]]
"""Layer -> (input range, output range or None when the next layers' input grid takes the output)."""


def calibration_batches(config: Any, data: Data | Iterable | None, example: torch.Tensor | None) -> list:
    """Up to ``config.calib_batches`` input batches, checked for emptiness, non-finite values and shape."""
    if data is None:
        if config.scheme == "static":
            raise ConfigError("static quantization calibrates input ranges: pass data=<calibration batches>")
        return []
    source = data.calib_loader() if isinstance(data, Data) else data
    batches: list[torch.Tensor] = []
    for i, item in enumerate(source):
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise DataError(f"calibration batch {i} is {type(x).__name__}, not a float tensor (or an (input, target) pair)")
        if not torch.isfinite(x).all():
            raise DataError(f"calibration batch {i} holds NaN or Inf; clean the calibration data before quantizing")
        ref = example if example is not None else (batches[0] if batches else x)
        if x.shape[1:] != ref.shape[1:]:
            raise DataError(
                f"calibration batch {i} has shape {tuple(x.shape)} but the model's input is {tuple(ref.shape)}: "
                "calibrate on batches shaped like the example input (only the batch size may differ)"
            )
        batches.append(x)
        if len(batches) == config.calib_batches:
            break
    if not batches:
        raise DataError("the calibration loader yielded no batches; give it at least one batch of inputs")
    return batches


def calibrated_ranges(
    model: nn.Module, targets: dict[str, nn.Module], batches: list, config: Any
) -> tuple[Ranges, dict[str, Any]]:
    """The ranges of every target layer, and what was chosen (``{"method": ..., "output_mse": {...}}``)."""
    if config.scheme != "static":
        return {}, {}
    stats = observe(model, targets, batches, histogram=config.calibration != "minmax")
    consumers = relu_consumers(model, targets)
    if config.calibration != "auto":
        return _pick(stats, config.calibration, config.percentile, targets, consumers), {"method": config.calibration}
    errors, candidates = {}, {}
    with torch.no_grad():
        reference = [model(x) for x in batches]
        for method in METHODS:
            candidates[method] = _pick(stats, method, config.percentile, targets, consumers)
            copy_ = copy.deepcopy(model)
            for name, layer in targets.items():
                _replace(copy_, name, QuantizedLayer.from_float(layer, "static", ranges=candidates[method][name]))
            diffs = [float(((copy_(x) - ref) ** 2).mean()) for x, ref in zip(batches, reference)]
            errors[method] = sum(diffs) / len(diffs)
    best = min(METHODS, key=lambda m: (errors[m], METHODS.index(m)))
    return candidates[best], {"method": best, "output_mse": errors}


def _pick(stats: dict, method: str, percentile: float, targets: dict, consumers: dict[str, list[str]]) -> Ranges:
    pick = {key: choose_range(s, method, percentile) for key, s in stats.items()}
    out: dict[str, list] = {n: [pick[n, "input"], pick[n, "output"]] for n in targets}
    for producer, users in consumers.items():
        # producer -> ReLU -> users: the users' (one, post-ReLU) input grid quantizes the producer's
        # output after the ReLU; the producer keeps its output float (no double rounding, and the
        # backends fuse conv/linear + ReLU + quantize into one int8 kernel)
        shared = (0.0, max(pick[u, "input"][1] for u in users))
        out[producer][1] = None
        for u in users:
            out[u][0] = shared
    return {n: (r[0], r[1]) for n, r in out.items()}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


_RELU_FUNCTIONS = (torch.relu, torch.relu_, nn.functional.relu)


def relu_consumers(model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Target layers whose output goes only through a ReLU (after any folded BatchNorm), and from
    it only into target layers."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 -- untraceable: every layer keeps its own grids
        return {}
    modules = dict(model.named_modules())
    out = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in targets:
            continue
        producer = node.target
        while len(node.users) == 1 and isinstance(modules.get(next(iter(node.users)).target), nn.Identity):
            node = next(iter(node.users))  # a folded BatchNorm
        if len(node.users) != 1:
            continue
        relu = next(iter(node.users))
        is_relu = (
            (relu.op == "call_module" and isinstance(modules.get(relu.target), nn.ReLU))
            or (relu.op == "call_function" and relu.target in _RELU_FUNCTIONS)
            or (relu.op == "call_method" and relu.target in ("relu", "relu_"))
        )
        users = list(relu.users) if is_relu else []
        if users and all(u.op == "call_module" and u.target in targets and u.args[:1] == (relu,) for u in users):
            out[producer] = [u.target for u in users]
    return out
