"""The search loop: an Optuna study on SQLite, seeded by the sensitivity table, run by an
executor (this process or Ray), resumable after any interruption.

Trials live in ``<run>/study.sqlite3`` (Optuna's RDB storage). Running the same search again
loads the study: finished trials are kept (never rerun), a trial that was running when the
process died is marked failed and its plan queued again, and the loop continues until the
study holds ``trials`` finished trials. A lock file keeps two processes off one run folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torchslim.errors import ConfigError
from torchslim.search.config import SearchConfig
from torchslim.search.result import TrialRow
from torchslim.search.sensitivity import Curves, budget_plan
from torchslim.search.space import INT8, Layers, distributions, params_from_plan

log = logging.getLogger(__name__)
OnTrial = Callable[[dict[str, Any]], None]
"""Called after each finished trial with ``{"done", "total", "best", "elapsed_s", "last", "metric"}``
(``metric``: the task's :class:`~torchslim.core.task.Metric`, which ``best["drop"]`` is in)."""


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``<run>/.search.lock`` for the duration; a second search on the folder is an error."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".search.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another search is running in {run_dir}; wait for it or use another output folder"
            ) from None
        yield


def open_study(run_dir: Path, name: str, config: SearchConfig, fingerprint: str) -> Any:
    """Create the study, or load it and check it was started with the same settings and model."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(run_dir / 'study.sqlite3').resolve()}"

    if config.sampler == "tpe":  # the constant liar keeps parallel workers off the same plan
        sampler = optuna.samplers.TPESampler(seed=config.seed, multivariate=True, constant_liar=True)
    else:
        sampler = optuna.samplers.NSGAIISampler(seed=config.seed)
    # the budget is a constraint each trial sets (see tell), not a sampler argument
    study = optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, load_if_exists=True, directions=["minimize", "minimize"]
    )
    identity = json.loads(json.dumps(config.identity() | {"model": fingerprint}))
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", identity)
    elif stored != identity:
        changed = sorted(k for k in identity if stored.get(k) != identity[k])
        raise ConfigError(
            f"{run_dir} holds study {name!r} started with other settings ({', '.join(changed)} differ); "
            "rerun with the same settings to resume it, or use another output folder"
        )
    return study


def recover_interrupted(study: Any) -> list[int]:
    """Mark trials left running by a dead process as failed and queue their plans again."""
    from optuna.trial import TrialState

    lost = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in lost:
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"origin": "sampler", **t.user_attrs, "rerun_of": t.number})
    if lost:
        study.set_user_attr("interrupted", sorted(study.user_attrs.get("interrupted", []) + [t.number for t in lost]))
        log.warning("trials %s were running when the last search stopped; they run again", [t.number for t in lost])
    return [t.number for t in lost]


def seed_study(study: Any, config: SearchConfig, layers: Layers, curves: Curves, max_drop: float) -> int:
    """Queue the starting plans once per study: uniform ones, then sensitivity-guided ones."""
    if study.user_attrs.get("seeded"):
        return 0
    space, seeds = config.space, []
    precision = (
        INT8
        if config.objective == "latency" and space.int8
        else (f"share{sorted(space.bits)[len(space.bits) // 2]}" if space.bits else INT8 if space.int8 else None)
    )
    if precision:
        uniform = {k: (precision if k.startswith("precision:") else 0.0) for k in distributions(space, layers)}
        for table in layers.tables:  # a table's choices are its own: the middle codebook, else float
            uniform[f"precision:{table}"] = space.table_precisions()[(len(space.tables) + 1) // 2]
        seeds.append(("seed: uniform " + precision, uniform, {}))
    for variant in variants(config):
        for multiple in config.seeds:
            params = sensitivity_params(config, layers, curves, multiple * max_drop, variant)
            seeds.append(
                (_seed_origin(multiple, variant), params, {"seed_multiple": multiple, "seed_variant": variant})
            )
    unique = []
    for origin, params, extra in seeds:
        if all(params != p for _, p, _ in unique):
            unique.append((origin, params, extra))
    for origin, params, extra in unique:
        study.enqueue_trial(params, user_attrs={"origin": origin, **extra})
    study.set_user_attr("seeded", True)
    return len(unique)


def variants(config: SearchConfig) -> tuple[str, ...]:
    """The seed families: for latency, int8 layers and float layers (which one runs faster
    depends on the model and the backend: int8 kernels do not always shrink with the channels)."""
    return ("int8", "float") if config.objective == "latency" and config.space.int8 else ("",)


def _seed_origin(multiple: float, variant: str) -> str:
    return f"seed: sensitivity x{multiple:g} budget" + (f", {variant}" if variant else "")


def sensitivity_params(
    config: SearchConfig, layers: Layers, curves: Curves, allowance: float, variant: str = ""
) -> dict[str, Any]:
    plan = budget_plan(curves, config.space, layers, allowance, config.objective, int8=variant != "float")
    return params_from_plan(plan, config.space, layers)


LADDER_TOP = 1024.0
"""The largest multiple of the budget the seed ladder tries."""


def ladder_step(study: Any, config: SearchConfig, layers: Layers, curves: Curves, max_drop: float) -> float | None:
    """Walk the sensitivity-seeded plans along their budget multiple, one measured plan at a time.

    Single-layer drops are measured without recovery and overstate what a recovered plan loses,
    so the seed at 8x the budget often still fits it. While the most aggressive seed measured
    fits, the plan at twice its multiple is queued; once one misses, the multiple is bisected
    between the last that fits and the first that misses, down to a 1.25 ratio. Each seed
    family (see :func:`variants`) walks on its own. A plan equal to one already measured is
    taken at its measured result. Nothing is queued while a ladder plan waits or runs, nor for a
    family whose smallest seed misses. Returns the multiple queued.
    """
    fits = _ladder_walks(study, config, max_drop) if config.seeds else None
    if fits is None:
        return None
    twins = measured(study)
    for variant, walk in fits.items():
        while True:
            lo = max((m for m, ok in walk.items() if ok), default=None)
            hi = None if lo is None else min((m for m, ok in walk.items() if not ok and m > lo), default=None)
            if lo is None or (hi is not None and hi / lo <= 1.25) or (hi is None and 2 * lo > LADDER_TOP):
                break
            multiple = 2 * lo if hi is None else (lo + hi) / 2
            params = sensitivity_params(config, layers, curves, multiple * max_drop, variant)
            twin = twins.get(_key(params))
            if twin is None:
                study.enqueue_trial(
                    params,
                    user_attrs={
                        "origin": _seed_origin(multiple, variant),
                        "seed_multiple": multiple,
                        "seed_variant": variant,
                    },
                )
                return multiple
            walk[multiple] = twin.user_attrs.get("drop", float("inf")) <= max_drop
            known = study.user_attrs.get("ladder_known", {})
            study.set_user_attr("ladder_known", known | {f"{variant}:{multiple}": walk[multiple]})
    return None


def _ladder_walks(study: Any, config: SearchConfig, max_drop: float) -> dict[str, dict[float, bool]] | None:
    """Per seed family, each budget multiple measured so far -> whether its plan fit the budget;
    ``None`` while a ladder plan waits or runs."""
    from optuna.trial import TrialState

    interrupted = set(study.user_attrs.get("interrupted", []))
    fits: dict[str, dict[float, bool]] = {v: {} for v in variants(config)}
    for key, ok in study.user_attrs.get("ladder_known", {}).items():  # multiples whose plan was measured already
        variant, _, multiple = key.rpartition(":")
        fits.setdefault(variant, {})[float(multiple)] = ok
    for t in study.get_trials(deepcopy=False):
        multiple = t.user_attrs.get("seed_multiple")
        if multiple is None or "repeat_of" in t.user_attrs or t.number in interrupted:
            continue
        if t.state in (TrialState.WAITING, TrialState.RUNNING):
            return None
        walk = fits.setdefault(t.user_attrs.get("seed_variant", ""), {})
        if t.state == TrialState.COMPLETE:
            walk[float(multiple)] = t.user_attrs["drop"] <= max_drop
        elif t.state == TrialState.FAIL:
            walk[float(multiple)] = False
    return fits


def finished(study: Any) -> list[Any]:
    """Trials that ended (complete or failed), not counting those a dead process left behind
    nor repeats of a plan already measured."""
    from optuna.trial import TrialState

    interrupted = set(study.user_attrs.get("interrupted", []))
    states = (TrialState.COMPLETE, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False, states=states)
    return [t for t in trials if t.number not in interrupted and "repeat_of" not in t.user_attrs]


def objective_key(config: SearchConfig) -> str:
    return "bytes" if config.objective == "size" else "latency_ms"


def run_trials(
    study: Any,
    executor: Any,
    config: SearchConfig,
    layers: Layers,
    max_drop: float,
    on_trial: OnTrial | None,
    follow_up: Callable[[], Any] | None = None,
) -> float:
    """Ask, run and tell trials until the study holds ``config.trials`` finished ones (or the
    timeout passes); returns the wall seconds spent. ``follow_up`` runs at the start and after
    each finished trial (the seed ladder queues its next plan there).

    Trials are deterministic, so a plan the sampler proposes again is not run again: the repeat
    is told the measured result at no cost and does not count. After three repeats in a row a
    neighbour of the best plan so far (one choice moved one step) is queued instead; after
    thirty the space is taken as exhausted and the search ends.
    """
    dists = distributions(config.space, layers)
    start, running, repeats = time.perf_counter(), {}, 0
    rng = random.Random(config.seed)
    follow = follow_up or (lambda: None)
    follow()

    def can_start() -> bool:
        timed_out = config.timeout_s is not None and time.perf_counter() - start > config.timeout_s
        if repeats >= 30:
            log.warning("the sampler keeps proposing measured plans: the space holds no new ones; stopping")
        return not timed_out and repeats < 30 and len(finished(study)) + len(running) < config.trials

    while True:
        while len(running) < executor.slots and can_start():
            trial = study.ask(fixed_distributions=dists)
            twin = measured(study).get(_key(trial.params))
            if twin is not None:
                tell(study, trial, {**twin.user_attrs, "repeat_of": twin.number}, config, max_drop)
                repeats += 1
                if repeats % 3 == 0:
                    study.enqueue_trial(
                        neighbour(study, config, max_drop, dists, rng), user_attrs={"origin": "neighbour of the best"}
                    )
                continue
            repeats = 0
            trial.set_user_attr("origin", trial.user_attrs.get("origin", "sampler"))
            running[trial.number] = trial
            executor.submit(trial.number, trial.params)
        if not running:
            return time.perf_counter() - start
        number, result = executor.wait()
        tell(study, running.pop(number), result, config, max_drop)
        follow()
        if on_trial is not None:
            on_trial(progress_info(study, config, max_drop, time.perf_counter() - start, number))


def _key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def measured(study: Any) -> dict[str, Any]:
    """Plan (as sorted JSON of its parameters) -> the complete trial that measured it."""
    from optuna.trial import TrialState

    out = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "repeat_of" not in t.user_attrs:
            out.setdefault(_key(t.params), t)
    return out


def neighbour(study: Any, config: SearchConfig, max_drop: float, dists: dict, rng: random.Random) -> dict[str, Any]:
    """The best plan so far with one randomly chosen parameter moved to an adjacent choice."""
    best = choose(finished(study), config, max_drop)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    params = dict(trials[best["trial"]].params) if best else {k: d.choices[0] for k, d in dists.items()}
    key = rng.choice(sorted(dists))
    choices = list(dists[key].choices)
    i = choices.index(params[key])
    params[key] = choices[min(max(i + rng.choice((-1, 1)), 0), len(choices) - 1)]
    return params


def tell(study: Any, trial: Any, result: dict, config: SearchConfig, max_drop: float) -> None:
    """Record a trial's result: its metrics, the budget as a constraint, the two objectives."""
    from optuna.trial import TrialState

    for key, value in result.items():
        trial.set_user_attr(key, value)
    if "error" in result:
        study.tell(trial, state=TrialState.FAIL)
        return
    trial.set_constraint("drop_over_budget", result["drop"] - max_drop)  # feasible when <= 0
    study.tell(trial, [result["drop"], result[objective_key(config)]])


