"""The straight-line recipe runner: baseline -> steps -> artifact -> verify -> evaluate -> report."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from torchslim.analysis.cost import count_params, layer_macs
from torchslim.artifact.inspect import inspect_file
from torchslim.artifact.runtime import compile_model, timeable
from torchslim.artifact.speed import keep_faster_
from torchslim.artifact.tslim import check_reproduces, load, save
from torchslim.core.data import Data
from torchslim.core.device import model_device, place
from torchslim.core.models import build_model
from torchslim.core.plan import CompressionPlan
from torchslim.core.task import Embedding
from torchslim.errors import RecipeError
from torchslim.evaluate.latency import measure_latency
from torchslim.evaluate.metrics import evaluate, fidelity, file_bytes, fp32_safetensors_bytes
from torchslim.recipe.builders import model_builder, recipe_data, task_of, trained_model
from torchslim.recipe.schema import DistillSection, Recipe, Step
from torchslim.report.records import Measurement, RunReport, StepRecord
from torchslim.report.render import write_report
from torchslim.search.result import SearchResult
from torchslim.train.baseline import trained_baseline
from torchslim.train.checkpoint import checkpoints
from torchslim.train.distributed import barrier, is_main, local_processes
from torchslim.train.fit import Progress, fit
from torchslim.transforms.compress import ONE_SHOT, compress
from torchslim.transforms.distill import distill

log = logging.getLogger(__name__)
ProgressFactory = Callable[[str], Progress]
"""Given a description of a long step, returns the ``progress(done, total)`` callback for it."""


def _apply(
    step: Step, model: torch.nn.Module, data, recipe: Recipe, progress: Progress | None, baseline, structure: list
):
    """Run one compression step through ``compress``; return the compressed model, its plan and
    the verbs' results. Channel and quantization results join ``structure`` for the report. A
    quantize step on a compiling backend then keeps float where int8 is slower there
    (:func:`keep_faster_`)."""
    plan, settings, teaches = step.compile(recipe.seed)
    done = compress(
        model, plan, data, settings=settings, teacher=baseline if teaches else None, progress=lambda _name: progress
    )
    if "channels" in done.results:
        structure.append({"criterion": settings.channels.criterion, **done.results["channels"].to_dict()})
    q = step.quantize
    if q is None or ("quantize" not in done.results and "mixed_precision" not in done.results):
        return done.model, done.plan, done.results
    entry: dict[str, Any] = {"backend": q.backend}
    if "quantize" in done.results:
        entry["quantization"] = done.results["quantize"].to_dict()
    else:
        mixed = done.results["mixed_precision"]
        entry |= {"quantization": mixed.quantized.to_dict(), "mixed_precision": mixed.to_dict() | {"quantized": None}}
    on_cpu = model_device(done.model).type == "cpu"  # the backends timed here run on the CPU
    if q.keep_faster and q.backend != "eager" and on_cpu and timeable(data.example_input(1), q.backend):
        examples = [data.example_input(b) for b in recipe.latency.batches]
        check = keep_faster_(done.model, model, q.backend, examples, recipe.threads, progress)
        entry["speed"] = check.to_dict()
        done.plan = done.plan.updated(check.plan())
    structure.append(entry)
    return done.model, done.plan, done.results


def _distill(
    section: DistillSection, recipe: Recipe, teacher: torch.nn.Module, data: Data, bar: ProgressFactory
) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any], Callable[[], torch.nn.Module] | None]:
    """The distilled student, what the report records of it, the report entry (student trained
    alone -- same initial weights, epochs and seed, no teacher -- and student distilled; the
    teacher's row is the report's baseline, added by the caller), and a user student's builder."""
    build, spec, rebuild = _student(section, recipe)
    cfg = section.config(recipe.seed)
    torch.manual_seed(recipe.seed)
    student = build()
    init = copy.deepcopy(student.state_dict())
    result = distill(
        student, cfg, data, teacher=teacher, progress=bar("distill: student with teacher"), device=recipe.device
    )

    def row(model: torch.nn.Module, seconds: float | None) -> dict[str, Any]:
        score = evaluate(model, data.eval_loader(), data.task)
        return {"accuracy": score, "params": count_params(model), "train_s": seconds}

    entry = {
        "student": {"name": spec.get("zoo") or spec["builder"], "kwargs": spec["kwargs"]},
        "student_distilled": row(student, result.seconds),
        "student_alone": None,
    } | result.to_dict()
    if section.compare_alone:
        alone = place(build(), recipe.device)
        alone.load_state_dict(init)
        t0 = time.perf_counter()
        fit(alone, data, cfg.train, bar("distill: student alone"))
        entry["student_alone"] = row(alone, time.perf_counter() - t0)
    return student, spec, entry, rebuild


