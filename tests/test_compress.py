"""The one applier: every verb's plan, replayed by ``compress`` on a fresh copy, does the same."""

import copy

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.core.plan import CompressionPlan
from torchslim.errors import ConfigError
from torchslim.train.fit import TrainConfig, fit
from torchslim.transforms.compress import ORDER, CompressSettings, compress


class DigitsCNN(nn.Module):
    """Two convolutions with BatchNorm, then two Linear layers: channels, folds and int8 all apply."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(32)
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))  # (B, 16, 8, 8)
        x = torch.relu(self.bn2(self.conv2(x)))  # (B, 32, 4, 4)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))  # (B, 10)


@pytest.fixture(scope="module")
def cnn(digits):
    torch.manual_seed(0)
    model = DigitsCNN()
    fit(model, digits, TrainConfig(epochs=3, lr=3e-3))
    return model.eval()


def _outputs(model: nn.Module, data) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.eval()(x) for x, _ in data.eval_loader()])


def _replayed(model, result, data, settings) -> nn.Module:
    """``result.plan`` applied by ``compress`` to a fresh copy of ``model``."""
    return compress(copy.deepcopy(model), result.plan, data, settings=settings).model


def test_prune_plan_replays_with_fine_tuning(digits_mlp, digits):
    cfg = ts.MagnitudePruneConfig(sparsity={"fc1": 0.9, "fc2": 0.8}, finetune=TrainConfig(epochs=1, lr=1e-3))
    model = copy.deepcopy(digits_mlp)
    result = ts.prune_(model, cfg, digits)
    assert result.plan.resolve("fc3").skip and result.plan.resolve("fc1").sparsity == pytest.approx(0.9, abs=1e-5)
    again = _replayed(digits_mlp, result, digits, CompressSettings(prune=cfg))
    assert torch.equal(_outputs(model, digits), _outputs(again, digits))


def test_global_prune_plan_replays_layer_by_layer(digits_mlp, digits):
    cfg = ts.MagnitudePruneConfig(sparsity=0.85, scope="global", finetune=None)
    model = copy.deepcopy(digits_mlp)
    result = ts.prune_(model, cfg, digits)
    sparsities = {result.plan.resolve(n).sparsity for n in ("fc1", "fc2", "fc3")}
    assert len(sparsities) == 3  # one threshold, a different fraction in every layer
    again = _replayed(digits_mlp, result, digits, CompressSettings(prune=cfg))
    assert torch.equal(_outputs(model, digits), _outputs(again, digits))


def test_share_plan_replays_with_centroid_training(digits_mlp, digits):
    cfg = ts.ShareConfig(bits={"re:fc[12]": 4, "fc3": None}, finetune=TrainConfig(epochs=1, lr=1e-4))
    model = copy.deepcopy(digits_mlp)
    result = ts.share_(model, cfg, digits)
    assert result.plan.resolve("fc1").bits == 4 and result.plan.resolve("fc3").skip
    again = _replayed(digits_mlp, result, digits, CompressSettings(share=cfg))
    assert torch.equal(_outputs(model, digits), _outputs(again, digits))
    assert again.fc3.weight.unique().numel() > 2**4  # trained along, not shared


def test_channel_plan_from_a_mac_target_replays_as_ratios(cnn, digits):
    cfg = ts.ChannelPruneConfig(macs=0.6, criterion="taylor", round_to=4, min_channels=4)
    model = copy.deepcopy(cnn)
    result = ts.channel_prune_(model, cfg, digits)
    assert result.macs_after < result.macs_before
    template = ts.ChannelPruneConfig(ratio={}, criterion="taylor", round_to=4, min_channels=4)
    again = _replayed(cnn, result, digits, CompressSettings(channels=template))
    assert [p.shape for p in again.parameters()] == [p.shape for p in model.parameters()]
    assert torch.equal(_outputs(model, digits), _outputs(again, digits))


def test_quantize_plan_replays_and_records_the_float_layers(cnn, digits):
    cfg = ts.QuantizeConfig(exclude=("fc2",))
    model = copy.deepcopy(cnn)
    result = ts.quantize_(model, cfg, digits)
    assert result.plan.resolve("conv1").quantize == 8 and "excluded" in result.plan.resolve("fc2").skip
    again = _replayed(cnn, result, digits, CompressSettings(quantize=ts.QuantizeConfig()))
    assert type(again.fc2) is nn.Linear and type(again.fc1) is type(model.fc1)
    assert torch.equal(_outputs(model, digits), _outputs(again, digits))


def test_mixed_precision_plan_replays(cnn, digits):
    cfg = ts.MixedPrecisionConfig(max_drop=0.0)
    model = copy.deepcopy(cnn)
    result = ts.mixed_precision_(model, cfg, digits)
    kept = [n for n in ("conv1", "conv2", "fc1", "fc2") if result.plan.resolve(n).quantize is None]
    assert kept == result.kept_float
    for name in kept:
        assert result.plan.resolve(name).skip.startswith("kept in float")
    again = _replayed(cnn, result, digits, CompressSettings(quantize=cfg.quantize))
    assert torch.equal(_outputs(model, digits), _outputs(again, digits))


def test_merged_plan_of_several_verbs_replays_in_one_call(digits_mlp, digits):
    prune_cfg = ts.MagnitudePruneConfig(sparsity={"fc1": 0.9, "fc2": 0.9}, finetune=None)
    share_cfg = ts.ShareConfig(bits={"fc2": 3, "fc3": 4}, finetune=None)
    model = copy.deepcopy(digits_mlp)
    plan = ts.prune_(model, prune_cfg, digits).plan.updated(ts.share_(model, share_cfg, digits).plan)
    assert plan.resolve("fc3").skip and plan.resolve("fc3").bits == 4  # skipped by prune, shared
    again = compress(digits_mlp, plan, digits, settings=CompressSettings(prune=prune_cfg, share=share_cfg))
    assert torch.equal(_outputs(model, digits), _outputs(again.model, digits))

    def decided(p: CompressionPlan) -> dict:  # the decisions, without the wording of the skips
        return {k: {f: v for f, v in d.items() if f != "skip"} for k, d in p.to_dict().items()}

    assert decided(again.plan) == decided(plan)
    assert list(again.results) == ["prune", "share"]


def test_compress_leaves_its_input_alone_and_runs_the_canonical_order(digits_mlp, digits):
    before = copy.deepcopy(digits_mlp.state_dict())
    plan = CompressionPlan.from_dict({"re:fc[12]": {"sparsity": 0.5, "bits": 4}, "fc1": {"quantize": 8}})
    settings = CompressSettings(prune=ts.MagnitudePruneConfig(finetune=None), share=ts.ShareConfig(finetune=None))
    done = compress(digits_mlp, plan, digits, settings=settings)
    assert all(torch.equal(v, digits_mlp.state_dict()[k]) for k, v in before.items())
    assert list(done.results) == [t for t in ORDER if t in done.results] == ["prune", "share", "quantize"]
    assert done.plan.resolve("fc2").bits == 4 and done.plan.resolve("fc1").quantize == 8


def test_a_plan_that_mixes_weight_bits_or_both_quantize_settings_is_refused(digits_mlp, digits):
    with pytest.raises(ConfigError, match="mixes weight bits"):
        compress(digits_mlp, CompressionPlan.from_dict({"fc1": {"quantize": 8}, "fc2": {"quantize": 4}}), digits)
    with pytest.raises(ConfigError, match="not both"):
        CompressSettings(quantize=ts.QuantizeConfig(), mixed_precision=ts.MixedPrecisionConfig())
