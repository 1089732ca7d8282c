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


def test_int4_layers_run_on_the_cpu_int4_kernel_and_match_the_dequantized_weight():
    from torchslim.core.qlayers import reference_forward

    torch.manual_seed(0)
    q = QuantizedLayer.from_float(torch.nn.Linear(256, 64), "weight", 4, 128)
    x = torch.randn(3, 5, 256)
    assert q._int4_kernel(x) and not q._int4_kernel(x.double())
    y = q(x)
    with reference_forward():
        want = q(x)  # the dequantized weight through F.linear
    assert y.shape == want.shape == (3, 5, 64)
    assert y.dtype == torch.float32 and torch.allclose(q(x.bfloat16()).float(), y, atol=2e-2, rtol=2e-2)
    assert float((y - want).norm() / want.norm()) < 1e-2
    q.weight_scale.mul_(2)  # a changed weight is repacked
    assert float(((q(x) - q.bias) - 2 * (want - q.bias)).norm() / want.norm()) < 2e-2
    odd = QuantizedLayer.from_float(torch.nn.Linear(256, 10), "weight", 4, 128)
    assert not odd._int4_kernel(x)  # outputs not a multiple of 16: the float path


def test_gptq_head_quantizes_a_tied_output_head_and_keeps_the_embedding_float(tmp_path, tiny_lm, token_batches):
    model = tiny_lm("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    table = model.model.embed_tokens.weight.detach().clone()
    result = ts.gptq_(model, ts.GPTQConfig(group_size=32, calib_batches=4, head=True), data=token_batches(4))
    assert isinstance(model.lm_head, QuantizedLayer) and result.layers[-1].name == "lm_head"
    assert result.layers[-1].output_error < result.layers[-1].rtn_output_error
    assert torch.equal(model.model.embed_tokens.weight, table)
    path = tmp_path / "head.tslim"
    ts.save(model, path)
    restored = ts.load(path, model=tiny_lm("llama"))
    batch = token_batches(1, seed=5)[0]
    assert isinstance(restored.lm_head, QuantizedLayer)
    assert torch.equal(_logits(restored, batch), _logits(model, batch))
    with pytest.raises(ConfigError, match="group_size=48 does not divide lm_head's 64 input features"):
        ts.gptq_(
            tiny_lm("llama"), ts.GPTQConfig(group_size=48, head=True, layers=("re:nothing",)), data=token_batches(1)
        )


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_three_bit_values_in_the_int4_layout_beat_three_bit_rounding(tiny_lm, token_batches, method):
    from torchslim.core.qlayers import unpack_int4

    model = tiny_lm("llama")
    if method == "gptq":
        result = ts.gptq_(model, ts.GPTQConfig(group_size=32, bits=3, calib_batches=4), data=token_batches(4))
    else:
        result = ts.awq_(model, ts.AWQConfig(group_size=32, bits=3, calib_batches=4), data=token_batches(4))
    assert "int3" in result.summary()
    assert sum(r.output_error for r in result.layers) < sum(r.rtn_output_error for r in result.layers)
    q = model.model.layers[0].mlp.down_proj
    ints = unpack_int4(q.weight, q.in_features)
    assert q.bits == 4 and int(ints.min()) >= -4 and int(ints.max()) <= 3
    with pytest.raises(ConfigError, match="bits=2"):
        ts.GPTQConfig(bits=2)


def test_the_inverse_factor_is_computed_in_place_and_damps_a_singular_h():
    from torchslim.transforms.gptq import cholesky_inverse_factor

    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = x.T @ x
    upper, used = cholesky_inverse_factor(h.clone, 0.01)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(40, dtype=h.dtype)
    want = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert used == 0.01 and torch.allclose(upper.triu(), want, atol=1e-10)
    singular = torch.zeros(40, 40)  # float32: a rank-1 block stays singular under the smallest damping
    singular[:2, :2] = 1.0
    singular.diagonal()[2:] = 1e-30
    upper, used = cholesky_inverse_factor(singular.clone, 1e-9)
    assert used > 1e-9 and torch.isfinite(upper).all()


def test_blocks_run_a_few_rows_at_a_time_give_the_whole_batch_outputs(monkeypatch, tiny_lm, token_batches):
    from torchslim.transforms import layerwise

    model = tiny_lm()
    batches = token_batches(2, rows=6, tokens=48)
    _, blocks = layerwise.repeated_blocks(model)
    monkeypatch.setattr(layerwise, "CHUNK_TOKENS", 96)  # 6 rows of 48 tokens, 2 rows at a time
    with torch.no_grad(), layerwise._no_cache(model):
        inputs = layerwise.capture_inputs(model, blocks, batches)
        whole = [layerwise._hidden(blocks[0](*a, **k)).clone() for a, k in inputs]
        assert len(list(layerwise.row_chunks(*inputs[0]))) == 3
        chunked = layerwise.run_block(blocks[0], inputs)
    for want, (a, k) in zip(whole, chunked, strict=True):
        got = a[0] if a else k["hidden_states"]
        assert torch.allclose(got, want, atol=1e-6)


def test_gptq_after_2_4_sparsity_keeps_every_zero_and_beats_rounding(tiny_lm, token_batches):
    model = tiny_lm()
    calib = token_batches(8)
    ts.sparsify_(model, ts.SparsifyConfig("sparsegpt", pattern="2:4", calib_batches=8), data=calib)
    masks = {n: m.weight == 0 for n, m in model.named_modules() if _in_blocks(n) and is_linear(m)}
    assert all(float(z.float().mean()) == 0.5 for z in masks.values())
    result = ts.gptq_(model, ts.GPTQConfig(group_size=32, calib_batches=8), data=calib)
    for name, zeros in masks.items():
        w = model.get_submodule(name).dequantized_weight()
        assert torch.equal(w[zeros], torch.zeros_like(w[zeros])), name  # the 2:4 pattern survives int4
    assert all(r.output_error < r.rtn_output_error for r in result.layers), result.to_dict()


def test_packed_int4_weights_are_entropy_coded_and_a_2_4_int4_file_is_smaller(tmp_path, tiny_lm, token_batches):
    from torchslim.artifact.tslim import read

    calib = token_batches(8)
    dense, sparse = tiny_lm(), tiny_lm()
    ts.sparsify_(sparse, ts.SparsifyConfig("sparsegpt", pattern="2:4", calib_batches=8), data=calib)
    for m in (dense, sparse):
        ts.gptq_(m, ts.GPTQConfig(group_size=32, calib_batches=8), data=calib)
    paths = [ts.save(m, tmp_path / f"{i}.tslim") for i, m in enumerate((dense, sparse))]
    int4_bytes = []
    for path in paths:  # each packed weight stored as it is, or as a coded blob where that is smaller
        manifest, stored = read(path)
        int4_bytes.append(sum(stored[f"{n}.weight"].numel() for n in manifest.quant))
    assert any(f"{n}.weight" in manifest.coded for n in manifest.quant)  # the 2:4 file: coded where smaller
    assert int4_bytes[1] < 0.9 * int4_bytes[0]  # the zero pairs cost positions, not bytes (tiny layers: overheads)
    restored = ts.load(paths[1], model=tiny_lm())
    batch = token_batches(1, seed=3)[0]
    assert torch.equal(_logits(restored, batch), _logits(sparse, batch))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_model_built_for_loading_gets_no_float_weights_of_its_own(tmp_path, tiny_lm, token_batches, arch):
    model = tiny_lm(arch)
    ts.gptq_(model, ts.GPTQConfig(group_size=32, calib_batches=2), data=token_batches(2))
    path = ts.save(model, tmp_path / "int4.tslim")
    built: dict[str, bool] = {}

    def build():
        fresh = tiny_lm(arch)
        built["on meta"] = all(p.is_meta for p in fresh.parameters())
        return fresh

    restored = ts.load(path, model=build)
    assert built["on meta"]
    assert not any(t.is_meta for t in [*restored.parameters(), *restored.buffers()])
    assert restored.lm_head.weight is restored.get_input_embeddings().weight
    batch = token_batches(1, seed=5)[0]  # equal logits: the rotary / position buffers made at build are real
    assert torch.equal(_logits(restored, batch), _logits(model, batch))
