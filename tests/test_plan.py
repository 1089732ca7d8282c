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
