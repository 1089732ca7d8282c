"""The recipe schema. Every model forbids unknown keys, so a misspelled key is an error naming it.

A recipe names a model, a dataset, how the dense baseline is trained, the compression
steps in order, and where outputs go. All problems in a file are reported at once.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from torchslim.core.models import ZOO
from torchslim.errors import ConfigError, RecipeError
from torchslim.search.config import Budget, LatencySetting, SearchConfig
from torchslim.search.space import Recovery, SearchSpace
from torchslim.train.fit import TrainConfig
from torchslim.transforms.channels import ChannelPruneConfig
from torchslim.transforms.distill import DistillConfig, student_kwargs
from torchslim.transforms.prune import MagnitudePruneConfig
from torchslim.transforms.quantize import QuantizeConfig
from torchslim.transforms.share import ShareConfig

BUILTIN = Path(__file__).parent / "builtin"
DEFAULT_RECIPE = "lenet_300_100"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    name: str = Field(description="a zoo model name, e.g. lenet_300_100 or resnet_mini")
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _in_zoo(self) -> "ModelSpec":
        if self.name not in ZOO:
            raise ValueError(f"unknown model {self.name!r}; the zoo has {sorted(ZOO)}")
        return self


class DataSection(_Strict):
    name: Literal["fashion_mnist", "digits"] = "fashion_mnist"
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(1000, ge=1)
    calib_size: int = Field(2048, ge=1)
    seed: int = 0


class TrainSection(_Strict):
    epochs: int = Field(ge=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    teacher: bool = Field(False, description="also distill from the uncompressed baseline's soft targets")
    distill_weight: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(2.0, gt=0)


class PruneSection(_Strict):
    sparsity: Union[float, dict[str, Optional[float]]]
    scope: str = Field("layer", pattern="^(layer|global)$")
    steps: int = Field(1, ge=1)
    finetune: TrainSection | None = None


class ShareSection(_Strict):
    bits: Union[int, dict[str, Optional[int]]]
    finetune: TrainSection | None = None
    kmeans_iters: int = Field(100, ge=1)
    half_biases: bool = False


class ChannelsSection(_Strict):
    """Structured pruning (``ChannelPruneConfig``): exactly one of macs, params or ratio."""

    macs: Optional[float] = None
    params: Optional[float] = None
    ratio: Union[float, dict[str, Optional[float]], None] = None
    criterion: str = "l2"
    scope: str = "layer"
    steps: int = 1
    round_to: int = 8
    min_channels: int = 8
    exclude: list[str] = Field(default_factory=list)
    calib_batches: int = 4
    finetune: TrainSection | None = None

    def config(self, finetune: Any = None, seed: int = 0) -> ChannelPruneConfig:
        fields = self.model_dump(exclude={"finetune", "exclude"})
        return ChannelPruneConfig(**fields, exclude=tuple(self.exclude), finetune=finetune, seed=seed)


class QuantizeSection(_Strict):
    """Quantization (``QuantizeConfig``); ``backend`` is where the report measures its latency."""

    scheme: str = "static"
    bits: int = 8
    calibration: str = "auto"
    percentile: float = 99.99
    calib_batches: int = 8
    group_size: int = 64
    per_channel: bool = True
    fold_bn: bool = True
    bias_correction: bool = True
    exclude: list[str] = Field(default_factory=list)
    qat: TrainSection | None = None
    max_drop: Optional[float] = Field(None, ge=0, lt=1, description="mixed precision: keep the most sensitive layers in float until the drop is at most this")
    backend: Literal["eager", "inductor", "onnxruntime"] = "inductor"

    @model_validator(mode="after")
    def _one_recovery(self) -> "QuantizeSection":
        if self.max_drop is not None and self.qat is not None:
            raise ValueError("max_drop (mixed precision) and qat do not combine; choose one")
        return self

    def config(self, qat: Any = None) -> QuantizeConfig:
        fields = self.model_dump(exclude={"qat", "exclude", "backend", "max_drop"})
        return QuantizeConfig(**fields, exclude=tuple(self.exclude), qat=qat)


class DistillSection(_Strict):
    """Knowledge distillation into a smaller student, the recipe's model as teacher: a zoo
    ``student``, or one derived from the teacher by a ``width`` multiplier (and ``depth``)."""

    student: Optional[ModelSpec] = None
    width: Optional[float] = Field(None, gt=0, le=1, description="derive the student: the teacher's width times this")
    depth: Optional[int] = Field(None, ge=1, description="derive the student: this many hidden layers (mlp) or blocks (resnet_mini, mobilenet_mini)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T of the soft targets")
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the soft targets; the labels get 1 - alpha")
    features: list[tuple[str, str]] = Field(default_factory=list, description="[student layer, teacher layer] pairs")
    feature_weight: float = Field(1.0, ge=0)
    feature_kind: Literal["hint", "attention"] = "hint"
    epochs: int = Field(10, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    cache_teacher: bool = False
    compare_alone: bool = Field(True, description="also train the student without the teacher (same epochs and seed) for the report")

    @model_validator(mode="after")
    def _one_student(self) -> "DistillSection":
        if (self.student is None) == (self.width is None):
            raise ValueError("give exactly one of student (a zoo model) or width (derive the student from the teacher)")
        if self.depth is not None and self.width is None:
            raise ValueError("depth derives the student with width; a named student has its own depth")
        return self

    def config(self, seed: int = 0) -> DistillConfig:
        train = TrainConfig(self.epochs, self.lr, self.weight_decay, seed, self.alpha, self.temperature)
        return DistillConfig(train, tuple(self.features), self.feature_weight, self.feature_kind, self.cache_teacher)

    def student_spec(self, teacher: ModelSpec) -> tuple[str, dict[str, Any]]:
        """The student's zoo name and arguments."""
        if self.student is not None:
            return self.student.name, dict(self.student.kwargs)
        assert self.width is not None
        return teacher.name, student_kwargs(teacher.name, teacher.kwargs, width=self.width, depth=self.depth)


