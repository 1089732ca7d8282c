"""A recipe's model, data and task: the zoo and built-in datasets by name, or the user's own
code named ``"pkg.module:function"``.

A recipe is code its user wrote, so it may import that user's modules: the recipe's folder
is searched first, then ``PYTHONPATH`` and the installed packages. An artifact, in contrast,
never imports anything; its model is rebuilt by the caller (here: the same builder).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from torchslim.artifact.weights import load_weights_
from torchslim.core.data import Data, load_data
from torchslim.core.images import ImageFolderSpec, image_folder
from torchslim.core.models import build_model
from torchslim.core.task import TASKS, Task
from torchslim.errors import RecipeError


def import_object(ref: str, base: Path | None, key: str) -> Any:
    """The object ``ref`` (``"pkg.module:attr"``) names, importing its module with ``base``
    (the recipe's folder) searched first. Every failure is a :class:`RecipeError` naming ``key``."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise RecipeError(f"{key}: {ref!r} is not of the form 'pkg.module:function'")
    added = base is not None and str(base) not in sys.path
    if added:
        sys.path.insert(0, str(base))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        where = f"next to the recipe ({base}), " if base is not None else ""
        raise RecipeError(
            f"{key}: cannot import {module_name!r} ({exc}); put the module {where}on PYTHONPATH, or install it"
        ) from exc
    except Exception as exc:  # noqa: BLE001  (the user's module raised while importing: say which)
        raise RecipeError(f"{key}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if added:
            sys.path.remove(str(base))
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"{key}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def model_builder(spec: Any, base: Path | None, key: str = "model") -> Callable[[], nn.Module]:
    """A function building a fresh, untrained model from a recipe's model section (zoo name
    or builder, with kwargs)."""
    kwargs = dict(spec.kwargs)
    if spec.builder is None:
        return lambda: build_model(spec.name, **kwargs)
    fn = import_object(spec.builder, base, f"{key}.builder")

    def build() -> nn.Module:
        try:
            model = fn(**kwargs)
        except TypeError as exc:
            raise RecipeError(f"{key}: {spec.builder}(**{kwargs}) failed: {exc}; check {key}.kwargs") from exc
        if not isinstance(model, nn.Module):
            raise RecipeError(f"{key}.builder: {spec.builder} returned {type(model).__name__}, not a torch nn.Module")
        return model

    return build


def trained_model(spec: Any, base: Path | None, key: str = "model") -> nn.Module | None:
    """The recipe's model with its ``weights`` loaded, or as its ``pretrained`` builder returns
    it, or ``None`` when it is neither (then the baseline section trains it)."""
    if spec.pretrained:
        return model_builder(spec, base, key)().eval()
    if spec.weights is None:
        return None
    model = model_builder(spec, base, key)()
    return load_weights_(model, resolve(base, spec.weights)).eval()


def resolve(base: Path | None, path: str) -> Path:
    """``path`` relative to the recipe's folder (absolute paths as they are)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or base is None else base / p


def task_of(ref: str, base: Path | None) -> Task:
    """A built-in task by name, or the user's task class or object ``"pkg.module:Name"``."""
    if ref in TASKS:
        return TASKS[ref]()
    if ":" not in ref:
        raise RecipeError(f"task: {ref!r} is neither a built-in task {sorted(TASKS)} nor 'pkg.module:Task'")
    obj = import_object(ref, base, "task")
    task = obj() if isinstance(obj, type) else obj
    missing = [
        m for m in ("split", "loss", "teacher_loss", "score", "finish", "compare", "check") if not hasattr(task, m)
    ]
    if missing or not hasattr(task, "metric"):
        raise RecipeError(f"task: {ref} lacks {missing or ['metric']} of torchslim.core.task.Task")
    return task


def recipe_data(section: Any, seed: int, task: Task, base: Path | None) -> Data:
    """The recipe's data: a built-in dataset, an image folder, or the user's builder's loaders.

    A builder returns a :class:`Data`, a mapping with ``train`` and ``eval`` (and optionally
    ``calib``) loaders, or a ``(train, eval[, calib])`` tuple."""
    if section.image_folder is not None:
        spec = ImageFolderSpec(
            str(resolve(base, section.image_folder)),
            size=section.size,
            channels=section.channels,
            batch_size=section.batch_size,
            seed=seed,
        )
        return replace(image_folder(spec), task=task)
    if section.builder is None:
        return replace(load_data(section.config(seed)), task=task)
    fn = import_object(section.builder, base, "data.builder")
    made = fn(**section.kwargs)
    if isinstance(made, Data):
        return replace(made, task=task)
    if isinstance(made, Mapping) and {"train", "eval"} <= set(made) and set(made) <= {"train", "eval", "calib"}:
        return Data(made["train"], made["eval"], made.get("calib"), task=task)
    if isinstance(made, tuple) and len(made) in (2, 3):
        return Data(*made, task=task)
    raise RecipeError(
        f"data.builder: {section.builder} returned {type(made).__name__}; return a torchslim Data, "
        "{'train': loader, 'eval': loader[, 'calib': loader]} or (train, eval[, calib])"
    )
