"""The recipe schema. Every model forbids unknown keys, so a misspelled key is an error naming it.

A recipe names a model, a dataset, how the dense baseline is trained, the compression
steps in order, and where outputs go. All problems in a file are reported at once. The
sections of data, training and every step are derived from the config dataclasses
(:mod:`torchslim.recipe.sections`): a YAML key and the Python argument of the same name have
the same type and default. Each step compiles to a plan and the settings of
:func:`~torchslim.transforms.compress.compress`, which applies it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, model_validator

from torchslim.artifact.weights import SAFETENSORS, STATE_DICT
from torchslim.core.data import DataSpec
from torchslim.core.models import ZOO
from torchslim.core.plan import CompressionPlan
from torchslim.core.task import TASKS
from torchslim.errors import ConfigError, RecipeError
from torchslim.recipe.sections import Strict, section
from torchslim.search.config import Budget, LatencySetting, SearchConfig
from torchslim.search.space import Recovery, SearchSpace
from torchslim.train.fit import TrainConfig
from torchslim.transforms.awq import AWQConfig
from torchslim.transforms.channels import ChannelPruneConfig
from torchslim.transforms.compress import ONE_SHOT, ORDER, CompressSettings
from torchslim.transforms.distill import DistillConfig, student_kwargs
from torchslim.transforms.gptq import GPTQConfig
from torchslim.transforms.lowrank import LowRankConfig
from torchslim.transforms.mixed_precision import MixedPrecisionConfig
from torchslim.transforms.prune import MagnitudePruneConfig
from torchslim.transforms.quantize import QuantizeConfig
from torchslim.transforms.share import ShareConfig
from torchslim.transforms.sparsify import SparsifyConfig

BUILTIN = Path(__file__).parent / "builtin"
DEFAULT_RECIPE = "lenet_300_100"


class ModelSpec(Strict):
    """A zoo model by ``name``, or your own by ``builder``; with ``weights``, or a ``pretrained``
    builder, it is already trained (the baseline section is then not used)."""

    name: str | None = Field(None, description="a zoo model name, e.g. lenet_300_100 or resnet_mini")
    builder: str | None = Field(
        None, description="'pkg.module:function' returning your nn.Module (the recipe's folder is searched first)"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(
        None,
        description="trained weights, relative to the recipe: .safetensors, or a state_dict .pt / .pth "
        "(read with torch.load(weights_only=True)); other files are refused unread",
    )
    pretrained: bool = Field(
        False, description="the builder returns a trained model (a Hugging Face checkpoint, say): no baseline training"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.name is None) == (self.builder is None):
            raise ValueError("give exactly one of name (a zoo model) or builder ('pkg.module:function')")
        if self.name is not None and self.name not in ZOO:
            raise ValueError(f"unknown model {self.name!r}; the zoo has {sorted(ZOO)}")
        if self.builder is not None and not _is_ref(self.builder):
            raise ValueError(f"builder {self.builder!r}: write it as 'pkg.module:function'")
        if self.pretrained and (self.builder is None or self.weights is not None):
            raise ValueError(
                "pretrained: true says the builder returns trained weights: give a builder and no weights file"
            )
        if self.weights is not None and Path(self.weights).suffix.lower() not in SAFETENSORS + STATE_DICT:
            raise ValueError(
                f"weights {self.weights!r}: use a .safetensors file or a state_dict saved as .pt / .pth; other "
                "files are refused unread (a pickle runs code when loaded)"
            )
        return self

    @property
    def label(self) -> str:
        """The zoo name or the builder, for messages and reports."""
        return self.name or str(self.builder)


def _is_ref(text: str) -> bool:
    module, sep, attr = text.partition(":")
    return bool(sep and module and attr and all(p.isidentifier() for p in (*module.split("."), *attr.split("."))))


TEACHER = (bool, Field(False, description="also distill from the uncompressed baseline's soft targets"))
TrainSection = section(TrainConfig, name="TrainSection")
FinetuneSection = section(TrainConfig, name="FinetuneSection", extras={"teacher": TEACHER})
_Data = section(
    DataSpec,
    name="_Data",
    recipe_wide=(),  # the split has its own seed
    extras={
        "builder": (
            str | None,
            Field(
                None,
                description="'pkg.module:function' returning your loaders (a Data, {train, eval[, calib]} or a tuple)",
            ),
        ),
        "kwargs": (dict[str, Any], Field(default_factory=dict, description="arguments of the data builder")),
        "image_folder": (
            str | None,
            Field(None, description="a folder of images, one subfolder per class (relative to the recipe)"),
        ),
        "size": (int, Field(224, ge=1, description="image folder: images are resized to size x size")),
        "channels": (Literal[1, 3], Field(3, description="image folder: 3 (RGB) or 1 (grayscale)")),
    },
)


class DataSection(_Data):
    """A built-in dataset by ``name``, your own loaders from ``builder``, or an ``image_folder``."""

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if self.builder is not None and self.image_folder is not None:
            raise ValueError("give at most one of builder or image_folder")
        if self.builder is not None and not _is_ref(self.builder):
            raise ValueError(f"builder {self.builder!r}: write it as 'pkg.module:function'")
        return self

    @property
    def label(self) -> str:
        """The dataset's name, builder or folder, for messages and reports."""
        return self.builder or self.image_folder or self.name

    def described(self) -> dict[str, Any]:
        """What a report records of user data: the builder and its kwargs, or the image folder."""
        if self.builder is not None:
            return {"builder": self.builder, "kwargs": self.kwargs}
        if self.image_folder is not None:
            return {"image_folder": self.image_folder, "size": self.size, "channels": self.channels}
        return self.model_dump()


