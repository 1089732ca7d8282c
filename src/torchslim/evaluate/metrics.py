"""A task's metric and fidelity over a loader (accuracy and top-1 agreement for
classification), and the real size of files."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from torchslim.core.device import model_device
from torchslim.core.task import Classification, Task, as_float32, forward, move
from torchslim.errors import DataError


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, task: Task | None = None) -> float:
    """The task's metric (accuracy by default) over every batch of ``loader``, in eval mode;
    batches are moved to the model's device.

    Example:
        >>> evaluate(model, data.eval_loader(), data.task)  # doctest: +SKIP
        0.9123
    """
    task = task or Classification()
    model.eval()
    device, total, count = model_device(model), 0.0, 0.0
    for batch in loader:
        batch = move(batch, device)
        s, n = task.score(forward(model, task, batch), batch)
        total, count = total + s, count + n
    if count == 0:
        raise DataError("the evaluation loader yielded no samples; give it at least one batch")
    return task.finish(total, count)


@torch.no_grad()
def fidelity(model: nn.Module, reference: nn.Module, loader: Iterable, task: Task | None = None) -> float:
    """How closely ``model``'s outputs follow ``reference``'s on ``loader``: the task's
    fidelity measure (top-1 agreement for classification)."""
    task = task or Classification()
    model.eval()
    reference.eval()
    device, total, count = model_device(model), 0.0, 0.0
    for batch in loader:
        batch = move(batch, device)
        s, n = task.compare(forward(model, task, batch), forward(reference, task, batch), batch)
        total, count = total + s, count + n
    if count == 0:
        raise DataError("the evaluation loader yielded no samples; give it at least one batch")
    return as_float32(total / count)


def accuracy(model: nn.Module, loader: Iterable) -> float:
    """Fraction of samples whose top-1 prediction equals the label."""
    return evaluate(model, loader, Classification())


def agreement(model: nn.Module, reference: nn.Module, loader: Iterable) -> float:
    """Fraction of samples where both models predict the same top-1 class."""
    return fidelity(model, reference, loader, Classification())


def file_bytes(path: str | os.PathLike) -> int:
    """Size of a file on disk in bytes."""
    return Path(path).stat().st_size


def fp32_safetensors_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict saved as float32 safetensors: the size to beat. A tensor
    tied to another (a language model's output head and its embedding table) is stored once,
    as ``save_pretrained`` stores it."""
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        alias = (v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if alias not in seen:
            seen.add(alias)
            state[k] = v.detach().float().contiguous()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fp32.safetensors"
        save_file(state, str(path))
        return file_bytes(path)
