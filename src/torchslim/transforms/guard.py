"""What every verb checks around its work: a verb that fails leaves the model as it found it,
and a verb that changed the model's structure proves the model still runs."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from torchslim.core.task import call_model
from torchslim.errors import ConfigError


@contextlib.contextmanager
def rollback(model: nn.Module) -> Iterator[None]:
    """Restore ``model`` (its modules, parameters and buffers) if the block raises.

    Example:
        >>> model = nn.Linear(2, 2)
        >>> try:
        ...     with rollback(model):
        ...         model.weight = nn.Parameter(torch.zeros(3, 3))
        ...         raise ValueError("failed halfway")
        ... except ValueError:
        ...     pass
        >>> tuple(model.weight.shape)
        (2, 2)
    """
    backup = copy.deepcopy(model)
    try:
        yield
    except BaseException:
        model.__dict__.update(backup.__dict__)
        raise


def check_runs(model: nn.Module, example: torch.Tensor, what: str, hint: str) -> None:
    """Run ``model`` on ``example`` in eval mode; a failure is a :class:`ConfigError` that says
    which model (``what``: "quantized", "pruned") broke and what to do (``hint``)."""
    was_training = model.training
    try:
        with torch.no_grad():
            call_model(model.eval(), example)
    except Exception as exc:  # noqa: BLE001 -- any failure here is reported with what to do
        raise ConfigError(
            f"the {what} {type(model).__name__} fails on the example input ({type(exc).__name__}: {exc}); {hint}"
        ) from exc
    finally:
        model.train(was_training)
