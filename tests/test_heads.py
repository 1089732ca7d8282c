"""Structured pruning of a Hugging Face encoder (a tiny random BERT): whole heads, FFN neurons
and layers leave the model, the Hugging Face forward still runs, importance picks the parts
that write nothing, the file keeps the head counts and the shorter layer list, and bad
requests are clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torchslim as ts  # noqa: E402
from torchslim.errors import ConfigError  # noqa: E402


def _bert(layers: int = 4, heads: int = 4, hidden: int = 32, ffn: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=60,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=24,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(config).eval()


def _batches(n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 60, (6, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 7:] = 0  # one padded text
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _states(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_heads_neurons_and_layers_leave_and_the_file_keeps_the_shapes(tmp_path):
    model = _bert()
    result = ts.encoder_prune_(
        model, ts.EncoderPruneConfig(heads=0.5, neurons=0.5, layers=2, round_to=8), batches=_batches()
    )
    assert len(model.encoder.layer) == 2 and model.config.num_hidden_layers == 2
    for layer in model.encoder.layer:
        attn = layer.attention.self
        assert (attn.num_attention_heads, attn.all_head_size, attn.query.out_features) == (2, 16, 16)
        assert layer.attention.output.dense.in_features == 16
        assert layer.intermediate.dense.out_features == 32 == layer.output.dense.in_features
    assert result.to_dict()["dropped"] == sorted(result.to_dict()["dropped"]) and len(result.to_dict()["dropped"]) == 2
    assert result.params_after < result.params_before / 2
    plan = result.plan.to_dict()
    assert plan["encoder.layer.0.attention.self"] == {"channels": 0.5}
    assert plan["encoder.layer.1.intermediate.dense"] == {"channels": 0.5}
    batch = _batches(1)[0]
    assert _states(model, batch).shape == (6, 12, 32)

    path = tmp_path / "bert.tslim"
    ts.save(model, path)
    restored = ts.load(path, model=_bert())
    assert len(restored.encoder.layer) == 2 and restored.config.num_hidden_layers == 2
    assert restored.encoder.layer[1].attention.self.num_attention_heads == 2
    torch.testing.assert_close(_states(restored, batch), _states(model, batch))


def test_explicit_heads_go_and_the_rest_keep_their_weights():
    model, dense = _bert(), _bert()
    ts.encoder_prune_(model, ts.EncoderPruneConfig(heads={0: [0, 2], 3: [1]}))  # no data: sliced, not refitted
    q0, q3 = model.encoder.layer[0].attention.self.query, model.encoder.layer[3].attention.self.query
    d0 = dense.encoder.layer[0].attention.self.query
    assert q0.out_features == 16 and q3.out_features == 24
    torch.testing.assert_close(q0.weight, torch.cat([d0.weight[8:16], d0.weight[24:32]]))
    out0 = model.encoder.layer[0].attention.output.dense
    torch.testing.assert_close(
        out0.weight, torch.cat([dense.encoder.layer[0].attention.output.dense.weight[:, i : i + 8] for i in (8, 24)], 1)
    )
    assert model.encoder.layer[1].attention.self.num_attention_heads == 4
    assert _states(model, _batches(1)[0]).shape == (6, 12, 32)


def test_importance_removes_the_head_and_the_layer_that_write_nothing():
    model = _bert()
    with torch.no_grad():
        model.encoder.layer[1].attention.self.value.weight[8:16] = 0  # head 1 of layer 1 writes zeros
        model.encoder.layer[1].attention.self.value.bias[8:16] = 0
        for part in (model.encoder.layer[2].attention.output.dense, model.encoder.layer[2].output.dense):
            part.weight.zero_()  # layer 2 adds nothing before its LayerNorms: an identity on normalised states
            part.bias.zero_()
    result = ts.encoder_prune_(model, ts.EncoderPruneConfig(heads={1: 3}, layers=3), batches=_batches())
    assert result.to_dict()["dropped"] == [2]
    assert [r.removed_heads for r in result.layers if r.layer == 1] == [[1]]


def test_global_scope_ranks_every_layer_together():
    model = _bert()
    result = ts.encoder_prune_(
        model, ts.EncoderPruneConfig(heads=0.5, neurons=0.5, scope="global", round_to=8), batches=_batches()
    )
    kept = [r.heads[1] for r in result.layers]
    assert all(k >= 1 for k in kept) and sum(kept) == 8
    assert all(r.neurons[1] % 8 == 0 for r in result.layers)


@pytest.mark.parametrize(
    "heads, says",
    [
        ({0: [0, 1, 2, 3]}, "removes all 4 heads of layer 0"),
        ({0: [4]}, "layer 0 has heads 0 to 3"),
        ({0: 5}, "layer 0 has 4 heads; keep between 1 and 4"),
        ({7: [0]}, "the encoder has layers 0 to 3"),
        (1.5, "the fraction to keep must be in (0, 1]"),
    ],
)
def test_more_heads_than_exist_is_a_clear_error_and_the_model_is_untouched(heads, says):
    model = _bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ts.encoder_prune_(model, ts.EncoderPruneConfig(heads=heads), batches=_batches())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_other_models_and_missing_data_are_clear_errors():
    with pytest.raises(ConfigError, match="no BERT-style encoder layers"):
        ts.encoder_prune_(torch.nn.Sequential(torch.nn.Linear(4, 4)), ts.EncoderPruneConfig(heads=0.5))
    with pytest.raises(ConfigError, match="importance is measured on calibration text"):
        ts.encoder_prune_(_bert(), ts.EncoderPruneConfig(neurons=0.5))
    with pytest.raises(ConfigError, match="nothing to prune"):
        ts.EncoderPruneConfig()
    with pytest.raises(ConfigError, match="keep between 1 and 4"):
        ts.encoder_prune_(_bert(), ts.EncoderPruneConfig(layers=0), batches=_batches())


def test_reconstruction_brings_the_pruned_output_closer_to_the_original():
    dense, batches = _bert(), _batches(4)
    errors = {}
    for reconstruct in (False, True):
        model = copy.deepcopy(dense)
        config = ts.EncoderPruneConfig(heads=0.5, neurons=0.5, reconstruct=reconstruct, round_to=8)
        ts.encoder_prune_(model, config, batches=batches)
        errors[reconstruct] = sum(float((_states(model, b) - _states(dense, b)).pow(2).mean()) for b in batches)
    assert errors[True] < 0.5 * errors[False]


def test_smoothing_shares_factors_only_within_one_layers_query_key_value():
    """SmoothQuant's factors are shared by the layers that read one tensor -- each layer's query,
    key and value -- and by nothing else, though BERT's later inputs reuse freed memory."""
    from torchslim.transforms.smoothing import smoothing_factors

    model = _bert()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(5, 60, (512, 24), generator=g)} for _ in range(2)]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    factors = smoothing_factors(model, layers, batches, 0.5)
    groups: dict[int, list[str]] = {}
    for name, s in factors.items():
        groups.setdefault(id(s), []).append(name)
    shared = sorted(g for g in groups.values() if len(g) > 1)
    assert shared == [[f"encoder.layer.{i}.attention.self.{p}" for p in ("query", "key", "value")] for i in range(4)]
