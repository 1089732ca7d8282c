"""Low-rank factorisation on tiny random transformers: ranks chosen by the energy kept, layers
that would not save left dense, files that load back (also quantized), clear errors and a model
left as it was when anything fails."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

pytest.importorskip("transformers")

import torchslim as ts  # noqa: E402
from torchslim.artifact.tslim import pack_manifest, read  # noqa: E402
from torchslim.core.linears import weight_matrix  # noqa: E402
from torchslim.core.lowrank import LowRankLinear  # noqa: E402
from torchslim.core.qlayers import QuantizedLayer  # noqa: E402
from torchslim.errors import ArtifactError, ConfigError, ShapeMismatchError  # noqa: E402


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch).logits


def _ranks(result) -> dict[str, int]:
    return {r.name: r.rank for r in result.layers}


@pytest.mark.parametrize("arch, per_block", [("llama", 7), ("gpt2", 4)])
def test_energy_one_reproduces_the_outputs(tiny_lm, token_batches, arch, per_block):
    model = tiny_lm(arch, hidden=32, intermediate=64)
    batch = token_batches(1)[0]
    want = _logits(model, batch)
    result = ts.lowrank_(model, ts.LowRankConfig(energy=1.0, min_saving=None))
    assert len(result.layers) == 2 * per_block and all(r.factorised for r in result.layers)
    assert all(r.rank == r.full_rank and r.energy == 1.0 for r in result.layers)  # random weights: full rank
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 2 * per_block
    assert torch.allclose(_logits(model, batch), want, atol=1e-4, rtol=1e-4)


def test_factors_split_the_singular_values_and_keep_a_conv1d_orientation(tiny_lm):
    model = tiny_lm("gpt2", hidden=32, intermediate=64)
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D: weight (in 32, out 64)
    w = weight_matrix(conv).clone()  # (64, 32)
    ts.lowrank_(model, ts.LowRankConfig(energy=1.0, min_saving=None, layers=("transformer.h.0.mlp.c_fc",)))
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, LowRankLinear) and (layer.in_features, layer.out_features, layer.rank) == (32, 64, 32)
    up, down = layer.up.weight, layer.down.weight
    assert torch.allclose(up @ down, w, atol=1e-5)
    s = torch.linalg.svdvals(w)
    assert torch.allclose(up.norm(dim=0), s.sqrt(), rtol=1e-4) and torch.allclose(down.norm(dim=1), s.sqrt(), rtol=1e-4)
    assert isinstance(model.transformer.h[1].mlp.c_fc, type(conv))  # only the named layer


def test_rank_grows_with_energy_and_the_report_counts_parameters(tiny_lm, token_batches):
    dense = tiny_lm("llama", hidden=32, intermediate=64)
    ranks, errors = [], []
    for energy in (0.3, 0.6, 0.9):
        model = copy.deepcopy(dense)
        result = ts.lowrank_(model, ts.LowRankConfig(energy=energy, min_saving=None), data=token_batches(1))
        ranks.append(_ranks(result))
        errors.append(sum(r.output_error for r in result.layers))
        assert all(r.energy >= energy and r.tokens == 4 * 32 for r in result.layers)
        for r in result.layers:
            layer = model.get_submodule(r.name)
            assert r.params_after == r.rank * (layer.in_features + layer.out_features)
    for low, high in zip(ranks, ranks[1:]):
        assert all(low[n] <= high[n] for n in low) and sum(high.values()) > sum(low.values())
    assert errors[0] > errors[1] > errors[2] > 0
    assert "energy 0.9" in result.summary() and "mean relative output error" in result.summary()


def test_a_layer_that_would_not_save_is_left_dense_with_the_reason(tiny_lm):
    model = tiny_lm("llama")
    q_proj = model.model.layers[0].self_attn.q_proj
    result = ts.lowrank_(model, ts.LowRankConfig(energy=0.9, min_saving=0.1, max_rank_ratio=0.5, rank_multiple=8))
    rows = {r.name: r for r in result.layers}
    kept = rows["model.layers.0.self_attn.q_proj"]  # 64 x 64: rank 32 of 64 costs 32 * 128 = all 4096 weights
    assert not kept.factorised and kept.params_after == kept.params_before == 4096 and kept.rank == 32
    assert "saving less than min_saving=0.1: left dense" in kept.note
    assert model.model.layers[0].self_attn.q_proj is q_proj
    gate = rows["model.layers.0.mlp.gate_proj"]  # 128 x 64: rank 32 costs 6144 of 8192
    assert gate.factorised and gate.rank == 32 and gate.params_after == 6144 and gate.note is None
    assert all(r.rank % 8 == 0 and r.rank <= r.full_rank // 2 for r in result.layers)
    assert "of 14 Linear layers factorised" in result.summary()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_file_loads_back_with_identical_logits_and_is_smaller(tmp_path, tiny_lm, token_batches, arch):
    model = tiny_lm(arch)
    dense = ts.save(model, tmp_path / "dense.tslim").stat().st_size
    ts.lowrank_(model, ts.LowRankConfig(energy=0.5), data=token_batches(2))
    path = ts.save(model, tmp_path / "low.tslim")
    assert path.stat().st_size < 0.75 * dense
    manifest, _ = read(path)
    assert manifest.lowrank == {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert manifest.tied  # the tied embedding stays one tensor
    restored = ts.load(path, model=tiny_lm(arch))
    for batch in token_batches(2, seed=5):
        assert torch.equal(_logits(restored, batch), _logits(model, batch))
    head, table = restored.get_output_embeddings(), restored.get_input_embeddings()
    assert head.weight is table.weight


def test_factors_quantize_with_gptq_and_int8_and_load_back(tmp_path, tiny_lm, token_batches):
    model = tiny_lm("llama", hidden=32, intermediate=64)
    ts.lowrank_(model, ts.LowRankConfig(energy=0.6, min_saving=0.0, rank_multiple=16))
    int4 = copy.deepcopy(model)
    result = ts.gptq_(int4, ts.GPTQConfig(group_size=16, calib_batches=2), data=token_batches(2))
    low = [m for m in int4.modules() if isinstance(m, LowRankLinear)]
    assert len(result.layers) == 2 * len(low) + (2 * 7 - len(low))  # both factors, and the layers left dense
    assert len(low) >= 2 * 5
    assert all(isinstance(m.down, QuantizedLayer) for m in int4.modules() if isinstance(m, LowRankLinear))
    int8 = copy.deepcopy(model)
    ts.quantize_(int8, ts.QuantizeConfig(scheme="dynamic", activations="token"), example=token_batches(1)[0])
    batch = token_batches(1, seed=3)[0]
    for name, quantized in (("int4", int4), ("int8", int8)):
        path = ts.save(quantized, tmp_path / f"{name}.tslim")
        assert read(path)[0].quant and read(path)[0].lowrank
        restored = ts.load(path, model=tiny_lm("llama", hidden=32, intermediate=64))
        assert torch.equal(_logits(restored, batch), _logits(quantized, batch)), name


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(energy=0), "energy=0"),
        (dict(energy=1.5), "energy=1.5"),
        (dict(energy=float("nan")), "energy=nan"),
        (dict(min_saving=1.0), "min_saving=1.0"),
        (dict(max_rank_ratio=0), "max_rank_ratio=0"),
        (dict(rank_multiple=0), "rank_multiple=0"),
        (dict(layers="re:.*q_proj"), "use a tuple of layer names"),
        (dict(layers=("re:(",)), "not a valid regular expression"),
    ],
)
def test_bad_configs_say_what_to_do(config, message):
    with pytest.raises(ConfigError, match=message):
        ts.LowRankConfig(**config)


def test_a_pattern_matching_nothing_is_an_error_before_anything_changes(tiny_lm):
    model = tiny_lm("llama", hidden=32, intermediate=64)
    with pytest.raises(ConfigError, match=r"\['re:.*qproj'\] match no Linear layer"):
        ts.lowrank_(model, ts.LowRankConfig(layers=("re:.*mlp.*", "re:.*qproj")))
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


@pytest.mark.parametrize("with_data", [False, True])
def test_a_failure_mid_run_leaves_the_model_as_it_was(tiny_lm, token_batches, with_data):
    model = tiny_lm("gpt2", hidden=32, intermediate=64)
    batch = token_batches(1)[0]
    want, layers = _logits(model, batch), dict(model.named_modules())

    def fail(done: int, total: int) -> None:
        if done == 1:
            raise RuntimeError("interrupted")

    data = token_batches(2) if with_data else None
    with pytest.raises(RuntimeError, match="interrupted"):
        ts.lowrank_(model, ts.LowRankConfig(energy=0.5, min_saving=None), data=data, progress=fail)
    assert dict(model.named_modules()) == layers  # every module is the original object
    assert torch.equal(_logits(model, batch), want)


def test_a_second_run_does_not_factorise_the_factors(tiny_lm):
    model = tiny_lm("llama", hidden=32, intermediate=64)
    first = ts.lowrank_(model, ts.LowRankConfig(energy=0.5, min_saving=None, layers=("re:.*mlp.*",)))
    second = ts.lowrank_(model, ts.LowRankConfig(energy=0.5, min_saving=None))
    assert len(first.layers) == 2 * 3 and len(second.layers) == 2 * 4
    assert not any("mlp" in r.name for r in second.layers)
    low = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(low) == 2 * 7 and all(type(m.down) is type(m.up) is torch.nn.Linear for m in low)
    with pytest.raises(ConfigError, match="no Linear layer to factorise"):
        ts.lowrank_(model, ts.LowRankConfig(energy=0.5, min_saving=None))


@pytest.fixture
def lowrank_file(tmp_path, tiny_lm):
    model = tiny_lm("llama", hidden=32, intermediate=64)
    ts.lowrank_(model, ts.LowRankConfig(energy=0.5, layers=("re:.*mlp.*",)))
    return read(ts.save(model, tmp_path / "low.tslim"))


_GATE = "model.layers.0.mlp.gate_proj"  # 64 x 32


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (lambda m: m["lowrank"][_GATE].update(rank=33), ShapeMismatchError, "rank 33 .* 64 x 32: a rank is at most 32"),
        (lambda m: m["lowrank"][_GATE].update(rank=True), ArtifactError, "an entry must be"),
        (lambda m: m["lowrank"][_GATE].update(rank=0), ArtifactError, "an entry must be"),
        (lambda m: m["lowrank"][_GATE].update(bits=4), ArtifactError, "an entry must be"),
        (lambda m: m.update(lowrank=[1]), ArtifactError, "'lowrank' must map layer names"),
        (lambda m: m["lowrank"].update({f"{_GATE}.down": {"rank": 2}}), ArtifactError, "lies inside"),
        (lambda m: m["lowrank"].update({"model.norm": {"rank": 2}}), ShapeMismatchError, "has LlamaRMSNorm there"),
        (lambda m: m["lowrank"].update({"model.nothing": {"rank": 2}}), ShapeMismatchError, "has nothing there"),
        (
            lambda m: m["lowrank"].pop(_GATE),
            ShapeMismatchError,
            "gate_proj.down' as 'Linear' but the model has nothing",
        ),
        (lambda m: m["lowrank"][_GATE].update(rank=2), ShapeMismatchError, "gate_proj.down.* may only shrink"),
        (lambda m: m["lowrank"][_GATE].update(rank=31), ShapeMismatchError, "rank 31 in 'lowrank' but factors"),
    ],
)
def test_hand_edited_lowrank_entries_are_refused_and_leave_the_model_intact(
    tmp_path, tiny_lm, lowrank_file, edit, error, message
):
    manifest, stored = lowrank_file
    edited = json.loads(json.dumps(manifest.raw))
    edit(edited)
    bad = tmp_path / "bad.tslim"
    bad.write_bytes(st_save(stored, metadata=pack_manifest(edited)))
    fresh = tiny_lm("llama", hidden=32, intermediate=64)
    layers = dict(fresh.named_modules())
    with pytest.raises(error, match=message):
        ts.load(bad, model=fresh)
    assert dict(fresh.named_modules()) == layers


def _small() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 8)).eval()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_fuzzed_lowrank_entry_loads_or_fails_with_an_artifact_error(tmp_path_factory, data):
    torch.manual_seed(0)
    model = _small()
    w = model[0].weight.detach()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    model[0] = LowRankLinear.from_factors(u[:, :5] * s[:5], vh[:5], model[0].bias.detach())
    folder = tmp_path_factory.mktemp("fuzz")
    manifest, stored = read(ts.save(model, folder / "m.tslim"))
    names = st.sampled_from(["0", "1", "2", "0.down", "0.up", "", "9", "2.weight"])
    values = st.one_of(
        st.fixed_dictionaries({"rank": st.integers(-2, 40)}),
        st.dictionaries(st.sampled_from(["rank", "bits"]), st.integers(0, 6) | st.booleans() | st.none(), max_size=2),
        st.integers() | st.text(max_size=4) | st.none(),
    )
    edited = json.loads(json.dumps(manifest.raw))
    edited["lowrank"] = data.draw(st.dictionaries(names, values, max_size=3) | st.none() | st.integers())
    (folder / "e.tslim").write_bytes(st_save(stored, metadata=pack_manifest(edited)))
    x = torch.randn(3, 16)
    try:
        restored = ts.load(folder / "e.tslim", model=_small())
    except ArtifactError:
        return
    assert edited["lowrank"] == {"0": {"rank": 5}}  # only the original entry loads
    assert torch.equal(restored(x), model(x))
