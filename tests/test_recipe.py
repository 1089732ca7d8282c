import json

import pytest
import yaml

import torchslim as ts
from torchslim.errors import ConfigError, RecipeError, ReportError
from torchslim.recipe.run import run_recipe
from torchslim.recipe.schema import builtin_recipes, load_recipe, parse_recipe
from torchslim.report.records import RunReport

TINY = """
name: tiny
model: {name: lenet_300_100, kwargs: {in_features: 64}}
data: {name: digits, batch_size: 64, eval_batch_size: 200, calib_size: 128}
baseline: {epochs: 4, lr: 0.003}
steps:
  - prune: {sparsity: {fc1: 0.9, fc2: 0.9, fc3: 0.5}, steps: 2, finetune: {epochs: 1, lr: 0.002}}
  - share: {bits: 4, finetune: {epochs: 1, lr: 0.0003}}
latency: {batches: [1, 8], repeats: 5, warmup: 1}
outputs: {dir: "OUT", artifact: "{name}.tslim"}
"""


def tiny_recipe(out_dir):
    return parse_recipe(TINY.replace("OUT", str(out_dir)))


def test_builtin_recipes_parse():
    assert builtin_recipes() == [
        "lenet5",
        "lenet_300_100",
        "llm_int4",
        "minilm",
        "minilm_tiny",
        "resnet_mini",
        "resnet_mini_int8",
    ]
    r = load_recipe()
    assert r.name == "lenet_300_100" and [s.kind for s in r.steps] == ["prune", "share"]
    assert load_recipe("lenet5").model.name == "lenet5"


def test_unknown_and_misspelled_keys_are_named_all_at_once():
    raw = yaml.safe_load(TINY)
    raw["outptus"] = {}
    raw["steps"][0]["prune"]["sparsty"] = 0.5
    raw["baseline"]["epochs"] = "many"
    with pytest.raises(RecipeError) as err:
        parse_recipe(yaml.safe_dump(raw))
    text = str(err.value)
    assert "3 problem(s)" in text
    assert "outptus: unknown key" in text and "steps.0.prune.sparsty: unknown key" in text
    assert "baseline.epochs" in text


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\nmodel: {name: lenet5}\nsteps: [{prune: {sparsity: 0.5}, share: {bits: 4}}]", "exactly one"),
        ("name: x\nmodel: {name: lenet5}\nsearch: {budget: '1'}", r"search: .*'1pt'"),
        ("name: x\nmodel: {name: lenet5}\nsearch: {sparsity: [0.5, 0.9]}", r"search: .*include 0.0"),
        ("name: x\nmodel: {name: lenet5}\nsearch: {objective: speed}", r"search.objective"),
        (
            "name: x\nmodel: {name: lenet5}\nsteps: [{prune: {sparsity: 1.5}}]",
            r"steps.0.prune: sparsity=1.5 is outside \[0, 1\)",
        ),
        ("name: x\nmodel: {name: lenet5}\nsteps: [{share: {bits: {fc1: 12}}}]", "steps.0.share: bits=12"),
        ("name: x\nmodel: {name: resnet}\nsteps: [{prune: {sparsity: 0.5}}]", "model: .*unknown model 'resnet'"),
        (
            "name: x\nmodel: {name: lenet5}\ndata: {name: cifar}\nsteps: [{prune: {sparsity: 0.5}}]",
            "data: unknown dataset 'cifar'",
        ),
        ("[1, 2]", "YAML mapping"),
        ("name: [unclosed", "not valid YAML"),
    ],
)
def test_malformed_recipes(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text)


def test_a_recipe_without_steps_is_for_search_and_compress_says_so():
    from torchslim.recipe.run import run_recipe

    recipe = parse_recipe("name: x\nmodel: {name: lenet5}")
    assert recipe.steps == [] and recipe.search is None
    with pytest.raises(RecipeError, match="no steps.*torchslim search"):
        run_recipe(recipe)


def test_null_skips_a_layer_and_braces_in_paths_are_literal():
    r = parse_recipe(
        "name: x\nmodel: {name: lenet5}\nsteps: [{prune: {sparsity: {'re:.*': 0.5, fc2: null}}}]\n"
        "outputs: {dir: 'out/{name}-{x}', artifact: 'a{b}.tslim'}"
    )
    assert r.steps[0].prune.sparsity == {"re:.*": 0.5, "fc2": None}
    assert str(r.artifact_path()) == "out/x-{x}/a{b}.tslim"