PruneSection = section(MagnitudePruneConfig, nested={"finetune": FinetuneSection}, name="PruneSection")
ShareSection = section(ShareConfig, nested={"finetune": FinetuneSection}, name="ShareSection")
ChannelsSection = section(ChannelPruneConfig, nested={"finetune": FinetuneSection}, name="ChannelsSection")
QuantizeSection = section(
    QuantizeConfig,
    nested={"qat": FinetuneSection},
    extras={
        "max_drop": (
            float | None,
            Field(
                None,
                ge=0,
                lt=1,
                description="mixed precision: keep the most sensitive layers in float until "
                "the accuracy drop is at most this",
            ),
        ),
        "backend": (
            Literal["eager", "inductor", "onnxruntime"],
            Field("inductor", description="where the report measures the quantized model's latency"),
        ),
        "keep_faster": (
            bool,
            Field(
                True,
                description="time int8 against the float model compiled on `backend` (not eager) at the "
                "report's latency batches, and keep float, layer by layer, where int8 is slower",
            ),
        ),
    },
    name="QuantizeSection",
)
_Distill = section(
    DistillConfig,
    nested={"train": TrainSection},
    extras={
        "student": (ModelSpec | None, None),
        "width": (
            float | None,
            Field(None, gt=0, le=1, description="derive the student: the teacher's width times this"),
        ),
        "depth": (
            int | None,
            Field(
                None,
                ge=1,
                description="derive the student: this many hidden layers (mlp) or blocks (resnet_mini, mobilenet_mini)",
            ),
        ),
        "compare_alone": (
            bool,
            Field(True, description="also train the student without the teacher (same epochs and seed) for the report"),
        ),
    },
    name="_Distill",
)


