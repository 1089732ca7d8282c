"""Per-layer decisions as data.

A :class:`CompressionPlan` is an ordered map from a module name, or a ``re:`` pattern matched
against the full module name, to a :class:`LayerDecision`. An exact name wins over patterns;
among patterns the first one that matches wins. Search and recipes produce plans, transforms
consume them, the artifact stores them and the report renders them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, TypeVar

from torchslim.errors import ConfigError

PLAN_VERSION = 1


@dataclass(frozen=True)
class LayerDecision:
    """What happens to one layer. ``None`` means "this technique leaves it alone".

    Attributes:
        sparsity: fraction of weights set to zero, in [0, 1).
        bits: codebook size as bits per shared-weight index (2**bits clusters), 1..8.
        channels: fraction of the layer's output channels removed by structured pruning, in [0, 1).
        quantize: integer bits of the layer's weights at run time (8: int8, 4: int4 weight-only;
            the scheme -- static, dynamic or weight-only -- comes from the quantize settings);
            ``None`` keeps the layer in float.
        skip: why the layer is left untouched; a skipped layer always carries a reason.
    """

    sparsity: float | None = None
    bits: int | None = None
    channels: float | None = None
    quantize: int | None = None
    skip: str | None = None

    def __post_init__(self) -> None:
        if self.sparsity is not None:
            check_sparsity(self.sparsity, "sparsity")
        if self.channels is not None:
            check_sparsity(self.channels, "channels")
        if self.bits is not None and (not isinstance(self.bits, int) or not 1 <= self.bits <= 8):
            raise ConfigError(f"bits={self.bits!r}: use an integer from 1 to 8 (2 to 256 clusters)")
        if self.quantize is not None and self.quantize not in (4, 8):
            raise ConfigError(
                f"quantize={self.quantize!r}: the weight bits of a quantized layer, 8 (int8) or 4 (int4 "
                "weight-only); leave it out to keep the layer in float"
            )


def check_sparsity(value: Any, where: str) -> float:
    """Return ``value`` as a float, or raise if it is not a sparsity in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}={value!r}: a sparsity is a number in [0, 1), e.g. 0.9")
    if not 0.0 <= value < 1.0:
        raise ConfigError(
            f"{where}={value!r} is outside [0, 1): 0 keeps every weight, 0.9 removes 90 %; "
            "1.0 would remove the whole layer"
        )
    return float(value)


def match_layer(keys: Iterable[str], name: str) -> str | None:
    """Return the key that governs module ``name``: the exact name, else the first ``re:`` match."""
    keys = list(keys)
    if name in keys:
        return name
    for key in keys:
        if key.startswith("re:") and re.fullmatch(key[3:], name):
            return key
    return None


def check_keys(names: Iterable[str], keys: Iterable[str], what: str, layers: str = "layer") -> None:
    """Every key (a module name or ``re:`` pattern) must match one of ``names``: a key that
    matches nothing is a typo that would otherwise leave a layer alone silently.

    Example:
        >>> check_keys(["fc1", "fc2"], ["re:fc.*", "fc9"], "exclude")
        Traceback (most recent call last):
        torchslim.errors.ConfigError: exclude ['fc9'] match no layer; the layers are ['fc1', 'fc2']
    """
    names = list(names)
    unused = [k for k in keys if not any(match_layer([k], n) for n in names)]
    if unused:
        raise ConfigError(f"{what} {unused} match no {layers}; the {layers}s are {names[:40]}")


T = TypeVar("T")


def layer_targets(names: list[str], spec: T | Mapping[str, T], what: str) -> tuple[dict[str, T], dict[str, str]]:
    """Resolve one value for every layer, or a per-layer map, against the layers ``names``.

    Returns ``(value per targeted layer, reason per skipped layer)``. A key of the map that sets
    a value but matches no layer is an error naming it (a typo would otherwise skip a layer
    silently); a ``None`` key may name any module (a plan's skip of another technique's layer).
    """
    if not isinstance(spec, Mapping):
        return {n: spec for n in names}, {}
    check_keys(names, [k for k, v in spec.items() if v is not None], f"{what} keys", "Linear/Conv layer")
    targets, skipped = {}, {}
    for n in names:
        key = match_layer(spec, n)
        if key is None:
            skipped[n] = f"no {what} rule names this layer"
        elif spec[key] is None:
            skipped[n] = f"the {what} rule {key!r} skips this layer"
        else:
            targets[n] = spec[key]
    return targets, skipped


@dataclass(frozen=True)
class CompressionPlan:
    """Ordered rules ``module name or 're:pattern' -> LayerDecision``.

    Example:
        >>> plan = CompressionPlan.from_dict({"fc3": {"bits": 8}, "re:fc.*": {"sparsity": 0.9}})
        >>> plan.resolve("fc1").sparsity, plan.resolve("fc3").bits
        (0.9, 8)
    """

    rules: tuple[tuple[str, LayerDecision], ...] = ()

    def __post_init__(self) -> None:
        for key, _ in self.rules:
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as exc:
                    raise ConfigError(f"plan key {key!r} is not a valid regular expression: {exc}") from exc

    def resolve(self, name: str) -> LayerDecision | None:
        """The decision for module ``name``, or ``None`` when no rule names it."""
        key = match_layer((k for k, _ in self.rules), name)
        return dict(self.rules)[key] if key is not None else None

    def merged(self, name: str, **changes: Any) -> CompressionPlan:
        """A new plan where module ``name`` has an exact rule updated with ``changes``."""
        current = self.resolve(name) or LayerDecision()
        rules = [(k, d) for k, d in self.rules if k != name]
        return CompressionPlan(tuple(rules) + ((name, replace(current, **changes)),))

    def updated(self, other: CompressionPlan) -> CompressionPlan:
        """This plan with every rule of ``other`` merged in, field by field (``other`` wins)."""
        plan = self
        for key, decision in other.rules:
            changes = {
                f.name: getattr(decision, f.name) for f in fields(decision) if getattr(decision, f.name) is not None
            }
            plan = plan.merged(key, **changes)
        return plan

    def field_map(self, name: str) -> dict[str, Any]:
        """Rule key -> value of one field (e.g. ``"sparsity"``), for rules that set it or skip.

        A field a rule sets is that technique's decision even when the rule also carries a
        ``skip`` (a layer pruned by one verb and left alone by the next holds both). A skipping
        rule that does not set the field maps to ``None``, which transform configs read as
        "leave this layer alone", so an exact skip still wins over a pattern that sets it.
        """
        return {k: getattr(d, name) for k, d in self.rules if d.skip or getattr(d, name) is not None}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``None`` fields are left out."""
        return {k: {f: v for f, v in asdict(d).items() if v is not None} for k, d in self.rules}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Any]]) -> CompressionPlan:
        """Build a plan from ``to_dict`` output; an unknown field is an error naming it."""
        allowed = {f.name for f in fields(LayerDecision)}
        rules = []
        for key, decision in data.items():
            if not isinstance(decision, Mapping):
                raise ConfigError(f"plan entry {key!r} must be a mapping like {{'sparsity': 0.9}}")
            unknown = sorted(set(decision) - allowed)
            if unknown:
                raise ConfigError(f"plan entry {key!r}: unknown field(s) {unknown}; use {sorted(allowed)}")
            rules.append((str(key), LayerDecision(**decision)))
        return cls(tuple(rules))
