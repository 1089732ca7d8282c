"""Mixed precision: quantize every layer except the few that cost the accuracy.

``mixed_precision_`` measures each layer's sensitivity -- the accuracy lost when only that
layer is quantized -- then quantizes all of them and hands the most sensitive layers back to
float, one at a time, until the accuracy drop is within the budget. The model is then
quantized in place with those layers excluded. Accuracy (the data's task metric) is measured
on labelled batches the caller gives, by default the first ``calib_batches`` batches of the
data's calibration split (training images the test set never sees, so the choice does not
peek at the test set).
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from torchslim.core.data import Data
from torchslim.core.plan import CompressionPlan
from torchslim.core.qlayers import unfuse_transformer_layers_
from torchslim.core.task import Classification, Task
from torchslim.errors import ConfigError
from torchslim.evaluate.metrics import evaluate
from torchslim.transforms.calibrate import calibrated_ranges, calibration_batches, inputs_of
from torchslim.transforms.quantize import (
    QuantizeConfig,
    QuantizeResult,
    _select,
    fold_batchnorm_,
    quantize_,
    quantize_layer,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """How much accuracy quantization may cost, and how to quantize the rest.

    Attributes:
        max_drop: the largest accepted accuracy drop as a fraction (0.003 = 0.3 points).
        quantize: how the quantized layers are quantized (static int8 by default).
    """

    max_drop: float = 0.003
    quantize: QuantizeConfig = QuantizeConfig()

    def __post_init__(self) -> None:
        if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float)) or not 0 <= self.max_drop < 1:
            raise ConfigError(
                f"max_drop={self.max_drop!r}: a fraction of accuracy in [0, 1), e.g. 0.003 for 0.3 points"
            )


@dataclass
class MixedPrecisionResult:
    """The sensitivity of every layer, the layers kept in float, and the quantization done."""

    float_accuracy: float
    sensitivity: dict[str, float]  # layer -> accuracy drop when only it is quantized
    kept_float: list[str]
    history: list[dict] = field(default_factory=list)  # accuracy as layers return to float
    quantized: QuantizeResult | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["quantized"] = self.quantized.to_dict() if self.quantized else None
        return out

    @property
    def plan(self) -> CompressionPlan:
        """The quantized layers' weight bits; each layer kept in float says what it would cost."""
        plan = self.quantized.plan if self.quantized is not None else CompressionPlan()
        for name in self.kept_float:
            why = f"kept in float: quantized alone it costs {100 * self.sensitivity[name]:.2f} points"
            plan = plan.merged(name, skip=why)
        return plan


def mixed_precision_(
    model: nn.Module,
    config: MixedPrecisionConfig,
    data: Data | Iterable | None = None,
    *,
    eval_batches: Iterable | None = None,
    example: torch.Tensor | None = None,
) -> MixedPrecisionResult:
    """Quantize ``model`` in place, keeping in float the fewest layers that hold the budget.

    Args:
        model: the trained float model.
        config: the accuracy budget and the quantization settings.
        data: calibration data: a :class:`~torchslim.core.data.Data` (whose calibration split,
            with labels, also measures the accuracy unless ``eval_batches`` is given) or any
            iterable of input batches (then ``eval_batches`` is required).
        eval_batches: ``(input, label)`` batches to measure accuracy on.
        example: an input batch the calibration batches must match (see :func:`quantize_`).

    Example:
        >>> result = ts.mixed_precision_(model, ts.MixedPrecisionConfig(max_drop=0.003), data)  # doctest: +SKIP
        >>> result.kept_float  # doctest: +SKIP
        ['stem']
    """
    if isinstance(data, Data):
        data.check(model)
    if config.quantize.qat is not None:
        raise ConfigError("mixed precision chooses layers by post-training quantization: set quantize.qat=None")
    if eval_batches is None and not isinstance(data, Data):
        raise ConfigError(
            "pass eval_batches=<(input, label) batches> to measure accuracy on, or data=<a torchslim Data>"
        )
    if eval_batches is None:  # data is a Data (checked above): its first calibration batches
        eval_batches = itertools.islice(data.calib_loader(), config.quantize.calib_batches)
    # an iterator is read once into a list; a loader is re-read per evaluation, never held whole
    batches = list(eval_batches) if isinstance(eval_batches, Iterator) else eval_batches
    work = copy.deepcopy(model).eval()
    fold_batchnorm_(work)  # a folded float model computes what the original does
    task = data.task if isinstance(data, Data) else Classification()
    base = evaluate(work, batches, task)
    _, targets = _select(work, config.quantize)
    if data is None:
        raise ConfigError("mixed precision calibrates its int8 layers: pass data=<calibration batches>")
    calib = [inputs_of(b, task) for b in calibration_batches(data, config.quantize.calib_batches, example)]
    unfuse_transformer_layers_(work, targets)  # the fused encoder kernel would bypass the layers
    ranges, _ = calibrated_ranges(work, targets, calib, config.quantize)
    q = config.quantize
    quantized = {n: quantize_layer(layer, q, ranges.get(n)) for n, layer in targets.items()}
    sensitivity = {}
    for name in targets:
        work.set_submodule(name, quantized[name])
        sensitivity[name] = round(task.metric.drop(base, evaluate(work, batches, task)), 6)
        work.set_submodule(name, targets[name])
        log.info("sensitivity of %s: %.4f", name, sensitivity[name])
    kept = _greedy(work, targets, quantized, sensitivity, (base, config.max_drop), batches, task)
    result = MixedPrecisionResult(base, sensitivity, [h["kept_float"][-1] for h in kept[1:]], kept)
    result.quantized = quantize_(model, replace(q, exclude=q.exclude + tuple(result.kept_float)), data, example=example)
    return result


def _greedy(
    work: nn.Module,
    targets: dict[str, nn.Module],
    quantized: dict[str, nn.Module],
    sensitivity: dict[str, float],
    budget: tuple[float, float],
    batches: list,
    task: Task,
) -> list[dict]:
    """Quantize every layer, then return the most sensitive to float until the budget holds.
    (``"accuracy"`` in the history is the task's metric.)"""
    base, max_drop = budget
    for name in targets:
        work.set_submodule(name, quantized[name])
    kept: list[str] = []
    history = [{"kept_float": [], "accuracy": evaluate(work, batches, task)}]
    for name in sorted(targets, key=lambda n: -sensitivity[n]):
        if task.metric.drop(base, history[-1]["accuracy"]) <= max_drop:
            break
        work.set_submodule(name, targets[name])
        kept.append(name)
        history.append({"kept_float": list(kept), "accuracy": evaluate(work, batches, task)})
    return history
