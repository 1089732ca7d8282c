import copy

import pytest
import torch
from torch.nn.utils import parametrize

from torchslim.analysis.cost import layer_costs
from torchslim.errors import ConfigError
from torchslim.evaluate.metrics import accuracy
from torchslim.train.fit import TrainConfig
from torchslim.transforms.prune import MagnitudePruneConfig, prune_
from torchslim.transforms.share import ShareConfig, SharedWeight, kmeans_codebook, share_


def test_kmeans_codebook_maps_every_nonzero_to_its_nearest_centroid():
    torch.manual_seed(0)
    w = torch.randn(40, 30)
    w[w.abs() < 0.5] = 0
    codebook, index = kmeans_codebook(w, bits=3)
    assert codebook.numel() == 8 and torch.all(codebook[1:] > codebook[:-1])
    assert torch.all(index[w == 0] == 8) and torch.all(index[w != 0] < 8)
    nearest = (w[w != 0][:, None] - codebook[None]).abs().argmin(1)
    assert torch.equal(index[w != 0], nearest)


def test_fewer_distinct_values_than_clusters_keeps_them_exactly():
    w = torch.tensor([[0.0, 1.5, -2.0], [1.5, 0.0, 0.25]])
    codebook, index = kmeans_codebook(w, bits=4)
    assert codebook.tolist() == [-2.0, 0.25, 1.5]
    assert torch.equal(torch.cat([codebook, torch.zeros(1)])[index], w)


def test_a_failure_leaves_no_layer_parametrized(digits_mlp):
    model = copy.deepcopy(digits_mlp)
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError):
        share_(model, ShareConfig(bits=3, finetune=None))
    assert not any(parametrize.is_parametrized(m) for m in (model.fc1, model.fc2, model.fc3))


def test_adjacent_floats_stay_distinct():
    a = 1.0 + 2.0**-23
    w = torch.tensor([[a, 1.0 + 2.0**-22, 0.0]])
    codebook, index = kmeans_codebook(w, bits=2)
    assert torch.equal(torch.cat([codebook, torch.zeros(1)])[index], w)


def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    index = torch.tensor([[0, 1, 2], [1, 1, 0]])
    weight_grad = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    codebook = torch.tensor([0.5, -0.5], requires_grad=True)
    (SharedWeight(index)(codebook) * weight_grad).sum().backward()
    assert codebook.grad.tolist() == [1.0 + 6.0, 2.0 + 4.0 + 5.0]


def test_centroid_gradients_are_bitwise_reproducible():
    torch.manual_seed(0)
    index = torch.randint(0, 17, (300, 784))
    weight_grad = torch.randn(300, 784)
    grads = []
    for _ in range(3):
        codebook = torch.randn(16, generator=torch.Generator().manual_seed(1)).requires_grad_()
        (SharedWeight(index)(codebook) * weight_grad).sum().backward()
        grads.append(codebook.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_share_after_prune_keeps_zeros_and_bounds_distinct_values(digits, digits_mlp):
    model = copy.deepcopy(digits_mlp)
    prune_(model, MagnitudePruneConfig(sparsity=0.8, finetune=None))
    zeros = {c.name: c.params - c.nonzero for c in layer_costs(model)}
    before = model.fc1.weight.detach().clone()
    result = share_(
        model, ShareConfig(bits={"re:fc[12]": 4, "fc3": 2}, finetune=TrainConfig(epochs=1, lr=1e-3)), digits
    )
    costs = {c.name: c for c in layer_costs(model)}
    assert costs["fc1"].distinct <= 16 and costs["fc3"].distinct <= 4
    assert {n: c.params - c.nonzero for n, c in costs.items()} == zeros
    assert torch.equal(model.fc1.weight == 0, before == 0)
    assert not parametrize.is_parametrized(model.fc1)
    assert result.plan.resolve("fc3").bits == 2 and result.losses
    assert accuracy(model, digits.eval_loader()) > 0.8


def test_trained_quantisation_moves_centroids(digits, digits_mlp):
    model = copy.deepcopy(digits_mlp)
    share_(model, ShareConfig(bits=3, finetune=None))
    untrained = set(model.fc2.weight.detach().unique().tolist())
    share_(model, ShareConfig(bits=3, finetune=TrainConfig(epochs=1, lr=1e-2)), digits)
    trained = set(model.fc2.weight.detach().unique().tolist())
    assert len(trained) <= 8 and trained != untrained


def test_half_biases_are_exact_float16_values(digits_mlp):
    model = copy.deepcopy(digits_mlp)
    share_(model, ShareConfig(bits={"fc1": 4}, finetune=None, half_biases=True))
    assert torch.equal(model.fc1.bias, model.fc1.bias.half().float())
    assert not torch.equal(model.fc2.bias, model.fc2.bias.half().float())


def test_unnamed_layers_keep_their_weights_and_zeros(digits, digits_mlp):
    model = copy.deepcopy(digits_mlp)
    prune_(model, MagnitudePruneConfig(sparsity={"fc3": 0.5}, finetune=None))
    fc3 = model.fc3.weight.detach().clone()
    result = share_(model, ShareConfig(bits={"fc1": 3}, finetune=TrainConfig(epochs=1, lr=1e-3)), digits)
    assert torch.equal(model.fc3.weight == 0, fc3 == 0)
    assert result.plan.resolve("fc2").skip == "no bits rule names this layer"


@pytest.mark.parametrize("bits", [0, 9, {"fc1": 12}])
def test_bad_bits(bits):
    with pytest.raises(ConfigError, match="bits"):
        ShareConfig(bits=bits)


def test_after_centroid_training_no_gradient_is_left_on_the_weights(digits, digits_mlp):
    model = copy.deepcopy(digits_mlp)
    share_(model, ShareConfig(bits=4, finetune=TrainConfig(epochs=1, lr=1e-4)), digits)
    assert all(p.grad is None or p.grad.shape == p.shape for p in model.parameters())
    assert model.fc1.weight.grad is None  # a codebook-sized gradient here broke torch.export
    torch.export.export(model, (digits.example_input(2),))


def test_an_embedding_table_is_shared_only_when_named_and_its_file_shrinks(tmp_path):
    """A word-embedding table is most of a text encoder's file: named in a bits map, it gets a
    k-means codebook the file entropy-codes; a plain int bits leaves it alone."""
    import torchslim as ts

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(500, 32), torch.nn.Linear(32, 4)).eval()
    plain = copy.deepcopy(model)
    share_(plain, ShareConfig(bits=4, finetune=None))
    assert torch.equal(plain[0].weight, model[0].weight) and plain[1].weight.unique().numel() <= 16
    before = tmp_path / "dense.tslim"
    ts.save(model, before)
    result = share_(model, ShareConfig(bits={"0": 4}, finetune=None))
    assert result.plan.to_dict()["0"] == {"bits": 4} and model[0].weight.unique().numel() <= 16
    after = tmp_path / "shared.tslim"
    ts.save(model, after)
    assert after.stat().st_size < 0.2 * before.stat().st_size
    restored = ts.load(after, model=torch.nn.Sequential(torch.nn.Embedding(500, 32), torch.nn.Linear(32, 4)))
    ids = torch.randint(0, 500, (3, 7))
    torch.testing.assert_close(restored(ids), model(ids))
