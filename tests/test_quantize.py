"""Quantization: numerics against references, calibration, QAT, save/load, backends, bad input."""

import copy
import re

import pytest
import torch
from torch import nn

import torchslim as ts
import torchslim.artifact.tslim as tslim
from torchslim.analysis.ranges import BINS, InputStats, _mse, choose_range
from torchslim.artifact.runtime import compile_model, export_onnx
from torchslim.core.models import ZOO
from torchslim.core.qlayers import QuantizedLayer, pack_int4, unpack_int4
from torchslim.core.qrnn import QuantEntry, QuantizedRNN
from torchslim.errors import ArtifactError, ConfigError, DataError, ShapeMismatchError
from torchslim.evaluate.metrics import accuracy
from torchslim.train.fit import TrainConfig, fit
from torchslim.transforms.channels import ChannelPruneConfig, channel_prune_
from torchslim.transforms.quantize import QuantizeConfig, fold_batchnorm_, quantize_

X = torch.randn(4, 1, 28, 28)


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU twice, then Linear: a small CNN for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))  # (B, 16, 8, 8)
        x = torch.relu(self.bn2(self.conv2(x)))  # (B, 32, 4, 4)
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def digits_cnn(digits):
    torch.manual_seed(0)
    model = DigitsCNN()
    fit(model, digits, TrainConfig(epochs=4, lr=3e-3))
    return model.eval()


def test_a_static_linear_equals_pytorchs_fake_quant_reference():
    layer = nn.Linear(32, 16)
    x = torch.randn(8, 32) * 3
    q = QuantizedLayer.from_float(layer, "static", ranges=((float(x.min()), float(x.max())), (-2.0, 3.0)))
    scale = (float(x.max()) - float(x.min())) / 255
    zp = round(-float(x.min()) / scale)
    w_scale = layer.weight.detach().abs().amax(1) / 127
    ref_w = torch.fake_quantize_per_channel_affine(
        layer.weight.detach(), w_scale, torch.zeros(16, dtype=torch.int32), 0, -128, 127
    )
    ref = nn.functional.linear(torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255), ref_w, layer.bias)
    ref = torch.fake_quantize_per_tensor_affine(ref, 5.0 / 255, round(2.0 / (5.0 / 255)), 0, 255)
    assert torch.allclose(q(x), ref, atol=1e-5)
    assert q.weight.dtype == torch.int8 and int(q.weight.abs().max()) == 127


def test_int4_packs_two_values_a_byte_and_pads_the_last_group():
    q = torch.randint(-8, 8, (5, 37), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (5, 19) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, 37), q)
    layer = nn.Linear(37, 5)
    q4 = QuantizedLayer.from_float(layer, "weight", bits=4, group_size=16)
    assert q4.weight_scale.shape == (5, 3) and q4.weight_scale.dtype == torch.float16
    err = (q4.dequantized_weight() - layer.weight).abs().max()
    assert err <= float(q4.weight_scale.float().max()) / 2 + 1e-6  # within half a step of the coarsest group


def test_batchnorm_folding_keeps_outputs_and_is_recorded():
    model = ZOO["resnet_mini"]().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    before = model(X)
    folded = fold_batchnorm_(model)
    assert len(folded) == 9 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(model(X), before, atol=1e-5)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_every_calibration_method_keeps_the_cnn_accurate(digits, digits_cnn, method):
    model = copy.deepcopy(digits_cnn)
    base = accuracy(digits_cnn, digits.eval_loader())
    result = quantize_(model, QuantizeConfig(calibration=method), data=digits)
    assert all(isinstance(model.get_submodule(n), QuantizedLayer) for n in ("conv1", "conv2", "fc"))
    assert result.folded == ["bn1", "bn2"]
    assert accuracy(model, digits.eval_loader()) >= base - 0.02
    rows = {r.name: r for r in result.layers}
    assert rows["conv2"].input_range[0] == 0.0 and 0 < rows["conv2"].weight_error < 0.02


def test_range_methods_clip_a_heavy_tail_that_minmax_keeps():
    data = torch.relu(torch.randn(100_000)) ** 3  # most values below 1, the largest near 95
    top = float(data.max())
    stats = InputStats(0.0, top, data.numel(), torch.histc(data[data != 0], BINS, 0.0, top), int((data == 0).sum()))
    assert choose_range(stats, "minmax") == (0.0, top)
    ranges = {m: choose_range(stats, m) for m in ("percentile", "mse", "entropy")}
    assert all(lo == 0.0 for lo, _ in ranges.values())
    assert ranges["percentile"][1] < 0.6 * top and ranges["entropy"][1] < 0.6 * top and ranges["mse"][1] < top
    edges = torch.linspace(0.0, top, BINS + 1, dtype=torch.float64)
    chosen, whole = _mse(stats.hist.double(), edges, [ranges["mse"], (0.0, top)])
    assert chosen < whole


