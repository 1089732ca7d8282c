"""How many channels each coupling group keeps in one step of structured pruning.

Per-group ratios give the counts directly. A MAC or parameter target is met by one pressure
shared by all groups -- a quantile of the pooled, per-group normalised scores (global scope) or
one fraction per layer (layer scope) -- bisected against the cost of a pruned copy, then the
slack is filled with the best remaining channels. Counts are rounded to the hardware multiple
and never go below the floor.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from torchslim.analysis.cost import count_params, layer_macs
from torchslim.analysis.coupling import Coupling, CouplingGroup, analyse
from torchslim.analysis.importance import CRITERIA, gather_stats
from torchslim.core.plan import match_layer
from torchslim.errors import ConfigError

if TYPE_CHECKING:
    from torchslim.transforms.channels import ChannelPruneConfig


class Target(NamedTuple):
    """Where one round aims: the model's cost before pruning and every group's first width."""

    frac: float  # fraction of the way to the final target after this round
    macs0: int
    params0: int
    original: dict[str, int]  # group root -> channels before the first round


def decide(
    model: nn.Module,
    coupling: Coupling,
    config: ChannelPruneConfig,
    batches: list,
    example: torch.Tensor,
    target: Target,
    step: int,
) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Channels each group keeps after this step, and the scores that pick which."""
    frac, macs0, params0, original = target
    scores = _scores(model, coupling, config, batches)
    groups = [g for g in coupling.groups if g.root in scores]
    if not groups and step > 1:
        return {}, scores  # every group reached its floor in an earlier round
    if not groups:
        reasons = "; ".join(f"{g.root}: {g.skip}" for g in coupling.groups)
        raise ConfigError(f"no coupling group of {type(model).__name__} can be pruned ({reasons})")
    if config.ratio is not None:
        _rounded_away(groups, config, original)
        groups = [g for g in groups if not g.skip]
        return {
            g.root: _round(original[g.root] * (1 - _ratio(config, g.root)) ** frac, g, config) for g in groups
        }, scores
    which, full = ("macs", macs0) if config.macs is not None else ("params", params0)
    goal = full * getattr(config, which) ** frac
    return _keep_within(model, groups, scores, config, example, which, goal, full, original), scores


def _rounded_away(groups: list[CouplingGroup], config: ChannelPruneConfig, original: dict[str, int]) -> None:
    """Record as skipped each group whose final width rounds back to its full width, and refuse
    a request under which no group would lose a channel, saying why for each."""
    for g in groups:
        ratio, step = _ratio(config, g.root), math.lcm(config.round_to, g.multiple)
        if ratio > 0 and _round(original[g.root] * (1 - ratio), g, config) >= original[g.root]:
            g.skip = (
                f"removing {ratio:g} of its {original[g.root]} channels rounds back to {original[g.root]} "
                f"(kept widths are multiples of {step}, at least {config.min_channels}): lower round_to to prune it"
            )
    asked = [g for g in groups if _ratio(config, g.root) > 0]
    if asked and all(g.skip for g in asked):  # ratio 0 everywhere is a request for nothing: not an error
        reasons = "; ".join(f"{g.root}: {g.skip}" for g in asked)
        raise ConfigError(f"the ratios remove no channel anywhere ({reasons})")


def _scores(model: nn.Module, coupling: Coupling, config: ChannelPruneConfig, batches: list) -> dict[str, torch.Tensor]:
    """Each group's channel scores under the criterion; a group that is not scored gets its reason."""
    if isinstance(config.ratio, Mapping):
        roots = [g.root for g in coupling.groups]
        unused = [k for k, v in config.ratio.items() if v is not None and not any(match_layer([k], r) for r in roots)]
        if unused:
            raise ConfigError(f"ratio keys {unused} name no coupling group; ratios are set per group root: {roots}")
    stats = gather_stats(model, coupling, config.criterion, batches, config.seed)
    scores = {}
    for g in coupling.prunable():
        if config.ratio is not None and isinstance(config.ratio, Mapping):
            key = match_layer(config.ratio, g.root)
            if key is None or config.ratio[key] is None:
                g.skip = "no ratio rule names this group" if key is None else f"the ratio rule {key!r} skips it"
                continue
        s = CRITERIA[config.criterion](g, stats)
        if s is None:
            g.skip = f"criterion {config.criterion!r} finds nothing to score in this group"
            continue
        scores[g.root] = s
    return scores


