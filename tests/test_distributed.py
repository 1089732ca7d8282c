"""Data-parallel training under torchrun and epoch checkpoints: the same steps on N processes as
on one at the same global batch, rank 0 alone writing, and a killed run resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

import torchslim.recipe.run as recipe_run
import torchslim.train.baseline as train_baseline
import torchslim.train.checkpoint as train_checkpoint
from torchslim.core.data import Data, TensorBatches
from torchslim.core.task import Classification
from torchslim.recipe.run import run_recipe
from torchslim.recipe.schema import parse_recipe
from torchslim.train.checkpoint import checkpoints
from torchslim.train.distributed import shard
from torchslim.train.fit import TrainConfig, fit

TINY = """
name: tiny
model: {name: lenet_300_100, kwargs: {in_features: 64}}
data: {name: digits, batch_size: 64, eval_batch_size: 200, calib_size: 128}
baseline: {epochs: 2, lr: 0.003}
steps:
  - prune: {sparsity: {fc1: 0.8, fc2: 0.8, fc3: 0.5}, steps: 1, finetune: {epochs: 2, lr: 0.002}}
latency: {batches: [1], repeats: 2, warmup: 1}
outputs: {dir: "OUT", artifact: "{name}.tslim"}
"""


def _data(rows: int = 90, batch: int = 16) -> Data:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, 8, generator=g), torch.randint(0, 3, (rows,), generator=g)
    train = TensorBatches((x, y), batch, shuffle=True, seed=3)
    return Data(train=train, eval=TensorBatches((x, y), 32), task=Classification())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def test_shards_cover_the_batch_once_and_weigh_rows():
    batch = ({"x": torch.arange(10).view(5, 2), "mask": torch.ones(5)}, torch.arange(5), torch.tensor(3.0))
    parts = [shard(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p[0][1] for p in parts]), torch.arange(5))
    assert torch.equal(torch.cat([p[0][0]["x"] for p in parts]), batch[0]["x"])
    assert [w for _, w in parts] == [2 * 2 / 5, 3 * 2 / 5]  # rows here * ranks / rows
    assert all(p[0][2] is batch[2] for p in parts)  # not a per-row tensor: as it is
    whole, weight = shard((torch.zeros(1, 3), torch.zeros(1)), 0, 2)  # fewer rows than ranks
    assert weight == 0.0 and whole[0].shape == (1, 3)


def _worker(rank: int, size: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        torch.set_num_threads(1)
        model = _model()
        losses = fit(model, _data(), TrainConfig(epochs=2, lr=0.01))
        if rank == 0:
            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()} | {"losses": torch.tensor(losses)}, out
            )
    finally:
        dist.destroy_process_group()


def test_two_processes_take_the_steps_one_process_takes_on_the_same_global_batch(tmp_path):
    one = _model()
    losses = fit(one, _data(), TrainConfig(epochs=2, lr=0.01))
    out = tmp_path / "two.safetensors"
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2, join=True)
    two = load_file(out)
    assert torch.allclose(two.pop("losses"), torch.tensor(losses), atol=1e-5)
    for k, v in one.state_dict().items():
        assert torch.allclose(two[k], v, atol=1e-5), k


class _Killed(Exception):
    pass


def test_a_run_killed_mid_training_resumes_after_its_last_epoch(tmp_path, caplog):
    config = TrainConfig(epochs=4, lr=0.01)
    whole = _model()
    expected = fit(whole, _data(), config)
    steps_per_epoch = _data().train_steps()

    def die(done: int, _total: int) -> None:
        if done == 2 * steps_per_epoch + 1:  # one step into the third epoch
            raise _Killed

    with checkpoints(tmp_path), pytest.raises(_Killed):
        fit(_model(), _data(), config, progress=die)
    assert len(list(tmp_path.glob("fit-1-*.safetensors"))) == 1
    resumed = _model()
    with checkpoints(tmp_path):
        losses = fit(resumed, _data(), config)
    assert "after epoch 2 of 4" in caplog.text
    assert losses == pytest.approx(expected, abs=1e-6)
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    with checkpoints(tmp_path):  # a finished fit is not trained again
        assert fit(_model(), _data(), config, progress=die) == pytest.approx(expected, abs=1e-6)
    other = TrainConfig(epochs=4, lr=0.02)  # another config: its own checkpoint, trained from the start
    with checkpoints(tmp_path):
        assert fit(_model(), _data(), other)[0] != pytest.approx(expected[0])


def test_only_rank_0_writes_the_run_outputs(tmp_path, monkeypatch):
    first = tmp_path / "rank0"
    report = run_recipe(parse_recipe(TINY.replace("OUT", str(first))))
    assert not (first / "checkpoints").exists()  # removed once the run succeeded
    other = tmp_path / "rank1"
    other.mkdir()
    (other / "report.json").write_text((first / "report.json").read_text())  # what rank 0 wrote
    for module in (recipe_run, train_checkpoint, train_baseline):  # this process plays rank 1
        monkeypatch.setattr(module, "is_main", lambda: False)
    for module in (recipe_run, train_checkpoint):
        monkeypatch.setattr(module, "barrier", lambda: None)
    theirs = run_recipe(parse_recipe(TINY.replace("OUT", str(other))))
    assert sorted(p.name for p in other.iterdir()) == ["report.json"]
    assert theirs.compressed == report.compressed


def test_compress_on_two_processes_writes_one_artifact(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY.replace("OUT", str(tmp_path / "out")))
    env = os.environ | {"OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "torchslim.cli", "compress", str(recipe), "--nproc", "2", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("before / after") == 1  # rank 0 alone prints
    out = Path(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "tiny.tslim"]
    two = json.loads((out / "report.json").read_text())["compressed"]
    one = run_recipe(parse_recipe(TINY.replace("OUT", str(tmp_path / "one")))).compressed
    assert abs(two["accuracy"] - one.accuracy) <= 0.005  # the same steps, up to the order of float sums
