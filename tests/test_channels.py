"""Structured pruning: one test per awkward topology, criteria, targets, save/load, bad input."""

import copy

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.analysis.cost import count_params, layer_macs
from torchslim.analysis.coupling import analyse
from torchslim.analysis.importance import CRITERIA, gather_stats
from torchslim.core.models import ZOO
from torchslim.errors import ConfigError, ShapeMismatchError
from torchslim.recipe.schema import parse_recipe
from torchslim.train.fit import TrainConfig
from torchslim.transforms.channels import ChannelPruneConfig, channel_prune_

X = torch.randn(4, 1, 28, 28)


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that a wrong slice changes the outputs."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _groups(model):
    return {g.root: g for g in analyse(model, X).groups}


def test_residual_adds_couple_the_stem_with_every_block_output_of_its_width():
    g = _groups(ZOO["resnet_mini"]())
    stem = {str(m) for m in g["stem"].members}
    assert {
        "stem[out]",
        "stem_bn[out]",
        "layer1.conv2[out]",
        "layer1.bn2[out]",
        "layer2.conv1[in]",
        "layer2.shortcut.0[in]",
        "layer1.conv1[in]",
    } <= stem
    assert {str(m) for m in g["layer1.conv1"].members} == {"layer1.conv1[out]", "layer1.bn1[out]", "layer1.conv2[in]"}
    assert "produces the model's output" in g["fc"].skip


def test_depthwise_convs_share_channels_with_the_pointwise_conv_before_them():
    g = _groups(ZOO["mobilenet_mini"]())
    members = {str(m) for m in g["blocks.1.dw"].members}
    assert {"blocks.1.dw[out]", "blocks.1.dw_bn[out]", "blocks.0.pw[out]", "blocks.1.pw[in]"} <= members
    assert g["blocks.1.dw"].channels == 64


def test_concat_maps_each_branch_to_its_slice_of_the_joined_tensor():
    g = _groups(ZOO["concat_net"]())
    b2 = g["b2"]
    dense_in = next(s for s in b2.slices if s.name == "dense" and s.side == "in")
    assert dense_in.idxs == tuple(range(16, 48)) and dense_in.root_idxs == tuple(range(32))  # after b1's 16
    bn = next(s for s in g["dense"].slices if s.name == "bn")
    assert bn.idxs == tuple(range(64, 96))  # the dense branch is appended after the 64 mixed channels


def test_a_chunk_whose_halves_feed_different_layers_is_skipped_and_the_branches_pruned():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 16, 3, 2, 1), nn.Linear(16, 10)
            self.a, self.b = nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1)

        def forward(self, x):
            a, b = torch.chunk(torch.relu(self.conv(x)), 2, dim=1)  # (B, 8, 14, 14) each
            return self.fc(torch.cat([self.a(a), self.b(b)], 1).mean((2, 3)))

    model = Split().eval()
    result = channel_prune_(model, ChannelPruneConfig(ratio=0.5, round_to=1, min_channels=1), example=X)
    groups = {g.root: g for g in result.groups}
    assert groups["conv"].skip.startswith("removing its channels breaks the forward pass")
    assert (model.conv.out_channels, model.a.out_channels, model.b.out_channels, model.fc.in_features) == (16, 4, 4, 8)
    assert model(X).shape == (4, 10)


def test_channels_tied_by_a_gated_chunk_are_skipped():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.d, self.fc = nn.Conv2d(1, 16, 3, 2, 1), nn.Conv2d(8, 8, 3), nn.Linear(8, 10)

        def forward(self, x):
            a, b = torch.chunk(self.c(x), 2, dim=1)  # GLU: channel i gates channel i + 8
            return self.fc(self.d(a * torch.sigmoid(b)).mean((2, 3)))

    model = Gated().eval()
    result = channel_prune_(model, ChannelPruneConfig(ratio=0.5, round_to=1, min_channels=1), example=X)
    assert {g.root: g.skip for g in result.groups}["c"].startswith("its channels are tied")
    assert model.c.out_channels == 16 and model.d.out_channels == 4 and model(X).shape == (4, 10)


