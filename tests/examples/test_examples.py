"""Users' own models and data, end to end: a CNN from its own file with a map-style dataset
(from Python and from a recipe through the CLI), a dict-batch text classifier with padded
variable-length batches, and an iterable dataset fed from a generator. Each reports its own
metric."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import user_cnn
from safetensors.torch import save_file
from text_gru import TextGRU
from text_gru import loaders as text_loaders
from torch.utils.data import DataLoader, IterableDataset
from typer.testing import CliRunner

import torchslim as ts
from torchslim.cli import app
from torchslim.core.data import Data
from torchslim.core.task import Regression
from torchslim.evaluate.metrics import evaluate, fidelity
from torchslim.report.records import RunReport
from torchslim.search.result import SearchResult
from torchslim.train.fit import TrainConfig, fit

HERE = Path(__file__).parent
FINETUNE = TrainConfig(epochs=1, lr=1e-3)


@pytest.fixture(scope="module")
def trained_cnn():
    """The user's CNN trained on their own dataset, as they would hand it over."""
    torch.manual_seed(0)
    model = user_cnn.build()
    data = Data(**user_cnn.loaders())
    fit(model, data, TrainConfig(epochs=4, lr=3e-3))
    return model, data


def _steps(model, data):
    ts.prune_(model, ts.MagnitudePruneConfig(sparsity=0.6, steps=1, finetune=FINETUNE), data=data)
    ts.share_(model, ts.ShareConfig(bits=4, finetune=FINETUNE), data=data)
    ts.quantize_(model, ts.QuantizeConfig(scheme="static", calib_batches=4), data=data)


def test_user_cnn_from_python(trained_cnn, tmp_path):
    dense, data = trained_cnn
    before = evaluate(dense, data.eval, data.task)
    model = user_cnn.build()
    model.load_state_dict(dense.state_dict())
    _steps(model, data)
    after = evaluate(model, data.eval, data.task)
    assert before > 0.9 and data.task.metric.drop(before, after) < 0.05, (before, after)
    path = ts.save(model, tmp_path / "cnn.tslim")
    restored = ts.load(path, model=user_cnn.build())
    x = next(iter(data.eval))[0]
    assert torch.equal(restored(x), model(x))
    assert path.stat().st_size < 0.25 * sum(t.numel() * 4 for t in dense.state_dict().values())


RECIPE = """
name: user
model: {builder: "my_cnn:build", kwargs: {width: 8}, weights: cnn.safetensors}
data: {builder: "my_cnn:loaders", kwargs: {train: 256, eval: 128}}
steps:
  - prune: {sparsity: 0.6, steps: 1, finetune: {epochs: 1, lr: 0.001}}
  - share: {bits: 4, finetune: {epochs: 1, lr: 0.001}}
  - quantize: {scheme: static, calib_batches: 4, backend: eager}
latency: {batches: [1], repeats: 3, warmup: 1}
outputs: {dir: OUT}
"""


def test_user_cnn_through_a_recipe_and_the_cli(trained_cnn, tmp_path):
    dense, _ = trained_cnn
    shutil.copy(HERE / "user_cnn.py", tmp_path / "my_cnn.py")  # found next to the recipe, not on sys.path
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(tmp_path / "cnn.safetensors"))
    recipe = tmp_path / "user.yaml"
    recipe.write_text(RECIPE.replace("OUT", str(tmp_path / "out")))
    result = CliRunner().invoke(app, ["compress", str(recipe)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "my_cnn:build on my_cnn:loaders" in result.output
    report = RunReport.from_dict(json.loads((tmp_path / "out" / "report.json").read_text()))
    assert report.baseline.accuracy > 0.9 and report.compressed.agreement > 0.9
    assert report.compressed.ratio > 4 and report.model["builder"] == "my_cnn:build"
    restored = ts.load(tmp_path / "out" / "user.tslim", model=user_cnn.build())  # a fresh model of the user's
    x = next(iter(user_cnn.loaders(eval=64)["eval"]))[0]
    assert restored(x).shape == (64, 4)


SEARCH = """
search:
  budget: 3pt
  trials: 2
  sparsity: [0.0, 0.5, 0.8]
  bits: []
  channels: [0.0]
  int8: false
  seeds: [1.0]
  recovery: {samples: 64, epochs: 1, lr: 0.001, share_epochs: 0}
  final: {samples: 128, epochs: 1, lr: 0.001, share_epochs: 0}
  latency_backend: eager
  latency_batch: 8
"""


def test_user_cnn_searched_through_the_cli(trained_cnn, tmp_path):
    dense, _ = trained_cnn
    shutil.copy(HERE / "user_cnn.py", tmp_path / "my_cnn.py")
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(tmp_path / "cnn.safetensors"))
    recipe = tmp_path / "user.yaml"
    recipe.write_text(RECIPE.replace("OUT", str(tmp_path / "out")) + SEARCH)
    result = CliRunner().invoke(app, ["search", str(recipe), "--quiet"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = SearchResult.from_dict(json.loads((tmp_path / "out" / "report.json").read_text()))
    assert report.model == {"name": "my_cnn:build", "kwargs": {"width": 8}} and report.data == {"name": "user"}
    assert report.search.trials_done == 2 and report.final is not None and report.baseline.accuracy_search > 0.9
    assert "held-out split:" in result.output and "points lost" in result.output
    restored = ts.load(report.final.artifact, model=user_cnn.build())  # the file loads into the user's model
    x = next(iter(user_cnn.loaders(eval=64)["eval"]))[0]
    assert restored(x).shape == (64, 4)


def test_dict_batch_text_classifier_with_padding():
    torch.manual_seed(0)
    model = TextGRU()
    data = Data(**text_loaders())
    batch = next(iter(data.eval))
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # variable lengths, padded
    fit(model, data, TrainConfig(epochs=6, lr=1e-2))
    before = evaluate(model, data.eval, data.task)
    dense = TextGRU()
    dense.load_state_dict(model.state_dict())
    ts.prune_(model, ts.MagnitudePruneConfig(sparsity=0.5, steps=1, finetune=TrainConfig(epochs=1, lr=1e-3)), data=data)
    ts.quantize_(model, ts.QuantizeConfig(scheme="weight"), data=data)
    after = evaluate(model, data.eval, data.task)
    assert data.task.metric.name == "accuracy" and before > 0.8 and before - after < 0.05, (before, after)
    assert fidelity(model, dense, data.eval, data.task) > 0.9


class Generated(IterableDataset):
    """Batches made on the fly by a generator: y = 2 x0 - x1 (+ noise); no length, no files."""

    def __init__(self, batches: int, seed: int) -> None:
        self.batches, self.seed = batches, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.batches):
            x = torch.randn(32, 6, generator=g)
            yield x, (2 * x[:, 0] - x[:, 1]).unsqueeze(1) + 0.01 * torch.randn(32, 1, generator=g)


def test_iterable_dataset_from_a_generator_reports_mse():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    data = Data(
        train=DataLoader(Generated(40, 0), batch_size=None),
        eval=DataLoader(Generated(8, 1), batch_size=None),
        task=Regression(),
    )
    before = evaluate(model, data.eval, data.task)
    fit(model, data, TrainConfig(epochs=5, lr=1e-2))
    trained = evaluate(model, data.eval, data.task)
    ts.share_(model, ts.ShareConfig(bits=5, finetune=TrainConfig(epochs=1, lr=1e-3)), data=data)
    shared = evaluate(model, data.eval, data.task)
    assert data.task.metric.name == "mse" and trained < before / 20 and shared < 2 * trained + 0.01, (
        before,
        trained,
        shared,
    )