def test_missing_recipe_file_lists_builtins():
    with pytest.raises(RecipeError, match=r"not found.*lenet5"):
        load_recipe("no/such/recipe.yaml")


def test_run_writes_artifact_and_reports_and_is_deterministic(tmp_path):
    report = run_recipe(tiny_recipe(tmp_path / "a"))
    c, b = report.compressed, report.baseline
    assert b.accuracy > 0.9 and c.accuracy > 0.85
    assert c.ratio > 10 and c.bytes == (tmp_path / "a" / "tiny.tslim").stat().st_size
    assert 0 <= c.agreement <= 1 and c.latency["batch8"]["median_ms"] > 0
    md = (tmp_path / "a" / "report.md").read_text()
    assert "## Before / after" in md and "| fc1.weight |" in md and "## Steps" in md
    assert report.plan["fc1"] == {"sparsity": pytest.approx(0.9, abs=1e-3), "bits": 4}
    assert [(s.index, s.kind) for s in report.steps] == [(1, "prune"), (2, "share")]
    assert report.steps[1].plan["fc1"] == {"bits": 4}
    again = run_recipe(tiny_recipe(tmp_path / "b"))
    assert again.baseline_cached and not report.baseline_cached
    assert (tmp_path / "a" / "tiny.tslim").read_bytes() == (tmp_path / "b" / "tiny.tslim").read_bytes()
    written = json.loads((tmp_path / "a" / "report.json").read_text())
    assert written["schema_version"] == 2 and RunReport.from_dict(written) == report


def test_a_report_of_the_previous_version_renders_and_a_newer_one_is_refused(tmp_path):
    from typer.testing import CliRunner

    from torchslim.cli import app

    run_recipe(tiny_recipe(tmp_path))
    data = json.loads((tmp_path / "report.json").read_text())
    old = {k: v for k, v in data.items() if k not in ("schema_version", "steps", "kind")}  # version 1's layout
    (tmp_path / "report.json").write_text(json.dumps(old))
    (tmp_path / "report.md").unlink()
    printed = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert printed.exit_code == 0, printed.output
    assert "## Before / after" in (tmp_path / "report.md").read_text()
    (tmp_path / "report.json").write_text(json.dumps(data | {"schema_version": 9}))
    printed = CliRunner().invoke(app, ["report", str(tmp_path)], env={"COLUMNS": "200"})
    assert printed.exit_code == 2 and "schema version 9" in printed.output and "upgrade torchslim" in printed.output
    with pytest.raises(ReportError, match=r"missing \['baseline'"):
        RunReport.from_dict({k: v for k, v in data.items() if k != "baseline"})
    with pytest.raises(ReportError, match=r"report.json.compressed: null where a Measurement belongs"):
        RunReport.from_dict(data | {"compressed": None})


