"""Configs and plans as JSON-ready dicts with a type tag and a version, and back.

``to_dict`` writes ``{"type": <class name>, "version": N, "fields": {...}}`` for a config
dataclass (nested configs likewise) and ``{"type": "CompressionPlan", "version": N, "rules":
{...}}`` for a plan. ``from_dict`` resolves the tag only through the ``allowed`` map its caller
passes -- class name to class, a literal dict in the calling module -- so a file never names
code to import. Lists come back as tuples where the field's type says tuple, so a config read
back equals the one written. Written by hand: it is a few lines over ``dataclasses``, and
pickle-free libraries that do this (pydantic) would need every config to be a model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from torchslim.core.plan import PLAN_VERSION, CompressionPlan
from torchslim.errors import ConfigError

CONFIG_VERSION = 1
"""Version of the tagged config layout; a reader refuses a newer one."""


def to_dict(obj: Any) -> Any:
    """A tagged, JSON-ready form of a config dataclass or plan (other values as they are).

    Example:
        >>> from torchslim.train.fit import TrainConfig
        >>> to_dict(TrainConfig(epochs=2))["fields"]["epochs"]
        2
    """
    if isinstance(obj, CompressionPlan):
        return {"type": "CompressionPlan", "version": PLAN_VERSION, "rules": obj.to_dict()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"type": type(obj).__name__, "version": CONFIG_VERSION, "fields": values}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(data: Any, allowed: Mapping[str, type]) -> Any:
    """Rebuild what :func:`to_dict` wrote; a type not in ``allowed`` is a :class:`ConfigError`.

    Example:
        >>> from torchslim.train.fit import TrainConfig
        >>> from_dict(to_dict(TrainConfig(epochs=2)), {"TrainConfig": TrainConfig}) == TrainConfig(epochs=2)
        True
    """
    if isinstance(data, list):
        return [from_dict(v, allowed) for v in data]
    if not isinstance(data, Mapping) or "type" not in data or "version" not in data:
        return {k: from_dict(v, allowed) for k, v in data.items()} if isinstance(data, Mapping) else data
    name, version = data.get("type"), data.get("version")
    if name == "CompressionPlan":
        _check_version(name, version, PLAN_VERSION)
        return CompressionPlan.from_dict(data.get("rules") or {})
    if not isinstance(name, str) or name not in allowed:
        raise ConfigError(f"unknown config type {name!r}: this reader knows {sorted(allowed)}")
    _check_version(name, version, CONFIG_VERSION)
    cls = allowed[name]
    fields = data.get("fields")
    if not isinstance(fields, Mapping):
        raise ConfigError(f"{name}: 'fields' must be a mapping of its settings")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{name}: unknown field(s) {unknown}; it has {sorted(known)}")
    return cls(**{k: _as_hinted(from_dict(v, allowed), hints[k]) for k, v in fields.items()})


def _check_version(name: str, version: Any, newest: int) -> None:
    if not isinstance(version, int) or not 1 <= version <= newest:
        raise ConfigError(f"{name} version {version!r}: this reader reads versions 1 to {newest}; upgrade torchslim")


def _as_hinted(value: Any, hint: Any) -> Any:
    """Lists back to tuples where ``hint`` (or an option of it) is a tuple type."""
    if not isinstance(value, list):
        return value
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if typing.get_origin(option) is tuple:
            args = typing.get_args(option)
            inner = args[0] if args else Any
            return tuple(_as_hinted(v, inner) for v in value)
    return value
