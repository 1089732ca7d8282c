"""Accuracy, top-1 agreement between two models, and the real size of files."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


@torch.no_grad()
def predictions(model: nn.Module, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 predictions and labels over ``loader``, with the model in eval mode."""
    model.eval()
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x).argmax(dim=1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def accuracy(model: nn.Module, loader: Iterable) -> float:
    """Fraction of samples whose top-1 prediction equals the label."""
    preds, labels = predictions(model, loader)
    return (preds == labels).float().mean().item()


def agreement(model: nn.Module, reference: nn.Module, loader: Iterable) -> float:
    """Fraction of samples where both models predict the same top-1 class."""
    a, _ = predictions(model, loader)
    b, _ = predictions(reference, loader)
    return (a == b).float().mean().item()


def file_bytes(path: str | os.PathLike) -> int:
    """Size of a file on disk in bytes."""
    return Path(path).stat().st_size


def fp32_safetensors_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict saved as float32 safetensors: the size to beat."""
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fp32.safetensors"
        save_file(state, str(path))
        return file_bytes(path)
