"""Stacked, bidirectional LSTM and GRU layers: their input and hidden matrices (every layer and
direction) are pruned, shared and quantized, the file loads into a fresh model with equal
outputs; structured pruning slices their hidden units in every layer and direction (as many in
each direction) and their input features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.analysis.coupling import analyse
from torchslim.core.data import Data


class Tagger(nn.Module):
    """A two-layer bidirectional recurrent classifier of the last step."""

    def __init__(self, kind: type[nn.RNNBase] = nn.GRU) -> None:
        super().__init__()
        self.rnn = kind(6, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def _data() -> Data:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 7, 6, generator=g)
    y = (x[:, :, 0].sum(1) > 0).long() + (x[:, -1, 1] > 0.5).long()
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]
    return Data(train=batches, eval=batches)


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM])
def test_every_recurrent_matrix_is_pruned_shared_quantized_and_loads_equal(kind, tmp_path):
    torch.manual_seed(0)
    model, data = Tagger(kind).eval(), _data()
    dense_bytes = ts.save(model, tmp_path / "dense.tslim").stat().st_size
    pruned = ts.prune_(model, ts.MagnitudePruneConfig(sparsity=0.7, finetune=ts.TrainConfig(epochs=1)), data=data)
    assert pruned.plan.resolve("rnn").sparsity == pytest.approx(0.7, abs=0.005)
    for name in model.rnn._flat_weights_names:
        if name.startswith("weight_"):  # every layer and direction, input and hidden
            assert float((getattr(model.rnn, name) == 0).float().mean()) == pytest.approx(0.7, abs=0.01), name
    shared = ts.share_(model, ts.ShareConfig(bits=4, finetune=ts.TrainConfig(epochs=1, lr=1e-4)), data=data)
    assert shared.plan.resolve("rnn").bits == 4
    w = model.rnn.weight_hh_l1_reverse
    assert w[w != 0].unique().numel() <= 16 and float((w == 0).float().mean()) == pytest.approx(0.7, abs=0.01)
    x = next(iter(data.eval))[0]
    path = ts.save(model, tmp_path / "m.tslim")
    assert dense_bytes / path.stat().st_size > 4
    with torch.no_grad():
        assert torch.equal(ts.load(path, model=lambda: Tagger(kind))(x), model(x))
    import onnxruntime

    session = onnxruntime.InferenceSession(ts.export_onnx(model, x[:1]))  # checked at two sizes inside
    for batch, length in ((1, 7), (5, 3)):
        out = session.run(None, {session.get_inputs()[0].name: x[:batch, :length].numpy()})[0]
        assert torch.allclose(torch.from_numpy(out), model(x[:batch, :length]), atol=1e-4)
    mixed = ts.mixed_precision_(Tagger(kind).eval(), ts.MixedPrecisionConfig(max_drop=0.05), data)
    assert "scheme='dynamic'" in mixed.plan.resolve("rnn").skip  # static int8 leaves recurrent layers in float
    quantized = ts.quantize_(model, ts.QuantizeConfig(scheme="dynamic"), data=data)
    assert quantized.plan.resolve("rnn").quantize == 8
    path = ts.save(model, tmp_path / "q.tslim")
    with torch.no_grad():
        assert torch.equal(ts.load(path, model=lambda: Tagger(kind))(x), model(x))


class Encoder(nn.Module):
    """Features -> a recurrent layer of any depth and direction -> a hidden layer -> classes."""

    def __init__(self, kind: type[nn.RNNBase] = nn.GRU, layers: int = 2, bidirectional: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.rnn = kind(12, 16, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.mid = nn.Linear(32 if bidirectional else 16, 20)
        self.head = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.rnn(torch.relu(self.inp(x)))[0][:, -1])))


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM])
def test_stacked_hidden_units_are_sliced_in_every_layer_and_load_equal(kind, tmp_path):
    torch.manual_seed(0)
    model, x = Encoder(kind, layers=3).eval(), torch.randn(4, 7, 6)
    result = ts.channel_prune_(model, ts.ChannelPruneConfig(ratio=0.5, round_to=1, min_channels=1), example=x)
    rnn, g = model.rnn, 4 if kind is nn.LSTM else 3
    assert (rnn.input_size, rnn.hidden_size, model.mid.in_features) == (6, 8, 8)
    for depth in range(3):  # every layer's gates, recurrent columns and (above the first) input columns
        assert getattr(rnn, f"weight_ih_l{depth}").shape == (g * 8, 6 if depth == 0 else 8)
        assert getattr(rnn, f"weight_hh_l{depth}").shape == (g * 8, 8)
        assert getattr(rnn, f"bias_hh_l{depth}").shape == (g * 8,)
    assert {r.root: r.after for r in result.groups}["rnn"] == 8
    path = ts.save(model, tmp_path / "m.tslim")
    with torch.no_grad():
        assert torch.equal(ts.load(path, model=lambda: Encoder(kind, layers=3))(x), model(x))


def test_an_inner_layer_keeps_its_strongest_units_and_the_output_is_unchanged_when_they_are_idle():
    torch.manual_seed(0)
    model, x = Encoder(nn.GRU, layers=2).eval(), torch.randn(4, 7, 6)
    with torch.no_grad():  # layer 0's units 3 and 9 and layer 1's units 1 and 5 feed nothing
        rnn = model.rnn
        for name, units in (("weight_ih_l1", [3, 9]), ("weight_hh_l0", [3, 9]), ("weight_hh_l1", [1, 5])):
            getattr(rnn, name)[:, units] = 0.0
        model.mid.weight[:, [1, 5]] = 0.0
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):  # and are weak
            getattr(rnn, name).view(3, 16, -1)[:, [3, 9]] *= 1e-3
    reference = Encoder(nn.GRU, layers=2).eval()
    reference.load_state_dict(model.state_dict())
    group = next(g for g in analyse(model, x).prunable() if g.root == "rnn")
    group.handle.prune([1, 5])
    assert model.rnn.hidden_size == 14 and model.rnn.weight_ih_l1.shape == (42, 14)
    torch.testing.assert_close(model(x), reference(x))


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM])
def test_bidirectional_stacks_lose_as_many_units_in_each_direction_and_load_equal(kind, tmp_path):
    torch.manual_seed(0)
    model, x = Encoder(kind, layers=2, bidirectional=True).eval(), torch.randn(4, 7, 6)
    result = ts.channel_prune_(model, ts.ChannelPruneConfig(ratio=0.5, round_to=1, min_channels=1), example=x)
    rnn, g = model.rnn, 4 if kind is nn.LSTM else 3
    assert (rnn.input_size, rnn.hidden_size, model.mid.in_features) == (6, 8, 16)
    for depth in range(2):
        for sfx in ("", "_reverse"):
            assert getattr(rnn, f"weight_ih_l{depth}{sfx}").shape == (g * 8, 6 if depth == 0 else 16)
            assert getattr(rnn, f"weight_hh_l{depth}{sfx}").shape == (g * 8, 8)
    assert {r.root: r.after for r in result.groups}["rnn"] == 16
    path = ts.save(model, tmp_path / "m.tslim")
    with torch.no_grad():
        assert torch.equal(ts.load(path, model=lambda: Encoder(kind, layers=2, bidirectional=True))(x), model(x))


def test_a_bidirectional_layer_loses_the_units_asked_in_each_direction():
    torch.manual_seed(0)
    model, x = Encoder(nn.LSTM, layers=1, bidirectional=True).eval(), torch.randn(4, 7, 6)
    with torch.no_grad():  # forward unit 2 and backward unit 5 feed nothing
        model.rnn.weight_hh_l0[:, 2] = 0.0
        model.rnn.weight_hh_l0_reverse[:, 5] = 0.0
        model.mid.weight[:, [2, 16 + 5]] = 0.0
    reference = Encoder(nn.LSTM, layers=1, bidirectional=True).eval()
    reference.load_state_dict(model.state_dict())
    group = next(g for g in analyse(model, x).prunable() if g.root == "rnn")
    assert (group.channels, group.halves) == (32, 2)
    scores = torch.ones(32)
    scores[[2, 21]] = 0.0
    assert group.lowest(scores, 2) == [2, 21]  # one from each direction, though 2 and 21 are the two lowest overall
    group.handle.prune([2, 21])
    assert model.rnn.hidden_size == 15 and model.mid.in_features == 30
    torch.testing.assert_close(model(x), reference(x))
    with pytest.raises(ValueError, match="both directions must lose as many units"):
        next(g for g in analyse(model, x).prunable() if g.root == "rnn").handle.prune([0, 1])


def test_a_bidirectional_tagger_keeps_its_output_width():
    x = torch.randn(4, 7, 6)
    for kind in (nn.GRU, nn.LSTM):
        model = Tagger(kind).eval()
        ts.channel_prune_(model, ts.ChannelPruneConfig(ratio=0.5, round_to=1, min_channels=1), example=x)
        assert (model.rnn.hidden_size, model.head.in_features) == (8, 16) and model(x).shape == (4, 3)


def test_tracing_leaves_every_recurrent_forward_as_it_was():
    model, x = Encoder(nn.GRU, layers=2).eval(), torch.randn(2, 7, 6)
    own = model.rnn.forward
    model.rnn.forward = lambda inp, hx=None: own(inp, hx)  # a forward the user set on the instance
    patched = model.rnn.forward
    analyse(model, x)
    assert model.rnn.forward is patched
    analyse(plain := Encoder(nn.LSTM).eval(), x)
    assert "forward" not in plain.rnn.__dict__


def test_importance_rows_of_a_bidirectional_layer_follow_each_output_feature():
    from torchslim.analysis.importance import _params, _rows

    layer, idxs = nn.LSTM(5, 8, num_layers=2, bidirectional=True), (13, 3, 9, 0, 15)
    rows, w = _rows(layer, "out", idxs, _params), _params(layer)
    for row, i in zip(rows, idxs, strict=True):  # feature i: unit i % 8 of the last layer's direction i // 8
        sfx, j = ("_reverse" if i >= 8 else ""), i % 8
        ih, hh = w[f"weight_ih_l1{sfx}"], w[f"weight_hh_l1{sfx}"]
        assert torch.equal(row, torch.cat([*(m[j + g * 8] for m in (ih, hh) for g in range(4)), hh[:, j]]))
