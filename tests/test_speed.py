"""int8 timed against the float model compiled on the same backend; float kept where int8 loses."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.artifact import speed
from torchslim.core.qlayers import QuantizedLayer
from torchslim.errors import ConfigError


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def pair(digits):
    torch.manual_seed(0)
    model = Small().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    quantized = copy.deepcopy(model)
    ts.quantize_(quantized, ts.QuantizeConfig(calibration="minmax"), digits)
    return model, quantized


def scripted(monkeypatch, times: dict[str, tuple[float, float]]) -> None:
    """Replace the timer: ``times`` maps what is timed (the whole model while all int8,
    ``mixed`` once some layers went back, or a layer's name) to (int8 ms, float ms)."""

    def fake(model, float_model, backend, examples, threads, rounds=7):
        if isinstance(model, QuantizedLayer):
            name = next(n for n, m in float_model_layers.items() if m is float_model)
            return times[name]
        return times["mixed" if any(not isinstance(m, QuantizedLayer) for m in layers(model)) else "whole"]

    float_model_layers: dict[str, nn.Module] = {}
    original = speed._float_twin

    def twin(model, reference, names):
        out = original(model, reference, names)
        float_model_layers.update({n: out.get_submodule(n) for n in names})
        return out

    def layers(model):
        return [model.get_submodule(n) for n in float_model_layers]

    monkeypatch.setattr(speed, "_time", fake)
    monkeypatch.setattr(speed, "_float_twin", twin)


def test_int8_faster_than_float_is_kept(pair, monkeypatch):
    reference, quantized = pair
    scripted(monkeypatch, {"whole": (1.0, 2.0)})
    check = ts.keep_faster_(quantized, reference, "onnxruntime", torch.zeros(1, 1, 8, 8))
    assert check.delivered == "int8" and check.kept_float == [] and check.delivered_ms == 1.0
    assert all(isinstance(quantized.get_submodule(n), QuantizedLayer) for n in ("conv", "fc1", "fc2"))
    assert "int8 kept" in check.summary()


def test_layers_slower_in_int8_go_back_to_float_when_that_beats_float(pair, monkeypatch):
    reference, quantized = pair
    scripted(
        monkeypatch,
        {"whole": (3.0, 2.0), "conv": (0.5, 0.4), "fc1": (0.2, 0.5), "fc2": (0.1, 0.1), "mixed": (1.5, 2.5)},
    )
    check = ts.keep_faster_(quantized, reference, "onnxruntime", torch.zeros(1, 1, 8, 8))
    assert check.delivered == "mixed" and check.kept_float == ["conv", "fc2"]  # int8 no faster alone
    assert check.delivered_ms == pytest.approx(2.0 * 1.5 / 2.5)  # float 2.0 ms times the mix's ratio in its pair
    assert isinstance(quantized.fc1, QuantizedLayer)
    assert isinstance(quantized.conv, nn.Conv2d) and isinstance(quantized.fc2, nn.Linear)
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(quantized.conv(x), reference.bn(reference.conv(x)), atol=1e-5)  # BatchNorm folded in
    skips = check.plan().to_dict()
    assert "int8 0.500 ms against float 0.400 ms on onnxruntime" in str(skips["conv"])


def test_when_no_mix_beats_float_every_layer_goes_back(pair, monkeypatch):
    reference, quantized = pair
    scripted(
        monkeypatch,
        {"whole": (3.0, 2.0), "conv": (0.5, 0.4), "fc1": (0.2, 0.5), "fc2": (0.1, 0.1), "mixed": (2.5, 2.0)},
    )
    check = ts.keep_faster_(quantized, reference, "onnxruntime", [torch.zeros(1, 1, 8, 8)])
    assert check.delivered == "float" and check.delivered_ms == 2.0 and check.kept_float == ["conv", "fc1", "fc2"]
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(quantized(x), reference(x), atol=1e-5)  # the float model, BatchNorm folded


def test_measured_on_onnxruntime_the_delivered_model_is_consistent(pair, tmp_path):
    reference, quantized = pair
    x = torch.randn(1, 1, 8, 8)
    check = ts.keep_faster_(quantized, reference, "onnxruntime", x)
    assert check.float_ms > 0 and check.int8_ms > 0 and check.batches == [1]
    assert check.delivered in ("int8", "mixed", "float")
    assert check.delivered_ms <= check.float_ms or check.delivered == "float"
    kept = set(check.kept_float)
    for name in ("conv", "fc1", "fc2"):
        assert isinstance(quantized.get_submodule(name), QuantizedLayer) is (name not in kept)
    restored = ts.load(ts.save(quantized, tmp_path / "m.tslim"), model=Small)
    assert torch.equal(restored(x), quantized(x))


def test_compile_model_against_float_leaves_the_model_and_reports(pair, monkeypatch):
    reference, quantized = pair
    scripted(monkeypatch, {"whole": (3.0, 2.0), "conv": (0.5, 0.4), "fc1": (0.6, 0.5), "fc2": (0.2, 0.1)})
    before = copy.deepcopy(quantized.state_dict())
    runner = ts.compile_model(quantized, "onnxruntime", torch.zeros(2, 1, 8, 8), against=reference)
    assert runner.speed.backend == "onnxruntime" and runner.speed.batches == [2] and runner.speed.delivered == "float"
    assert runner(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert all(torch.equal(before[k], v) for k, v in quantized.state_dict().items())


def test_speed_check_refuses_what_it_cannot_time(pair):
    reference, quantized = pair
    with pytest.raises(ConfigError, match="eager int8 is the fake-quant reference"):
        ts.keep_faster_(quantized, reference, "eager", torch.zeros(1, 1, 8, 8))
    with pytest.raises(ConfigError, match="no quantized layer: quantize it first"):
        ts.keep_faster_(reference, reference, "onnxruntime", torch.zeros(1, 1, 8, 8))
    with pytest.raises(ConfigError, match="reference has no float layer 'conv'"):
        ts.keep_faster_(quantized, nn.Sequential(nn.Linear(2, 2)), "onnxruntime", torch.zeros(1, 1, 8, 8))


def test_onnxruntime_sessions_for_timing_side_by_side_do_not_spin():
    model, x = nn.Sequential(nn.Linear(4, 3), nn.ReLU()), torch.randn(2, 4)
    quiet = ts.compile_model(model, "onnxruntime", x, spin=False)
    options = quiet.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    torch.testing.assert_close(quiet(x), ts.compile_model(model, "onnxruntime", x)(x))
