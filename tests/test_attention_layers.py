"""PyTorch's own attention layers through every verb: ``nn.TransformerEncoder`` (whose layers
take a fused kernel in eval mode) and ``nn.MultiheadAttention`` (which reads its packed
in-projection and its output projection's weight itself). Pruning and sharing reach both
projections; int8 records why attention stays float; a saved file loads into a fresh model
with equal outputs, and the ONNX export runs at two batch sizes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.core.data import Data
from torchslim.errors import ConfigError


class Encoder(nn.Module):
    """A small sequence classifier of the kind users write with torch.nn's transformer blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.pool = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x))
        pooled, _ = self.pool(h[:, :1], h, h)
        return self.head(pooled[:, 0])


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    x = torch.randn(256, 7, 6)
    y = (x[:, :, 0].mean(1) > 0).long() + (x[:, :, 1].mean(1) > 0.3).long()
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    data = Data(train=batches, eval=batches)
    model = Encoder()
    ts.fit(model, data, ts.TrainConfig(epochs=8, lr=3e-3))
    return model.eval(), data


VERBS = {
    "prune with fine-tuning": lambda m, d: ts.prune_(
        m, ts.MagnitudePruneConfig(sparsity=0.5, finetune=ts.TrainConfig(epochs=1, lr=1e-3)), data=d
    ),
    "share with centroid training": lambda m, d: ts.share_(
        m, ts.ShareConfig(bits=5, finetune=ts.TrainConfig(epochs=1, lr=1e-4)), data=d
    ),
    "static int8": lambda m, d: ts.quantize_(m, ts.QuantizeConfig(scheme="static"), data=d),
    "dynamic int8": lambda m, d: ts.quantize_(m, ts.QuantizeConfig(scheme="dynamic"), data=d),
    "mixed precision": lambda m, d: ts.mixed_precision_(m, ts.MixedPrecisionConfig(max_drop=0.05), d),
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_runs_records_its_skips_and_the_file_loads_equal(verb, trained, tmp_path):
    dense, data = trained
    model = copy.deepcopy(dense)
    result = VERBS[verb](model, data)
    plan = result.plan.to_dict()
    if verb.startswith("prune"):  # the packed q/k/v projection and out_proj too
        for name in ("pool", "pool.out_proj", "encoder.layers.0.self_attn", "encoder.layers.1.linear2"):
            assert plan[name]["sparsity"] == pytest.approx(0.5, abs=0.01), name
        assert float((model.pool.in_proj_weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    elif verb.startswith("share"):
        assert plan["pool"] == {"bits": 5} and plan["encoder.layers.0.self_attn.out_proj"] == {"bits": 5}
        assert model.encoder.layers[1].self_attn.in_proj_weight.unique().numel() <= 2**5
    else:
        assert plan["encoder.layers.0.linear1"] == {"quantize": 8} and plan["head"] == {"quantize": 8}
        assert "kernel" in plan["pool"]["skip"]  # attention itself has no int8 kernel here: kept in float
    x = next(iter(data.eval))[0]
    with torch.no_grad():
        assert (model(x).argmax(1) == dense(x).argmax(1)).float().mean() >= 0.8
        path = ts.save(model, tmp_path / "m.tslim")
        restored = ts.load(path, model=Encoder)
        assert torch.equal(restored(x), model(x))
    if verb == "dynamic int8":  # ONNX has no operator for choosing activation scales at run time
        with pytest.raises(ConfigError, match="cannot export"):
            ts.export_onnx(restored, x[:1])
    elif verb != "mixed precision":  # its layers and the file are those of static int8
        import onnxruntime

        session = onnxruntime.InferenceSession(ts.export_onnx(restored, x[:1]))
        for batch in (1, 5):
            out = session.run(None, {session.get_inputs()[0].name: x[:batch].numpy()})[0]
            assert out.shape == (batch, 3)


def test_a_failing_verb_leaves_the_model_as_it_was(trained, monkeypatch):
    dense, data = trained
    model = copy.deepcopy(dense)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    import torchslim.transforms.prune as prune

    def fail(*_a, **_k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(prune, "fit", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        ts.prune_(model, ts.MagnitudePruneConfig(sparsity=0.5, finetune=ts.TrainConfig(epochs=1)), data=data)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
