"""Adaptive compression end to end: sensitivity -> seeded multi-objective search -> the chosen
plan applied, recovered with distillation, saved, loaded back and measured -> a ``SearchResult``.

Every figure about the delivered model is measured on the model loaded from its `.tslim`
file. The choice is made on the search split; the budget is judged on the held-out split,
which no trial ever saw.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_tensors
from torch import nn

from torchslim.analysis.cost import count_params
from torchslim.artifact.runtime import timeable
from torchslim.artifact.tslim import check_reproduces, load, save
from torchslim.core.data import Data
from torchslim.core.files import write_atomic
from torchslim.core.plan import CompressionPlan
from torchslim.core.task import Metric
from torchslim.errors import ConfigError
from torchslim.evaluate.metrics import file_bytes
from torchslim.search.config import SearchConfig
from torchslim.search.parallel import WorkerSpec, check_rebuildable, make_executor
from torchslim.search.result import (
    Baseline,
    BudgetFacts,
    Choice,
    Delivered,
    LatencySetting,
    LayerFacts,
    PlanRow,
    SearchFacts,
    SearchResult,
    Sensitivity,
)
from torchslim.search.sensitivity import cached_sensitivity, fingerprint
from torchslim.search.space import Layers, apply_plan
from torchslim.search.study import (
    choose,
    finished,
    ladder_step,
    open_study,
    recover_interrupted,
    run_lock,
    run_trials,
    seed_study,
    trial_rows,
)
from torchslim.search.trial import Evaluator, latency_ms

log = logging.getLogger(__name__)
Bar = Callable[[str], Callable[[int, int], None] | None]


def search(
    model: nn.Module,
    data: Data,
    config: SearchConfig,
    run_dir: str | Path,
    *,
    name: str = "search",
    zoo: Mapping[str, Any] | None = None,
    progress: Bar | None = None,
    on_trial: Callable[[dict], None] | None = None,
) -> SearchResult:
    """Search per-layer plans for ``model`` under ``config.budget``; deliver the best as a file.

    ``data`` is any :class:`Data`: its task's metric is what the budget protects (accuracy for
    classification; a budget in points needs a percentage metric, else give it relative, "1%"),
    and its evaluation loader is split into the search and held-out halves. Parallel trials on
    Ray need a zoo model and a built-in dataset, which each worker loads again.

    Writes into ``run_dir``: ``study.sqlite3`` (the trials; rerunning resumes), ``sensitivity.json``,
    ``baseline.safetensors``, ``<name>.tslim`` (the delivered model). Returns what it measured.

    Example:
        >>> result = search(model, data, SearchConfig(Budget.parse("1pt")), "runs/s")  # doctest: +SKIP
        >>> result.final.ratio, result.final.within_budget  # doctest: +SKIP
    """
    _check_inputs(model, data, config)
    check_rebuildable(zoo is not None and data.spec is not None, config.workers, config.ray_address, config.use_ray)
    run_dir, bar = Path(run_dir), progress or (lambda _d: None)
    with run_lock(run_dir):
        start = time.perf_counter()
        torch.set_num_threads(config.latency.threads)
        model = model.eval()
        weights = run_dir / "baseline.safetensors"
        write_atomic(weights, save_tensors({k: v.detach().contiguous() for k, v in model.state_dict().items()}))
        evaluator = Evaluator(model, data, config, zoo)
        max_drop = config.budget.max_drop(evaluator.base_accuracy)
        layers = Layers.of(model, data.example_input(2), config.space)
        curves, cached = cached_sensitivity(
            run_dir / "sensitivity.json",
            model,
            data,
            evaluator.search_batches,
            config.space,
            layers,
            "search",
            bar("sensitivity"),
        )
        timings = {"sensitivity_s": time.perf_counter() - start}
        key = fingerprint(model, config.space, f"search split, seed {config.seed}")
        study = open_study(run_dir, name, config, key)
        spec = _worker_spec(zoo, weights, data, config)
        report_trial = None if on_trial is None else (lambda info: on_trial(info | {"metric": data.task.metric}))
        facts = _run_study(
            study,
            evaluator,
            spec,
            layers=layers,
            curves=curves,
            max_drop=max_drop,
            on_trial=report_trial,
            timings=timings,
        )
        trials = finished(study)
        chosen = choose(trials, config, max_drop)
        t0 = time.perf_counter()
        baseline = _baseline(evaluator, model, config)
        path = run_dir / f"{name}.tslim"
        final = None if chosen is None else deliver(evaluator, config, chosen, path, max_drop)
        timings["final_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - start
        return SearchResult(
            **_header(model, data, config, name, zoo, max_drop),
            metric=asdict(data.task.metric),
            baseline=baseline,
            chosen=_chosen(chosen, max_drop, config, data.task.metric),
            final=final,
            trials=trial_rows(trials, max_drop, config.objective),
            sensitivity=Sensitivity(curves, "search", cached),
            layers=LayerFacts(list(layers.weights + layers.tables), list(layers.groups), dict(layers.skipped)),
            plan_table=_plan_table(final.plan if final else chosen and chosen["plan"], layers),
            search=_search_facts(config, trials, facts, timings, run_dir / "study.sqlite3", name),
            timings=timings,
        )


def _check_inputs(model: nn.Module, data: Data, config: SearchConfig) -> None:
    """Refuse, before any work, a budget the metric cannot take and a latency that cannot be timed."""
    metric = data.task.metric
    if not config.budget.relative and metric.unit != "%":
        raise ConfigError(
            f"budget {config.budget.text()}: points apply to a percentage, and the {data.task.name} task's metric "
            f"is {metric.name}; give the budget relative to the baseline, e.g. '1%' (at most 1 % worse)"
        )
    data.check(model)
    inputs = data.example_input(1)
    if not timeable(inputs, config.latency.backend):
        if config.objective == "latency":
            raise ConfigError(
                f"latency backend {config.latency.backend!r} compiles models that take tensors (one, a tuple or a "
                f"dict of them), and this one takes {type(inputs).__name__} inputs: search latency with "
                "backend='eager', or search size"
            )
        log.info(
            "latency is not measured: backend %r takes tensors (one, a tuple or a dict) and the model takes %s inputs",
            config.latency.backend,
            type(inputs).__name__,
        )


def _header(
    model: nn.Module, data: Data, config: SearchConfig, name: str, zoo: Mapping[str, Any] | None, max_drop: float
) -> dict[str, Any]:
    """What was searched, under which budget and objective: the first fields of the result."""
    return {
        "recipe": name,
        "model": {"name": zoo["zoo"], "kwargs": dict(zoo.get("kwargs", {}))}
        if zoo
        else {"name": type(model).__name__, "kwargs": {}},
        "data": {"name": data.name},
        "threads": config.latency.threads,
        "budget": BudgetFacts(
            "relative" if config.budget.relative else "absolute", config.budget.value, max_drop, config.budget.text()
        ),
        "objective": config.objective,
        "latency_setting": LatencySetting(config.latency.backend, config.latency.batch, config.latency.threads),
    }


def _run_study(
    study,
    evaluator: Evaluator,
    spec,
    *,
    layers: Layers,
    curves: Any,
    max_drop: float,
    on_trial: Callable[[dict], None] | None,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Resume or start the study: seed it, run its trials on an executor; the facts of the run."""
    config = evaluator.config
    interrupted = recover_interrupted(study)
    resumed = len(study.trials) > 0
    seed_study(study, config, layers, curves, max_drop)
    t0 = time.perf_counter()
    executor, message = make_executor(evaluator, spec, config.workers, config.ray_address, config.use_ray)
    timings["executor_s"] = time.perf_counter() - t0
    if message:
        log.warning(message)
    try:
        t0 = time.perf_counter()
        already = len(finished(study))
        ladder = partial(ladder_step, study, config, layers, curves, max_drop)
        run_trials(study, executor, config, layers, max_drop, on_trial, ladder)
        timings["search_s"] = time.perf_counter() - t0
    finally:
        executor.close()
    return {
        "already": already,
        "executor": executor.description,
        "message": message,
        "resumed": resumed,
        "interrupted": interrupted,
    }


