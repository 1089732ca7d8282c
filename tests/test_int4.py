"""GPTQ and AWQ on tiny random Llama and GPT-2 models, block by block: int4 layers whose
outputs stay closer to the float model's than round-to-nearest's, files that load back, clear errors."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torchslim as ts  # noqa: E402
from torchslim.core.linears import is_linear  # noqa: E402
from torchslim.core.qlayers import QuantizedLayer  # noqa: E402
from torchslim.errors import ConfigError  # noqa: E402


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch).logits


def _rtn(model: torch.nn.Module, group_size: int) -> torch.nn.Module:
    rtn = copy.deepcopy(model)
    layers = [n for n, m in rtn.named_modules() if is_linear(m) and _in_blocks(n)]
    for name in layers:
        rtn.set_submodule(name, QuantizedLayer.from_float(rtn.get_submodule(name), "weight", 4, group_size))
    return rtn


def _in_blocks(name: str) -> bool:
    return ".layers." in f".{name}" or ".h." in f".{name}"


@pytest.mark.parametrize(
    "arch, per_block", [("llama", 7), ("gpt2", 4)]
)  # q k v o gate up down; c_attn c_proj c_fc c_proj
def test_gptq_int4_beats_rounding_on_every_layer_and_the_file_loads_back(
    tmp_path, tiny_lm, token_batches, arch, per_block
):
    model = tiny_lm(arch)
    held_out = token_batches(2, seed=7)
    want = [_logits(model, b) for b in held_out]
    rtn = _rtn(model, 32)
    result = ts.gptq_(model, ts.GPTQConfig(group_size=32, calib_batches=8), data=token_batches(8))
    linears = [n for n, m in model.named_modules() if _in_blocks(n) and isinstance(m, QuantizedLayer)]
    assert len(result.layers) == len(linears) == 2 * per_block
    assert not any(is_linear(m) for n, m in model.named_modules() if _in_blocks(n))
    assert all(r.output_error < r.rtn_output_error for r in result.layers), result.to_dict()
    assert all(r.tokens == 8 * 4 * 32 and r.note is None for r in result.layers)
    err = sum(float((_logits(model, b) - w).pow(2).mean()) for b, w in zip(held_out, want, strict=True))
    err_rtn = sum(float((_logits(rtn, b) - w).pow(2).mean()) for b, w in zip(held_out, want, strict=True))
    assert err < err_rtn  # on tokens it was not calibrated on
    path = tmp_path / "gptq.tslim"
    ts.save(model, path)
    restored = ts.load(path, model=tiny_lm(arch))
    assert torch.equal(_logits(restored, held_out[0]), _logits(model, held_out[0]))
    assert "int4" in result.summary()


def test_gptq_without_act_order_and_with_few_tokens_says_how_it_damped(caplog, tiny_lm, token_batches):
    model = tiny_lm()
    with caplog.at_level(logging.WARNING, logger="torchslim.transforms.gptq"):
        result = ts.gptq_(
            model, ts.GPTQConfig(group_size=64, act_order=False, calib_batches=1), data=token_batches(1, 1, 16)
        )
    few = [r for r in result.layers if r.note]
    assert few and all(r.tokens == 16 for r in few)
    assert "16 calibration tokens for 64 inputs" in few[0].note and "damped" in caplog.text


def test_gptq_bad_input_is_a_clear_error_and_leaves_the_model_alone(tiny_lm, token_batches):
    model = tiny_lm()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="group_size=48 does not divide .* 64 input features: use a divisor"):
        ts.gptq_(model, ts.GPTQConfig(group_size=48), data=token_batches(2))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="pass data="):
        ts.gptq_(model, ts.GPTQConfig())
    with pytest.raises(ConfigError, match="repeated blocks"):
        ts.gptq_(torch.nn.Sequential(torch.nn.Linear(8, 8)), ts.GPTQConfig(group_size=8), data=[torch.zeros(2, 8)])
    with pytest.raises(ConfigError, match="damp="):
        ts.GPTQConfig(damp=0.0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_awq_int4_is_closer_than_rounding_and_the_file_loads_back(tmp_path, tiny_lm, token_batches, arch):
    model = tiny_lm(arch)
    with torch.no_grad():  # a few input features far larger than the rest, as in trained models
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith(("ln_1.weight", "ln_2.weight")):
                p[::16] = 10.0
    held_out = token_batches(2, seed=7)
    want = [_logits(model, b) for b in held_out]
    rtn = _rtn(model, 32)
    result = ts.awq_(model, ts.AWQConfig(group_size=32, calib_batches=8), data=token_batches(8))
    assert all(r.output_error <= r.rtn_output_error for r in result.layers), result.to_dict()
    assert any(r.alpha > 0 for r in result.layers) and all(0.5 <= r.mean_clip <= 1 for r in result.layers)
    err = sum(float((_logits(model, b) - w).pow(2).mean()) for b, w in zip(held_out, want, strict=True))
    err_rtn = sum(float((_logits(rtn, b) - w).pow(2).mean()) for b, w in zip(held_out, want, strict=True))
    assert err < err_rtn
    path = tmp_path / "awq.tslim"
    ts.save(model, path)
    restored = ts.load(path, model=tiny_lm(arch))
    assert torch.equal(_logits(restored, held_out[0]), _logits(model, held_out[0]))
    assert "AWQ" in result.summary()
    with pytest.raises(ConfigError, match="group_size=48 does not divide"):
        ts.awq_(tiny_lm(arch), ts.AWQConfig(group_size=48), data=token_batches(2))
