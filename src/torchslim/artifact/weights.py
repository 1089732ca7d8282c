"""A user's trained weights, read without running code: a ``.safetensors`` file, or a
state_dict saved with ``torch.save`` as ``.pt`` / ``.pth`` and read with
``torch.load(weights_only=True)`` (PyTorch's restricted unpickler, which rebuilds tensors and
plain containers and refuses everything else). Any other kind of file is refused before it
is opened: a pickle can run code when read.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from torchslim.errors import WeightsError

SAFETENSORS = (".safetensors",)
STATE_DICT = (".pt", ".pth")
_LISTED = 8  # names shown per kind of mismatch


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, by name, on the CPU.

    Example:
        >>> state = read_weights("model.safetensors")  # doctest: +SKIP
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in SAFETENSORS + STATE_DICT:
        raise WeightsError(
            f"{p}: weights must be a .safetensors file or a state_dict saved as .pt / .pth; {suffix or 'this'} "
            "files are refused unread, because a pickle runs code when loaded"
        )
    if not p.is_file():
        raise WeightsError(f"{p}: no such weights file")
    if suffix in SAFETENSORS:
        try:
            return load_file(str(p))
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{p}: not a readable safetensors file ({exc})") from exc
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{p} holds more than tensors (a whole pickled model or other objects), which torchslim does not "
            f"unpickle: save model.state_dict() instead, or safetensors ({str(exc).splitlines()[0]})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsError(f"{p}: not a readable torch.save file ({exc})") from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # a training checkpoint that wraps the state_dict
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{p}: holds a {type(state).__name__}, not a state_dict of tensors by name")
    return dict(state)


def load_weights_(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Fill ``model`` with the weights in ``path``; every missing, unexpected or misshapen
    name is listed in one :class:`WeightsError` before anything is copied."""
    state = read_weights(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label}: {', '.join(names[:_LISTED])}" + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
        if names
    ]
    if problems:
        raise WeightsError(
            f"{path} does not fit the model built for it; " + "; ".join(problems) + ". Check the builder and its "
            "kwargs match the architecture the weights were trained with"
        )
    model.load_state_dict(state)
    return model
