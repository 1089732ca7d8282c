"""Knowledge distillation: a teacher's soft targets (and features) train a student.

``distill`` trains a student -- any model, or one derived from the teacher by
:func:`derive_student` -- against a teacher with the losses of :mod:`torchslim.train.losses`:
soft targets at temperature ``T`` mixed with the labels, plus optional feature pairs
(``(student layer, teacher layer)``), each a hint through a learned projection or an
attention-transfer map. Forward hooks capture the named features without changing either
model; the teacher runs in eval mode without gradients, and its logits for the training split
can be computed once and cached (``cache_teacher``) when no feature pair needs it to run.

The same objective is the recovery step of structured pruning, weight sharing and QAT: their
``finetune`` / ``qat`` configs take the uncompressed model as ``teacher`` (the soft targets
of ``TrainConfig.temperature`` and ``distill_weight``).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim.core.data import Data, TensorBatches
from torchslim.core.device import Device, model_device, place
from torchslim.core.models import ZOO, build_model
from torchslim.core.plan import CompressionPlan
from torchslim.core.task import Classification, Task, call_model, forward, logits_of, move
from torchslim.errors import ConfigError
from torchslim.train.fit import Progress, TrainConfig, fit
from torchslim.train.losses import FEATURE_KINDS, FeatureLoss

log = logging.getLogger(__name__)

WIDTH_ARGS = {
    "resnet_mini": "width",
    "mobilenet_mini": "width",
    "concat_net": "width",
    "mlp": "width",
    "lstm_classifier": "hidden_size",
    "gru_classifier": "hidden_size",
}
"""The zoo builders' width argument, scaled by :func:`derive_student`'s multiplier."""
DEPTH_ARGS = {"mlp": "depth", "resnet_mini": "blocks", "mobilenet_mini": "blocks"}
"""The zoo builders' depth argument (hidden layers / blocks; a student keeps the first ones),
set by :func:`derive_student`."""


@dataclass(frozen=True)
class DistillConfig:
    """How a student learns from its teacher.

    Attributes:
        train: epochs, learning rate, seed, and the soft targets: ``temperature`` (T) and
            ``distill_weight`` (alpha, the weight of the soft-target term; the labels get
            ``1 - alpha``).
        features: ``(student layer, teacher layer)`` pairs whose outputs are matched, each
            optionally with its own kind as a third item.
        feature_weight: the weight of each feature loss added to the logit loss.
        feature_kind: the kind of the pairs that name none: ``"hint"`` (MSE through a learned
            projection when the widths differ), ``"attention"`` (attention transfer between
            conv feature maps) or ``"relation"`` (MiniLM self-attention relations between
            token features, e.g. the query, key and value projections of a transformer layer).
        cache_teacher: compute the teacher's logits for the training split once (no feature
            pairs: the teacher would run anyway).
    """

    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, temperature=4.0, distill_weight=0.7))
    features: tuple[tuple[str, ...], ...] = ()
    feature_weight: float = 1.0
    feature_kind: str = "hint"
    cache_teacher: bool = False

    def __post_init__(self) -> None:  # the temperature and alpha are checked by TrainConfig
        pairs = tuple(tuple(p) for p in self.features)
        if not all(len(p) in (2, 3) and all(isinstance(n, str) and n for n in p) for p in pairs):
            raise ConfigError(
                f"features={self.features!r}: give (student layer, teacher layer) name pairs, each optionally with "
                "a kind as a third item"
            )
        object.__setattr__(self, "features", pairs)
        if self.feature_kind not in FEATURE_KINDS:
            raise ConfigError(f"feature_kind={self.feature_kind!r}: choose one of {list(FEATURE_KINDS)}")
        for pair in (p for p in pairs if len(p) == 3 and p[2] not in FEATURE_KINDS):
            raise ConfigError(f"feature kind {pair[2]!r} of {pair[:2]}: choose one of {list(FEATURE_KINDS)}")
        if (
            isinstance(self.feature_weight, bool)
            or not isinstance(self.feature_weight, (int, float))
            or self.feature_weight < 0
        ):
            raise ConfigError(f"feature_weight={self.feature_weight!r}: use a number >= 0")
        if self.cache_teacher and self.features:
            raise ConfigError(
                "cache_teacher caches logits only; with feature pairs the teacher runs every batch anyway: drop one"
            )

    def to_dict(self) -> dict:
        return asdict(self) | {"features": [list(p) for p in self.features]}


@dataclass
class DistillResult:
    """What ``distill`` did: the loss per epoch and the time it took."""

    history: list[float]
    seconds: float
    config: DistillConfig
    projections: int = 0  # learned feature projections (trained, then dropped)

    @property
    def plan(self) -> CompressionPlan:
        """Distillation trains a whole student rather than deciding per layer: an empty plan."""
        return CompressionPlan()

    def to_dict(self) -> dict:
        return {
            "history": self.history,
            "seconds": self.seconds,
            "config": self.config.to_dict(),
            "projections": self.projections,
        }


@contextlib.contextmanager
def capture(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of ``model``'s named submodules while the block runs.

    Example:
        >>> with capture(model, ["fc1"]) as feats:  # doctest: +SKIP
        ...     model(x)
        >>> feats["fc1"].shape  # doctest: +SKIP
    """
    try:  # runs every training batch: look the names up, and list the model's layers only on a miss
        modules = {name: model.get_submodule(name) for name in names if name}
    except AttributeError:
        modules = {}
    if len(modules) != len(set(names)):
        check_layers(model, names, "model")
    found: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():

        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            found[name] = logits_of(out)

        handles.append(module.register_forward_hook(hook))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def check_layers(model: nn.Module, names: list[str] | tuple[str, ...], role: str) -> None:
    """Every name must be a submodule of ``model``; a missing one is named with close matches."""
    known = dict(model.named_modules())
    for name in names:
        if name not in known or name == "":
            close = difflib.get_close_matches(name, [n for n in known if n], n=3)
            hint = f"; did you mean {close}?" if close else f"; its layers are {[n for n in known if n][:12]}"
            raise ConfigError(f"the {role} has no layer {name!r} (feature pair){hint}")