class DistillSection(_Distill):
    """Knowledge distillation into a smaller student, the recipe's model as teacher: a zoo
    ``student``, or one derived from the teacher by a ``width`` multiplier (and ``depth``)."""

    @model_validator(mode="after")
    def _one_student(self) -> DistillSection:
        if (self.student is None) == (self.width is None):
            raise ValueError("give exactly one of student (a zoo model) or width (derive the student from the teacher)")
        if self.depth is not None and self.width is None:
            raise ValueError("depth derives the student with width; a named student has its own depth")
        return self

    def student_spec(self, teacher: ModelSpec) -> tuple[str, dict[str, Any]]:
        """The student's zoo name and arguments (a builder student is built by the runner)."""
        if self.student is not None:
            return str(self.student.name), dict(self.student.kwargs)
        assert self.width is not None
        if teacher.name is None:
            raise ConfigError(
                "width derives the student from a zoo teacher; for your own model give student: {builder: ...}"
            )
        return teacher.name, student_kwargs(teacher.name, teacher.kwargs, width=self.width, depth=self.depth)


LowRankSection = section(LowRankConfig, name="LowRankSection")
SparsifySection = section(SparsifyConfig, name="SparsifySection")
GPTQSection = section(GPTQConfig, name="GPTQSection")
AWQSection = section(AWQConfig, name="AWQSection")

STEP_KINDS = ("distill", "channels", "prune", "lowrank", "sparsify", "share", "gptq", "awq", "quantize")


class Step(Strict):
    """Exactly one of the keys: ``distill``, ``channels``, ``prune``, ``lowrank``,
    ``sparsify``, ``share``, ``gptq``, ``awq`` or ``quantize``."""

    distill: DistillSection | None = None
    channels: ChannelsSection | None = None
    prune: PruneSection | None = None
    lowrank: LowRankSection | None = None
    sparsify: SparsifySection | None = None
    share: ShareSection | None = None
    gptq: GPTQSection | None = None
    awq: AWQSection | None = None
    quantize: QuantizeSection | None = None

    @model_validator(mode="after")
    def _one_key(self) -> Step:
        given = [k for k in STEP_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a step has exactly one of {list(STEP_KINDS)}, got {given or 'none'}")
        q = self.quantize
        if q is not None and q.max_drop is not None and q.qat is not None:
            raise ValueError("quantize: max_drop (mixed precision) and qat do not combine; choose one")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in STEP_KINDS if getattr(self, k) is not None)

    def compile(self, seed: int) -> tuple[CompressionPlan, CompressSettings, bool]:
        """The plan, the settings of :func:`~torchslim.transforms.compress.compress`, and whether
        its training uses the baseline as teacher (a ``distill`` step does not compile)."""
        section = getattr(self, self.kind)
        cfg = section.config(seed)
        if self.kind == "channels":
            return CompressionPlan(), CompressSettings(channels=cfg), _teaches(section.finetune)
        if self.kind == "prune":
            return _rules("sparsity", cfg.sparsity), CompressSettings(prune=cfg), _teaches(section.finetune)
        if self.kind == "share":
            return _rules("bits", cfg.bits), CompressSettings(share=cfg), _teaches(section.finetune)
        if self.kind in ONE_SHOT:  # they choose their layers themselves: no plan rules
            return CompressionPlan(), CompressSettings(**{self.kind: cfg}), False
        assert self.kind == "quantize", "a distill step replaces the model; it does not compile to a plan"
        if section.max_drop is not None:
            return (
                CompressionPlan(),
                CompressSettings(mixed_precision=MixedPrecisionConfig(section.max_drop, cfg)),
                False,
            )
        return _rules("quantize", cfg.bits), CompressSettings(quantize=cfg), _teaches(section.qat)


def _teaches(finetune: Any) -> bool:
    return finetune is not None and finetune.teacher


def _rules(field: str, spec: Any) -> CompressionPlan:
    """A step's per-layer value as plan rules: one number for every layer, or the step's map (a
    ``None`` there skips the layer)."""
    if not isinstance(spec, Mapping):
        return CompressionPlan.from_dict({"re:.*": {field: spec}})
    rules = {k: {field: v} if v is not None else {"skip": f"the recipe's rule {k!r} skips it"} for k, v in spec.items()}
    return CompressionPlan.from_dict(rules)


