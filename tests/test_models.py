import pytest
import torch

from torchslim.analysis.cost import count_params, layer_costs, weight_layers
from torchslim.core.models import build_model, lenet5, lenet_300_100
from torchslim.errors import ConfigError


def test_lenet_300_100_matches_the_paper():
    model = lenet_300_100()
    assert count_params(model) == 266_610
    assert [n for n, _ in weight_layers(model)] == ["fc1", "fc2", "fc3"]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_caffe_lenet5_has_431k_weights():
    model = lenet5()
    assert count_params(model) == 431_080
    assert [c.shape for c in layer_costs(model)] == [(20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_zoo_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown model 'resnet'"):
        build_model("resnet")
    with pytest.raises(ConfigError, match="at least 12x12"):
        build_model("lenet5", image_size=8)
    with pytest.raises(ConfigError, match="bad arguments"):
        build_model("lenet_300_100", width=3)
