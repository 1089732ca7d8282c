"""Tied weights through every verb: an embedding shared with the output projection (as
language models have) and a block reused twice. A tie is stored once, restored on load, and
kept (or the layer left alone with a reason) by every verb."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.artifact.tslim import pack_manifest, read
from torchslim.core.ties import Ties, tied_names
from torchslim.errors import ArtifactError

VOCAB, WIDTH = 96, 24


class TinyLM(nn.Module):
    """Embedding -> MLP -> output projection tied to the embedding (``tie=False``: a copy)."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 48), nn.GELU(), nn.Linear(48, WIDTH))
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.head(h + self.mlp(h))


class Looped(nn.Module):
    """One block applied twice, registered under two names (a weight-tied recurrence)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.first = nn.Linear(16, 16)
        self.second = self.first
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.second(torch.relu(self.first(torch.relu(self.stem(x)))))))


def _lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().eval()


TOKENS = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))


def _roundtrip(model: nn.Module, tmp_path, build=TinyLM, x=TOKENS):
    path = ts.save(model, tmp_path / "m.tslim")
    restored = ts.load(path, model=build)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    return path, restored


def test_a_tie_is_found_once_and_stored_once(tmp_path):
    model = _lm()
    assert tied_names(model.state_dict()) == {"head.weight": "embed.weight"}
    path, restored = _roundtrip(model, tmp_path)
    untied = TinyLM(tie=False)
    untied.load_state_dict(model.state_dict())
    copy_bytes = ts.save(untied, tmp_path / "copy.tslim").stat().st_size
    assert copy_bytes - path.stat().st_size >= VOCAB * WIDTH * 4  # the shared matrix is not stored twice
    manifest, stored = read(path)
    assert manifest.version == 6 and manifest.tied == {"head.weight": "embed.weight"} and "head.weight" not in stored
    assert read(tmp_path / "copy.tslim")[0].version == 5  # files without ties stay readable by older readers
    assert restored.head.weight is restored.embed.weight
    from torchslim.artifact.inspect import inspect_file

    rows = {r.name: r for r in inspect_file(path)[0]}
    assert rows["head.weight"].bytes == 0 and rows["head.weight"].values == "tied to embed.weight"
    assert sum(r.bytes for r in rows.values()) < path.stat().st_size  # the payload is counted once
    import onnxruntime

    session = onnxruntime.InferenceSession(ts.export_onnx(restored, TOKENS[:1]))
    for batch, length in ((1, 9), (4, 5)):
        out = session.run(None, {session.get_inputs()[0].name: TOKENS[:batch, :length].numpy()})[0]
        assert torch.allclose(torch.from_numpy(out), model(TOKENS[:batch, :length]), atol=1e-4)


def test_load_ties_again_a_builder_that_does_not(tmp_path):
    path = ts.save(_lm(), tmp_path / "m.tslim")
    restored = ts.load(path, model=lambda: TinyLM(tie=False))
    assert restored.head.weight is restored.embed.weight
    with torch.no_grad():
        assert torch.equal(restored(TOKENS), _lm()(TOKENS))


def test_pruning_keeps_one_mask_and_sharing_one_codebook(tmp_path):
    model = _lm()
    ts.prune_(model, ts.MagnitudePruneConfig(sparsity={"head": 0.6, "mlp.0": 0.5}, finetune=None))
    assert model.head.weight is model.embed.weight
    assert abs(float((model.embed.weight == 0).float().mean()) - 0.6) < 0.02
    ts.share_(model, ts.ShareConfig(bits={"head": 4, "mlp.0": 5}, finetune=None))
    assert model.head.weight is model.embed.weight  # one tensor, one codebook
    assert model.embed.weight[model.embed.weight != 0].unique().numel() <= 16
    path, restored = _roundtrip(model, tmp_path)
    assert restored.head.weight is restored.embed.weight and read(path)[0].tied == {"head.weight": "embed.weight"}


def test_training_shared_centroids_trains_the_one_codebook():
    model = _lm()
    tokens = torch.randint(0, VOCAB, (64, 9), generator=torch.Generator().manual_seed(2))
    targets = torch.randint(0, VOCAB, (64, 9), generator=torch.Generator().manual_seed(3))
    from torchslim.core.data import Data
    from torchslim.core.task import LanguageModel

    class Logits(nn.Module):
        def __init__(self, lm: nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids)

    wrapped = Logits(model)
    data = Data(
        train=[{"input_ids": tokens[i : i + 16], "labels": targets[i : i + 16]} for i in range(0, 64, 16)],
        eval=[{"input_ids": tokens[:16], "labels": targets[:16]}],
        task=LanguageModel(),
    )
    before = model.embed.weight.detach().clone()
    ts.share_(wrapped, ts.ShareConfig(bits={"lm.head": 3}, finetune=ts.TrainConfig(epochs=1, lr=1e-2)), data=data)
    assert model.head.weight is model.embed.weight and model.embed.weight.unique().numel() <= 9
    assert not torch.equal(model.embed.weight, before)


def test_quantize_and_mixed_precision_leave_a_tied_layer_in_float_and_say_why(tmp_path):
    from torchslim.core.data import Data
    from torchslim.core.task import LanguageModel

    batches = [(TOKENS, TOKENS.roll(-1, 1))] * 2
    data = Data(train=batches, eval=batches, task=LanguageModel())
    for scheme in ("dynamic", "static", "mixed"):
        model = _lm()
        if scheme == "mixed":
            result = ts.mixed_precision_(model, ts.MixedPrecisionConfig(max_drop=0.5), data)
        else:
            result = ts.quantize_(model, ts.QuantizeConfig(scheme=scheme), data=data)
        skip = result.plan.resolve("head").skip
        assert skip and "tied to embed.weight" in skip and model.head.weight is model.embed.weight, scheme
        assert result.plan.resolve("mlp.0").quantize == 8  # the untied layers are int8
        path, _ = _roundtrip(model, tmp_path)
        assert read(path)[0].tied == {"head.weight": "embed.weight"}


def test_channel_pruning_leaves_a_tied_width_whole_and_says_why(tmp_path):
    model = _lm()
    result = ts.channel_prune_(model, ts.ChannelPruneConfig(ratio=0.5, round_to=1, min_channels=1), example=TOKENS)
    assert (
        "is tied to" in result.plan.resolve("mlp.2").skip and "would break the tie" in result.plan.resolve("mlp.2").skip
    )
    assert model.mlp[0].out_features == 24 and model.head.weight is model.embed.weight  # the hidden width is cut
    _roundtrip(model, tmp_path)


def test_a_block_reused_twice_is_one_layer_through_every_verb(tmp_path):
    torch.manual_seed(0)
    model, x = Looped().eval(), torch.randn(16, 8)
    assert Ties(model).groups[0][0] == ["first.weight", "second.weight"]
    ts.prune_(model, ts.MagnitudePruneConfig(sparsity=0.5, finetune=None))
    ts.share_(model, ts.ShareConfig(bits=4, finetune=None))
    assert model.first is model.second and model.first.weight[model.first.weight != 0].unique().numel() <= 16
    path, restored = _roundtrip(model, tmp_path, Looped, x)
    assert read(path)[0].tied == {"second.weight": "first.weight", "second.bias": "first.bias"}
    assert restored.first.weight is restored.second.weight
    q = ts.quantize_(model, ts.QuantizeConfig(scheme="dynamic"), example=x)
    assert "tied to second.weight" in (q.plan.resolve("first").skip or "")
    _roundtrip(model, tmp_path, Looped, x)


def test_a_file_with_a_bad_tie_is_an_artifact_error(tmp_path):
    path = ts.save(_lm(), tmp_path / "m.tslim")
    manifest, stored = read(path)
    for tied in ({}, {"head.weight": 3}, {"head.weight": "nope"}, {"a": "b", "b": "embed.weight"}, [1]):
        edited = json.loads(json.dumps(manifest.raw)) | {"tied": tied}
        bad = tmp_path / "bad.tslim"
        from safetensors.torch import save as st_save

        bad.write_bytes(st_save(stored, metadata=pack_manifest(edited)))
        with pytest.raises(ArtifactError, match="tied"):
            ts.load(bad, model=TinyLM)
