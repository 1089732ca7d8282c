"""Epoch checkpoints of training, so that a run killed part-way resumes where it stopped.

Inside ``checkpoints(folder)`` (``run_recipe`` opens one in the run's output folder) every
:func:`~torchslim.train.fit.fit` saves, at the end of each epoch, the model's state, the
optimiser's and the schedule's, the random-number state and the losses so far, into
``folder/fit-N-KEY.safetensors``: the tensors in safetensors, the rest as JSON in its header,
written atomically by rank 0. ``N`` counts the run's fits, ``KEY`` fingerprints the training
config and the model's state when the fit began. A rerun of the same recipe meets the same fits
in the same order and finds their files: a finished fit is skipped (its final state loaded), an
unfinished one continues after its last saved epoch. A file that does not match is ignored.
Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from torchslim.core.files import write_atomic
from torchslim.train.distributed import barrier, is_main

log = logging.getLogger(__name__)
META = "torchslim-fit"


@dataclass
class _Store:
    folder: Path
    fits: int = 0


_ACTIVE: ContextVar[_Store | None] = ContextVar("torchslim_checkpoints", default=None)


@contextlib.contextmanager
def checkpoints(folder: str | Path) -> Iterator[Path]:
    """Within the block, every ``fit`` checkpoints each epoch into ``folder`` and resumes from it."""
    token = _ACTIVE.set(_Store(Path(folder)))
    try:
        yield Path(folder)
    finally:
        _ACTIVE.reset(token)


@dataclass
class Resumed:
    """What a checkpoint gave back: the epochs done, their losses, the optimiser steps taken."""

    epochs: int
    losses: list[float]
    steps: int
    complete: bool


@dataclass
class FitCheckpoint:
    """The checkpoint file of one ``fit`` call."""

    path: Path

    def resume(
        self, model: nn.Module, extra: list[nn.Parameter], opt: torch.optim.Optimizer, sched: Any
    ) -> Resumed | None:
        """Load the saved state into the model, optimiser and schedule; None without a file."""
        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = json.loads(f.metadata()[META])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open has no iterator
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable checkpoint %s (%s); training from the start", self.path, exc)
            return None
        part = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(part)
        with torch.no_grad():
            for i, p in enumerate(extra):
                p.copy_(tensors[f"extra.{i}"])
        if not meta["complete"]:
            state = {int(i): dict(v) for i, v in meta["optimizer"]["state"].items()}
            for k, t in tensors.items():
                if k.startswith("opt."):
                    _, i, key = k.split(".", 2)
                    state.setdefault(int(i), {})[key] = t
            opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
            sched.load_state_dict(meta["schedule"])
            torch.set_rng_state(tensors["rng.cpu"])
        return Resumed(meta["epochs"], meta["losses"], meta["steps"], meta["complete"])

    def save(
        self,
        model: nn.Module,
        extra: list[nn.Parameter],
        opt: torch.optim.Optimizer,
        sched: Any,
        done: Resumed,
    ) -> None:
        """Write the state after ``done.epochs`` epochs (rank 0; every rank waits for it)."""
        if is_main():
            tensors = {f"model.{k}": _own(v) for k, v in model.state_dict().items()}
            tensors |= {f"extra.{i}": _own(p) for i, p in enumerate(extra)}
            meta: dict[str, Any] = {
                "epochs": done.epochs,
                "losses": done.losses,
                "steps": done.steps,
                "complete": done.complete,
            }
            if not done.complete:
                opt_state = opt.state_dict()
                plain: dict[str, dict[str, Any]] = {}
                for i, entry in opt_state["state"].items():
                    for key, value in entry.items():
                        if isinstance(value, torch.Tensor):
                            tensors[f"opt.{i}.{key}"] = _own(value)
                        else:
                            plain.setdefault(str(i), {})[key] = value
                meta["optimizer"] = {"state": plain, "param_groups": opt_state["param_groups"]}
                meta["schedule"] = sched.state_dict()
                tensors["rng.cpu"] = torch.get_rng_state()
            write_atomic(self.path, save(tensors, metadata={META: json.dumps(meta)}))
        barrier()


def for_fit(model: nn.Module, extra: list[nn.Parameter], config: Any) -> FitCheckpoint | None:
    """The checkpoint of the ``fit`` starting now, inside :func:`checkpoints`; else None."""
    store = _ACTIVE.get()
    if store is None:
        return None
    store.fits += 1
    digest = hashlib.sha256(repr(config).encode())
    for name, t in [*model.state_dict().items(), *((f"extra.{i}", p) for i, p in enumerate(extra))]:
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(_own(t).reshape(-1).view(torch.uint8).numpy().tobytes())
    return FitCheckpoint(store.folder / f"fit-{store.fits}-{digest.hexdigest()[:16]}.safetensors")


def _own(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy that shares memory with nothing (safetensors refuses shared tensors)."""
    return t.detach().to("cpu", copy=True).contiguous()
