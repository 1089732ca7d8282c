import math

import pytest

from torchslim.core.plan import CompressionPlan, LayerDecision, match_layer
from torchslim.errors import ConfigError


def test_exact_name_beats_patterns_and_first_pattern_wins():
    plan = CompressionPlan.from_dict({"re:fc.*": {"sparsity": 0.9}, "re:fc3": {"sparsity": 0.1}, "fc3": {"bits": 8}})
    assert plan.resolve("fc1").sparsity == 0.9
    assert plan.resolve("fc3") == LayerDecision(bits=8)
    assert plan.resolve("conv1") is None
    assert match_layer(["re:fc.*", "re:fc3"], "fc3") == "re:fc.*"


def test_pattern_must_match_the_whole_name():
    assert match_layer(["re:fc"], "fc1") is None
    assert match_layer(["re:fc\\d"], "fc1") == "re:fc\\d"


def test_round_trip_and_update():
    plan = CompressionPlan.from_dict({"fc1": {"sparsity": 0.92, "bits": 5}, "fc2": {"skip": "too small"}})
    assert CompressionPlan.from_dict(plan.to_dict()) == plan
    merged = plan.updated(CompressionPlan.from_dict({"fc1": {"bits": 4}}))
    assert merged.resolve("fc1") == LayerDecision(sparsity=0.92, bits=4)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, math.nan, "0.5", True])
def test_sparsity_outside_unit_interval_is_an_error(bad):
    with pytest.raises(ConfigError, match="sparsity"):
        LayerDecision(sparsity=bad)


def test_bad_bits_unknown_field_and_bad_regex():
    with pytest.raises(ConfigError, match="bits"):
        LayerDecision(bits=9)
    with pytest.raises(ConfigError, match="unknown field"):
        CompressionPlan.from_dict({"fc1": {"sparsty": 0.5}})
    with pytest.raises(ConfigError, match="regular expression"):
        CompressionPlan.from_dict({"re:fc[": {"bits": 4}})


def test_transform_configs_come_from_a_plan():
    from torchslim.transforms.prune import MagnitudePruneConfig
    from torchslim.transforms.share import ShareConfig

    plan = CompressionPlan.from_dict(
        {"fc1": {"sparsity": 0.9, "bits": 4}, "re:fc[23]": {"sparsity": 0.5}, "fc3": {"skip": "output layer"}}
    )
    prune_cfg = MagnitudePruneConfig.from_plan(plan, steps=2, finetune=None)
    assert prune_cfg.sparsity == {"fc1": 0.9, "re:fc[23]": 0.5, "fc3": None} and prune_cfg.steps == 2
    from torchslim.core.models import lenet_300_100

    targets, skipped = prune_cfg.targets(lenet_300_100())
    assert targets == {"fc1": 0.9, "fc2": 0.5} and skipped == {"fc3": "the sparsity rule 'fc3' skips this layer"}
    assert ShareConfig.from_plan(plan, finetune=None).bits == {"fc1": 4, "fc3": None}
    with pytest.raises(ConfigError, match="no bits"):
        ShareConfig.from_plan(CompressionPlan.from_dict({"fc1": {"sparsity": 0.5}}))
