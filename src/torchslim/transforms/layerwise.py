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

import ctypes
import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from torchslim.core.data import Data
from torchslim.core.linears import in_features, is_linear
from torchslim.core.plan import match_layer
from torchslim.core.qlayers import QuantizedLayer
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


def _hidden_arg(args: tuple, kwargs: dict) -> Any:
    """A block's hidden-state argument: its first positional one, else ``hidden_states``."""
    return args[0] if args else kwargs.get("hidden_states")


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, kwargs | {"hidden_states": hidden}


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list) -> Inputs:
    """Each batch's arguments to the first block (the embeddings' output, masks, positions)."""
    inputs: Inputs = []

    def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        args, kwargs = _with_hidden(
            args, dict(kwargs), _hidden_arg(args, kwargs).clone()
        )  # its own memory: run_block writes over it
        inputs.append((args, kwargs))
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
    """The block on every batch's arguments: the next block's arguments. Each batch's output
    is written over its input, a few rows at a time (:func:`row_chunks`), so the calibration
    set's hidden states are allocated once, not once per block."""
    for i, (a, k) in enumerate(inputs):
        hidden = _hidden_arg(a, k)
        parts = []
        for rows, ca, ck in row_chunks(a, k):
            out = _hidden(block(*ca, **ck))
            if not parts and out.shape == hidden[rows].shape and out.dtype == hidden.dtype:
                hidden[rows] = out  # rows are independent: the rows still to come are unchanged
            else:  # a block that changes the width or type: the outputs replace the inputs
                parts.append(out)
        if parts:
            inputs[i] = _with_hidden(a, k, torch.cat(parts))
        release_free_memory()
    return inputs


CHUNK_TOKENS = 512
"""A block runs on at most this many tokens' rows at a time (at least one row): its
intermediate activations (a feed-forward layer's, attention's) then stay a small fraction of
the calibration set's hidden states, whatever the batch size."""


def row_chunks(args: tuple, kwargs: dict, tokens: int | None = None) -> Iterator[tuple[slice, tuple, dict]]:
    """A batch's arguments cut into runs of rows of about ``tokens`` tokens, each with its
    slice of rows: every tensor of two or more dimensions whose first is the batch's row count
    is sliced, everything else (a mask or positions broadcast over rows, flags) passed whole.
    Rows are independent in a transformer block, so the outputs, concatenated, are the whole
    batch's. ``tokens``: :data:`CHUNK_TOKENS` by default."""
    tokens = CHUNK_TOKENS if tokens is None else tokens
    hidden = _hidden_arg(args, kwargs) if args or "hidden_states" in kwargs else kwargs.get("input_ids")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        yield slice(None), args, kwargs
        return
    rows = hidden.shape[0]
    step = max(1, tokens // max(1, hidden.shape[1]))  # rows of (rows, tokens, ...) at a time
    if step >= rows:
        yield slice(None), args, kwargs
        return
    for r0 in range(0, rows, step):
        part = slice(r0, r0 + step)
        cut = functools.partial(_rows, rows=rows, part=part)
        yield part, tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _rows(value: Any, rows: int, part: slice) -> Any:
    if isinstance(value, torch.Tensor):
        return value[part] if value.dim() >= 2 and value.shape[0] == rows else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, rows, part) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, rows, part) for k, v in value.items()}
    return value


@torch.no_grad()
def input_statistics(block: nn.Module, inputs: Inputs, layers: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """Per Linear layer (``nn.Linear`` or GPT-2 ``Conv1D``) of ``block`` over every calibration
    token: ``hessian`` (the sum of ``x xᵀ``, float32 as in the papers), ``sq_norm`` and
    ``abs_sum`` (each input feature's sum of squares and of magnitudes) and ``tokens``."""
    stats = {n: _empty_stats(m) for n, m in layers.items()}

    def record(name: str, x: torch.Tensor) -> None:
        _accumulate(stats[name], x)

    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: record(n, args[0])) for n, m in layers.items()]
    try:
        for a, k in inputs:
            for _, ca, ck in row_chunks(a, k):
                block(*ca, **ck)
            release_free_memory()
    finally:
        for h in hooks:
            h.remove()
    return stats


def _empty_stats(m: nn.Module) -> dict[str, Any]:
    n = in_features(m)
    return {
        "hessian": torch.zeros(n, n),
        "sq_norm": torch.zeros(n, dtype=torch.float64),
        "abs_sum": torch.zeros(n, dtype=torch.float64),
        "tokens": 0,
    }