def test_an_output_layer_behind_a_functional_op_keeps_its_width():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(1, 16, 3, 2, 1), nn.Conv2d(16, 10, 1)

        def forward(self, x):
            return torch.log_softmax(self.head(torch.relu(self.conv(x))).mean((2, 3)), 1)  # (B, 10)

    model = Head().eval()
    result = channel_prune_(model, ChannelPruneConfig(ratio=0.5, round_to=1, min_channels=1), example=X)
    assert {g.root: g.skip for g in result.groups}["head"].startswith(
        "removing its channels changes the model's output"
    )
    assert model.head.out_channels == 10 and model.conv.out_channels == 8 and model(X).shape == (4, 10)


def test_a_failed_step_leaves_the_model_as_it_was(monkeypatch):
    import torchslim.transforms.channels as channels

    model = ZOO["resnet_mini"]().eval()
    y = model(X)

    def broken(*_args):
        raise RuntimeError("shape mismatch in forward")

    monkeypatch.setattr(channels, "check_runs", broken)
    with pytest.raises(RuntimeError):
        channel_prune_(model, ChannelPruneConfig(ratio=0.5), example=X)
    assert model.stem.out_channels == 32 and torch.equal(model(X), y)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_ratio_zero_changes_nothing_and_half_really_shrinks(name, tmp_path):
    model = _randomise_norms(ZOO[name]())
    before = model(X)
    result = channel_prune_(model, ChannelPruneConfig(ratio=0.0, round_to=1, min_channels=1), example=X)
    assert torch.equal(model(X), before) and result.params_after == result.params_before

    result = channel_prune_(model, ChannelPruneConfig(ratio=0.5, round_to=4, min_channels=4), example=X)
    assert result.params_after < 0.6 * result.params_before and count_params(model) == result.params_after
    assert result.macs_after == sum(layer_macs(model, X).values()) < result.macs_before
    assert model(X).shape == (4, 10)
    path = ts.save(model, tmp_path / f"{name}.tslim")
    restored = ts.load(path, model=ZOO[name])  # a freshly built, full-size model, resized from the file
    assert torch.equal(restored(X), model.eval()(X))
    assert count_params(restored) == result.params_after


def test_resnet_half_ratio_gives_exact_widths():
    model = ZOO["resnet_mini"]()
    result = channel_prune_(model, ChannelPruneConfig(ratio=0.5, round_to=8), example=X)
    assert (model.stem.out_channels, model.layer1.conv1.out_channels, model.layer3.conv2.out_channels) == (16, 16, 64)
    assert model.layer2.conv1.in_channels == 16 and model.fc.in_features == 64 and model.fc.out_features == 10
    assert {g.root: g.after for g in result.groups}["layer2.conv1"] == 32


def test_lstm_and_gru_hidden_units_are_removed_with_every_gate():
    for name, gates in (("lstm_classifier", 4), ("gru_classifier", 3)):
        model = ZOO[name]()
        channel_prune_(model, ChannelPruneConfig(ratio=0.25, round_to=8), example=X)
        rnn = model.rnn
        assert rnn.hidden_size == 96 and rnn.weight_hh_l0.shape == (gates * 96, 96)
        assert rnn.weight_ih_l0.shape == (gates * 96, 28) and rnn.bias_ih_l0.shape == (gates * 96,)
        assert model.fc.in_features == 96 and model(X).shape == (4, 10)


@pytest.mark.parametrize("name", ["lstm_classifier", "gru_classifier"])
def test_hidden_unit_slicing_matches_the_unpruned_reference(name):
    model = ZOO[name](hidden_size=8).eval()
    reference = copy.deepcopy(model)
    with torch.no_grad():  # units 1 and 5 feed nothing: no other unit and not the classifier reads them
        for m in (reference, model):
            m.rnn.weight_hh_l0[:, [1, 5]] = 0.0
            m.fc.weight[:, [1, 5]] = 0.0
    groups = analyse(model, X).prunable()
    groups[0].handle.prune([1, 5])
    assert model.rnn.hidden_size == 6
    torch.testing.assert_close(model(X), reference(X))


