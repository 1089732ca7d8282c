"""Recipe sections derived from the config dataclasses, so YAML and Python build the same object.

:func:`section` turns a frozen config dataclass into a strict pydantic model with the same
field names, types and defaults (a nested config becomes a nested section), minus the fields
the recipe sets once for all (the ``seed``), plus keys that only a recipe has (which teacher a
fine-tuning uses, where the report measures latency). ``ConfigSection.config(seed)`` builds the
dataclass back; the section's validator builds it once while the recipe is read, so the
dataclass's own checks run before any training and every section's problems are reported
together. Written by hand because pydantic validates a dataclass but cannot drop, add or
re-default its fields for another schema.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, create_model, model_validator

from torchslim.errors import ConfigError

RECIPE_WIDE = ("seed",)
"""Dataclass fields a recipe sets once at its top level, never per section."""


class Strict(BaseModel):
    """A recipe mapping: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigSection(Strict):
    """A section mirroring one config dataclass (``dataclass``); ``extras`` are recipe-only keys."""

    dataclass: ClassVar[type]
    extras: ClassVar[tuple[str, ...]] = ()
    recipe_wide: ClassVar[tuple[str, ...]] = RECIPE_WIDE

    def config(self, seed: int = 0) -> Any:
        """The config dataclass this section describes (nested sections become configs too)."""
        names = {f.name for f in dataclasses.fields(self.dataclass)}
        kwargs = {k: _config_of(getattr(self, k), seed) for k in type(self).model_fields if k in names}
        kwargs |= {k: seed for k in self.recipe_wide if k in names}
        return self.dataclass(**kwargs)

    @model_validator(mode="after")
    def _dataclass_checks(self) -> ConfigSection:
        try:
            self.config()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self


def _config_of(value: Any, seed: int) -> Any:
    return value.config(seed) if isinstance(value, ConfigSection) else value


def section(
    cls: type,
    *,
    nested: dict[str, type[ConfigSection]] | None = None,
    extras: dict[str, tuple[Any, Any]] | None = None,
    defaults: dict[str, Any] | None = None,
    name: str | None = None,
    doc: str | None = None,
    recipe_wide: tuple[str, ...] = RECIPE_WIDE,
) -> type[ConfigSection]:
    """A strict section for dataclass ``cls``.

    Args:
        cls: the config dataclass.
        nested: field -> the section of its nested config (its default is converted).
        extras: recipe-only keys, ``name -> (type, default)``.
        defaults: fields whose default differs from the dataclass's (a config nested in another
            takes that parent's default, e.g. the distillation's training run).
        name: the pydantic model's name (default ``<cls>Section``).
        doc: its docstring (default the dataclass's).
        recipe_wide: fields left out, set from the recipe's top level (``()`` keeps them all).
    """
    nested, extras, defaults = nested or {}, extras or {}, defaults or {}
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in recipe_wide:
            continue
        default = defaults.get(f.name, _default(f))
        if f.name in nested:
            sub = nested[f.name]
            optional = type(None) in typing.get_args(hints[f.name])
            fields[f.name] = (sub | None if optional else sub, _as_section(sub, default))
        else:
            fields[f.name] = (hints[f.name], default)
    fields |= extras
    model = create_model(name or f"{cls.__name__}Section", __base__=ConfigSection, __doc__=doc or cls.__doc__, **fields)
    model.dataclass = cls
    model.extras = tuple(extras)
    model.recipe_wide = recipe_wide
    return model


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return ...


def _as_section(sub: type[ConfigSection], default: Any) -> Any:
    """A nested config's default (a dataclass instance) as its section."""
    if default is None or default is ...:
        return default
    values = dataclasses.asdict(default)
    return sub(**{k: v for k, v in values.items() if k in sub.model_fields})