def _accumulate(s: dict[str, Any], x: torch.Tensor) -> None:
    x = x.detach().reshape(-1, x.shape[-1]).float().cpu()
    s["hessian"].addmm_(x.T, x)
    s["sq_norm"] += x.pow(2).sum(0, dtype=torch.float64)
    s["abs_sum"] += x.abs().sum(0, dtype=torch.float64)
    s["tokens"] += x.shape[0]


def release_kernel_caches(module: nn.Module) -> None:
    """Drop the int4 kernels' packed weights in ``module`` (made again when the model next runs):
    a calibration pass runs each layer once per batch and need not keep a second copy."""
    for m in module.modules():
        if isinstance(m, QuantizedLayer):
            m.release_kernel_cache()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere
    nothing). Each block frees matrices of the same few sizes (its layers' ``H`` and their
    factors, a batch's hidden states); glibc keeps such freed memory in its heap, and over a
    model's blocks what it keeps grows to several times what is alive."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl) or no such symbol
        return None


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
                release_kernel_caches(block)
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
    head: bool = False,
) -> None:
    """Call ``change(block, prefix, name, layer, stats)`` on every Linear layer ``choose(block,
    prefix)`` picks in each repeated block, block by block, with its input statistics on the
    calibration ``batches`` as the already-changed blocks give them (``stats`` None without
    batches: nothing is run); with ``head``, then on the model's output head (its parent as
    ``block``), measured on the outputs of the changed blocks. ``change`` replaces the layer
    in ``block`` or gives it a new ``weight`` Parameter, never writes into the old one.

    If anything fails, every layer changed so far is put back, so the model is as it was. The
    originals are held until then instead of a copy of the whole model made up front: a large
    model's memory peaks near its own size plus what the changed layers take.
    """
    done: list[tuple[nn.Module, str, nn.Module, nn.Parameter]] = []

    def tracked(block: nn.Module, prefix: str, name: str, layer: nn.Module, stats: dict | None) -> None:
        done.append((block, name, layer, layer.weight))
        change(block, prefix, name, layer, stats)
        release_free_memory()

    try:
        if batches is None:
            prefix, blocks = repeated_blocks(model)
            for i, block in enumerate(blocks):
                for name, layer in choose(block, f"{prefix}.{i}").items():
                    tracked(block, f"{prefix}.{i}", name, layer, None)
                if progress is not None:
                    progress(i + 1, len(blocks))

        else:

            def visit(prefix: str, block: nn.Module, inputs: Inputs) -> None:
                layers = choose(block, prefix)
                stats = input_statistics(block, inputs, layers)
                for name, layer in layers.items():
                    tracked(block, prefix, name, layer, stats.pop(name))

            blockwise(model, batches, visit, progress)
        if head:
            name, layer = output_head(model)
            parent, _, attr = name.rpartition(".")
            stats = None if batches is None else head_statistics(model, batches, layer)
            tracked(model.get_submodule(parent), parent, attr, layer, stats)
    except BaseException:
        for block, name, layer, weight in reversed(done):
            layer.weight = weight
            block.set_submodule(name, layer)
        raise
    done.clear()  # the originals go: their memory back to the system now, not at the next verb
    release_free_memory()


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


def output_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The name and module of the model's output head: what ``get_output_embeddings()`` gives (a
    Hugging Face language model's ``lm_head``) when it is a Linear layer."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, m in model.named_modules():
        if m is head and is_linear(m):
            return name, m
    raise ConfigError(f"{type(model).__name__} has no Linear output head (get_output_embeddings()): leave the head out")


@torch.no_grad()
def head_statistics(model: nn.Module, batches: list, head: nn.Module) -> dict[str, Any]:
    """The output head's input statistics (as :func:`input_statistics`) over whole-model runs
    on the calibration ``batches``, each stopped at the head (no logits are computed)."""
    stats = _empty_stats(head)

    def grab(_m: nn.Module, args: tuple) -> None:
        _accumulate(stats, args[0])
        raise _Captured

    was_training = model.training
    model.eval()
    hook = head.register_forward_pre_hook(grab)
    try:
        with _no_cache(model):
            for batch in batches:
                for part in _batch_chunks(batch):
                    try:
                        call_model(model, part)
                    except _Captured:
                        pass
                release_free_memory()
    finally:
        hook.remove()
        model.train(was_training)
        release_kernel_caches(model)
    return stats


def _batch_chunks(batch: Any) -> Iterator[Any]:
    """A model batch (token ids, or a dict of them) in runs of rows, as :func:`row_chunks`."""
    if isinstance(batch, dict):
        for _, _, kwargs in row_chunks((), batch):
            yield kwargs
    else:
        for _, args, _ in row_chunks((batch,), {}):
            yield args[0]
