"""GPTQ on a tiny random Llama, block by block: int4 layers whose outputs stay closer to the
float model's than round-to-nearest's, a file that loads back, and clear errors."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torchslim as ts  # noqa: E402
from torchslim.core.qlayers import QuantizedLayer  # noqa: E402
from torchslim.errors import ConfigError  # noqa: E402


def _llama(hidden: int = 64, intermediate: int = 128) -> torch.nn.Module:
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
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _batches(n: int, rows: int = 4, tokens: int = 32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (rows, tokens), generator=g) for _ in range(n)]


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch).logits


def _rtn(model: torch.nn.Module, group_size: int) -> torch.nn.Module:
    rtn = copy.deepcopy(model)
    layers = [n for n, m in rtn.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]
    for name in layers:
        rtn.set_submodule(name, QuantizedLayer.from_float(rtn.get_submodule(name), "weight", 4, group_size))
    return rtn


def test_gptq_int4_beats_rounding_on_every_layer_and_the_file_loads_back(tmp_path):
    model = _llama()
    held_out = _batches(2, seed=7)
    want = [_logits(model, b) for b in held_out]
    rtn = _rtn(model, 32)
    result = ts.gptq_(model, ts.GPTQConfig(group_size=32, calib_batches=8), data=_batches(8))
    linears = [n for n, m in model.named_modules() if ".layers." in f".{n}" and isinstance(m, QuantizedLayer)]
    assert len(result.layers) == len(linears) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if ".layers." in f".{n}")
    assert all(r.output_error < r.rtn_output_error for r in result.layers), result.to_dict()
    assert all(r.tokens == 8 * 4 * 32 and r.note is None for r in result.layers)
    err = sum(float((_logits(model, b) - w).pow(2).mean()) for b, w in zip(held_out, want, strict=True))
    err_rtn = sum(float((_logits(rtn, b) - w).pow(2).mean()) for b, w in zip(held_out, want, strict=True))
    assert err < err_rtn  # on tokens it was not calibrated on
    path = tmp_path / "gptq.tslim"
    ts.save(model, path)
    restored = ts.load(path, model=_llama())
    assert torch.equal(_logits(restored, held_out[0]), _logits(model, held_out[0]))
    assert "int4" in result.summary()


def test_gptq_without_act_order_and_with_few_tokens_says_how_it_damped(caplog):
    model = _llama()
    with caplog.at_level(logging.WARNING, logger="torchslim.transforms.gptq"):
        result = ts.gptq_(
            model, ts.GPTQConfig(group_size=64, act_order=False, calib_batches=1), data=_batches(1, 1, 16)
        )
    few = [r for r in result.layers if r.note]
    assert few and all(r.tokens == 16 for r in few)
    assert "16 calibration tokens for 64 inputs" in few[0].note and "damped" in caplog.text


def test_gptq_bad_input_is_a_clear_error_and_leaves_the_model_alone():
    model = _llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="group_size=48 does not divide .* 64 input features: use a divisor"):
        ts.gptq_(model, ts.GPTQConfig(group_size=48), data=_batches(2))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="pass data="):
        ts.gptq_(model, ts.GPTQConfig())
    with pytest.raises(ConfigError, match="repeated blocks"):
        ts.gptq_(torch.nn.Sequential(torch.nn.Linear(8, 8)), ts.GPTQConfig(group_size=8), data=[torch.zeros(2, 8)])
    with pytest.raises(ConfigError, match="damp="):
        ts.GPTQConfig(damp=0.0)