def test_dynamic_and_weight_only_schemes(digits, digits_mlp):
    base = accuracy(digits_mlp, digits.eval_loader())
    for config in (
        QuantizeConfig(scheme="dynamic"),
        QuantizeConfig(scheme="weight"),
        QuantizeConfig(scheme="weight", bits=4, group_size=32),
    ):
        model = copy.deepcopy(digits_mlp)
        result = quantize_(model, config, example=digits.example_input(4))
        assert {r.scheme for r in result.layers} == {config.scheme}
        assert accuracy(model, digits.eval_loader()) >= base - (0.03 if config.bits == 4 else 0.01)


def test_saved_int8_loads_bit_exact_and_is_four_times_smaller(tmp_path, digits_cnn, digits):
    model = copy.deepcopy(digits_cnn)
    quantize_(model, QuantizeConfig(), data=digits)
    path = ts.save(model, tmp_path / "int8.tslim")
    restored = ts.load(path, model=DigitsCNN)
    x = digits.example_input(16)
    assert torch.equal(restored(x), model(x))
    manifest = tslim.read(path)[0]
    assert manifest.folded == {"bn1": "conv1", "bn2": "conv2"}
    assert manifest.raw["quant"]["conv1"] == {
        "of": "Conv2d",
        "scheme": "static",
        "bits": 8,
        "group_size": 0,
        "per_channel": True,
        "input": list(model.conv1.input_q),
        "output": None,
    }
    assert manifest.quant["conv1"] == QuantEntry("Conv2d", "static", 8, 0, True, model.conv1.input_q, None)
    assert restored.conv1.input_q == model.conv1.input_q and type(restored.conv1.input_q[0]) is float

    per_tensor = copy.deepcopy(digits_cnn)
    quantize_(per_tensor, QuantizeConfig(per_channel=False), data=digits)
    assert per_tensor.conv1.weight_scale.shape == (1,) and "per tensor" in repr(per_tensor.conv1)
    restored = ts.load(ts.save(per_tensor, tmp_path / "tensor.tslim"), model=DigitsCNN)
    assert not restored.conv1.per_channel and restored.conv1.tensor_scale == per_tensor.conv1.tensor_scale
    assert torch.equal(restored(x), per_tensor(x))

    mlp = ZOO["lenet_300_100"]()
    fp32 = ts.save(mlp, tmp_path / "fp32.tslim").stat().st_size
    quantize_(mlp, QuantizeConfig(), data=[torch.randn(8, 1, 28, 28)])
    assert fp32 / ts.save(mlp, tmp_path / "mlp8.tslim").stat().st_size >= 3.9


@pytest.mark.parametrize("config", [QuantizeConfig(), QuantizeConfig(scheme="weight", bits=4, group_size=16)])
def test_structured_pruning_then_quantization_round_trips(tmp_path, config):
    model = ZOO["resnet_mini"]().eval() if config.bits == 8 else ZOO["lenet_300_100"]().eval()
    channel_prune_(model, ChannelPruneConfig(ratio=0.5, round_to=4, min_channels=4), example=X)
    quantize_(model, config, data=[torch.randn(8, 1, 28, 28)])
    path = ts.save(model, tmp_path / "m.tslim")
    fresh = ZOO["resnet_mini"]() if config.bits == 8 else ZOO["lenet_300_100"]()
    assert torch.equal(ts.load(path, model=fresh)(X), model(X))


def test_qat_trains_through_the_grid_then_converts(digits, digits_cnn):
    model = copy.deepcopy(digits_cnn)
    result = quantize_(model, QuantizeConfig(qat=TrainConfig(epochs=1, lr=1e-4)), data=digits, teacher=digits_cnn)
    assert isinstance(model.conv1, QuantizedLayer) and result.history[0]["qat_epochs"] == 1
    assert accuracy(model, digits.eval_loader()) >= accuracy(digits_cnn, digits.eval_loader()) - 0.02


def test_excluded_and_unsupported_layers_stay_float_with_the_reason():
    model = ZOO["lstm_classifier"]().eval()
    result = quantize_(model, QuantizeConfig(), data=[torch.randn(8, 1, 28, 28)])
    skips = {r.name: r.skip for r in result.layers if r.skip}
    assert list(skips) == ["rnn"] and skips["rnn"] == "LSTM layers are quantized by scheme='dynamic'; kept in float"
    assert isinstance(model.fc, QuantizedLayer) and isinstance(model.rnn, nn.LSTM)

    model = ZOO["lenet_300_100"]().eval()
    result = quantize_(model, QuantizeConfig(exclude=("re:fc[12]",)), data=[torch.randn(8, 1, 28, 28)])
    assert {r.name: r.skip for r in result.layers if r.skip} == {
        "fc1": "excluded (kept in float)",
        "fc2": "excluded (kept in float)",
    }
    assert type(model.fc1) is nn.Linear and isinstance(model.fc3, QuantizedLayer)


