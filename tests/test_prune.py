import copy

import pytest
import torch
from torch.nn.utils import parametrize

from torchslim.analysis.cost import layer_costs
from torchslim.errors import ConfigError
from torchslim.train.fit import TrainConfig
from torchslim.transforms.prune import MagnitudePruneConfig, frozen_zeros, prune_, schedule


def _sparsity(model):
    return {c.name: 1 - c.density for c in layer_costs(model)}


def test_one_shot_layer_sparsity_is_exact_and_removes_the_smallest(digits_mlp):
    model = copy.deepcopy(digits_mlp)
    before = model.fc1.weight.detach().abs().clone()
    result = prune_(model, MagnitudePruneConfig(sparsity=0.9, finetune=None))
    s = _sparsity(model)
    assert s["fc1"] == pytest.approx(0.9, abs=1e-4) and s["fc3"] == pytest.approx(0.9, abs=1e-3)
    kept = model.fc1.weight.detach() != 0
    assert before[kept].min() >= before[~kept].max()
    assert result.plan.resolve("fc2").sparsity == pytest.approx(0.9, abs=1e-3)
    assert not parametrize.is_parametrized(model.fc1), "masks must be made permanent"
    assert not torch.signbit(model.fc1.weight[~kept]).any(), "pruned entries are +0.0, never -0.0"


def test_per_layer_map_skips_unnamed_layers_with_a_reason(digits_mlp):
    model = copy.deepcopy(digits_mlp)
    result = prune_(model, MagnitudePruneConfig(sparsity={"fc1": 0.5, "re:fc2": 0.8}, finetune=None))
    s = _sparsity(model)
    assert s["fc1"] == pytest.approx(0.5, abs=1e-3) and s["fc2"] == pytest.approx(0.8, abs=1e-3)
    assert s["fc3"] == 0.0
    assert result.plan.resolve("fc3").skip == "no sparsity rule names this layer"


def test_global_threshold_prunes_big_layers_harder(digits_mlp):
    model = copy.deepcopy(digits_mlp)
    prune_(model, MagnitudePruneConfig(sparsity=0.8, scope="global", finetune=None))
    costs = layer_costs(model)
    total = sum(c.params for c in costs)
    assert sum(c.params - c.nonzero for c in costs) == pytest.approx(0.8 * total, abs=2)
    assert len({round(1 - c.density, 2) for c in costs}) > 1


def test_iterative_schedule_keeps_masks_fixed_while_fine_tuning(digits, digits_mlp):
    model = copy.deepcopy(digits_mlp)
    result = prune_(model, MagnitudePruneConfig(sparsity=0.8, steps=3, finetune=TrainConfig(epochs=2, lr=2e-3)), digits)
    assert [round(h["sparsity"]["fc1"], 4) for h in result.history] == [round(x, 4) for x in schedule(0.8, 3)]
    assert all(h["losses"] for h in result.history)
    assert _sparsity(model)["fc1"] == pytest.approx(0.8, abs=1e-3)
    from torchslim.evaluate.metrics import accuracy

    assert accuracy(model, digits.eval_loader()) > 0.85


def test_progress_counts_over_all_rounds(digits, digits_mlp):
    calls = []
    cfg = MagnitudePruneConfig(sparsity=0.5, steps=3, finetune=TrainConfig(epochs=1, lr=1e-3))
    prune_(copy.deepcopy(digits_mlp), cfg, digits, progress=lambda done, total: calls.append((done, total)))
    per_round = digits.train_steps()
    assert {total for _, total in calls} == {3 * per_round}
    assert [done for done, _ in calls] == list(range(1, 3 * per_round + 1))


def test_frozen_zeros_survive_training(digits, digits_mlp):
    model = copy.deepcopy(digits_mlp)
    with torch.no_grad():
        model.fc3.weight[:, :50] = 0
    prune_(model, MagnitudePruneConfig(sparsity={"fc1": 0.5}, finetune=TrainConfig(epochs=1, lr=1e-2)), digits)
    assert (model.fc3.weight[:, :50] == 0).all() and (model.fc3.weight[:, 50:] != 0).all()
    with frozen_zeros([model.fc3]):
        assert parametrize.is_parametrized(model.fc3, "weight")
    assert not parametrize.is_parametrized(model.fc3)


def test_global_scope_without_weight_layers_is_an_error():
    with pytest.raises(ConfigError, match="at least one Linear/Conv"):
        prune_(torch.nn.Sequential(torch.nn.ReLU()), MagnitudePruneConfig(sparsity=0.5, scope="global", finetune=None))


def test_schedule_is_cubic_and_ends_at_target():
    s = schedule(0.9, 4)
    assert s[-1] == pytest.approx(0.9) and s == sorted(s) and s[0] > 0.9 / 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 1.0}, "outside"),
        ({"sparsity": -0.2}, "outside"),
        ({"sparsity": {"fc1": 1.2}}, "outside"),
        ({"sparsity": 0.5, "steps": 0}, "steps"),
        ({"sparsity": 0.5, "scope": "net"}, "scope"),
        ({"sparsity": {"fc1": 0.5, "fc2": 0.7}, "scope": "global"}, "under one sparsity"),
    ],
)
def test_bad_configs(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MagnitudePruneConfig(**kwargs)


def test_key_matching_no_layer_is_an_error(digits_mlp):
    with pytest.raises(ConfigError, match=r"\['fc9'\] match no Linear/Conv layer"):
        prune_(copy.deepcopy(digits_mlp), MagnitudePruneConfig(sparsity={"fc9": 0.5}, finetune=None))
