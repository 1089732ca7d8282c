"""The straight-line recipe runner: baseline -> steps -> artifact -> verify -> evaluate -> report."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from torchslim.analysis.cost import count_params, layer_macs
from torchslim.artifact.inspect import inspect_file
from torchslim.artifact.runtime import compile_model
from torchslim.artifact.tslim import check_reproduces, load, save
from torchslim.core.data import load_data
from torchslim.core.models import build_model
from torchslim.core.plan import CompressionPlan
from torchslim.errors import RecipeError
from torchslim.evaluate.latency import measure_latency
from torchslim.evaluate.metrics import accuracy, agreement, file_bytes, fp32_safetensors_bytes
from torchslim.recipe.schema import DistillSection, Recipe, Step
from torchslim.report.records import Measurement, RunReport, StepRecord
from torchslim.report.render import write_report
from torchslim.search.result import SearchResult
from torchslim.train.baseline import trained_baseline
from torchslim.train.fit import Progress, fit
from torchslim.transforms.compress import compress
from torchslim.transforms.distill import distill

log = logging.getLogger(__name__)
ProgressFactory = Callable[[str], Progress]
"""Given a description of a long step, returns the ``progress(done, total)`` callback for it."""


def _apply(step: Step, model: torch.nn.Module, data, seed: int, progress: Progress | None, baseline, structure: list):
    """Run one compression step through ``compress``; return the compressed model and its plan.
    Channel and quantization results join ``structure`` for the report."""
    plan, settings, teaches = step.compile(seed)
    done = compress(
        model, plan, data, settings=settings, teacher=baseline if teaches else None, progress=lambda _name: progress
    )
    if "channels" in done.results:
        structure.append({"criterion": settings.channels.criterion, **done.results["channels"].to_dict()})
    if "quantize" in done.results:
        structure.append({"quantization": done.results["quantize"].to_dict(), "backend": step.quantize.backend})
    if "mixed_precision" in done.results:
        mixed = done.results["mixed_precision"]
        structure.append(
            {
                "quantization": mixed.quantized.to_dict(),
                "mixed_precision": mixed.to_dict() | {"quantized": None},
                "backend": step.quantize.backend,
            }
        )
    return done.model, done.plan


def _distill(
    section: DistillSection, recipe: Recipe, teacher: torch.nn.Module, data, bar: ProgressFactory
) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """The distilled student, its zoo spec, and the report entry: student trained alone (same
    initial weights, epochs and seed, no teacher) and student distilled (the teacher's row is
    the report's baseline, added by the caller)."""
    name, kwargs = section.student_spec(recipe.model)
    cfg = section.config(recipe.seed)
    torch.manual_seed(recipe.seed)
    student = build_model(name, **kwargs)
    init = copy.deepcopy(student.state_dict())
    result = distill(student, cfg, data, teacher=teacher, progress=bar("distill: student with teacher"))

    def row(model: torch.nn.Module, seconds: float | None) -> dict[str, Any]:
        return {"accuracy": accuracy(model, data.eval_loader()), "params": count_params(model), "train_s": seconds}

    entry = {
        "student": {"name": name, "kwargs": kwargs},
        "student_distilled": row(student, result.seconds),
        "student_alone": None,
    } | result.to_dict()
    if section.compare_alone:
        alone = build_model(name, **kwargs)
        alone.load_state_dict(init)
        t0 = time.perf_counter()
        fit(alone, data, cfg.train, bar("distill: student alone"))
        entry["student_alone"] = row(alone, time.perf_counter() - t0)
    return student, {"zoo": name, "kwargs": kwargs}, entry


@dataclass
class _Run:
    """What the steps of one recipe run have produced so far."""

    model: torch.nn.Module
    zoo: dict[str, Any]
    plan: CompressionPlan = field(default_factory=CompressionPlan)
    steps: list[StepRecord] = field(default_factory=list)
    structure: list[dict[str, Any]] = field(default_factory=list)
    distilled: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def run_recipe(recipe: Recipe, progress: ProgressFactory | None = None) -> RunReport:
    """Run ``recipe`` end to end; write the artifact and reports; return the report.

    Example:
        >>> report = run_recipe(load_recipe("lenet_300_100"))  # doctest: +SKIP
        >>> report.compressed.ratio  # doctest: +SKIP
    """
    if not recipe.steps:
        raise RecipeError(
            f"recipe {recipe.name!r} has no steps: add steps for `torchslim compress`, or run `torchslim search` with it"
        )
    bar = progress or (lambda _description: None)
    torch.set_num_threads(recipe.threads)
    start = time.perf_counter()
    data = load_data(recipe.data.config(recipe.seed))
    base_cfg = recipe.baseline.config(recipe.seed)
    baseline, cached = trained_baseline(recipe.model.name, data, base_cfg, recipe.model.kwargs, bar("baseline"))
    run = _Run(baseline, {"zoo": recipe.model.name, "kwargs": recipe.model.kwargs})  # every step returns a new model
    run.timings["baseline_s"] = time.perf_counter() - start
    for i, step in enumerate(recipe.steps, 1):
        t0 = time.perf_counter()
        if step.distill is not None:  # the first step (the schema says so): the student replaces the model
            run.model, run.zoo, run.distilled = _distill(step.distill, recipe, baseline, data, bar)
            step_plan = CompressionPlan()
        else:
            run.model, step_plan = _apply(
                step, run.model, data, recipe.seed, bar(f"step {i}: {step.kind}"), baseline, run.structure
            )
            run.plan = run.plan.updated(step_plan)
        run.steps.append(StepRecord(i, step.kind, time.perf_counter() - t0, step_plan.to_dict()))
        run.timings[f"step{i}_{step.kind}_s"] = run.steps[-1].seconds
    run.model.eval()
    t0 = time.perf_counter()
    artifact = recipe.artifact_path()
    save(
        run.model,
        artifact,
        plan=run.plan.to_dict(),
        metrics={"accuracy": accuracy(run.model, data.eval_loader())},
        zoo=run.zoo,
    )
    restored = load(artifact)
    check_reproduces(run.model, restored, (x for x, _ in data.eval_loader()), artifact)
    run.timings["save_verify_s"] = time.perf_counter() - t0
    report = _report(recipe, run, baseline, restored, data, cached)
    report.timings["total_s"] = time.perf_counter() - start
    write_report(report, recipe.out_dir())
    return report


def _report(
    recipe: Recipe, run: _Run, baseline: torch.nn.Module, restored: torch.nn.Module, data, cached: bool
) -> RunReport:
    """Measure the baseline and the model loaded from the file; assemble the report."""
    quantized = recipe.steps[-1].quantize
    backend = quantized.backend if quantized is not None else "eager"
    artifact = recipe.artifact_path()
    before = _measure(baseline, data, recipe, fp32_safetensors_bytes(baseline))
    after = _measure(restored, data, recipe, file_bytes(artifact), backend)
    after.agreement = agreement(restored, baseline, data.eval_loader())
    after.ratio = before.bytes / after.bytes
    if run.distilled is not None:
        run.distilled["teacher"] = {"accuracy": before.accuracy, "params": before.params, "train_s": None}
    return RunReport(
        recipe=recipe.name,
        model=recipe.model.model_dump(),
        data=asdict(data.spec),
        threads=recipe.threads,
        baseline_cached=cached,
        baseline=before,
        compressed=after,
        plan=run.plan.to_dict(),
        layers=[row.to_dict() for row in inspect_file(artifact)[0]],
        artifact=str(artifact),
        steps=run.steps,
        structure=[s for s in run.structure if "quantization" not in s],
        quantization=next((s for s in run.structure if "quantization" in s), None),
        distillation=run.distilled,
        timings=run.timings,
    )


def _measure(model: torch.nn.Module, data, recipe: Recipe, nbytes: int, backend: str = "eager") -> Measurement:
    lat = recipe.latency
    example = data.eval.tensors[0]
    latency = {}
    for b in lat.batches:
        runner = compile_model(model, backend, example[:b], recipe.threads)
        timing = measure_latency(runner, example[:b], recipe.threads, lat.warmup, lat.repeats).to_dict()
        latency[f"batch{b}"] = timing | {"backend": backend}
    return Measurement(
        accuracy=accuracy(model, data.eval_loader()),
        bytes=nbytes,
        params=count_params(model),
        macs=sum(layer_macs(model, example[:1]).values()),
        nonzero=int(sum(int((t != 0).sum()) for t in model.state_dict().values())),
        latency=latency,
    )


def run_search(
    recipe: Recipe,
    progress: ProgressFactory | None = None,
    on_trial: Callable[[dict], None] | None = None,
    **overrides: Any,
) -> SearchResult:
    """Search plans for the recipe's model (its ``search`` section, ``overrides`` winning); write
    the delivered `.tslim` and report.json / report.md / report.html; return what it measured.

    Example:
        >>> report = run_search(load_recipe("lenet5"), budget="1pt", objective="size")  # doctest: +SKIP
    """
    from torchslim.recipe.schema import SearchSection
    from torchslim.report.html import write_search_report
    from torchslim.search.run import search

    bar = progress or (lambda _description: None)
    config = (recipe.search or SearchSection()).config(recipe.threads, recipe.seed, **overrides)
    torch.set_num_threads(recipe.threads)
    start = time.perf_counter()
    data = load_data(recipe.data.config(recipe.seed))
    base_cfg = recipe.baseline.config(recipe.seed)
    assert base_cfg is not None
    baseline, cached = trained_baseline(recipe.model.name, data, base_cfg, recipe.model.kwargs, bar("baseline"))
    baseline_s = time.perf_counter() - start
    zoo = {"zoo": recipe.model.name, "kwargs": recipe.model.kwargs}
    report = search(
        baseline, data, config, recipe.out_dir(), name=recipe.name, zoo=zoo, progress=bar, on_trial=on_trial
    )
    report.baseline_cached = cached
    report.timings["baseline_s"] = baseline_s
    write_search_report(report, recipe.out_dir())
    return report
