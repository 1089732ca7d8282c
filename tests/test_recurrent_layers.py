"""Stacked, bidirectional LSTM and GRU layers: their input and hidden matrices (every layer and
direction) are pruned, shared and quantized, the file loads into a fresh model with equal
outputs, and structured pruning says why it leaves their hidden units whole."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.core.data import Data
from torchslim.errors import ConfigError


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


def test_structured_pruning_says_why_stacked_recurrent_layers_keep_their_hidden_units():
    x = torch.randn(4, 7, 6)
    with pytest.raises(
        ConfigError, match="rnn: only one-layer, one-direction GRUs.*still pruned, shared and quantized"
    ):
        ts.channel_prune_(
            Tagger(nn.GRU).eval(), ts.ChannelPruneConfig(ratio=0.5, round_to=1, min_channels=1), example=x
        )
    with pytest.raises(ConfigError, match="past rnn, a stacked, bidirectional or projected recurrent layer"):
        ts.channel_prune_(
            Tagger(nn.LSTM).eval(), ts.ChannelPruneConfig(ratio=0.5, round_to=1, min_channels=1), example=x
        )