def test_bad_calibration_data_and_layers(digits_cnn):
    good = torch.randn(8, 1, 8, 8)
    nan = good.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="calibration batch 1 holds NaN or Inf"):
        quantize_(copy.deepcopy(digits_cnn), QuantizeConfig(), data=[good, nan])
    with pytest.raises(DataError, match="yielded no batches"):
        quantize_(copy.deepcopy(digits_cnn), QuantizeConfig(), data=[])
    with pytest.raises(DataError, match=r"has shape \(8, 1, 28, 28\) but the model's input is \(8, 1, 8, 8\)"):
        quantize_(copy.deepcopy(digits_cnn), QuantizeConfig(), data=[good, torch.randn(8, 1, 28, 28)])
    with pytest.raises(ConfigError, match="static quantization calibrates"):
        quantize_(copy.deepcopy(digits_cnn), QuantizeConfig())
    with pytest.raises(ConfigError, match="no layer this scheme can quantize"):
        quantize_(nn.Sequential(nn.Embedding(8, 4)), QuantizeConfig(scheme="dynamic"), example=torch.zeros(2, 3).long())
    with pytest.raises(ConfigError, match=r"exclude \['fc9'\] match no layer"):
        quantize_(copy.deepcopy(digits_cnn), QuantizeConfig(exclude=("fc9",)), data=[good])
    for bad, message in (
        (dict(bits=4), "int4 weight-only"),
        (dict(calibration="kl"), "calibration='kl'"),
        (dict(scheme="int8"), "scheme='int8'"),
        (dict(percentile=30.0), "percentile=30.0"),
        (dict(scheme="dynamic", qat=TrainConfig()), "qat trains through static"),
    ):
        with pytest.raises(ConfigError, match=message):
            QuantizeConfig(**bad)


def test_constant_inputs_and_all_zero_weights_are_handled_and_recorded():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)  # so the second layer's input is constantly 0
    result = quantize_(model, QuantizeConfig(calibration="mse"), data=[torch.randn(16, 4)])
    rows = {r.name: r for r in result.layers}
    assert rows["0"].note.startswith("all-zero weight") and not model[0].weight.any()
    assert rows["2"].input_range == [0.0, 0.0] and rows["2"].input_scale == pytest.approx(1 / 255)
    assert torch.allclose(model(torch.randn(3, 4)), model[2].bias.expand(3, 2), atol=model[2].output_q[0])


def test_a_file_quantized_for_another_model_is_refused_and_the_model_kept(tmp_path, digits_cnn, digits):
    model = copy.deepcopy(digits_cnn)
    quantize_(model, QuantizeConfig(), data=digits)
    path = ts.save(model, tmp_path / "int8.tslim")
    other = ZOO["lenet5"]()
    before = {n: type(m) for n, m in other.named_modules()}
    with pytest.raises(ShapeMismatchError):
        ts.load(path, model=other)
    assert {n: type(m) for n, m in other.named_modules()} == before

    class NoBN(DigitsCNN):
        def __init__(self):
            super().__init__()
            self.bn1 = nn.Identity()

    with pytest.raises(ShapeMismatchError, match="folded a BatchNorm at 'bn1'"):
        ts.load(path, model=NoBN())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["quant"]["fc"].update(scheme="int3"), "unknown description"),
        (lambda m: m["quant"]["fc"].update(bits=4), "not valid"),
        (lambda m: m["quant"].update(conv1="int8"), "unknown description"),
        (lambda m: m.update(folded=["bn1"]), "needs 'quant' and 'folded'"),
        (lambda m: m["quant"]["fc"].update(input=[0.0, 3]), "a grid must be"),
        (lambda m: m["quant"]["fc"].update(output=[0.1, 256]), "a grid must be"),
        (lambda m: m["quant"]["fc"].pop("input"), "a grid must be"),
        (lambda m: m["quant"]["conv1"].update(output=[1.5]), "a grid must be"),
        (lambda m: m["folded"].update(bn1="fc"), "folded a BatchNorm at 'bn1' into 'fc'"),
        (lambda m: m.pop("quant"), "needs 'quant' and 'folded'"),
        (lambda m: m["quant"]["fc"].update(per_channel="yes"), "per_channel must be true or false"),
        (lambda m: m["quant"]["fc"].update(smooth=True), "smooth must be false, or true for a dynamic int8"),
        (lambda m: m["quant"]["fc"].update(per_channel=False), "weight_scale is \\(10,\\), expected \\(1,\\)|shape"),
    ],
)
def test_hostile_quantization_manifests_are_artifact_errors(tmp_path, digits_cnn, digits, edit, message):
    from safetensors.torch import load_file, save_file

    model = copy.deepcopy(digits_cnn)
    quantize_(model, QuantizeConfig(calibration="minmax"), data=digits)
    path = ts.save(model, tmp_path / "int8.tslim")
    manifest = tslim.read(path)[0].raw
    edit(manifest)
    save_file(load_file(path), tmp_path / "bad.tslim", metadata=tslim.pack_manifest(manifest))
    with pytest.raises(ArtifactError, match=message):
        ts.load(tmp_path / "bad.tslim", model=DigitsCNN)


