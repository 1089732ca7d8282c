"""Per-layer sensitivity: the quality lost when only one layer is compressed, one way.

For every weight layer and every setting of the search space -- a sparsity, a codebook size,
int8 -- and for every prunable coupling group and channel fraction, a copy of the model is
compressed at that one place (no recovery training) and scored with the task's metric on
the search split. The table seeds the search with plans that spend the budget where it costs
least, and the report plots it. It is cached in the run folder under a fingerprint of the
weights, the space and the split, so a resumed search does not measure it again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from torchslim.core.data import Data
from torchslim.core.files import write_atomic
from torchslim.core.plan import CompressionPlan, LayerDecision
from torchslim.evaluate.metrics import evaluate
from torchslim.search.space import Layers, SearchSpace
from torchslim.transforms.channels import ChannelPruneConfig, channel_prune_
from torchslim.transforms.mixed_precision import MixedPrecisionConfig, mixed_precision_
from torchslim.transforms.prune import MagnitudePruneConfig, prune_
from torchslim.transforms.share import ShareConfig, share_

log = logging.getLogger(__name__)
Curves = dict[str, dict[str, list[list[float]]]]
"""technique -> layer (or group root) -> [[setting, drop of the metric], ...]"""


def fingerprint(model: nn.Module, space: SearchSpace, split: str) -> str:
    """A short hex digest of the weights, the space and the split the table was measured on."""
    h = hashlib.sha256(json.dumps([repr(space), split]).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def layer_sensitivity(
    model: nn.Module,
    data: Data,
    batches: Iterable,
    space: SearchSpace,
    layers: Layers,
    progress: Callable[[int, int], None] | None = None,
) -> Curves:
    """The task's metric drop on ``batches`` per technique, layer and setting (for a percentage
    such as accuracy, drops are fractions)."""
    model, metric = model.eval(), data.task.metric
    base = evaluate(model, batches, data.task)
    jobs: list[tuple[str, str, float]] = [("sparsity", n, s) for n in layers.weights for s in space.sparsity if s > 0]
    jobs += [("bits", n, b) for n in layers.weights for b in space.bits]
    jobs += [("bits", n, b) for n in layers.tables for b in space.tables]
    jobs += [("channels", g, c) for g in layers.groups for c in space.channels if c > 0]
    curves: Curves = {}
    for i, (technique, name, setting) in enumerate(jobs):
        work = copy.deepcopy(model)
        _compress_one(work, technique, name, setting, data, space)
        drop = round(metric.drop(base, evaluate(work, batches, data.task)), 6)
        curves.setdefault(technique, {}).setdefault(name, []).append([setting, drop])
        if progress is not None:
            progress(i + 1, len(jobs) + 1)
    if space.int8:
        mixed = mixed_precision_(copy.deepcopy(model), MixedPrecisionConfig(0.99), data, eval_batches=batches)
        curves["int8"] = {n: [[8, d]] for n, d in mixed.sensitivity.items()}
    if progress is not None:
        progress(len(jobs) + 1, len(jobs) + 1)
    return curves


def _compress_one(work: nn.Module, technique: str, name: str, setting: float, data: Data, space: SearchSpace) -> None:
    if technique == "sparsity":
        prune_(work, MagnitudePruneConfig({name: setting}, finetune=None), data)
    elif technique == "bits":
        share_(work, ShareConfig({name: int(setting)}, finetune=None), data)
    else:
        cfg = ChannelPruneConfig(ratio={name: setting}, round_to=space.round_to, min_channels=space.min_channels)
        channel_prune_(work, cfg, data)


def cached_sensitivity(
    path: Path,
    model: nn.Module,
    data: Data,
    batches: Iterable,
    space: SearchSpace,
    layers: Layers,
    split: str,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Curves, bool]:
    """The table from ``path`` when its fingerprint matches, else measured and written there."""
    key = fingerprint(model, space, split)
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored.get("fingerprint") == key:
                return stored["curves"], True
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            log.warning("ignoring unreadable sensitivity cache %s (%s)", path, exc)
    curves = layer_sensitivity(model, data, batches, space, layers, progress)
    write_atomic(path, json.dumps({"fingerprint": key, "split": split, "curves": curves}, indent=1) + "\n")
    return curves, False


def budget_plan(
    curves: Curves, space: SearchSpace, layers: Layers, allowance: float, objective: str, int8: bool = True
) -> CompressionPlan:
    """A plan giving every place the most aggressive setting whose own drop is within
    ``allowance`` split evenly over the places (single-layer drops roughly add up). For the
    ``latency`` objective a layer prefers int8; for ``size`` the smallest codebook, else int8.
    ``int8=False`` leaves every layer in float (whether int8 is faster depends on the model and
    the backend, so the latency search is seeded both ways)."""
    each = allowance / max(len(layers.weights) + len(layers.groups) + len(layers.tables), 1)

    def most(technique: str, name: str) -> float | None:
        ok = [s for s, d in curves.get(technique, {}).get(name, []) if d <= each]
        return (min(ok) if technique == "bits" else max(ok)) if ok else None

    rules: dict[str, dict[str, Any]] = {g: {"channels": most("channels", g)} for g in layers.groups}
    for n in layers.weights:
        entry = rules.setdefault(n, {})
        entry["sparsity"] = most("sparsity", n)
        fits8 = int8 and space.int8 and curves.get("int8", {}).get(n, [[8, 1.0]])[0][1] <= each
        bits = most("bits", n)
        if fits8 and (objective == "latency" or bits is None):
            entry["quantize"] = 8
        elif bits is not None and objective == "size":
            entry["bits"] = int(bits)
    for n in layers.tables:  # a codebook makes a table smaller, never faster
        bits = most("bits", n) if objective == "size" else None
        rules[n] = {"bits": None if bits is None else int(bits)}
    rules = {k: {f: v for f, v in d.items() if v} for k, d in rules.items()}
    return CompressionPlan(tuple((k, LayerDecision(**v)) for k, v in rules.items() if v))