STEP_KINDS = ("distill", "channels", "prune", "share", "quantize")


class Step(_Strict):
    """Exactly one of the keys: ``distill``, ``channels``, ``prune``, ``share`` or ``quantize``."""

    distill: DistillSection | None = None
    channels: ChannelsSection | None = None
    prune: PruneSection | None = None
    share: ShareSection | None = None
    quantize: QuantizeSection | None = None

    @model_validator(mode="after")
    def _one_key(self) -> "Step":
        given = [k for k in STEP_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a step has exactly one of {list(STEP_KINDS)}, got {given or 'none'}")
        try:  # the transforms' own checks, before any training starts
            if self.distill is not None:
                self.distill.config()
            elif self.channels is not None:
                self.channels.config()
            elif self.quantize is not None:
                self.quantize.config(TrainConfig(1, 1e-3) if self.quantize.qat else None)
            elif self.prune is not None:
                MagnitudePruneConfig(self.prune.sparsity, self.prune.scope, self.prune.steps, None)  # type: ignore[arg-type]
            else:
                assert self.share is not None
                ShareConfig(self.share.bits, None, self.share.kmeans_iters)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def kind(self) -> str:
        return next(k for k in STEP_KINDS if getattr(self, k) is not None)


class RecoverySection(_Strict):
    """Recovery training with the uncompressed model as teacher (``search.space.Recovery``)."""

    samples: int = Field(16384, ge=0, description="training images used (a seeded subset); 0: all")
    epochs: int = Field(1, ge=0)
    lr: float = Field(2e-3, gt=0)
    share_epochs: int = Field(1, ge=0, description="epochs that train the shared layers' centroids")
    distill_weight: float = Field(0.7, ge=0, le=1)
    temperature: float = Field(4.0, gt=0)


class SearchSection(_Strict):
    """Adaptive compression (``torchslim search``): the budget, the objective, the per-layer
    choices, how trials recover and are timed, and how many run."""

    budget: Optional[str] = Field(None, description="'1pt' (absolute points) or '1%' (relative); --budget overrides")
    objective: Literal["size", "latency"] = "size"
    sampler: Literal["tpe", "nsga2"] = "tpe"
    trials: int = Field(40, ge=1)
    timeout_s: Optional[float] = Field(None, gt=0)
    sparsity: Optional[list[float]] = Field(None, description="sparsity choices; default: the objective's (none for latency)")
    bits: Optional[list[int]] = Field(None, description="codebook sizes; default: the objective's (none for latency)")
    channels: Optional[list[float]] = Field(None, description="channel fractions; default [0, 0.25, 0.5]")
    int8: bool = True
    round_to: int = Field(8, ge=1)
    min_channels: int = Field(8, ge=1)
    recovery: RecoverySection = RecoverySection()
    final: RecoverySection = RecoverySection(samples=0, epochs=3, lr=1e-3)
    latency_backend: Literal["eager", "inductor", "onnxruntime"] = "onnxruntime"
    latency_batch: int = Field(64, ge=1)
    seeds: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0], description="budget multiples of the sensitivity-seeded plans")
    workers: int = Field(1, ge=1, description="trials at once (more than 1 runs them on Ray)")
    ray_address: Optional[str] = None

    @model_validator(mode="after")
    def _valid(self) -> "SearchSection":
        try:
            self.space(self.objective)
            if self.budget is not None:
                Budget.parse(self.budget)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def space(self, objective: str) -> SearchSpace:
        """The choices set here, the rest from ``SearchSpace.default_for(objective)``."""
        base = SearchSpace.default_for(objective)
        given = {k: tuple(v) for k in ("sparsity", "bits", "channels") if (v := getattr(self, k)) is not None}
        return replace(base, **given, int8=self.int8, round_to=self.round_to, min_channels=self.min_channels)

    def config(self, threads: int, seed: int, **overrides: Any) -> SearchConfig:
        """The :class:`SearchConfig`; ``overrides`` (budget text, objective, trials, ...) win when not None."""
        given = {k: v for k, v in overrides.items() if v is not None}
        budget = given.pop("budget", self.budget)
        if budget is None:
            raise ConfigError("no accuracy budget: pass --budget 1pt (points, absolute) or --budget 1% (relative), or set search.budget")
        fields = {k: getattr(self, k) for k in ("objective", "sampler", "trials", "timeout_s", "workers", "ray_address")}
        fields |= given
        return SearchConfig(
            Budget.parse(budget), space=self.space(fields["objective"]), recovery=Recovery(**self.recovery.model_dump()),
            final=Recovery(**self.final.model_dump()), seeds=tuple(self.seeds), seed=seed,
            latency=LatencySetting(self.latency_backend, self.latency_batch, threads), **fields,
        )  # fmt: skip