def _student(section: DistillSection, recipe: Recipe):
    """``(build, record, rebuild)`` of the distillation student: a user builder, a zoo model,
    or one derived from a zoo teacher."""
    if section.student is not None and section.student.builder is not None:
        build = model_builder(section.student, recipe.base, "steps.distill.student")
        return build, {"builder": section.student.builder, "kwargs": section.student.kwargs}, build
    name, kwargs = section.student_spec(recipe.model)
    return (lambda: build_model(name, **kwargs)), {"zoo": name, "kwargs": kwargs}, None


@dataclass
class _Run:
    """What the steps of one recipe run have produced so far."""

    model: torch.nn.Module
    zoo: dict[str, Any]
    plan: CompressionPlan = field(default_factory=CompressionPlan)
    steps: list[StepRecord] = field(default_factory=list)
    structure: list[dict[str, Any]] = field(default_factory=list)
    oneshot: list[dict[str, Any]] = field(default_factory=list)
    distilled: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    rebuild: Callable[[], torch.nn.Module] | None = None  # a user model's builder (zoo models: None)


@dataclass
class Source:
    """A recipe's data and trained baseline, and how to build its model afresh."""

    data: Data
    baseline: torch.nn.Module
    ready: bool  # came trained: from the baseline cache or the recipe's weights
    zoo: dict[str, Any]  # what the report records of the model (a zoo name or a builder, and kwargs)
    build: Callable[[], torch.nn.Module] | None  # a user model's builder; None for zoo models


def model_source(recipe: Recipe, bar: ProgressFactory) -> Source:
    """The recipe's task and data; its model trained (from weights, the cache, or the baseline
    section) and moved to the recipe's device."""
    spec, base = recipe.model, recipe.base
    data = recipe_data(recipe.data, recipe.seed, task_of(recipe.task, base), base)
    build = model_builder(spec, base) if spec.builder is not None else None
    baseline = trained_model(spec, base)
    ready = baseline is not None
    base_cfg = recipe.baseline.config(recipe.seed)
    if baseline is None and spec.name is not None and data.spec is not None:
        baseline, ready = trained_baseline(spec.name, data, base_cfg, spec.kwargs, bar("baseline"))
    elif baseline is None:
        torch.manual_seed(recipe.seed)
        baseline = (build or model_builder(spec, base))()
        place(baseline, recipe.device)
        data.check(baseline)
        fit(baseline, data, base_cfg, bar("baseline"))
    place(baseline, recipe.device).eval()
    if isinstance(data.task, Embedding) and data.task.reference is None:  # scored against the baseline's output
        data = replace(data, task=replace(data.task, reference=baseline))
    kind = {"zoo": spec.name} if build is None else {"builder": spec.builder}
    return Source(data, baseline, ready, kind | {"kwargs": spec.kwargs}, build)


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
    folder = recipe.out_dir() / "checkpoints"
    with checkpoints(folder):  # a rerun after a killed run resumes its training from here
        report = _run_recipe(recipe, progress)
    if is_main():
        shutil.rmtree(folder, ignore_errors=True)
    return report


