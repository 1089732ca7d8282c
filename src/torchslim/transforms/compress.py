"""One applier: ``compress`` applies any plan, in the one order that works.

A :class:`~torchslim.core.plan.CompressionPlan` says, per layer, what happens (channels
removed, sparsity, codebook bits, quantized weight bits); :class:`CompressSettings` says how
each technique runs (fine-tuning, criterion, calibration). ``compress`` reads the plan one
technique at a time, in :data:`ORDER`: whole channels first (they resize the layers the
others touch), then magnitude pruning and a joint recovery of the two -- the techniques that
train. Then the one-shot methods of the LLM literature, which change a trained model from
calibration statistics without training: low-rank factors first (they replace a layer by two
plain Linear layers, which everything after works on), one-shot sparsity next (its zeros, in
the factors too), weight sharing (its k-means sees the final float weights, e.g. an
embedding table), GPTQ or AWQ (they replace the Linear layers by int4 ones), and
quantization last (it replaces the float layers that are left). Every verb's result carries
the plan it realised (the one-shot methods' carry per-layer rows instead: see
:class:`CompressSettings`), so a result's plan, applied by ``compress`` to a fresh copy of the
same model with the same settings, does the same thing again. Recipes and the search run
through here; the order lives nowhere else.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from torchslim.analysis.cost import weight_layers
from torchslim.core.data import Data
from torchslim.core.device import Device, model_device, place
from torchslim.core.plan import CompressionPlan
from torchslim.core.task import move
from torchslim.errors import ConfigError
from torchslim.train.fit import Progress, TrainConfig, fit
from torchslim.transforms.awq import AWQConfig, awq_
from torchslim.transforms.channels import ChannelPruneConfig, channel_prune_
from torchslim.transforms.gptq import GPTQConfig, gptq_
from torchslim.transforms.layerwise import calibration_inputs
from torchslim.transforms.lowrank import LowRankConfig, lowrank_
from torchslim.transforms.mixed_precision import MixedPrecisionConfig, mixed_precision_
from torchslim.transforms.prune import MagnitudePruneConfig, frozen_zeros, prune_
from torchslim.transforms.quantize import QuantizeConfig, quantize_
from torchslim.transforms.share import ShareConfig, share_
from torchslim.transforms.sparsify import SparsifyConfig, sparsify_

log = logging.getLogger(__name__)

ORDER = ("channels", "prune", "recover", "lowrank", "sparsify", "share", "gptq", "awq", "quantize")
"""The techniques in the order ``compress`` applies them (a recipe's steps follow it too); why
this order: the module docstring."""

ONE_SHOT: dict[str, Callable[..., Any]] = {"lowrank": lowrank_, "sparsify": sparsify_, "gptq": gptq_, "awq": awq_}
"""The one-shot methods (block by block on calibration batches, no training), in ``ORDER``."""


@dataclass(frozen=True)
class CompressSettings:
    """How each technique runs where a plan asks for it.

    The plan decides where and how much: its ``channels``, ``sparsity``, ``bits`` and
    ``quantize`` fields replace the per-layer targets of these configs. Two techniques can also
    decide for themselves when the plan names no layer for them: ``channels`` with a MAC,
    parameter or ratio target of its own, and ``mixed_precision`` with its accuracy budget.

    Attributes:
        channels: structured pruning (criterion, widths, fine-tuning); with a target of its own
            it runs even when the plan removes no channels.
        prune: magnitude pruning (rounds, scope, fine-tuning). With per-layer sparsities that
            differ, the plan's values are each layer's own target (scope ``"layer"``).
        recover: one training run after channels and pruning, zeros held, with the teacher;
            ``None``: none.
        share: weight sharing (centroid training, k-means iterations, float16 biases).
        quantize: how the plan's quantized layers are quantized (scheme, calibration).
        mixed_precision: choose the int8 layers under an accuracy budget, when the plan
            quantizes no layer; exclusive with ``quantize``.
        lowrank, sparsify, gptq, awq: the one-shot methods for transformers
            (:func:`~torchslim.transforms.lowrank.lowrank_`, ``sparsify_``, ``gptq_``,
            ``awq_``): each runs when set, on the layers its own config's ``layers`` names,
            with the first ``calib_batches`` calibration batches of ``data``. They decide for
            themselves and add no plan rules: the plan's fields are the targets of the
            techniques above, which a replay of the plan would apply again; what they did per
            layer is in their results. ``gptq`` and ``awq`` exclude each other (both quantize
            the same layers to int4).

    Example:
        >>> settings = CompressSettings(prune=MagnitudePruneConfig(steps=3), share=ShareConfig(finetune=None))
    """

    channels: ChannelPruneConfig | None = None
    prune: MagnitudePruneConfig | None = None
    recover: TrainConfig | None = None
    share: ShareConfig | None = None
    quantize: QuantizeConfig | None = None
    mixed_precision: MixedPrecisionConfig | None = None
    lowrank: LowRankConfig | None = None
    sparsify: SparsifyConfig | None = None
    gptq: GPTQConfig | None = None
    awq: AWQConfig | None = None

    def __post_init__(self) -> None:
        if self.quantize is not None and self.mixed_precision is not None:
            raise ConfigError("give quantize or mixed_precision, not both (mixed_precision holds its own quantize)")
        if self.gptq is not None and self.awq is not None:
            raise ConfigError("give gptq or awq, not both: each quantizes the same Linear layers to int4")


@dataclass
class CompressResult:
    """The compressed copy, the plan it realised, and each technique's own result."""

    model: nn.Module
    plan: CompressionPlan
    results: dict[str, Any] = field(default_factory=dict)  # technique -> the verb's result


StepProgress = Callable[[str], "Progress | None"]
"""Given a technique's name, the ``progress(done, total)`` callback of its training (or None)."""


@dataclass(frozen=True)
class _Inputs:
    """What every technique of one ``compress`` call takes besides the model and its config."""

    data: Data | None
    teacher: nn.Module | None
    example: torch.Tensor | None
    bar: StepProgress


def compress(
    model: nn.Module,
    plan: CompressionPlan,
    data: Data | None = None,
    *,
    settings: CompressSettings = CompressSettings(),
    teacher: nn.Module | None = None,
    example: torch.Tensor | None = None,
    progress: StepProgress | None = None,
    device: Device = None,
) -> CompressResult:
    """Apply ``plan`` to a copy of ``model`` in the canonical order; ``model`` is left as it is.

    Args:
        model: the model to compress (not changed).
        plan: per-layer decisions (a verb's ``result.plan``, a search's, or written by hand).
        data: training, calibration and evaluation data for the techniques that need it.
        settings: how each technique runs.
        teacher: soft targets for every training step (e.g. ``model`` itself); ``None``: labels.
        example: one input batch for tracing and calibration checks.
        progress: given a technique's name, its training progress callback.
        device: where to run (``"auto"``, ``"cpu"``, ``"cuda:N"``): the copy and the teacher
            move there; ``None``: where the model is.

    Example:
        >>> plan = CompressionPlan.from_dict({"re:fc.*": {"sparsity": 0.9, "bits": 5}})
        >>> small = compress(model, plan, data, settings=CompressSettings(prune=MagnitudePruneConfig(steps=3)))  # doctest: +SKIP
        >>> small.plan.resolve("fc1").bits  # doctest: +SKIP
        5
    """
    work = place(copy.deepcopy(model), device)
    if teacher is not None:
        place(teacher, device)
    bar = progress or (lambda _name: None)
    done = CompressResult(work, CompressionPlan())
    ctx = _Inputs(data, teacher, example, bar)
    ran_channels = _channels(work, plan, settings.channels, ctx, done)
    ran_prune = _prune(work, plan, settings.prune, ctx, done)
    if (ran_channels or ran_prune) and settings.recover is not None and data is not None:
        with frozen_zeros(m for _, m in weight_layers(work)):
            done.results["recover"] = fit(work, data, settings.recover, bar("recover"), teacher)
    _one_shot(work, ("lowrank", "sparsify"), settings, ctx, done)
    _share(work, plan, settings.share, ctx, done)
    _one_shot(work, ("gptq", "awq"), settings, ctx, done)
    _quantize(work, plan, settings, ctx, done)
    work.eval()
    return done


def _wanted(plan: CompressionPlan, name: str) -> dict[str, Any] | None:
    """The plan's per-layer map for one field, or None when it asks nothing of that technique."""
    values = plan.field_map(name)
    return values if any(values.values()) else None


def _record(done: CompressResult, technique: str, result: Any) -> None:
    done.results[technique] = result
    done.plan = done.plan.updated(result.plan)
    log.info("compress: %s done", technique)


def _one_shot(
    work: nn.Module, kinds: tuple[str, ...], settings: CompressSettings, ctx: _Inputs, done: CompressResult
) -> None:
    """Run the one-shot methods of ``kinds`` that ``settings`` sets, on the calibration batches
    of ``ctx.data`` moved to the model's device (without data, the verb says whether it needs
    them); record each result (they add no plan rules)."""
    for kind in kinds:
        cfg = getattr(settings, kind)
        if cfg is None:
            continue
        batches = None
        if ctx.data is not None:
            device = model_device(work)
            batches = [move(b, device) for b in calibration_inputs(ctx.data, cfg.calib_batches)]
        done.results[kind] = ONE_SHOT[kind](work, cfg, batches, progress=ctx.bar(kind))
        log.info("compress: %s done: %s", kind, done.results[kind].summary())


def _channels(
    work: nn.Module, plan: CompressionPlan, cfg: ChannelPruneConfig | None, ctx: _Inputs, done: CompressResult
) -> bool:
    ratios = _wanted(plan, "channels")
    if ratios is not None:
        cfg = replace(cfg or ChannelPruneConfig(ratio={}), macs=None, params=None, ratio=ratios)
    elif cfg is None or not _decides(cfg):
        return False
    result = channel_prune_(work, cfg, ctx.data, example=ctx.example, progress=ctx.bar("channels"), teacher=ctx.teacher)
    _record(done, "channels", result)
    return True


def _decides(cfg: ChannelPruneConfig) -> bool:
    """Whether a channel config carries a target of its own (an empty ratio map is a template)."""
    return cfg.macs is not None or cfg.params is not None or bool(cfg.ratio)


def _prune(
    work: nn.Module, plan: CompressionPlan, cfg: MagnitudePruneConfig | None, ctx: _Inputs, done: CompressResult
) -> bool:
    sparsity = _wanted(plan, "sparsity")
    if sparsity is None:
        return False
    cfg = cfg or MagnitudePruneConfig()
    scope = cfg.scope if len({v for v in sparsity.values() if v is not None}) == 1 else "layer"
    cfg = replace(cfg, sparsity=sparsity, scope=scope)
    result = prune_(work, cfg, ctx.data, teacher=ctx.teacher, progress=ctx.bar("prune"))
    _record(done, "prune", result)
    return True


def _share(work: nn.Module, plan: CompressionPlan, cfg: ShareConfig | None, ctx: _Inputs, done: CompressResult) -> None:
    bits = _wanted(plan, "bits")
    if bits is None:
        return
    cfg = replace(cfg or ShareConfig(), bits=bits)
    result = share_(work, cfg, ctx.data, teacher=ctx.teacher, progress=ctx.bar("share"))
    _record(done, "share", result)


def _quantize(
    work: nn.Module, plan: CompressionPlan, settings: CompressSettings, ctx: _Inputs, done: CompressResult
) -> None:
    if _wanted(plan, "quantize") is not None:
        base = settings.quantize or (settings.mixed_precision or MixedPrecisionConfig()).quantize
        cfg = base.with_plan(plan)
        result = quantize_(work, cfg, ctx.data, example=ctx.example, progress=ctx.bar("quantize"), teacher=ctx.teacher)
        _record(done, "quantize", result)
    elif settings.mixed_precision is not None:
        mixed = mixed_precision_(work, settings.mixed_precision, ctx.data, example=ctx.example)
        _record(done, "mixed_precision", mixed)