def _search_facts(
    config: SearchConfig, trials: list, facts: dict, timings: dict, storage: Path, study: str
) -> SearchFacts:
    """How the study ran: trials done, failed and per hour, the executor, resumption."""
    ran, wall = len(trials) - facts["already"], timings["search_s"]
    return SearchFacts(
        sampler=config.sampler,
        trials_done=len(trials),
        workers=config.workers,
        wall_s=wall,
        trials_per_hour=ran / wall * 3600 if wall > 0 and ran else None,
        trials_this_run=ran,
        trials_failed=sum(t.state.name == "FAIL" for t in trials),
        executor=facts["executor"],
        execution_note=facts["message"],
        storage=str(storage),
        resumed=facts["resumed"],
        interrupted_trials=list(facts["interrupted"]),
        study=study,
    )


def _worker_spec(
    zoo: Mapping[str, Any] | None, weights: Path, data: Data, config: SearchConfig
) -> Callable[[], WorkerSpec] | None:
    if zoo is None or data.spec is None:  # a user's model or loaders: a worker could not load them again
        return None
    return lambda: WorkerSpec(
        zoo["zoo"], dict(zoo.get("kwargs", {})), weights.read_bytes(), asdict(data.spec), config, config.latency.threads
    )


def _baseline(ev: Evaluator, model: nn.Module, config: SearchConfig) -> Baseline:
    return Baseline(
        accuracy_search=ev.base_accuracy,
        accuracy_holdout=ev.base_holdout,
        accuracy_test=ev.score(model, ev.data.eval_loader()),
        bytes=ev.base_bytes,
        params=count_params(model),
        latency_ms=_latencies(model, ev.example, config),
    )