@pytest.mark.parametrize("per_channel", [True, False])
def test_inductor_runs_the_int8_model_on_integer_kernels_with_the_same_answers(digits, digits_cnn, per_channel):
    model = copy.deepcopy(digits_cnn)
    quantize_(model, QuantizeConfig(per_channel=per_channel), data=digits)
    x = next(iter(digits.eval_loader()))[0]
    fast = compile_model(model, "inductor", x)
    ref, out = model(x), fast(x)
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.99
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("per_channel", [True, False])
def test_onnx_export_runs_in_onnx_runtime_with_the_same_answers(digits, digits_cnn, per_channel):
    model = copy.deepcopy(digits_cnn)
    quantize_(model, QuantizeConfig(per_channel=per_channel), data=digits)
    import onnx

    graph = onnx.load_from_string(export_onnx(model, digits.example_input(2))).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    sizes = {i.name: len(onnx.numpy_helper.to_array(i).reshape(-1)) for i in graph.initializer}
    weight_scales = [
        sizes.get(n.input[1]) for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight")
    ]
    assert weight_scales and all((size > 1) == per_channel for size in weight_scales)
    x = torch.cat([b[0] for b in digits.eval_loader()])
    ort = compile_model(model, "onnxruntime", x[:64])
    agree = (ort(x).argmax(1) == model(x).argmax(1)).float().mean()
    assert agree >= 0.995


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru, self.head = nn.GRU(6, 8, num_layers=2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


@pytest.mark.parametrize("build, features", [(_Recurrent, 6), (_Attention, 16)])
def test_onnx_export_from_one_sample_keeps_batch_and_sequence_dynamic(build, features):
    import onnxruntime

    torch.manual_seed(0)
    model = build().eval()
    session = onnxruntime.InferenceSession(export_onnx(model, torch.randn(1, 1, features)))
    for batch, length in ((1, 4), (5, 4), (3, 11)):
        x = torch.randn(batch, length, features)
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert out.shape == (batch, 3) and torch.allclose(torch.from_numpy(out), model(x), atol=1e-4)


QUANT_RECIPE = """
name: tiny_int8
model: {name: resnet_mini, kwargs: {width: 8}}
data: {name: digits, batch_size: 64, eval_batch_size: 200, calib_size: 128}
baseline: {epochs: 2, lr: 0.003}
steps:
  - prune: {sparsity: 0.05, finetune: null}
  - quantize: {calibration: percentile, backend: onnxruntime}
latency: {batches: [4], repeats: 3, warmup: 1}
outputs: {dir: "OUT", artifact: "{name}.tslim"}
"""


def test_recipe_quantize_step_reports_layers_and_the_cli_exports_onnx(tmp_path, compress_cli, monkeypatch):
    from typer.testing import CliRunner

    from torchslim.artifact import speed
    from torchslim.cli import app

    monkeypatch.setattr(speed, "_time", lambda *_args, **_kw: (1.0, 2.0))  # int8 timed faster than float
    output, report = compress_cli(QUANT_RECIPE)
    check = report["quantization"]["speed"]
    assert check["backend"] == "onnxruntime" and check["batches"] == [4] and check["delivered"] == "int8"
    assert "float model compiled 2.000 ms, int8 1.000 ms; int8 kept" in (tmp_path / "report.md").read_text()
    assert "quantized layers (latency on onnxruntime)" in output
    rows = {r["name"]: r for r in report["quantization"]["quantization"]["layers"]}
    assert rows["stem"]["scheme"] == "static" and rows["fc"]["bits"] == 8
    assert report["compressed"]["latency"]["batch4"]["backend"] == "onnxruntime"
    assert report["compressed"]["agreement"] >= 0.97
    assert "## Quantization" in (tmp_path / "report.md").read_text()

    out = tmp_path / "m.onnx"
    printed = CliRunner().invoke(
        app, ["export", str(tmp_path / "tiny_int8.tslim"), "--onnx", str(out), "--shape", "1,1,8,8"]
    )
    assert printed.exit_code == 0, printed.output
    assert out.stat().st_size > 0 and "top-1 agreement 100.0%" in printed.output
    bad = CliRunner().invoke(app, ["export", str(tmp_path / "tiny_int8.tslim"), "--onnx", str(out), "--shape", "1,x"])
    assert bad.exit_code == 2 and "--shape" in bad.output


def test_int8_kernels_count_as_exact_only_with_vnni_or_amx(tmp_path):
    from torchslim.artifact.runtime import exact_int8_kernels

    cases = {
        "avx2 avx512f": False,
        "avx2 avx512_vnni": True,
        "avx2 avx_vnni": True,
        "avx2 amx_int8": True,
        "neon": True,
    }
    for flags, exact in cases.items():
        (tmp_path / "cpuinfo").write_text(f"processor : 0\nflags : fpu {flags}\n")
        assert exact_int8_kernels(str(tmp_path / "cpuinfo")) is exact, flags
    assert exact_int8_kernels(str(tmp_path / "missing")) is True


def test_quantize_must_be_the_last_step():
    from torchslim.errors import RecipeError
    from torchslim.recipe.schema import parse_recipe

    text = QUANT_RECIPE.replace("  - quantize: {calibration: percentile, backend: onnxruntime}\n", "").replace(
        "  - prune:", "  - quantize: {}\n  - prune:"
    )
    with pytest.raises(RecipeError, match=r"steps: \['quantize', 'prune'\]: steps run in the order"):
        parse_recipe(text)
    with pytest.raises(RecipeError, match="calibration='kl'"):
        parse_recipe(QUANT_RECIPE.replace("calibration: percentile", "calibration: kl"))
    with pytest.raises(RecipeError, match="do not combine"):
        parse_recipe(QUANT_RECIPE.replace("calibration: percentile", "max_drop: 0.01, qat: {epochs: 1, lr: 0.001}"))


def test_recipe_mixed_precision_reports_the_sensitivity(compress_cli):
    _, report = compress_cli(QUANT_RECIPE.replace("backend: onnxruntime", "backend: eager, max_drop: 0.0"))
    mixed = report["quantization"]["mixed_precision"]
    assert set(mixed["sensitivity"]) >= {"stem", "fc"} and mixed["history"][0]["kept_float"] == []
    kept = {
        r["name"] for r in report["quantization"]["quantization"]["layers"] if r["skip"] == "excluded (kept in float)"
    }
    assert kept == set(mixed["kept_float"])


def test_mixed_precision_keeps_the_culprit_layer_in_float(digits, digits_mlp):
    model = copy.deepcopy(digits_mlp)
    with torch.no_grad():  # hidden unit 0 is dead, so a huge fc2 weight on it changes nothing in float...
        model.fc1.weight[0].zero_()
        model.fc1.bias[0] = -1.0
        model.fc2.weight[:, 0] = 1000.0  # ...but its per-channel int8 scale rounds every other fc2 weight to 0
    base = accuracy(model, digits.eval_loader())
    result = ts.mixed_precision_(model, ts.MixedPrecisionConfig(max_drop=0.02), digits)
    assert max(result.sensitivity, key=result.sensitivity.get) == "fc2" and result.sensitivity["fc2"] > 0.3
    assert result.kept_float == ["fc2"] and result.float_accuracy - result.history[-1]["accuracy"] <= 0.02
    assert (
        type(model.fc2) is nn.Linear and isinstance(model.fc1, QuantizedLayer) and isinstance(model.fc3, QuantizedLayer)
    )
    assert {r.name: r.skip for r in result.quantized.layers if r.skip} == {"fc2": "excluded (kept in float)"}
    assert accuracy(model, digits.eval_loader()) >= base - 0.02
    with pytest.raises(ConfigError, match="max_drop"):
        ts.MixedPrecisionConfig(max_drop=1.5)


def test_an_output_feeding_a_relu_then_int8_layers_takes_their_input_grid(digits, digits_mlp):
    model = copy.deepcopy(digits_mlp)
    quantize_(model, QuantizeConfig(calibration="minmax"), data=digits)
    assert model.fc1.output_q is None and model.fc2.output_q is None  # quantized after the ReLU by the next input
    assert model.fc2.input_q[1] == 0 and model.fc3.output_q[1] > 0  # post-ReLU grid; the logits keep negatives
    model = ZOO["resnet_mini"]().eval()
    quantize_(model, QuantizeConfig(calibration="minmax"), data=[torch.randn(8, 1, 28, 28)])
    assert model.layer1.conv1.output_q is None  # conv1 -> folded bn1 -> relu -> conv2
    assert model.stem.output_q is not None  # the stem's ReLU also feeds a float residual add
    model = ZOO["lenet5"]().eval()
    quantize_(model, QuantizeConfig(calibration="minmax"), data=[torch.randn(8, 1, 28, 28)])
    # conv1 -> relu -> max_pool2d -> conv2: one grid from zero, quantized at conv1's output already
    assert model.conv1.output_q == model.conv2.input_q and model.conv1.output_q[1] == 0
    assert model.conv2.output_q == model.fc1.input_q  # ... -> max_pool2d -> flatten -> fc1


def test_an_output_feeding_only_a_relu_gets_a_grid_from_zero_and_the_export_drops_that_relu():
    import onnx

    torch.manual_seed(0)
    model = ZOO["mobilenet_mini"](width=8).eval()
    x = torch.randn(32, 1, 28, 28)
    seen = []
    hook = model.blocks[3].pw_bn.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        model(x)
    hook.remove()
    assert float(seen[0].min()) < 0  # what the last pointwise conv (+ BN) gives the ReLU
    result = quantize_(model, QuantizeConfig(calibration="minmax"), data=[x])
    pw = model.blocks[3].pw  # pw -> folded pw_bn -> relu -> mean -> fc: no int8 layer takes its output directly
    assert pw.output_q is not None and pw.output_q[1] == 0  # zero point 0: the grid clamps as the ReLU does
    row = next(r for r in result.layers if r.name == "blocks.3.pw")
    assert row.output_range[0] == 0.0 and row.output_range[1] == pytest.approx(float(seen[0].max()), rel=1e-4)
    graph = onnx.load_from_string(export_onnx(model, x[:2])).graph
    made = {out: n.op_type for n in graph.node for out in n.output}
    relus = [n for n in graph.node if n.op_type == "Relu"]
    assert relus and not any(made.get(n.input[0]) == "DequantizeLinear" for n in relus)  # the ones left quantize next
    assert sum(n.op_type == "Identity" and made.get(n.input[0]) == "DequantizeLinear" for n in graph.node) >= 1
    with torch.no_grad():
        torch.testing.assert_close(compile_model(model, "onnxruntime", x[:8])(x[:8]), model(x[:8]), atol=0.05, rtol=0.0)


def test_the_model_outputs_grid_spans_their_whole_range_whatever_the_method(digits, digits_mlp):
    batches = [x for x, _ in digits.calib_loader()][: QuantizeConfig().calib_batches]
    with torch.no_grad():
        logits = torch.cat([digits_mlp(x) for x in batches])
    model = copy.deepcopy(digits_mlp)
    result = quantize_(model, QuantizeConfig(calibration="percentile", percentile=90.0), data=digits)
    rows = {r.name: r for r in result.layers}
    assert rows["fc3"].output_range == pytest.approx([float(logits.min()), float(logits.max())], abs=1e-5)
    assert rows["fc1"].input_range[1] < float(batches[0].max())  # the inputs are clipped at the 90th percentile


def test_auto_calibration_picks_per_layer_methods_closest_to_the_float_outputs(digits, digits_cnn):
    model = copy.deepcopy(digits_cnn)
    result = quantize_(model, QuantizeConfig(bias_correction=False), data=digits)  # calibration="auto" is the default
    chosen = result.calibration
    whole = chosen["output_mse"]
    assert set(whole) == {"minmax", "percentile", "mse", "entropy"} and chosen["start"] == min(whole, key=whole.get)
    assert set(chosen["layers"]) == {"conv1", "conv2", "fc"} and chosen["final_output_mse"] <= whole[chosen["start"]]
    x = torch.cat([b for b, _ in digits.calib_loader()])
    with torch.no_grad():
        assert float(((model(x) - digits_cnn(x)) ** 2).mean()) == pytest.approx(chosen["final_output_mse"], rel=1e-3)


def test_auto_scores_its_candidates_on_the_first_rows_and_reports_progress(digits, digits_cnn, monkeypatch):
    from torchslim.transforms import calibrate

    monkeypatch.setattr(calibrate, "AUTO_ROWS", 100)
    model, seen = copy.deepcopy(digits_cnn), []
    result = quantize_(
        model, QuantizeConfig(bias_correction=False), data=digits, progress=lambda d, t: seen.append((d, t))
    )
    x = torch.cat([b for b, _ in digits.calib_loader()])[:100]
    with torch.no_grad():
        err = float(((model(x) - digits_cnn(x)) ** 2).mean())
    assert err == pytest.approx(result.calibration["final_output_mse"], rel=1e-3)
    assert seen[-1][0] == seen[-1][1] == 4 + 3 * 3  # four whole-model methods, then three more per layer


def test_bias_correction_stopping_each_pass_at_its_layer_changes_nothing(digits, digits_cnn, monkeypatch):
    from torchslim.transforms import calibrate

    models = []
    for stop in (True, False):
        if not stop:
            full = calibrate._channel_means
            monkeypatch.setattr(
                calibrate, "_channel_means", lambda m, n, b, stop=False, full=full: full(m, n, b, False)
            )
        model = copy.deepcopy(digits_cnn)
        quantize_(model, QuantizeConfig(calibration="minmax"), data=digits)
        models.append(model)
    for (name, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        assert torch.equal(a, b), name


def test_the_inductor_backend_falls_back_to_torch_compile_for_models_export_cannot_capture():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            if float(x.sum()) > 0:  # data-dependent Python control flow: torch.export refuses it
                return self.fc(x)
            return -self.fc(x)

    model = Branchy().eval()
    x = torch.randn(4, 8)
    fast = compile_model(model, "inductor", x)
    assert fast.fallback is not None
    assert torch.allclose(fast(x), model(x), atol=1e-5) and torch.allclose(fast(-x), model(-x), atol=1e-5)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_dynamic_int8_lstm_and_gru_match_the_float_layer_and_round_trip(tmp_path, cell):
    torch.manual_seed(0)
    rnn = getattr(nn, cell)(12, 16, num_layers=2, bidirectional=True, batch_first=True).eval()
    model = nn.Sequential(rnn)
    x = torch.randn(5, 7, 12)
    (ref, state) = rnn(x)
    result = quantize_(model, QuantizeConfig(scheme="dynamic"), example=x)
    q = model[0]
    assert isinstance(q, QuantizedRNN) and q.weight_hh_l1_reverse.dtype == torch.int8
    assert result.layers[0].scheme == "dynamic" and result.layers[0].weight_error < 0.01
    out, q_state = q(x)
    assert out.shape == ref.shape and (out - ref).abs().max() < 0.05
    first = q_state[0] if cell == "LSTM" else q_state
    assert first.shape == (state[0] if cell == "LSTM" else state).shape
    reference = getattr(nn, cell)(12, 16, num_layers=2, bidirectional=True, batch_first=True).eval()
    with torch.no_grad():  # the float layer run with the dequantized weights is what int8 approximates
        for name, w in q.dequantized_weights().items():
            getattr(reference, name).copy_(w)
        for name in q.bias_names():
            getattr(reference, name).copy_(getattr(q, name))
    assert (reference(x)[0] - out).abs().max() < 0.03  # only the dynamic activation rounding differs
    path = ts.save(model, tmp_path / "rnn.tslim")
    restored = ts.load(
        path, model=nn.Sequential(getattr(nn, cell)(12, 16, num_layers=2, bidirectional=True, batch_first=True))
    )
    assert torch.equal(restored(x)[0], out)


def test_a_pruned_lstm_classifier_quantizes_dynamically_and_loads_into_the_full_model(tmp_path):
    model = ZOO["lstm_classifier"]().eval()
    channel_prune_(model, ChannelPruneConfig(ratio=0.5, round_to=8, min_channels=8), example=X)
    before = model(X)
    quantize_(model, QuantizeConfig(scheme="dynamic"), example=X)
    assert isinstance(model.rnn, QuantizedRNN) and model.rnn.hidden_size == 64
    assert (model(X) - before).abs().max() < 0.05 * before.abs().max() + 0.05
    fp32 = ts.save(ZOO["lstm_classifier"](), tmp_path / "fp32.tslim").stat().st_size
    path = ts.save(model, tmp_path / "q.tslim")
    assert fp32 / path.stat().st_size > 3.5 * 2  # half the hidden units, then int8
    assert torch.equal(ts.load(path, model=ZOO["lstm_classifier"])(X), model(X))


def test_bias_correction_removes_the_mean_output_error_on_the_calibration_data(digits, digits_cnn):
    x = torch.cat([b for b, _ in digits.calib_loader()])
    with torch.no_grad():
        target = digits_cnn(x).mean(0)
    shifts = {}
    for corrected in (False, True):
        model = copy.deepcopy(digits_cnn)
        result = quantize_(model, QuantizeConfig(calibration="minmax", bias_correction=corrected), data=digits)
        with torch.no_grad():
            shifts[corrected] = float((model(x).mean(0) - target).abs().max())
        assert all((r.bias_shift is not None) == corrected for r in result.layers)
    assert shifts[True] < shifts[False]


def test_mixed_precision_of_a_dynamic_lstm_classifier():
    model = ZOO["lstm_classifier"]().eval()
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(2)
    ]

    config = ts.MixedPrecisionConfig(max_drop=0.5, quantize=QuantizeConfig(scheme="dynamic"))
    with pytest.raises(ConfigError, match="pass eval_batches"):
        ts.mixed_precision_(copy.deepcopy(model), config, batches)
    result = ts.mixed_precision_(model, config, batches, eval_batches=batches)
    assert set(result.sensitivity) == {"rnn", "fc"} and result.kept_float == []
    assert isinstance(model.rnn, QuantizedRNN) and isinstance(model.fc, QuantizedLayer)


def test_per_token_dynamic_int8_matches_its_reference_compiled_and_saved(tmp_path):
    """Per-token int8 inputs: eager is the fake-quant reference, the compiled integer matmul gives
    the same numbers, a token with an outlier does not coarsen the others, and the file keeps it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    dense = copy.deepcopy(model)
    result = quantize_(model, QuantizeConfig(scheme="dynamic", activations="token"), example=torch.randn(4, 32))
    assert [r.scheme for r in result.layers if r.scheme] == ["dynamic", "dynamic"]
    x = torch.randn(2, 5, 32)
    x[0, 0] *= 100.0  # one outlier token
    per_tensor = copy.deepcopy(dense)
    quantize_(per_tensor, QuantizeConfig(scheme="dynamic"), example=torch.randn(4, 32))
    with torch.no_grad():
        want, eager, coarse = dense(x), model(x), per_tensor(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    rest = (slice(None), slice(1, None))  # every token but the outlier
    assert (eager - want)[rest].abs().max() < 0.2 * (coarse - want)[rest].abs().max()
    path = tmp_path / "token.tslim"
    ts.save(model, path)
    back = ts.load(path, model=copy.deepcopy(dense))
    assert back[0].activations == "token"
    torch.testing.assert_close(back(x), eager)


def test_per_token_int8_compiles_to_onednn_int8_gemm():
    """Frozen and compiled, every per-token Linear is one oneDNN int8 GEMM, fed uint8 on VNNI CPUs
    (oneDNN runs int8 inputs there on its reference kernel, hundreds of times slower)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from torchslim.core import qlayers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    quantize_(model, QuantizeConfig(scheme="dynamic", activations="token"), example=torch.randn(4, 32))
    x = torch.randn(3, 16, 32)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        out, codes = run_and_get_code(torch.compile(model, dynamic=False), x)
        eager = model(x)
    code = "\n".join(codes)
    inputs = re.findall(r"qlinear_pointwise\.\w+\((?:reinterpret_tensor\()?(buf\d+)", code)
    assert len(inputs) == 2 and "aten.mm" not in code
    dtypes = {re.search(rf"\b{b} = empty_strided_cpu\(.*(torch\.\w+)\)", code).group(1) for b in inputs}
    assert dtypes == ({"torch.uint8"} if qlayers._U8_GEMM else {"torch.int8"})
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)