RecoverySection = section(Recovery, name="RecoverySection")


class SearchSection(Strict):
    """Adaptive compression (``torchslim search``): the budget, the objective, the per-layer
    choices, how trials recover and are timed, and how many run."""

    budget: str | None = Field(None, description="'1pt' (absolute points) or '1%' (relative); --budget overrides")
    objective: Literal["size", "latency"] = "size"
    sampler: Literal["tpe", "nsga2"] = "tpe"
    trials: int = Field(40, ge=1)
    timeout_s: float | None = Field(None, gt=0)
    sparsity: list[float] | None = Field(
        None, description="sparsity choices; default: the objective's (none for latency)"
    )
    bits: list[int] | None = Field(None, description="codebook sizes; default: the objective's (none for latency)")
    channels: list[float] | None = Field(None, description="channel fractions; default [0, 0.25, 0.5]")
    int8: bool = True
    tables: list[int] | None = Field(
        None, description="codebook sizes for embedding tables (a text encoder's word table); default: none"
    )
    round_to: int = Field(8, ge=1)
    min_channels: int = Field(8, ge=1)
    recovery: RecoverySection = RecoverySection()
    final: RecoverySection = RecoverySection(samples=0, epochs=3, lr=1e-3, share_epochs=1)
    latency_backend: Literal["eager", "inductor", "onnxruntime"] = "onnxruntime"
    latency_batch: int = Field(64, ge=1)
    seeds: list[float] = Field(
        default_factory=lambda: [1.0, 2.0, 4.0, 8.0], description="budget multiples of the sensitivity-seeded plans"
    )
    workers: int = Field(1, ge=1, description="trials at once (more than 1 runs them on Ray)")
    ray_address: str | None = None

    @model_validator(mode="after")
    def _valid(self) -> SearchSection:
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
        given = {k: tuple(v) for k in ("sparsity", "bits", "channels", "tables") if (v := getattr(self, k)) is not None}
        return replace(base, **given, int8=self.int8, round_to=self.round_to, min_channels=self.min_channels)

    def config(self, threads: int, seed: int, **overrides: Any) -> SearchConfig:
        """The :class:`SearchConfig`; ``overrides`` (budget text, objective, trials, ...) win when not None."""
        given = {k: v for k, v in overrides.items() if v is not None}
        budget = given.pop("budget", self.budget)
        if budget is None:
            raise ConfigError(
                "no accuracy budget: pass --budget 1pt (points, absolute) or --budget 1% (relative), or set search.budget"
            )
        fields = {
            k: getattr(self, k) for k in ("objective", "sampler", "trials", "timeout_s", "workers", "ray_address")
        }
        fields |= given
        return SearchConfig(
            Budget.parse(budget),
            space=self.space(fields["objective"]),
            recovery=self.recovery.config(seed),
            final=self.final.config(seed),
            seeds=tuple(self.seeds),
            seed=seed,
            latency=LatencySetting(self.latency_backend, self.latency_batch, threads),
            **fields,
        )


class LatencySection(Strict):
    batches: list[int] = Field(default_factory=lambda: [1, 64])
    repeats: int = Field(50, ge=1)
    warmup: int = Field(10, ge=0)


class Outputs(Strict):
    dir: str = "runs/{name}"
    artifact: str = "{name}.tslim"