def _latencies(model: nn.Module, example: Any, config: SearchConfig) -> dict[str, float]:
    """Milliseconds per call at batch 1 and at the searched batch (empty when not timeable)."""
    out = {f"batch{b}": latency_ms(model, example, _at(config, b)) for b in _batches(config)}
    return {k: v for k, v in out.items() if v is not None}


def _batches(config: SearchConfig) -> list[int]:
    return sorted({1, config.latency.batch})


def _at(config: SearchConfig, batch: int):
    return replace(config.latency, batch=batch)


def deliver(ev: Evaluator, config: SearchConfig, chosen: dict, path: Path, max_drop: float) -> Delivered:
    """Apply the chosen plan with the final (distillation) recovery, save, load, measure the file.
    The file and the result carry the plan as realised (channel counts rounded, layers kept)."""
    torch.manual_seed(config.seed)
    done = apply_plan(
        ev.model, CompressionPlan.from_dict(chosen["plan"]), ev.data, config.final, config.space, config.seed
    )
    model, plan = done.model, done.plan
    acc = ev.score(model, ev.search_batches)
    save(model, path, plan=plan.to_dict(), metrics={f"{ev.task.metric.name}_search": acc}, zoo=ev.zoo)
    restored = load(path) if ev.zoo else load(path, model=copy.deepcopy(ev.model))
    inputs = (ev.task.split(b)[0] for b in itertools.islice(ev.search_batches, 2))
    check_reproduces(model, restored, inputs, path)
    holdout = ev.score(restored, ev.holdout_batches)
    drop = ev.drop(ev.base_holdout, holdout)
    nbytes = file_bytes(path)
    return Delivered(
        plan=plan.to_dict(),
        artifact=str(path),
        bytes=nbytes,
        ratio=ev.base_bytes / nbytes,
        accuracy_search=ev.score(restored, ev.search_batches),
        accuracy_holdout=holdout,
        accuracy_test=ev.score(restored, ev.data.eval_loader()),
        drop_holdout=drop,
        within_budget=drop <= max_drop,
        latency_ms=_latencies(restored, ev.example, config),
    )


def _chosen(chosen: dict | None, max_drop: float, config: SearchConfig, metric: Metric) -> Choice:
    if chosen is None:
        return Choice(None, False, "no trial finished; nothing to deliver")
    what = f"{chosen['bytes']:,} bytes" if config.objective == "size" else f"{chosen['latency_ms']:.3f} ms"
    lost = f"loses {metric.show_drop(chosen['drop'])} on the search split"
    allowed = metric.show_drop(max_drop)
    if chosen["met_budget"]:
        message = f"trial {chosen['trial']}: {what}, {lost}, within the budget of {allowed}"
    else:
        message = (
            f"no trial met the budget of {allowed}; delivering the closest, trial {chosen['trial']}: {what}, {lost}"
        )
    return Choice(chosen["trial"], chosen["met_budget"], message)


def _plan_table(plan_dict: dict | None, layers: Layers) -> list[PlanRow]:
    """Per weight layer, what the plan does to it -- the plan as realised when a file was delivered."""
    plan = CompressionPlan.from_dict(plan_dict) if plan_dict else CompressionPlan()
    rows = []
    for name in layers.weights + layers.tables:
        d = plan.resolve(name)
        touched = d is not None and any(v for v in (d.channels, d.sparsity, d.bits, d.quantize))
        why = layers.skipped.get(name)
        rows.append(
            PlanRow(
                layer=name,
                channels=d.channels if d else None,
                sparsity=d.sparsity if d else None,
                bits=d.bits if d else None,
                int8=bool(d and d.quantize),
                skip=None
                if touched
                else ("left as it is by the chosen plan" + (f"; its channels cannot shrink: {why}" if why else "")),
            )
        )
    return rows
