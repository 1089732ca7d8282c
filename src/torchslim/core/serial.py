"""Configs and plans as JSON-ready dicts with a type tag and a version, and back.

``to_dict`` writes ``{"type": <class name>, "version": N, "fields": {...}}`` for a config
dataclass (nested configs likewise) and ``{"type": "CompressionPlan", "version": N, "rules":
{...}}`` for a plan. ``from_dict`` resolves the tag only through the ``allowed`` map its caller
passes -- class name to class, a literal dict in the calling module -- so a file never names
code to import. Lists come back as tuples where the field's type says tuple, so a config read
back equals the one written. Written by hand: it is a few lines over ``dataclasses``, and
pickle-free libraries that do this (pydantic) would need every config to be a model.

``record_from_dict`` reads a report record (``report.json``) back into its dataclasses by the
field types; reports carry one ``schema_version`` for the whole file instead of a tag per record.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from torchslim.core.plan import PLAN_VERSION, CompressionPlan
from torchslim.errors import ConfigError, ReportError

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


def versioned_record(cls: type, data: dict, source: str, newest: int, fix: str, what: str = "report") -> Any:
    """A report of version 1 to ``newest`` (``schema_version``; absent means 1) read into ``cls``
    and brought to ``newest``; another version is a :class:`ReportError` ending with ``fix``."""
    version = data.get("schema_version", 1)
    if version not in (1, newest):
        raise ReportError(
            f"{source}: {what} schema version {version!r}, but this torchslim reads 1 to {newest}; "
            f"upgrade torchslim, or {fix}"
        )
    return record_from_dict(cls, dict(data, schema_version=newest), source, fix)


def record_from_dict(cls: type, data: Any, where: str, fix: str) -> Any:
    """A report record (a dataclass of plain values, nested records, lists and optionals of them)
    from its JSON form, by the field types. Unknown or missing keys, or an object where a record
    belongs, are a :class:`ReportError` naming the path and ending with ``fix``.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Point:
        ...     x: int
        >>> record_from_dict(Point, {"x": 1}, "p.json", "rewrite it")
        Point(x=1)
    """
    if not isinstance(data, Mapping):
        raise ReportError(f"{where}: expected an object ({cls.__name__}), found {type(data).__name__}; {fix}")
    fields = dataclasses.fields(cls)
    unknown = sorted(set(data) - {f.name for f in fields})
    missing = sorted(f.name for f in fields if _required(f) and f.name not in data)
    if unknown or missing:
        raise ReportError(f"{where}: not a {cls.__name__} (unknown keys {unknown}, missing {missing}); {fix}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _record_value(v, hints[k], f"{where}.{k}", fix) for k, v in data.items()})


def _record_value(value: Any, hint: Any, where: str, fix: str) -> Any:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options or hint is Any:
            return None
        if any(dataclasses.is_dataclass(o) or typing.get_origin(o) in (list, dict) for o in options):
            raise ReportError(f"{where}: null where a {getattr(hint, '__name__', hint)} belongs; {fix}")
        return None
    for option in options:
        if dataclasses.is_dataclass(option):
            return record_from_dict(option, value, where, fix)
        args = typing.get_args(option)
        if typing.get_origin(option) is list and args and dataclasses.is_dataclass(args[0]):
            if not isinstance(value, list):
                raise ReportError(f"{where}: expected a list, found {type(value).__name__}; {fix}")
            return [record_from_dict(args[0], v, f"{where}[{i}]", fix) for i, v in enumerate(value)]
    return value


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
