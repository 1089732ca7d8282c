"""Dense baseline training with an on-disk cache, so a pipeline does not retrain each time.

The cache key is a fingerprint of everything that decides the trained weights: the zoo
model and its arguments, the data spec, the training config, and the torch version.
Entries are safetensors files (no pickle) written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from torchslim.core.data import Data
from torchslim.core.files import write_atomic
from torchslim.core.models import build_model
from torchslim.train.distributed import is_main
from torchslim.train.fit import Progress, TrainConfig, fit

log = logging.getLogger(__name__)
CACHE_ENV = "TORCHSLIM_CACHE"


def cache_dir() -> Path:
    """``$TORCHSLIM_CACHE``, else ``$XDG_CACHE_HOME/torchslim``, else ``~/.cache/torchslim``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "torchslim"


def baseline_key(model: str, kwargs: dict[str, Any], data: Data, config: TrainConfig) -> str:
    """A short hex fingerprint of what decides the baseline's weights.

    The soft-target settings are left out: a baseline trains without a teacher, so they
    change nothing.
    """
    train = {k: v for k, v in asdict(config).items() if k not in ("distill_weight", "temperature")}
    if config.precision == "fp32":  # keys of fp32 baselines stay as they were before the field existed
        del train["precision"]
    blob = json.dumps(
        {"model": model, "kwargs": kwargs, "data": asdict(data.spec), "train": train, "torch": torch.__version__},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def trained_baseline(
    model: str, data: Data, config: TrainConfig, kwargs: dict[str, Any] | None = None, progress: Progress | None = None
) -> tuple[torch.nn.Module, bool]:
    """The zoo ``model`` trained on ``data`` with ``config``; returns ``(model, came_from_cache)``."""
    kwargs = dict(kwargs or {})
    path = cache_dir() / f"{model}-{baseline_key(model, kwargs, data, config)}.safetensors"
    torch.manual_seed(config.seed)
    net = build_model(model, **kwargs)
    if path.is_file():
        try:
            net.load_state_dict(load_file(str(path)))
            log.info("baseline loaded from cache %s", path)
            return net.eval(), True
        except (SafetensorError, RuntimeError, OSError) as exc:
            log.warning("ignoring unreadable baseline cache %s (%s); retraining", path, exc)
            torch.manual_seed(config.seed)
            net = build_model(model, **kwargs)
    fit(net, data, config, progress)
    if is_main():  # one writer under torchrun
        write_atomic(path, save({k: v.contiguous() for k, v in net.state_dict().items()}))
    return net.eval(), False