class _SharedInput(nn.Module):
    """Two projections of one input (like a block's query and key), then an output layer."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.out = nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.q(x) * self.k(x))


def test_smoothquant_moves_outlier_channels_into_the_weights(tmp_path):
    """An input channel 60x larger than the rest coarsens every token's int8 grid; SmoothQuant's
    factors (shared by layers reading one input) cut the error, survive the file and compile."""
    from torch._inductor import config as inductor_config

    torch.manual_seed(0)
    dense = _SharedInput().eval()

    def inputs(n):
        x = torch.randn(n, 8, 32)
        x[..., 3] *= 60.0
        return x

    calib, x = [inputs(4) for _ in range(4)], inputs(16)
    plain, smoothed = copy.deepcopy(dense), copy.deepcopy(dense)
    quantize_(plain, QuantizeConfig(scheme="dynamic", activations="token"), example=calib[0])
    result = quantize_(smoothed, QuantizeConfig(scheme="dynamic", activations="token", smooth=0.5), data=calib)
    with torch.no_grad():
        want, got_plain, got = dense(x), plain(x), smoothed(x)
    assert (got - want).abs().mean() < 0.5 * (got_plain - want).abs().mean()
    assert smoothed.q.input_smooth is not None and smoothed.out.input_smooth is not None
    torch.testing.assert_close(smoothed.q.input_smooth, smoothed.k.input_smooth)  # one input, one set of factors
    assert int(smoothed.q.input_smooth.argmax()) == 3
    records = {r.name: r for r in result.layers}
    assert records["q"].weight_error < 0.02 and "input smoothed" in records["q"].note
    path = ts.save(smoothed, tmp_path / "smooth.tslim")
    assert tslim.read(path)[0].raw["quant"]["q"]["smooth"] is True
    back = ts.load(path, model=_SharedInput)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        torch.testing.assert_close(back(x), got)
        torch.testing.assert_close(torch.compile(back, dynamic=False)(x), got, atol=1e-3, rtol=1e-3)
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors["q.input_smooth"][0] = 0.0  # a divisor of zero: refused, not turned into inf
    manifest = tslim.read(path)[0].raw | {"fingerprint": tslim.fingerprint(tensors)}  # a writer that means it
    save_file(tensors, tmp_path / "bad.tslim", metadata=tslim.pack_manifest(manifest))
    with pytest.raises(ArtifactError, match="input_smooth must be positive"):
        ts.load(tmp_path / "bad.tslim", model=_SharedInput)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scheme": "static", "smooth": 0.5}, "scheme='dynamic'"),
        ({"scheme": "dynamic", "smooth": 1.5}, "in \\(0, 1\\]"),
        ({"scheme": "dynamic", "smooth": True}, "in \\(0, 1\\]"),
    ],
)
def test_smoothquant_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantizeConfig(**kwargs)
    model = _SharedInput()
    with pytest.raises(ConfigError, match="pass data="):
        quantize_(model, QuantizeConfig(scheme="dynamic", smooth=0.5), example=torch.randn(2, 32))
