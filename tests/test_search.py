"""Adaptive compression search: space, sensitivity, study, resume, parallel trials, CLI."""

from __future__ import annotations

import copy
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from torchslim.artifact.inspect import inspect_file
from torchslim.core.data import Data, TensorBatches, take_rows
from torchslim.core.plan import CompressionPlan
from torchslim.core.qlayers import QuantizedLayer
from torchslim.errors import ConfigError
from torchslim.search.config import Budget, LatencySetting, SearchConfig
from torchslim.search.result import SearchResult
from torchslim.search.run import search
from torchslim.search.sensitivity import budget_plan, cached_sensitivity, layer_sensitivity
from torchslim.search.space import (
    Layers,
    Recovery,
    SearchSpace,
    apply_plan,
    distributions,
    params_from_plan,
    plan_from_params,
)
from torchslim.search.trial import split_eval

optuna = pytest.importorskip("optuna")
SPACE = SearchSpace(sparsity=(0.0, 0.5, 0.8), bits=(6, 4), channels=(0.0, 0.25))
ZOO = {"zoo": "lenet_300_100", "kwargs": {"in_features": 64}}


def small_config(trials: int = 4, **kw) -> SearchConfig:
    fields = dict(
        objective="size",
        trials=trials,
        space=SPACE,
        recovery=Recovery(samples=256, epochs=1),
        final=Recovery(samples=0, epochs=1),
        latency=LatencySetting("eager", batch=8, threads=1, repeats=3),
    )
    return SearchConfig(Budget.parse("3pt"), **(fields | kw))


def test_budget_is_stated_explicitly_absolute_or_relative():
    assert Budget.parse("1pt").max_drop(0.9) == pytest.approx(0.01)
    assert Budget.parse("0.5 points").max_drop(0.9) == pytest.approx(0.005)
    assert Budget.parse("1%").max_drop(0.9) == pytest.approx(0.009)
    assert "relative" in Budget.parse("2%").text() and "absolute" in Budget.parse("2pt").text()
    for bad in ("1", "one point", "-1pt", "150pt"):
        with pytest.raises(ConfigError, match="1pt|fraction"):
            Budget.parse(bad)


def test_a_plan_and_optuna_parameters_translate_both_ways(digits_mlp, digits):
    layers = Layers.of(digits_mlp, digits.example_input(2), SPACE)
    assert layers.weights == ("fc1", "fc2", "fc3") and set(layers.groups) == {"fc1", "fc2"}
    plan = CompressionPlan.from_dict({"fc1": {"channels": 0.25, "sparsity": 0.8, "bits": 4}, "fc3": {"quantize": 8}})
    params = params_from_plan(plan, SPACE, layers)
    assert set(params) == set(distributions(SPACE, layers))
    assert params["precision:fc1"] == "share4" and params["precision:fc3"] == "int8" and params["sparsity:fc2"] == 0.0
    assert plan_from_params(params).to_dict() == {
        "fc1": {"channels": 0.25, "sparsity": 0.8, "bits": 4},
        "fc3": {"quantize": 8},
    }


