"""One transformer block at a time: the driver of the one-shot algorithms for large models.

GPTQ, SparseGPT, Wanda and AWQ change each Linear layer from statistics of its inputs on a few
calibration sequences. Running the whole model per layer would cost a forward pass per
Linear; holding every layer's inputs at once would cost the memory they are meant to save.
As in the papers, the model's repeated blocks (a decoder's layers) are taken in order: the
inputs of the first block are captured once, each block is measured on them and changed, and
the changed block's outputs become the next block's inputs -- so each block sees what its
already-compressed predecessors give it, and only one block's activations are held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from torchslim.core.data import Data
from torchslim.core.linears import in_features, is_linear
from torchslim.core.plan import match_layer
from torchslim.core.task import call_model
from torchslim.errors import ConfigError
from torchslim.transforms.calibrate import calibration_batches, inputs_of

Inputs = list[tuple[tuple, dict[str, Any]]]  # each calibration batch's positional and keyword arguments


class _Captured(Exception):
    """Raised by the first block's hook: the rest of the model need not run."""


def repeated_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the longest ``nn.ModuleList`` whose items hold Linear layers
    (a decoder's ``model.layers``, GPT-2's ``transformer.h``, BERT's ``encoder.layer``)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(linear_layers(b) for b in m):
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise ConfigError(
            f"{type(model).__name__} has no list of repeated blocks holding Linear layers (a transformer's layers): "
            "the one-shot algorithms run block by block on transformers"
        )
    return best


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules() if is_linear(m)}


@contextmanager
def _no_cache(model: nn.Module) -> Iterator[None]:
    """A language model's key/value cache off: each block is run more than once on the same inputs."""
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "use_cache")]
    before = [c.use_cache for c in configs]
    for c in configs:
        c.use_cache = False
    try:
        yield
    finally:
        for c, b in zip(configs, before, strict=True):
            c.use_cache = b


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, kwargs | {"hidden_states": hidden}


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list) -> Inputs:
    """Each batch's arguments to the first block (the embeddings' output, masks, positions)."""
    inputs: Inputs = []

    def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append((args, dict(kwargs)))
        raise _Captured

    hook = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                call_model(model, batch)
            except _Captured:
                pass
    finally:
        hook.remove()
    if len(inputs) != len(batches):
        raise ConfigError(
            f"the model's forward pass did not reach its first block on {len(batches) - len(inputs)} batches"
        )
    return inputs


@torch.no_grad()
def run_block(block: nn.Module, inputs: Inputs) -> Inputs:
    """The block on every batch's arguments: the next block's arguments."""
    return [_with_hidden(a, k, _hidden(block(*a, **k))) for a, k in inputs]


@torch.no_grad()
def input_statistics(block: nn.Module, inputs: Inputs, layers: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """Per Linear layer (``nn.Linear`` or GPT-2 ``Conv1D``) of ``block`` over every calibration token: ``hessian`` (the sum of
    ``x xᵀ``, float64), ``sq_norm`` and ``abs_sum`` (each input feature's sum of squares and of
    magnitudes) and ``tokens``."""
    stats = {
        n: {
            "hessian": torch.zeros(in_features(m), in_features(m), dtype=torch.float64),
            "sq_norm": torch.zeros(in_features(m), dtype=torch.float64),
            "abs_sum": torch.zeros(in_features(m), dtype=torch.float64),
            "tokens": 0,
        }
        for n, m in layers.items()
    }

    def record(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        s = stats[name]
        s["hessian"] += x.T @ x
        s["sq_norm"] += (x * x).sum(0)
        s["abs_sum"] += x.abs().sum(0)
        s["tokens"] += x.shape[0]

    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: record(n, args[0])) for n, m in layers.items()]
    try:
        for a, k in inputs:
            block(*a, **k)
    finally:
        for h in hooks:
            h.remove()
    return stats


def blockwise(
    model: nn.Module,
    batches: list,
    visit: Callable[[str, nn.Module, Inputs], None],
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Call ``visit(name, block, inputs)`` on each repeated block in order, with the inputs the
    already-visited blocks give; ``visit`` changes the block in place."""
    prefix, blocks = repeated_blocks(model)
    was_training = model.training
    model.eval()
    try:
        with _no_cache(model):
            inputs = capture_inputs(model, blocks, batches)
            for i, block in enumerate(blocks):
                visit(f"{prefix}.{i}", block, inputs)
                inputs = run_block(block, inputs)
                if progress is not None:
                    progress(i + 1, len(blocks))
    finally:
        model.train(was_training)


Chooser = Callable[[nn.Module, str], dict[str, nn.Module]]
Change = Callable[[nn.Module, str, str, nn.Module, "dict[str, Any] | None"], None]


def each_layer(
    model: nn.Module,
    batches: list | None,
    choose: Chooser,
    change: Change,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Call ``change(block, prefix, name, layer, stats)`` on every Linear layer ``choose(block,
    prefix)`` picks in each repeated block, block by block, with its input statistics on the
    calibration ``batches`` as the already-changed blocks give them (``stats`` None without
    batches: nothing is run). ``change`` may replace the layer in ``block``."""
    if batches is None:
        prefix, blocks = repeated_blocks(model)
        for i, block in enumerate(blocks):
            for name, layer in choose(block, f"{prefix}.{i}").items():
                change(block, f"{prefix}.{i}", name, layer, None)
            if progress is not None:
                progress(i + 1, len(blocks))
        return

    def visit(prefix: str, block: nn.Module, inputs: Inputs) -> None:
        layers = choose(block, prefix)
        stats = input_statistics(block, inputs, layers)
        for name, layer in layers.items():
            change(block, prefix, name, layer, stats[name])

    blockwise(model, batches, visit, progress)


def calibration_inputs(data: Data | list, batches: int) -> list:
    """The model inputs of the first ``batches`` calibration batches of ``data`` (a
    :class:`~torchslim.core.data.Data`'s calibration split, or a list of batches)."""
    task = data.task if isinstance(data, Data) else None
    return [inputs_of(b, task) for b in calibration_batches(data, batches)]


def chosen_layers(block: nn.Module, prefix: str, patterns: tuple[str, ...] | None) -> dict[str, nn.Module]:
    """The Linear layers of ``block`` that ``patterns`` (names or ``re:`` patterns relative to
    the model) name; ``None``: all of them."""
    layers = linear_layers(block)
    if patterns is not None:
        layers = {n: m for n, m in layers.items() if match_layer(patterns, f"{prefix}.{n}") is not None}
    return layers
