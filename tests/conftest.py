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


def _tiny_causal_lm(arch: str = "llama", hidden: int = 64, intermediate: int = 128, seed: int = 0) -> torch.nn.Module:
    """A tiny random Hugging Face causal LM: ``llama`` (grouped-query attention, SwiGLU, tied
    embeddings) or ``gpt2`` (``Conv1D`` projections, tied embeddings); 2 layers, 256 tokens."""
    transformers = pytest.importorskip("transformers")
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.GPT2Config(
            vocab_size=256,
            n_embd=hidden,
            n_inner=intermediate,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        cls = transformers.GPT2LMHeadModel
    torch.manual_seed(seed)
    return cls(config).eval()


@pytest.fixture
def tiny_lm():
    """``tiny_lm(arch="llama", hidden=64, intermediate=128)``: a new tiny random causal LM."""
    return _tiny_causal_lm


@pytest.fixture
def token_batches():
    """``token_batches(n, rows=4, tokens=32, seed=1)``: ``n`` batches of random token ids < 256."""

    def make(n: int, rows: int = 4, tokens: int = 32, seed: int = 1) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, 256, (rows, tokens), generator=g) for _ in range(n)]

    return make
