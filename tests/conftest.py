"""Shared fixtures. Every test writes only under pytest's temporary folders."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

_HOME_TMP = tempfile.mkdtemp(prefix="torchslim-tests-")
os.environ.setdefault("TORCHSLIM_CACHE", os.path.join(_HOME_TMP, "cache"))
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_HOME_TMP, "mpl"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_HOME_TMP, "inductor"))

from torchslim.core.data import DataSpec, load_data  # noqa: E402
from torchslim.core.models import lenet_300_100  # noqa: E402
from torchslim.train.fit import TrainConfig, fit  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def digits():
    return load_data(DataSpec("digits", batch_size=64, eval_batch_size=128, calib_size=256))


@pytest.fixture(scope="session")
def digits_mlp(digits):
    """A LeNet-300-100 for 8x8 digits, trained for a few epochs (about 97 % accuracy)."""
    torch.manual_seed(0)
    model = lenet_300_100(in_features=64)
    fit(model, digits, TrainConfig(epochs=6, lr=3e-3))
    return model.eval()


@pytest.fixture
def compress_cli(tmp_path):
    """Run ``torchslim compress`` on a recipe text whose outputs go to ``OUT``; return (output, report)."""
    import json

    from typer.testing import CliRunner

    from torchslim.cli import app

    def run(text: str) -> tuple[str, dict]:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(text.replace("OUT", str(tmp_path)))
        printed = CliRunner().invoke(app, ["compress", str(recipe)], env={"COLUMNS": "250"})
        assert printed.exit_code == 0, printed.output
        return printed.output, json.loads((tmp_path / "report.json").read_text())

    return run