def test_attention_embed_dims_stay_a_multiple_of_the_heads(tmp_path):
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.attn = nn.Linear(28, 32), nn.MultiheadAttention(32, 4, batch_first=True)
            self.norm, self.ff1, self.ff2, self.fc = (
                nn.LayerNorm(32),
                nn.Linear(32, 64),
                nn.Linear(64, 32),
                nn.Linear(32, 10),
            )

        def forward(self, x):
            x = self.embed(x.flatten(1, 2))  # (B, 28 rows, 32)
            x = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
            return self.fc((x + self.ff2(torch.relu(self.ff1(x)))).mean(1))

    model = Encoder().eval()
    result = channel_prune_(model, ChannelPruneConfig(ratio=0.3, round_to=1, min_channels=4), example=X)
    assert model.attn.embed_dim == 24 and model.attn.embed_dim % model.attn.num_heads == 0  # 22.4 -> 24
    assert {g.root: g.after for g in result.groups}["ff1"] == 45
    restored = ts.load(ts.save(model, tmp_path / "enc.tslim"), model=Encoder)
    assert torch.equal(restored(X), model(X))


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_every_criterion_scores_every_channel(criterion, digits):
    model = ZOO["resnet_mini"](width=8).eval()
    coupling = analyse(model, digits.eval.tensors[0][:4])
    batches = [(x[:32], y[:32]) for x, y in digits.calib_loader()]
    stats = gather_stats(model, coupling, criterion, batches)
    for g in coupling.prunable():
        s = CRITERIA[criterion](g, stats)
        assert s.shape == (g.channels,) and torch.isfinite(s).all()


def test_magnitude_removes_the_filters_that_are_zero():
    model = ZOO["lenet5"]()
    with torch.no_grad():
        model.conv1.weight[[3, 7, 11]] = 0.0
        model.conv1.bias[[3, 7, 11]] = 0.0
    x = torch.randn(2, 1, 28, 28)
    kept_before = model.conv1.weight[[i for i in range(20) if i not in (3, 7, 11)]].clone()
    channel_prune_(
        model, ChannelPruneConfig(ratio={"conv1": 0.15}, criterion="l1", round_to=1, min_channels=1), example=x
    )
    assert torch.equal(model.conv1.weight, kept_before)


def test_a_mac_target_is_met_in_global_and_layer_scope(digits):
    for scope in ("layer", "global"):
        model = ZOO["resnet_mini"](width=16)
        cfg = ChannelPruneConfig(macs=0.5, scope=scope, criterion="taylor", round_to=4, min_channels=4, steps=2)
        result = channel_prune_(model, cfg, digits)
        assert result.macs_after <= 0.5 * result.macs_before and result.macs_after > 0.3 * result.macs_before
        assert [h["step"] for h in result.history] == [1, 2]


def test_recovery_fine_tunes_with_a_teacher(digits, digits_mlp):
    model = copy.deepcopy(digits_mlp)
    cfg = ChannelPruneConfig(ratio={"fc1": 0.5}, criterion="taylor", finetune=TrainConfig(epochs=1, lr=1e-3))
    result = channel_prune_(model, cfg, digits, teacher=digits_mlp)
    assert model.fc1.out_features == 152 and model.fc2.in_features == 152  # 150 rounded up to a multiple of 8
    assert len(result.history[0]["loss"]) == 1 and ts.accuracy(model, digits.eval_loader()) > 0.9
    assert result.plan.resolve("fc1").channels == pytest.approx(1 - 152 / 300)
    assert result.plan.resolve("fc2").skip == "no ratio rule names this group"


def test_more_steps_than_the_floor_allows_and_a_parameter_target():
    model = ZOO["lenet5"]()
    result = channel_prune_(model, ChannelPruneConfig(ratio=0.75, steps=3, round_to=8, min_channels=16), example=X)
    assert (model.conv1.out_channels, model.conv2.out_channels, model.fc1.out_features) == (16, 16, 128)
    assert [r.skip for r in result.groups if r.root == "conv2"] == [None]  # pruned, then at the floor: not a skip
    model = ZOO["resnet_mini"]()
    result = channel_prune_(model, ChannelPruneConfig(params=0.4, round_to=8), example=X)
    assert 0.3 * result.params_before < result.params_after <= 0.4 * result.params_before