def _run_recipe(recipe: Recipe, progress: ProgressFactory | None) -> RunReport:
    bar = progress or (lambda _description: None)
    torch.set_num_threads(max(1, recipe.threads // local_processes()))  # processes on one machine share its cores
    start = time.perf_counter()
    source = model_source(recipe, bar)
    data, baseline, cached = source.data, source.baseline, source.ready
    run = _Run(baseline, source.zoo, rebuild=source.build)  # every step returns a new model
    run.timings["baseline_s"] = time.perf_counter() - start
    for i, step in enumerate(recipe.steps, 1):
        t0 = time.perf_counter()
        results: dict[str, Any] = {}
        if step.distill is not None:  # the first step (the schema says so): the student replaces the model
            run.model, run.zoo, run.distilled, run.rebuild = _distill(step.distill, recipe, baseline, data, bar)
            step_plan = CompressionPlan()
        else:
            run.model, step_plan, results = _apply(
                step, run.model, data, recipe, bar(f"step {i}: {step.kind}"), baseline, run.structure
            )
            run.plan = run.plan.updated(step_plan)
        if step.kind in ONE_SHOT:  # per-layer rows for the report
            run.oneshot.append({"step": i, "kind": step.kind, **results[step.kind].to_dict()})
        summary = "; ".join(r.summary() for r in results.values() if hasattr(r, "summary")) or None
        run.steps.append(StepRecord(i, step.kind, time.perf_counter() - t0, step_plan.to_dict(), summary))
        run.timings[f"step{i}_{step.kind}_s"] = run.steps[-1].seconds
    run.model.cpu().eval()  # the artifact is measured and verified on the CPU
    baseline.cpu()
    if not is_main():  # rank 0 alone saves, verifies and reports; the other ranks take its report
        barrier()
        path = recipe.out_dir() / "report.json"
        return RunReport.from_dict(json.loads(path.read_text()), str(path))
    t0 = time.perf_counter()
    artifact = recipe.artifact_path()
    metric = data.task.metric.name
    save(
        run.model,
        artifact,
        plan=run.plan.to_dict(),
        metrics={metric: evaluate(run.model, data.eval_loader(), data.task)},
        zoo=run.zoo if run.rebuild is None else None,
    )
    restored = load(artifact, model=run.rebuild)
    check_reproduces(run.model, restored, (data.task.split(b)[0] for b in data.eval_loader()), artifact)
    run.timings["save_verify_s"] = time.perf_counter() - t0
    report = _report(recipe, run, baseline, restored, data, cached)
    report.timings["total_s"] = time.perf_counter() - start
    write_report(report, recipe.out_dir())
    barrier()
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
    after.agreement = fidelity(restored, baseline, data.eval_loader(), data.task)
    after.ratio = before.bytes / after.bytes
    if run.distilled is not None:
        run.distilled["teacher"] = {"accuracy": before.accuracy, "params": before.params, "train_s": None}
    return RunReport(
        recipe=recipe.name,
        model=recipe.model.model_dump(exclude_none=True),
        data=asdict(data.spec) if data.spec is not None else recipe.data.described(),
        threads=recipe.threads,
        baseline_cached=cached,
        baseline=before,
        compressed=after,
        plan=run.plan.to_dict(),
        layers=[row.to_dict() for row in inspect_file(artifact)[0]],
        artifact=str(artifact),
        steps=run.steps,
        structure=[s for s in run.structure if "quantization" not in s],
        oneshot=run.oneshot,
        quantization=next((s for s in run.structure if "quantization" in s), None),
        distillation=run.distilled,
        timings=run.timings,
        metric=asdict(data.task.metric),
        fidelity=asdict(data.task.fidelity),
    )


def _measure(model: torch.nn.Module, data, recipe: Recipe, nbytes: int, backend: str = "eager") -> Measurement:
    lat = recipe.latency
    latency = {}
    for b in lat.batches:
        example = data.example_input(b)
        runner = compile_model(model, backend, example, recipe.threads)
        timing = measure_latency(runner, example, recipe.threads, lat.warmup, lat.repeats).to_dict()
        latency[f"batch{b}"] = timing | {"backend": backend}
    return Measurement(
        accuracy=evaluate(model, data.eval_loader(), data.task),
        bytes=nbytes,
        params=count_params(model),
        macs=sum(layer_macs(model, data.example_input(1)).values()),
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
    torch.set_num_threads(max(1, recipe.threads // local_processes()))  # processes on one machine share its cores
    start = time.perf_counter()
    source = model_source(recipe, bar)
    baseline, data, cached = source.baseline.cpu(), source.data, source.ready
    baseline_s = time.perf_counter() - start
    zoo = source.zoo if source.build is None else None  # a user model is loaded into its own builder
    report = search(
        baseline, data, config, recipe.out_dir(), name=recipe.name, zoo=zoo, progress=bar, on_trial=on_trial
    )
    if source.build is not None:
        report.model = {"name": source.zoo["builder"], "kwargs": dict(source.zoo["kwargs"])}
    report.baseline_cached = cached
    report.timings["baseline_s"] = baseline_s
    write_search_report(report, recipe.out_dir())
    return report
