"""The straight-line recipe runner: baseline -> steps -> artifact -> verify -> evaluate -> report."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict
from typing import Any, Callable

import torch

from torchslim.analysis.cost import count_params, layer_macs
from torchslim.artifact.inspect import inspect_file
from torchslim.artifact.runtime import compile_model
from torchslim.artifact.tslim import load, save
from torchslim.core.data import DataSpec, load_data
from torchslim.core.models import build_model
from torchslim.core.plan import CompressionPlan
from torchslim.errors import RecipeError, TorchslimError
from torchslim.evaluate.latency import measure_latency
from torchslim.evaluate.metrics import accuracy, agreement, file_bytes, fp32_safetensors_bytes
from torchslim.recipe.schema import DistillSection, Recipe, Step, TrainSection
from torchslim.report.render import write_report
from torchslim.train.baseline import trained_baseline
from torchslim.train.fit import Progress, TrainConfig, fit
from torchslim.transforms.channels import channel_prune_
from torchslim.transforms.distill import distill
from torchslim.transforms.mixed_precision import MixedPrecisionConfig, mixed_precision_
from torchslim.transforms.prune import MagnitudePruneConfig, prune_
from torchslim.transforms.quantize import quantize_
from torchslim.transforms.share import ShareConfig, share_

log = logging.getLogger(__name__)
ProgressFactory = Callable[[str], Progress]
"""Given a description of a long step, returns the ``progress(done, total)`` callback for it."""


def _train(section: TrainSection | None, seed: int) -> TrainConfig | None:
    if section is None:
        return None
    return TrainConfig(
        section.epochs, section.lr, section.weight_decay, seed, section.distill_weight, section.temperature
    )


def _apply(
    step: Step, model: torch.nn.Module, data, seed: int, progress: Progress | None, baseline, structure: list
) -> CompressionPlan:
    if step.quantize is not None:
        q = step.quantize
        teacher = baseline if q.qat is not None and q.qat.teacher else None
        if q.max_drop is not None:
            mixed = mixed_precision_(model, MixedPrecisionConfig(q.max_drop, q.config()), data)
            assert mixed.quantized is not None
            entry = {"quantization": mixed.quantized.to_dict(), "mixed_precision": mixed.to_dict() | {"quantized": None}}
        else:
            entry = {"quantization": quantize_(model, q.config(_train(q.qat, seed)), data, progress=progress, teacher=teacher).to_dict()}
        structure.append(entry | {"backend": q.backend})
        return CompressionPlan()
    section = step.channels or step.prune or step.share
    assert section is not None  # the schema guarantees exactly one
    teacher = baseline if section.finetune is not None and section.finetune.teacher else None
    if step.channels is not None:
        cfg = step.channels.config(_train(step.channels.finetune, seed), seed)
        result = channel_prune_(model, cfg, data, progress=progress, teacher=teacher)
        structure.append({"criterion": cfg.criterion, **result.to_dict()})
        return result.plan
    if step.prune is not None:
        p = step.prune
        cfg = MagnitudePruneConfig(p.sparsity, p.scope, p.steps, _train(p.finetune, seed))  # type: ignore[arg-type]
        return prune_(model, cfg, data, progress, teacher).plan
    s = step.share
    assert s is not None
    cfg = ShareConfig(s.bits, _train(s.finetune, seed), s.kmeans_iters, s.half_biases)  # type: ignore[arg-type]
    return share_(model, cfg, data, progress, teacher).plan


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
    result = distill(student, teacher, data, cfg, progress=bar("distill: student with teacher"))

    def row(model: torch.nn.Module, seconds: float | None) -> dict[str, Any]:
        return {"accuracy": accuracy(model, data.eval_loader()), "params": count_params(model), "train_s": seconds}

    entry = {"student": {"name": name, "kwargs": kwargs}, "student_distilled": row(student, result.seconds),
             "student_alone": None} | result.to_dict()  # fmt: skip
    if section.compare_alone:
        alone = build_model(name, **kwargs)
        alone.load_state_dict(init)
        t0 = time.perf_counter()
        fit(alone, data, cfg.train, bar("distill: student alone"))
        entry["student_alone"] = row(alone, time.perf_counter() - t0)
    return student, {"zoo": name, "kwargs": kwargs}, entry


def run_recipe(recipe: Recipe, progress: ProgressFactory | None = None) -> dict[str, Any]:
    """Run ``recipe`` end to end; write the artifact and reports; return the report data.

    Example:
        >>> report = run_recipe(load_recipe("lenet_300_100"))  # doctest: +SKIP
    """
    if not recipe.steps:
        raise RecipeError(
            f"recipe {recipe.name!r} has no steps: add steps for `torchslim compress`, or run `torchslim search` with it"
        )
    bar = progress or (lambda _description: None)
    torch.set_num_threads(recipe.threads)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = load_data(DataSpec(**recipe.data.model_dump()))
    base_cfg = _train(recipe.baseline, recipe.seed)
    assert base_cfg is not None
    baseline, cached = trained_baseline(recipe.model.name, data, base_cfg, recipe.model.kwargs, bar("baseline"))
    timings["baseline_s"] = time.perf_counter() - start

    model, plan, structure = copy.deepcopy(baseline), CompressionPlan(), []
    zoo, distilled = {"zoo": recipe.model.name, "kwargs": recipe.model.kwargs}, None
    for i, step in enumerate(recipe.steps):
        t0 = time.perf_counter()
        if step.distill is not None:  # the first step (the schema says so): the student replaces the model
            model, zoo, distilled = _distill(step.distill, recipe, baseline, data, bar)
            timings[f"step{i + 1}_distill_s"] = time.perf_counter() - t0
            continue
        plan = plan.updated(_apply(step, model, data, recipe.seed, bar(f"step {i + 1}: {step.kind}"), baseline, structure))
        timings[f"step{i + 1}_{step.kind}_s"] = time.perf_counter() - t0
    model.eval()

    quantized = recipe.steps[-1].quantize
    backend = quantized.backend if quantized is not None else "eager"
    out, artifact = recipe.out_dir(), recipe.artifact_path()
    t0 = time.perf_counter()
    mem_acc = accuracy(model, data.eval_loader())
    save(model, artifact, plan=plan.to_dict(), metrics={"accuracy": mem_acc}, zoo=zoo)
    restored = load(artifact)
    _check_same(model, restored, data)
    timings["save_verify_s"] = time.perf_counter() - t0

    report = {
        "recipe": recipe.name,
        "model": recipe.model.model_dump(),
        "data": asdict(data.spec),
        "threads": recipe.threads,
        "baseline_cached": cached,
        "baseline": _measure(baseline, data, recipe, fp32_safetensors_bytes(baseline)),
        "compressed": _measure(restored, data, recipe, file_bytes(artifact), backend),
        "plan": plan.to_dict(),
        "layers": [row.to_dict() for row in inspect_file(artifact)[0]],
        "structure": [s for s in structure if "quantization" not in s],
        "quantization": next((s for s in structure if "quantization" in s), None),
        "distillation": distilled,
        "artifact": str(artifact),
    }
    if distilled is not None:
        distilled["teacher"] = {"accuracy": report["baseline"]["accuracy"], "params": report["baseline"]["params"], "train_s": None}
    report["compressed"]["agreement"] = agreement(restored, baseline, data.eval_loader())
    report["compressed"]["ratio"] = report["baseline"]["bytes"] / report["compressed"]["bytes"]
    timings["total_s"] = time.perf_counter() - start
    report["timings"] = timings
    write_report(report, out)
    return report


@torch.no_grad()
def _check_same(model: torch.nn.Module, restored: torch.nn.Module, data) -> None:
    """The file must reproduce the in-memory compressed model exactly, on the whole eval split."""
    for x, _ in data.eval_loader():
        if not torch.equal(model(x), restored(x)):
            raise TorchslimError("the saved file does not reproduce the compressed model's outputs exactly")


def _measure(model: torch.nn.Module, data, recipe: Recipe, nbytes: int, backend: str = "eager") -> dict[str, Any]:
    lat = recipe.latency
    example = data.eval.tensors[0]
    latency = {}
    for b in lat.batches:
        runner = compile_model(model, backend, example[:b], recipe.threads)
        timing = measure_latency(runner, example[:b], recipe.threads, lat.warmup, lat.repeats).to_dict()
        latency[f"batch{b}"] = timing | {"backend": backend}
    return {
        "accuracy": accuracy(model, data.eval_loader()),
        "bytes": nbytes,
        "params": count_params(model),
        "macs": sum(layer_macs(model, example[:1]).values()),
        "nonzero": int(sum(int((t != 0).sum()) for t in model.state_dict().values())),
        "latency": latency,
    }


def run_search(
    recipe: Recipe, progress: ProgressFactory | None = None, on_trial: Callable[[dict], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:  # fmt: skip
    """Search plans for the recipe's model (its ``search`` section, ``overrides`` winning); write
    the delivered `.tslim` and report.json / report.md / report.html; return the report data.

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
    data = load_data(DataSpec(**recipe.data.model_dump()))
    base_cfg = _train(recipe.baseline, recipe.seed)
    assert base_cfg is not None
    baseline, cached = trained_baseline(recipe.model.name, data, base_cfg, recipe.model.kwargs, bar("baseline"))
    baseline_s = time.perf_counter() - start
    zoo = {"zoo": recipe.model.name, "kwargs": recipe.model.kwargs}
    report = search(baseline, data, config, recipe.out_dir(), name=recipe.name, zoo=zoo, progress=bar, on_trial=on_trial)
    report["baseline_cached"] = cached
    report["timings"]["baseline_s"] = baseline_s
    write_search_report(report, recipe.out_dir())
    return report
