"""Where work runs: ``device="auto" | "cpu" | "cuda" | "cuda:N"`` resolved once, at the boundary.

torchslim runs where the model is: training, calibration and evaluation move each batch to the
model's device, so a verb's ``device=`` only moves the model there first. Artifacts are always
written from CPU copies and load onto any device.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from torchslim.errors import ConfigError

Device = str | torch.device | None
"""``None`` leaves the model where it is; ``"auto"`` picks CUDA when present."""


def resolve_device(device: Device) -> torch.device | None:
    """The ``torch.device`` a ``device=`` argument names, checked against this machine.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None:
        return None
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={device!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={device!r} but this machine has no usable CUDA GPU (or torch is a CPU build): "
                "use device='cpu' or 'auto'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r} but this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ConfigError(f"device={device!r}: torchslim runs on 'cpu' or 'cuda'")
    return dev


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` runs: the device of its first parameter or buffer (CPU when it has none)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def place(model: nn.Module, device: Device) -> nn.Module:
    """``model`` moved to ``device`` (in place, as ``Module.to`` does); ``None`` leaves it."""
    dev = resolve_device(device)
    return model.to(dev) if dev is not None else model


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside, every parameter a module registers goes to the ``meta`` device: a model built
    here holds no parameter memory (its initialisers run on meta, costing nothing) until
    ``load_state_dict(..., assign=True)`` gives it the real tensors. Buffers are made as usual,
    so values computed at construction and not saved (rotary frequencies, say) stay real.
    The patch is process-wide while the context lasts."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta" and not is_lazy(param):
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