def _keep_within(
    model: nn.Module,
    groups: list[CouplingGroup],
    scores: dict,
    config: ChannelPruneConfig,
    example: torch.Tensor,
    which: str,
    goal: float,
    full: int,
    original: dict[str, int],
) -> dict[str, int]:
    """Channels per group so that the model's ``which`` (MACs or parameters) is at most ``goal``:
    one pressure shared by all groups, bisected, then the slack filled by the best channels."""
    keep_at = _keep_fn(groups, scores, config, original)

    def cost(x: float) -> int:
        return _cost_after(model, keep_at(x), scores, config, example, which)

    if cost(1.0) > goal:
        raise ConfigError(
            f"{which}={getattr(config, which)}: even with every group at its floor ({config.min_channels} channels, "
            f"multiples of {config.round_to}) the model keeps {cost(1.0) / full:.3f} of its {which}; "
            "lower min_channels / round_to or ask for less"
        )
    lo, hi = 0.0, 1.0
    for _ in range(18):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(mid) <= goal else (mid, hi)
    return _fill(
        keep_at(hi), groups, scores, config, lambda k: _cost_after(model, k, scores, config, example, which) <= goal
    )


def _fill(keep: dict[str, int], groups: list[CouplingGroup], scores: dict, config: ChannelPruneConfig, fits) -> dict:
    """Give channels back, best-scoring first, while the target still holds.

    Rounding to hardware multiples makes the cost a staircase, so the search above can land
    well under the target; this closes the gap one rounding step at a time.
    """
    keep = dict(keep)
    while True:
        options = []
        for g in groups:
            step = math.lcm(config.round_to, g.multiple)
            n = min(g.channels, (keep[g.root] // step + 1) * step)  # the next multiple, or the full width
            if n > keep[g.root]:
                s = scores[g.root] / scores[g.root].mean().clamp(min=1e-12)
                regained = torch.sort(s, descending=True).values[keep[g.root] : n]
                options.append((float(regained.mean()), g.root, n))
        for _, root, n in sorted(options, reverse=True):
            if fits({**keep, root: n}):
                keep[root] = n
                break
        else:
            return keep


def _ratio(config: ChannelPruneConfig, root: str) -> float:
    if isinstance(config.ratio, Mapping):
        return float(config.ratio[match_layer(config.ratio, root)])  # type: ignore[index, arg-type]
    return float(config.ratio)  # type: ignore[arg-type]


def _round(n: float, g: CouplingGroup, config: ChannelPruneConfig) -> int:
    """Round a channel count up to the hardware multiple, respect the floor and the current width."""
    step = math.lcm(config.round_to, g.multiple)
    n = math.ceil(round(n, 6) / step) * step
    floor = min(g.channels, math.ceil(config.min_channels / step) * step)
    return int(min(g.channels, max(n, floor)))


def _keep_fn(groups: list[CouplingGroup], scores: dict, config: ChannelPruneConfig, original: dict):
    """``x`` in [0, 1] -> kept channels per group; more is removed as ``x`` grows."""
    if config.scope == "layer":
        return lambda x: {g.root: _round(original[g.root] * (1 - x), g, config) for g in groups}
    normed = {g.root: scores[g.root] / scores[g.root].mean().clamp(min=1e-12) for g in groups}
    pooled = torch.sort(torch.cat(list(normed.values()))).values

    def keep(x: float) -> dict[str, int]:
        tau = pooled[min(int(x * len(pooled)), len(pooled) - 1)] if x < 1 else math.inf
        return {g.root: _round(int((normed[g.root] >= tau).sum()), g, config) for g in groups}

    return keep


def _cost_after(model: nn.Module, keep: dict, scores: dict, config: ChannelPruneConfig, example, which: str) -> int:
    """MACs or parameters of a copy of ``model`` pruned to ``keep`` (the model is not touched)."""
    clone = copy.deepcopy(model)
    for g in analyse(clone, example, config.exclude, config.min_channels, probe=False).groups:
        if g.root in keep and keep[g.root] < g.channels:
            drop = torch.argsort(scores[g.root])[: g.channels - keep[g.root]]
            g.handle.prune(sorted(int(i) for i in drop))
    return sum(layer_macs(clone, example).values()) if which == "macs" else count_params(clone)