def test_failed_run_keeps_earlier_outputs(tmp_path):
    run_recipe(tiny_recipe(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    bad = tiny_recipe(tmp_path).model_copy(
        update={"data": tiny_recipe(tmp_path).data.model_copy(update={"name": "nope"})}
    )
    from torchslim.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown dataset"):
        run_recipe(bad)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def _sections(model: type, seen: set) -> None:
    """Every ConfigSection class reachable from a pydantic model's field annotations."""
    import typing

    from pydantic import BaseModel

    from torchslim.recipe.sections import ConfigSection

    def walk(tp) -> None:
        for arg in typing.get_args(tp):
            walk(arg)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and tp not in seen:
            seen.add(tp)
            for field in tp.model_fields.values():
                walk(field.annotation)

    walk(model)
    seen.intersection_update({s for s in seen if issubclass(s, ConfigSection)})


def test_every_recipe_section_has_the_python_configs_fields_and_defaults():
    import dataclasses

    from torchslim.recipe.schema import Recipe
    from torchslim.recipe.sections import ConfigSection

    sections: set = set()
    _sections(Recipe, sections)
    covered = {s.dataclass.__name__ for s in sections}
    assert {"TrainConfig", "DataSpec", "MagnitudePruneConfig", "ShareConfig", "ChannelPruneConfig"} <= covered
    assert {"QuantizeConfig", "DistillConfig", "Recovery"} <= covered
    assert {"LowRankConfig", "SparsifyConfig", "GPTQConfig", "AWQConfig"} <= covered
    for section in sections:
        for f in dataclasses.fields(section.dataclass):
            if f.name in section.recipe_wide:
                assert f.name not in section.model_fields  # set once, at the recipe's top level
                continue
            assert f.name in section.model_fields, f"{section.__name__} lacks {f.name}"
            default = section.model_fields[f.name].get_default(call_default_factory=True)
            if isinstance(default, ConfigSection):
                default = default.config(seed=0)
            python = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if section.__name__ == "_Distill" and f.name == "train":
                python = section.dataclass().train  # the distillation's own training default
            assert default == python, f"{section.__name__}.{f.name}: recipe {default!r} != Python {python!r}"


def test_the_search_section_defaults_are_the_search_configs():
    from torchslim.recipe.schema import SearchSection
    from torchslim.search.config import Budget, SearchConfig

    built = SearchSection().config(threads=2, seed=0, budget="1pt")
    python = SearchConfig(Budget(0.01))
    for key in ("objective", "sampler", "trials", "timeout_s", "recovery", "final", "latency", "seeds", "workers"):
        assert getattr(built, key) == getattr(python, key), key
    assert built.space == python.space


EVERY_STEP = """
name: every
model: {name: resnet_mini, kwargs: {width: 16}}
data: {name: digits, batch_size: 64}
baseline: {epochs: 1, lr: 0.003}
steps:
  - distill: {width: 0.5, train: {epochs: 1, lr: 0.003}, features: [[layer1, layer1]]}
  - channels: {ratio: {"re:.*": 0.25}, criterion: l1, finetune: {epochs: 1, lr: 0.001, teacher: true}}
  - prune: {sparsity: {"re:.*": 0.5, fc: null}, steps: 2, finetune: null}
  - share: {bits: 5, finetune: {epochs: 1, lr: 0.0001}, half_biases: true}
  - quantize: {calibration: mse, exclude: [fc], backend: onnxruntime}
search: {budget: 1pt, trials: 3, channels: [0.0, 0.5]}
"""


def test_a_recipe_with_every_step_round_trips_and_so_do_its_compiled_settings():
    import json

    from torchslim.core.serial import from_dict, to_dict
    from torchslim.recipe.schema import CONFIG_TYPES, recipe_from_dict, recipe_to_dict

    recipe = parse_recipe(EVERY_STEP)
    data = json.loads(json.dumps(recipe_to_dict(recipe)))
    assert data["recipe_version"] == 1
    assert recipe_from_dict(data) == recipe
    for step in recipe.steps[1:]:
        plan, settings, _ = step.compile(seed=3)
        back = from_dict(json.loads(json.dumps(to_dict(settings))), CONFIG_TYPES)
        assert back == settings and from_dict(to_dict(plan), CONFIG_TYPES) == plan
    distill = recipe.steps[0].distill.config(seed=3)
    assert from_dict(json.loads(json.dumps(to_dict(distill))), CONFIG_TYPES) == distill


def test_a_tagged_config_names_only_allowed_types():
    from torchslim.core.serial import from_dict, to_dict
    from torchslim.recipe.schema import CONFIG_TYPES

    data = to_dict(ts.TrainConfig(epochs=1))
    with pytest.raises(ConfigError, match="unknown config type 'os.system'"):
        from_dict({**data, "type": "os.system"}, CONFIG_TYPES)
    with pytest.raises(ConfigError, match="version 9"):
        from_dict({**data, "version": 9}, CONFIG_TYPES)
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['epochz'\]"):
        from_dict({**data, "fields": {"epochz": 1}}, CONFIG_TYPES)


def test_steps_out_of_the_canonical_order_or_repeated_are_refused():
    base = "name: x\nmodel: {name: lenet5}\nsteps: "
    with pytest.raises(RecipeError, match="steps run in the order"):
        parse_recipe(base + "[{share: {bits: 4}}, {prune: {sparsity: 0.5}}]")
    with pytest.raises(RecipeError, match="each at most once"):
        parse_recipe(base + "[{prune: {sparsity: 0.5}}, {prune: {sparsity: 0.7}}]")