class LatencySection(_Strict):
    batches: list[int] = Field(default_factory=lambda: [1, 64])
    repeats: int = Field(50, ge=1)
    warmup: int = Field(10, ge=0)


class Outputs(_Strict):
    dir: str = "runs/{name}"
    artifact: str = "{name}.tslim"


class Recipe(_Strict):
    name: str
    model: ModelSpec
    data: DataSection = DataSection()
    baseline: TrainSection = TrainSection(epochs=15, lr=3e-3)
    steps: list[Step] = Field(default_factory=list, description="compression steps of `torchslim compress`")
    search: Optional[SearchSection] = Field(None, description="settings of `torchslim search`")
    outputs: Outputs = Outputs()
    latency: LatencySection = LatencySection()
    threads: int = Field(2, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _baseline_has_no_teacher(self) -> "Recipe":
        if self.baseline.teacher:
            raise ValueError("baseline.teacher: the dense baseline is the teacher; it cannot have one")
        kinds = [s.kind for s in self.steps]
        if "channels" in kinds and any(k not in ("channels", "distill") for k in kinds[: max(i for i, k in enumerate(kinds) if k == "channels")]):
            raise ValueError("steps: 'channels' steps must come before 'prune' and 'share' (they resize the layers those mask)")
        if "distill" in kinds and (kinds.index("distill") != 0 or kinds.count("distill") > 1):
            raise ValueError("steps: 'distill' must be the first step, and only one (it replaces the model by its student)")
        for step in self.steps:
            if step.distill is not None and step.distill.width is not None:
                try:
                    step.distill.student_spec(self.model)
                except ConfigError as exc:
                    raise ValueError(f"steps: distill: {exc}") from None
        if "quantize" in kinds and kinds.index("quantize") != len(kinds) - 1:
            raise ValueError("steps: 'quantize' must be the last step, and only one (it replaces the float layers)")
        return self

    def out_dir(self) -> Path:
        return Path(self.outputs.dir.replace("{name}", self.name))

    def artifact_path(self) -> Path:
        return self.out_dir() / self.outputs.artifact.replace("{name}", self.name)


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Validate YAML text as a recipe; raise :class:`RecipeError` listing every problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with keys name, model, steps, ...")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            what = "unknown key (misspelled?)" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {where}: {what}")
        raise RecipeError(f"{source}: {len(lines)} problem(s):\n" + "\n".join(lines)) from None


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with torchslim."""
    return sorted(p.stem for p in BUILTIN.glob("*.yaml"))


def load_recipe(ref: str | os.PathLike | None = None) -> Recipe:
    """Load a recipe from a path, or a built-in by name (default: LeNet-300-100)."""
    ref = DEFAULT_RECIPE if ref is None else ref
    path = Path(ref)
    if not path.is_file() and (BUILTIN / f"{ref}.yaml").is_file():
        path = BUILTIN / f"{ref}.yaml"
    if not path.is_file():
        raise RecipeError(f"recipe {str(ref)!r} not found: give a YAML path or a built-in name {builtin_recipes()}")
    return parse_recipe(path.read_text(), str(path))