def progress_info(study: Any, config: SearchConfig, max_drop: float, elapsed: float, last: int) -> dict[str, Any]:
    done = finished(study)
    best = choose(done, config, max_drop)
    return {"done": len(done), "total": config.trials, "best": best, "elapsed_s": elapsed, "last": last}


def choose(trials: list[Any], config: SearchConfig, max_drop: float) -> dict[str, Any] | None:
    """The best complete trial within the budget (smallest objective, then smallest drop); if
    none is within it, the one that loses least. Returns its attributes and whether it met it."""
    complete = [t for t in trials if t.values is not None and "drop" in t.user_attrs]
    if not complete:
        return None
    key = objective_key(config)
    feasible = [t for t in complete if t.user_attrs["drop"] <= max_drop]
    if feasible:
        best = min(feasible, key=lambda t: (t.user_attrs[key], t.user_attrs["drop"]))
    else:
        best = min(complete, key=lambda t: (t.user_attrs["drop"], t.user_attrs[key]))
    return {"trial": best.number, "met_budget": bool(feasible), **best.user_attrs}


def trial_rows(trials: list[Any], max_drop: float, objective: str) -> list[TrialRow]:
    """Every trial as a report row, with whether it is on the quality / bytes and quality /
    latency Pareto fronts of the feasible trials (``pareto``: the front of ``objective``)."""
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        a = t.user_attrs
        rows.append(
            TrialRow(
                number=t.number,
                state=t.state.name,
                origin=a.get("origin", "sampler"),
                plan=a.get("plan"),
                accuracy=a.get("accuracy"),
                drop=a.get("drop"),
                bytes=a.get("bytes"),
                latency_ms=a.get("latency_ms"),
                seconds=a.get("seconds"),
                error=a.get("error"),
                feasible=a.get("drop") is not None and a["drop"] <= max_drop,
            )
        )
    feasible = [r for r in rows if r.feasible]
    for r in feasible:
        r.pareto_bytes = not any(_dominates(o, r, "bytes") for o in feasible)
        r.pareto_latency_ms = not any(_dominates(o, r, "latency_ms") for o in feasible)
        r.pareto = r.pareto_bytes if objective == "size" else r.pareto_latency_ms
    return rows


def _dominates(a: TrialRow, b: TrialRow, key: str) -> bool:
    """``a`` loses no more quality than ``b`` and costs no more, and is better in one of the two
    (drops are in the metric's own direction, so this holds for lower-is-better metrics too)."""
    x, y = getattr(a, key), getattr(b, key)
    if x is None or y is None:  # latency not measured (a backend that cannot take the input)
        return False
    better_or_equal = a.drop <= b.drop and x <= y
    return better_or_equal and (a.drop < b.drop or x < y)