def test_per_group_ratios_come_from_a_compression_plan():
    plan = ts.CompressionPlan.from_dict({"layer1.conv1": {"channels": 0.5}, "re:layer[23].conv1": {"channels": 0.25}})
    model = ZOO["resnet_mini"]()
    result = channel_prune_(model, ChannelPruneConfig.from_plan(plan, round_to=8), example=X)
    widths = (model.layer1.conv1.out_channels, model.layer2.conv1.out_channels, model.layer3.conv1.out_channels)
    assert widths == (16, 48, 96) and model.stem.out_channels == 32
    assert result.plan.resolve("stem").skip == "no ratio rule names this group"


def test_the_floor_and_every_width_respect_the_heads_and_round_to():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.attn, self.fc = (
                nn.Linear(28, 32),
                nn.MultiheadAttention(32, 4, batch_first=True),
                nn.Linear(32, 10),
            )

        def forward(self, x):
            x = self.embed(x.flatten(1, 2))  # (B, 28, 32)
            return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = Attn().eval()
    channel_prune_(model, ChannelPruneConfig(ratio=0.9, round_to=1, min_channels=6), example=X)
    assert model.attn.embed_dim == 8 and model(X).shape == (4, 10)  # the floor 6, rounded up to the 4 heads


def test_bad_inputs_are_clear_errors_or_recorded_skips():
    with pytest.raises(ConfigError, match=r"\['stme'\] match no layer"):
        channel_prune_(ZOO["resnet_mini"](), ChannelPruneConfig(ratio={"stme": 0.5}), example=X)
    with pytest.raises(ConfigError, match=r"ratio keys \['stem_bn'\] name no coupling group"):
        channel_prune_(ZOO["resnet_mini"](), ChannelPruneConfig(ratio={"stem_bn": 0.5}), example=X)
    with pytest.raises(ConfigError, match="fine-tuning after pruning needs data"):
        channel_prune_(ZOO["lenet5"](), ChannelPruneConfig(ratio=0.5, finetune=TrainConfig(epochs=1)), example=X)
    with pytest.raises(ConfigError, match="1 would empty the layer"):
        ChannelPruneConfig(ratio=1.0)
    with pytest.raises(ConfigError, match="exactly one of macs, params or ratio"):
        ChannelPruneConfig(macs=0.5, ratio=0.5)
    with pytest.raises(ConfigError, match="criterion='fisher'"):
        ChannelPruneConfig(ratio=0.5, criterion="fisher")
    with pytest.raises(ConfigError, match="rnn: criterion 'bn_scale' finds nothing to score"):
        channel_prune_(ZOO["lstm_classifier"](), ChannelPruneConfig(ratio=0.5, criterion="bn_scale"), example=X)
    with pytest.raises(ConfigError, match="even with every group at its floor"):
        channel_prune_(ZOO["lenet5"](), ChannelPruneConfig(macs=0.01, min_channels=16), example=X)

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            return {"logits": self.fc(x.flatten(1))}["missing"]

    with pytest.raises(ConfigError, match="cannot trace Untraceable"):
        analyse(Untraceable(), X)


def test_layers_of_unknown_types_are_sliced_when_elementwise_else_skipped_with_the_reason(tmp_path):
    class Scale(nn.Module):  # a per-channel gain: Torch-Pruning slices the bare parameter with its group
        def __init__(self, n):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(n))

        def forward(self, x):
            return x * self.gain[:, None, None]

    class Mix(nn.Module):  # a channel-mixing matrix applied with einsum: nothing knows how to slice it
        def __init__(self, n):
            super().__init__()
            self.w = nn.Parameter(torch.eye(n))

        def forward(self, x):
            return torch.einsum("bchw,cd->bdhw", x, self.w)

    def net(mid):
        return nn.Sequential(
            nn.Conv2d(1, 16, 3), mid, nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16 * 24 * 24, 10)
        )

    model = net(Scale(16))
    channel_prune_(model, ChannelPruneConfig(ratio={"0": 0.5}, round_to=1, min_channels=1), example=X)
    assert model[1].gain.shape == (8,) and model(X).shape == (4, 10)
    assert torch.equal(ts.load(ts.save(model, tmp_path / "s.tslim"), model=net(Scale(16)))(X), model(X))
    groups = {g.root: g for g in analyse(net(Mix(16)), X).groups}
    assert groups["0"].skip.startswith("removing its channels breaks the forward pass; they may pass through 1,")
    assert groups["3"].skip is None