def test_apply_plan_removes_channels_prunes_shares_and_quantizes_a_copy(digits_mlp, digits):
    before = copy.deepcopy(digits_mlp.state_dict())
    plan = CompressionPlan.from_dict(
        {"fc1": {"channels": 0.25, "sparsity": 0.8}, "fc2": {"bits": 4}, "fc3": {"quantize": 8}}
    )
    done = apply_plan(digits_mlp, plan, digits, Recovery(samples=256, epochs=1), SPACE)
    out = done.model
    assert all(torch.equal(v, digits_mlp.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert out.fc1.out_features == 232  # 300 - 25 % = 225, rounded up to a multiple of 8
    assert abs(float((out.fc1.weight == 0).float().mean()) - 0.8) < 0.01
    assert out.fc2.weight.unique().numel() <= 2**4 + 1
    assert isinstance(out.fc3, QuantizedLayer)
    assert done.plan.resolve("fc1").channels == pytest.approx(1 - 232 / 300, abs=1e-6)  # the plan as realised


def test_sensitivity_is_measured_per_layer_and_cached(digits_mlp, digits, tmp_path):
    layers = Layers.of(digits_mlp, digits.example_input(2), SPACE)
    search_batches, _ = split_eval(digits, 0)
    curves, cached = cached_sensitivity(
        tmp_path / "s.json", digits_mlp, digits, search_batches, SPACE, layers, "search"
    )
    assert not cached
    assert [s for s, _ in curves["sparsity"]["fc1"]] == [0.5, 0.8] and [b for b, _ in curves["bits"]["fc3"]] == [6, 4]
    assert set(curves["channels"]) == {"fc1", "fc2"} and set(curves["int8"]) == {"fc1", "fc2", "fc3"}
    again, cached = cached_sensitivity(tmp_path / "s.json", digits_mlp, digits, search_batches, SPACE, layers, "search")
    assert cached and again == curves
    generous = budget_plan(curves, SPACE, layers, 1.0, "size")  # every single-layer drop fits: the most aggressive
    assert generous.resolve("fc1").sparsity == 0.8 and generous.resolve("fc1").bits == 4
    assert budget_plan(curves, SPACE, layers, 1.0, "latency").resolve("fc1").quantize == 8


def test_split_halves_are_disjoint_and_cover_the_evaluation_set(digits):
    a, b = split_eval(digits, 0)
    xa, xb = torch.cat([x for x, _ in a]), torch.cat([x for x, _ in b])
    assert len(xa) + len(xb) == digits.eval.rows
    rows = {tuple(r.flatten().tolist()) for r in xa}
    assert not any(tuple(r.flatten().tolist()) in rows for r in xb[:50])


def test_a_streamed_evaluation_set_splits_by_alternate_batches_without_loading_it():
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.arange(50.0).unsqueeze(1)
    loader = DataLoader(TensorDataset(x, torch.zeros(50, dtype=torch.long)), batch_size=8)
    data = Data(train=loader, eval=loader)
    for seed in (0, 1):
        a, b = split_eval(data, seed)
        rows_a, rows_b = (torch.cat([x for x, _ in half]).flatten().tolist() for half in (a, b))
        assert sorted(rows_a + rows_b) == x.flatten().tolist() and not set(rows_a) & set(rows_b)
        assert rows_a[0] == (0.0 if seed == 0 else 8.0)
        assert [len(list(h)) for h in (a, b, a, b)] == ([4, 3] if seed == 0 else [3, 4]) * 2  # re-iterable
    assert take_rows({"x": x[:3]}, 8, cycle=True)["x"].flatten().tolist() == [0, 1, 2, 0, 1, 2, 0, 1]


def test_search_delivers_a_file_measured_after_loading_and_resumes_without_rerunning(digits_mlp, digits, tmp_path):
    seen: list[int] = []
    report = search(
        digits_mlp, digits, small_config(4), tmp_path, name="s", zoo=ZOO, on_trial=lambda i: seen.append(i["last"])
    )
    assert sorted(seen) == [0, 1, 2, 3] and report.search.trials_done == 4
    assert report.trials[0].origin.startswith("seed: uniform")
    final, chosen = report.final, report.chosen
    by_number = {t.number: t for t in report.trials}
    searched, realised = by_number[chosen.trial].plan, final.plan
    assert chosen.met_budget and inspect_file(tmp_path / "s.tslim")[1].plan == realised  # the file's plan
    drop_channels = lambda plan: {k: {f: v for f, v in d.items() if f != "channels"} for k, d in plan.items()}  # noqa: E731
    assert drop_channels(searched) == drop_channels(realised)  # only channel fractions may be rounded
    assert final.bytes == (tmp_path / "s.tslim").stat().st_size < report.baseline.bytes
    assert final.within_budget == (final.drop_holdout <= report.budget.max_drop)
    first = {t.number: (t.plan, t.accuracy) for t in report.trials}

    seen.clear()
    again = search(
        digits_mlp, digits, small_config(6), tmp_path, name="s", zoo=ZOO, on_trial=lambda i: seen.append(i["last"])
    )
    assert len(seen) == 2 and min(seen) >= 4  # only new trials ran (a repeat of a measured plan is not run)
    assert again.search.resumed and again.search.trials_done == 6
    assert {t.number: (t.plan, t.accuracy) for t in again.trials if t.number < 4} == first


def test_a_trial_left_running_by_a_dead_process_runs_again(digits_mlp, digits, tmp_path):
    search(digits_mlp, digits, small_config(2), tmp_path, name="s", zoo=ZOO)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.sqlite3'}")
    layers = Layers.of(digits_mlp, digits.example_input(2), SPACE)
    lost = study.ask(fixed_distributions=distributions(SPACE, layers))  # asked, never told: the process died
    report = search(digits_mlp, digits, small_config(3), tmp_path, name="s", zoo=ZOO)
    assert report.search.interrupted_trials == [lost.number]
    rerun = [t for t in report.trials if t.number > lost.number]
    assert len(rerun) == 1 and rerun[0].plan == plan_from_params(lost.params).to_dict()
    assert report.search.trials_done == 3


def test_a_study_resumed_with_other_settings_or_a_busy_folder_is_refused(digits_mlp, digits, tmp_path):
    search(digits_mlp, digits, small_config(1), tmp_path, name="s", zoo=ZOO)
    with pytest.raises(ConfigError, match="other settings.*objective"):
        search(digits_mlp, digits, small_config(2, objective="latency"), tmp_path, name="s", zoo=ZOO)
    import fcntl

    with open(tmp_path / ".search.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another search is running"):
            search(digits_mlp, digits, small_config(2), tmp_path, name="s", zoo=ZOO)


def test_parallel_trials_without_ray_run_one_at_a_time_and_say_how_to_enable_it(
    digits_mlp, digits, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    report = search(digits_mlp, digits, small_config(2, workers=2), tmp_path, name="s", zoo=ZOO)
    assert "pip install 'torchslim[ray]'" in report.search.execution_note
    assert report.search.trials_done == 2


def test_two_ray_workers_are_pinned_to_their_own_cores(digits_mlp, digits, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    with pytest.raises(ConfigError, match="zoo"):  # a worker rebuilds the model from the zoo, by name
        search(digits_mlp, digits, small_config(3, workers=2), tmp_path / "other", name="s")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    report = search(digits_mlp, digits, small_config(4, workers=2), tmp_path / "run", name="s", zoo=ZOO)
    assert report.search.trials_done == 4 and report.final is not None
    executor = report.search.executor
    assert "2 Ray workers" in executor and "(1 node)" in executor and "cores [[0], [1]]" in executor


RECIPE = """
name: digits_search
model: {name: lenet_300_100, kwargs: {in_features: 64}}
data: {name: digits, batch_size: 64, eval_batch_size: 128, calib_size: 256}
baseline: {epochs: 4, lr: 0.003}
search:
  trials: TRIALS
  sparsity: [0.0, 0.5, 0.8]
  bits: [6, 4]
  channels: [0.0, 0.25]
  recovery: {samples: 256, epochs: 1}
  final: {samples: 0, epochs: 1}
  latency_backend: eager
  latency_batch: 8
outputs: {dir: OUT}
threads: 1
"""


def test_cli_search_and_report(tmp_path):
    from typer.testing import CliRunner

    from torchslim.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("OUT", str(tmp_path / "run")).replace("TRIALS", "3"))
    runner = CliRunner()
    missing = runner.invoke(app, ["search", str(recipe)])
    assert missing.exit_code == 2 and "--budget 1pt" in missing.output
    bad = runner.invoke(app, ["search", str(recipe), "--budget", "2"])
    assert bad.exit_code == 2 and "'1pt'" in bad.output
    done = runner.invoke(app, ["search", str(recipe), "--budget", "3pt"], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert "per-layer plan" in done.output and "held-out split" in done.output
    html = tmp_path / "run" / "report.html"
    assert html.stat().st_size > 10_000 and html.stat().st_mode & 0o044  # readable by others, like any report
    html.unlink()
    again = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert again.exit_code == 0 and html.is_file()
    assert runner.invoke(app, ["report", str(tmp_path / "nothing")]).exit_code == 2


def _complete_trials(db: Path) -> int:
    try:
        with sqlite3.connect(db) as con:
            return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_search_killed_with_sigkill_resumes_without_rerunning_finished_trials(tmp_path):
    recipe = tmp_path / "r.yaml"
    run = tmp_path / "run"
    recipe.write_text(RECIPE.replace("OUT", str(run)).replace("TRIALS", "5"))
    env = os.environ | {"HOME": str(tmp_path), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "torchslim.cli", "search", str(recipe), "--budget", "3pt"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _complete_trials(run / "study.sqlite3") < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _complete_trials(run / "study.sqlite3")
    assert 2 <= killed_at < 5 and not (run / "report.json").exists()
    with sqlite3.connect(run / "study.sqlite3") as con:
        before = dict(con.execute("select number, datetime_complete from trials where state = 'COMPLETE'").fetchall())
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = SearchResult.from_dict(json.loads((run / "report.json").read_text()))
    with sqlite3.connect(run / "study.sqlite3") as con:
        after = dict(con.execute("select number, datetime_complete from trials where state = 'COMPLETE'").fetchall())
    assert all(after[n] == t for n, t in before.items())  # finished trials kept, not rerun
    assert report.search.trials_done == 5 and report.search.trials_this_run == 5 - killed_at
    assert report.final is not None and (run / "digits_search.tslim").is_file()


def test_a_plan_proposed_again_is_not_rerun_and_an_exhausted_space_ends_the_search(digits_mlp, digits, tmp_path):
    one_plan = SearchSpace(sparsity=(0.0, 0.5), bits=(), channels=(), int8=False)  # 2**3 plans in all
    seen: list[int] = []
    report = search(
        digits_mlp,
        digits,
        small_config(12, space=one_plan),
        tmp_path,
        name="s",
        zoo=ZOO,
        on_trial=lambda i: seen.append(i["last"]),
    )
    plans = [json.dumps(t.plan, sort_keys=True) for t in report.trials]
    assert len(plans) == len(set(plans)) == len(seen) <= 8  # every plan measured once, then the search stopped
    assert report.search.trials_done == len(plans) and report.final is not None


def test_nsga2_runs_the_same_study_shape(digits_mlp, digits, tmp_path):
    report = search(
        digits_mlp, digits, small_config(3, sampler="nsga2", objective="latency"), tmp_path, name="s", zoo=ZOO
    )
    assert report.search.sampler == "nsga2" and report.search.trials_done == 3
    assert report.chosen.trial is not None and report.objective == "latency"
    assert all(t.latency_ms > 0 for t in report.trials if t.state == "COMPLETE")


def _synthetic_curves(layers: Layers) -> dict:
    """Single-layer drops that grow with each setting's aggressiveness."""
    return {
        "sparsity": {n: [[x, 0.2 * x] for x in SPACE.sparsity] for n in layers.weights},
        "bits": {n: [[b, 0.04 * (8 - b)] for b in SPACE.bits] for n in layers.weights},
        "int8": {n: [[8, 0.02]] for n in layers.weights},
        "channels": {g: [[c, 0.5 * c] for c in SPACE.channels] for g in layers.groups},
    }


def test_the_seed_ladder_doubles_the_budget_multiple_while_plans_fit_then_bisects(digits_mlp, digits):
    from torchslim.search.study import ladder_step, seed_study, tell

    layers = Layers.of(digits_mlp, digits.example_input(2), SPACE)
    config, max_drop = small_config(40, seeds=(1.0, 2.0)), 0.03
    study = optuna.create_study(directions=["minimize", "minimize"])
    seed_study(study, config, layers, _synthetic_curves(layers), max_drop)
    weight = {
        **{str(x): 0.008 * x for x in SPACE.sparsity},
        "float": 0.0,
        "int8": 0.002,
        "share6": 0.004,
        "share4": 0.008,
    }

    def measure(params: dict) -> dict:  # a recovered plan loses less than its single-layer drops say
        drop = sum(weight[str(v)] for k, v in params.items() if not k.startswith("channels")) + sum(
            0.016 * v for k, v in params.items() if k.startswith("channels")
        )
        return {"drop": round(drop, 6), "bytes": 1000 - int(10_000 * drop), "accuracy": 0.9 - drop}

    queued, plans = [], []
    for _ in range(30):
        queued.append(ladder_step(study, config, layers, _synthetic_curves(layers), max_drop))
        if not study.get_trials(states=(optuna.trial.TrialState.WAITING,)):
            break
        trial = study.ask(fixed_distributions=distributions(SPACE, layers))
        plans.append(json.dumps(trial.params, sort_keys=True))
        tell(study, trial, measure(trial.params), config, max_drop)
    ladder = [m for m in queued if m is not None]
    fits = {
        t.user_attrs["seed_multiple"]: t.user_attrs["drop"] <= max_drop
        for t in study.trials
        if "seed_multiple" in t.user_attrs
    }
    assert ladder[0] == 4.0  # the seeds at 1x and 2x (one plan) fit, so the walk goes on at 4x
    miss = next(i for i, m in enumerate(ladder) if not fits[m])
    assert ladder[: miss + 1] == sorted(ladder[: miss + 1]) and all(m < ladder[miss] for m in ladder[miss + 1 :])
    assert len(plans) == len(set(plans))  # every queued plan is a new one
    best = max(m for m, ok in fits.items() if ok)
    assert min(m for m, ok in fits.items() if not ok and m > best) / best <= 1.25  # the bisection converged
    assert ladder_step(study, config, layers, _synthetic_curves(layers), max_drop) is None


def test_latency_searches_channels_and_int8_only_and_is_seeded_in_int8_and_in_float(digits_mlp, digits):
    from torchslim.recipe.schema import SearchSection
    from torchslim.search.study import seed_study

    config = SearchConfig(Budget.parse("1pt"), objective="latency")
    assert config.space.sparsity == (0.0,) and config.space.bits == () and config.space.int8
    assert SearchConfig(Budget.parse("1pt")).space == SearchSpace()  # size: every technique
    assert SearchSection(objective="latency").space("latency") == config.space
    assert SearchSection(bits=[4]).space("latency").bits == (4,)  # what a recipe sets is kept
    layers = Layers.of(digits_mlp, digits.example_input(2), config.space)
    curves = _synthetic_curves(layers)
    study = optuna.create_study(directions=["minimize", "minimize"])
    seed_study(study, config, layers, curves, 0.2)
    by_variant: dict[str, set] = {}
    for t in study.trials:
        precisions = {v for k, v in t.system_attrs["fixed_params"].items() if k.startswith("precision:")}
        by_variant.setdefault(t.user_attrs.get("seed_variant"), set()).update(precisions)
    assert "int8" in by_variant["int8"] and by_variant["float"] == {"float"}


class _Keyed(torch.nn.Module):
    """A model called with keyword tensors, as a tokenizer's dict batches call an encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fc(input_ids * attention_mask)


def test_latency_is_measured_on_dict_inputs_by_the_compiled_backends():
    from torchslim.artifact.runtime import timeable
    from torchslim.search.trial import latency_ms

    batch = {"input_ids": torch.randn(4, 6), "attention_mask": torch.ones(4, 6)}
    assert timeable(batch, "onnxruntime") and timeable((batch["input_ids"],), "inductor")
    assert not timeable({"input_ids": batch["input_ids"], "text": "a"}, "inductor") and timeable("a", "eager")
    ms = latency_ms(_Keyed().eval(), batch, LatencySetting("onnxruntime", batch=8, threads=1, repeats=3))
    assert ms is not None and ms > 0


class _Bag(torch.nn.Module):
    """A word table (big enough to search) and a small one (left alone) feeding a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.words, self.kinds = torch.nn.Embedding(1024, 64), torch.nn.Embedding(4, 64)
        self.fc = torch.nn.Linear(64, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.words(ids).mean(1) + self.kinds(ids % 4).mean(1))


def test_embedding_tables_are_searched_for_codebooks_only_and_seeded_from_their_sensitivity():
    from torchslim.recipe.schema import SearchSection
    from torchslim.search.study import seed_study

    torch.manual_seed(0)
    model, ids = _Bag(), torch.randint(0, 1024, (64, 12))
    labels = torch.randint(0, 3, (64,))
    data = Data(train=TensorBatches((ids, labels), 16), eval=TensorBatches((ids[:32], labels[:32]), 16))
    space = SearchSection(bits=[6, 4], tables=[4, 2], sparsity=[0.0], channels=[0.0]).space("size")
    assert space.tables == (4, 2) and SearchSpace().tables == ()  # tables stay float unless offered
    layers = Layers.of(model, ids[:2], space)
    assert layers.tables == ("words",) and Layers.of(model, ids[:2], SearchSpace()).tables == ()
    dists = distributions(space, layers)
    assert list(dists["precision:words"].choices) == ["float", "share4", "share2"]  # no int8, no sparsity
    assert "sparsity:words" not in dists and "int8" in dists["precision:fc"].choices
    plan = plan_from_params({"precision:words": "share2", "precision:fc": "float", "sparsity:fc": 0.0})
    assert plan.resolve("words").bits == 2 and params_from_plan(plan, space, layers)["precision:words"] == "share2"
    measured = layer_sensitivity(model, data, data.eval, space, layers)
    assert [b for b, _ in measured["bits"]["words"]] == [4, 2] and "kinds" not in measured["bits"]
    curves = {"bits": {"words": [[4, 0.001], [2, 0.5]], "fc": [[6, 0.0], [4, 0.9]]}}
    seeded = budget_plan(curves, space, layers, 0.01, "size")
    assert seeded.resolve("words").bits == 4 and seeded.resolve("fc").bits == 6
    assert budget_plan(curves, space, layers, 0.01, "latency").resolve("words") is None  # a codebook is not faster
    done = apply_plan(model, seeded, data, Recovery(epochs=0, share_epochs=0), space)
    assert done.plan.resolve("words").bits == 4 and len(done.model.words.weight.unique()) <= 16
    study = optuna.create_study(directions=["minimize", "minimize"])
    config = SearchConfig(Budget.parse("1pt"), space=space)
    seed_study(study, config, layers, curves, 0.01)
    for t in study.trials:  # every queued plan is one Optuna can describe
        fixed = t.system_attrs["fixed_params"]
        assert fixed["precision:words"] in dists["precision:words"].choices