class Distiller(nn.Module):
    """The whole distillation objective of one student / teacher pair: soft targets and labels,
    plus one :class:`FeatureLoss` per feature pair (which own the projections to train)."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module, config: DistillConfig, example: Any, task: Task | None = None
    ) -> None:
        super().__init__()
        self.config, self.task = config, task or Classification()
        self.s_names, self.t_names = [p[0] for p in config.features], [p[1] for p in config.features]
        check_layers(student, self.s_names, "student")
        check_layers(teacher, self.t_names, "teacher")
        self._student, self._teacher = [student], [teacher]  # not submodules: not trained, not saved
        self.cache: torch.Tensor | None = None
        was_training = student.training
        student.eval()
        teacher.eval()
        with torch.no_grad(), capture(student, self.s_names) as fs, capture(teacher, self.t_names) as ft:
            s_raw, t_raw = call_model(student, example), call_model(teacher, example)
        student.train(was_training)
        if not isinstance(self.task, Classification):  # the task's teacher loss reads its own outputs
            self.task.check(example, s_raw)
            self.task.check(example, t_raw)
        s_out, t_out = (logits_of(o) if isinstance(self.task, Classification) else None for o in (s_raw, t_raw))
        if s_out is not None and s_out.shape[-1] != t_out.shape[-1]:
            raise ConfigError(
                f"the teacher predicts {t_out.shape[-1]} classes but the student {s_out.shape[-1]}: distillation needs "
                "the same classes (build the student with the teacher's num_classes)"
            )
        self.features = nn.ModuleList(
            FeatureLoss(tuple(fs[p[0]].shape), tuple(ft[p[1]].shape), p[2] if len(p) == 3 else config.feature_kind)
            for p in config.features
        )

    def cache_teacher(self, data: Data, batch: int = 1000) -> None:
        """The teacher's logits for every training row, computed once; only an in-memory
        training split (:class:`~torchslim.core.data.TensorBatches`) has rows to key them by,
        so for any other loader the teacher runs on every batch."""
        if not isinstance(data.train, TensorBatches):
            log.info("teacher outputs not cached: the training loader is not an in-memory split")
            return
        x = data.train.tensors[0]
        teacher = self._teacher[0].eval()
        with torch.no_grad():
            where = model_device(teacher)
            self.cache = torch.cat([logits_of(teacher(x[i : i + batch].to(where))) for i in range(0, len(x), batch)])

    def forward(self, batch: Any, rows: torch.Tensor | None) -> torch.Tensor:
        student, teacher, task = self._student[0], self._teacher[0], self.task
        with capture(student, self.s_names) as fs:
            out = forward(student, task, batch)
        if self.cache is not None and rows is not None:
            target: Any = self.cache[rows]
            ft: dict[str, torch.Tensor] = {}
        else:
            with torch.no_grad(), capture(teacher, self.t_names) as ft:
                target = forward(teacher, task, batch)
        train = self.config.train
        loss = task.teacher_loss(out, target, batch, train.temperature, train.distill_weight)
        for pair, feature in zip(self.config.features, self.features):
            loss = loss + self.config.feature_weight * feature(fs[pair[0]], ft[pair[1]])
        return loss


def distill(
    student: nn.Module,
    config: DistillConfig = DistillConfig(),
    data: Data | None = None,
    *,
    teacher: nn.Module | None = None,
    progress: Progress | None = None,
    device: Device = None,
) -> DistillResult:
    """Train ``student`` in place against ``teacher`` (unchanged; run in eval mode, no gradients).

    Raises :class:`~torchslim.errors.ConfigError` before training when no teacher or data is
    given, the two predict different numbers of classes, a feature pair names a layer that does
    not exist, or the temperature is not positive. ``device`` (``"auto"``, ``"cpu"``,
    ``"cuda:N"``) moves student and teacher there first; batches follow the student.

    Example:
        >>> student = ts.derive_student("resnet_mini", {}, width=0.5)  # doctest: +SKIP
        >>> cfg = ts.DistillConfig(features=(("layer3", "layer3"),))
        >>> ts.distill(student, cfg, data, teacher=teacher)  # doctest: +SKIP
    """
    if teacher is None or data is None:
        raise ConfigError("distill trains the student on the teacher's outputs: pass data=... and teacher=<model>")
    place(student, device)
    place(teacher, device)
    data.check(teacher)
    start = time.perf_counter()
    where = model_device(student)
    objective = Distiller(student, teacher, config, move(data.example_input(2), where), data.task).to(where)
    data.check(student)  # after the pair's own checks, whose messages are the more specific
    if config.cache_teacher:
        objective.cache_teacher(data)
    history = fit(
        student, data, config.train, progress, teacher, objective=objective, extra_params=list(objective.parameters())
    )
    projections = len([f for f in objective.features if f.projection is not None])
    return DistillResult(history, time.perf_counter() - start, config, projections)


def derive_student(
    name: str, kwargs: dict[str, Any] | None = None, *, width: float = 0.5, depth: int | None = None
) -> nn.Module:
    """A fresh zoo model narrower than the teacher ``name(**kwargs)``: its width argument times
    ``width`` (rounded, at least 1), and for builders with a depth argument ``depth`` hidden
    layers or blocks (the first ones).

    Example:
        >>> derive_student("resnet_mini", {"width": 32}, width=0.25).fc.in_features
        32
    """
    return build_model(name, **student_kwargs(name, kwargs, width=width, depth=depth))


def student_kwargs(
    name: str, kwargs: dict[str, Any] | None = None, *, width: float = 0.5, depth: int | None = None
) -> dict[str, Any]:
    """The zoo arguments of :func:`derive_student`'s student (what a file records to rebuild it)."""
    if name not in ZOO:
        raise ConfigError(f"unknown model {name!r}; the zoo has {sorted(ZOO)}")
    if name not in WIDTH_ARGS:
        raise ConfigError(
            f"{name} has no width argument to scale; derivable teachers: {sorted(WIDTH_ARGS)} (or pass your own student)"
        )
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 1:
        raise ConfigError(f"width={width!r}: a width multiplier in (0, 1], e.g. 0.5")
    out = dict(kwargs or {})
    key = WIDTH_ARGS[name]
    base = out.get(key, _default(name, key))
    out[key] = max(1, round(base * width))
    if depth is not None:
        if name not in DEPTH_ARGS:
            raise ConfigError(f"{name} has a fixed depth; depth is available for {sorted(DEPTH_ARGS)}")
        if (
            isinstance(depth, bool)
            or not isinstance(depth, int)
            or not 1 <= depth <= out.get(DEPTH_ARGS[name], _default(name, DEPTH_ARGS[name]))
        ):
            raise ConfigError(f"depth={depth!r}: a whole number from 1 to the teacher's depth")
        out[DEPTH_ARGS[name]] = depth
    return out


def _default(name: str, key: str) -> int:
    return inspect.signature(ZOO[name]).parameters[key].default