def test_a_file_does_not_fit_another_builder(tmp_path):
    model = ZOO["resnet_mini"]()
    channel_prune_(model, ChannelPruneConfig(ratio=0.5), example=X)
    path = ts.save(model, tmp_path / "r.tslim")
    with pytest.raises(
        ShapeMismatchError, match=r"describes module 'layer1\.bn1' as 'BatchNorm2d' but the model has nothing"
    ):
        ts.load(path, model=ZOO["mobilenet_mini"])
    with pytest.raises(ShapeMismatchError, match="only shrink"):
        ts.load(path, model=ZOO["resnet_mini"](width=8))


RECIPE = """
name: tiny_channels
model: {name: resnet_mini, kwargs: {width: 8}}
data: {name: digits, batch_size: 64, eval_batch_size: 200, calib_size: 128}
baseline: {epochs: 2, lr: 0.003}
steps:
  - channels: {macs: 0.6, criterion: l2, round_to: 4, min_channels: 4, finetune: {epochs: 1, lr: 0.001, teacher: true}}
  - prune: {sparsity: 0.5, finetune: null}
  - share: {bits: 5, finetune: null}
latency: {batches: [1], repeats: 3, warmup: 1}
outputs: {dir: "OUT", artifact: "{name}.tslim"}
"""


def test_recipe_step_reports_groups_and_layers(tmp_path, compress_cli):
    output, report = compress_cli(RECIPE)
    assert "channels removed (step 1), per group" in output and "layer1.conv1" in output
    s = report["structure"][0]
    assert s["macs_after"] <= 0.6 * s["macs_before"] and report["compressed"]["macs"] == s["macs_after"]
    assert any(g["skip"] and "model's output" in g["skip"] for g in s["groups"])
    md = (tmp_path / "report.md").read_text()
    assert "## Channels removed (structured step 1)" in md and "| layer1.conv1 | l2 | 8 |" in md


def test_channels_steps_must_come_first():
    text = RECIPE.replace("OUT", "x").replace("  - prune: {sparsity: 0.5, finetune: null}\n", "")
    text = text.replace("steps:\n", "steps:\n  - prune: {sparsity: 0.5}\n")
    with pytest.raises(Exception, match=r"steps run in the order \['distill', 'channels', 'prune'"):
        parse_recipe(text)


class DenseConcat(nn.Module):
    """A densely connected stack: each conv sees the concatenation of everything before it."""

    def __init__(self, growth: int = 12) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.a = nn.Conv2d(16, growth, 3, padding=1)
        self.b = nn.Conv2d(16 + growth, growth, 3, padding=1)
        self.head = nn.Linear(16 + 2 * growth, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.cat([x, torch.relu(self.a(x))], 1)
        x = torch.cat([x, torch.relu(self.b(x))], 1)
        return self.head(x.mean((2, 3)))


def test_groups_that_round_back_to_full_width_are_recorded_and_pruning_nothing_is_an_error():
    with pytest.raises(ConfigError, match=r"remove no channel anywhere.*rounds back to 12.*multiples of 8"):
        channel_prune_(DenseConcat().eval(), ChannelPruneConfig(ratio=0.3), example=X)
    model = DenseConcat().eval()
    result = channel_prune_(model, ChannelPruneConfig(ratio=0.3, round_to=4), example=X)
    skips = {r.root: r.skip for r in result.groups}
    assert model.stem.out_channels == 12 and model.a.out_channels == 12  # 16 x 0.7 -> 12; 12 x 0.7 = 8.4 -> 12
    assert "multiples of 4" in skips["a"] and result.plan.resolve("a").skip == skips["a"]
    mixed = DenseConcat(growth=12).eval()
    mixed.stem = nn.Conv2d(1, 32, 3, padding=1)
    mixed.a, mixed.b = nn.Conv2d(32, 12, 3, padding=1), nn.Conv2d(44, 12, 3, padding=1)
    mixed.head = nn.Linear(56, 10)
    result = channel_prune_(mixed, ChannelPruneConfig(ratio=0.3), example=X)
    skips = {r.root: r.skip for r in result.groups}
    assert mixed.stem.out_channels == 24 and "rounds back to 12" in skips["a"] and "lower round_to" in skips["b"]