class Recipe(Strict):
    name: str
    model: ModelSpec
    data: DataSection = DataSection()
    baseline: TrainSection = TrainSection(epochs=15, lr=3e-3)
    steps: list[Step] = Field(default_factory=list, description="compression steps of `torchslim compress`")
    search: SearchSection | None = Field(None, description="settings of `torchslim search`")
    outputs: Outputs = Outputs()
    latency: LatencySection = LatencySection()
    threads: int = Field(2, ge=1)
    seed: int = 0
    task: str = Field(
        "classification", description=f"what the model is for: {', '.join(TASKS)}, or your 'pkg.module:Task'"
    )
    device: str = Field("auto", description="where training and calibration run: auto, cpu, cuda or cuda:N")
    _base: Path | None = PrivateAttr(None)

    @property
    def base(self) -> Path | None:
        """The folder of the recipe file, which relative paths and user modules are found from."""
        return self._base

    @model_validator(mode="after")
    def _steps_in_order(self) -> Recipe:
        kinds = [s.kind for s in self.steps]
        order = ["distill", *(k for k in ORDER if k in STEP_KINDS)]
        if kinds != sorted(kinds, key=order.index) or len(set(kinds)) != len(kinds):
            raise ValueError(
                f"steps: {kinds}: steps run in the order {order} (distill replaces the model by its student; channels "
                "resize the layers that pruning masks; the one-shot methods change the trained model without training: "
                "lowrank replaces layers by factors that sparsify and the rest work on; sharing clusters the pruned "
                "weights; gptq and awq replace Linear layers by int4 ones; quantization replaces the float layers "
                "left), each at most once (prune and channels take steps: N for several rounds)"
            )
        if "gptq" in kinds and "awq" in kinds:
            raise ValueError(
                "steps: gptq and awq both quantize the Linear layers of the blocks to int4: keep one of them"
            )
        int4 = next((k for k in ("gptq", "awq") if k in kinds), None)
        if int4 is not None and "quantize" in kinds:
            head = " (gptq's head: true quantizes the output head too)" if int4 == "gptq" else ""
            raise ValueError(
                f"steps: {int4} turns the Linear layers into int4 layers, which a quantize step cannot quantize "
                f"again: drop the quantize step{head}, or drop {int4} (quantize with scheme: dynamic and smooth: 0.5 "
                "is W8A8 SmoothQuant)"
            )
        for step in self.steps:
            if step.distill is not None and step.distill.width is not None:
                try:
                    step.distill.student_spec(self.model)
                except ConfigError as exc:
                    raise ValueError(f"steps: distill: {exc}") from None
        return self

    def out_dir(self) -> Path:
        return Path(self.outputs.dir.replace("{name}", self.name))

    def artifact_path(self) -> Path:
        return self.out_dir() / self.outputs.artifact.replace("{name}", self.name)


CONFIG_TYPES: dict[str, type] = {
    c.__name__: c
    for c in (
        TrainConfig, DataSpec, ChannelPruneConfig, MagnitudePruneConfig, ShareConfig, QuantizeConfig,
        MixedPrecisionConfig, DistillConfig, CompressSettings, Recovery, SearchSpace, LatencySetting, Budget,
        SearchConfig, LowRankConfig, SparsifyConfig, GPTQConfig, AWQConfig,
    )
}  # fmt: skip
"""The config types a tagged dict may name (:func:`torchslim.core.serial.from_dict`); nothing else
is ever constructed from a file."""

RECIPE_VERSION = 1


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a JSON-ready mapping with its schema version (what a report records)."""
    return {"recipe_version": RECIPE_VERSION, **recipe.model_dump(mode="json")}


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate :func:`recipe_to_dict` output (or any recipe mapping) back into a :class:`Recipe`."""
    data = dict(data)
    version = data.pop("recipe_version", RECIPE_VERSION)
    if not isinstance(version, int) or not 1 <= version <= RECIPE_VERSION:
        raise RecipeError(f"{source}: recipe version {version!r}; this torchslim reads 1 to {RECIPE_VERSION}")
    return _validate(data, source)


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Validate YAML text as a recipe; raise :class:`RecipeError` listing every problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with keys name, model, steps, ...")
    return _validate(raw, source)


def _validate(raw: dict[str, Any], source: str) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            what = "unknown key (misspelled?)" if err["type"] == "extra_forbidden" else err["msg"]
            what = what.removeprefix("Value error, ")
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
    recipe = parse_recipe(path.read_text(), str(path))
    recipe._base = path.resolve().parent
    return recipe
