import pytest
import yaml

from torchslim.errors import RecipeError
from torchslim.recipe.run import run_recipe
from torchslim.recipe.schema import builtin_recipes, load_recipe, parse_recipe

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
    assert builtin_recipes() == ["lenet5", "lenet_300_100", "resnet_mini", "resnet_mini_int8"]
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
        ("name: x\nmodel: {name: lenet5}\nsteps: [{prune: {sparsity: 1.5}}]", r"steps.0: .*outside \[0, 1\)"),
        ("name: x\nmodel: {name: lenet5}\nsteps: [{share: {bits: {fc1: 12}}}]", "steps.0: .*bits=12"),
        ("name: x\nmodel: {name: resnet}\nsteps: [{prune: {sparsity: 0.5}}]", "model: .*unknown model 'resnet'"),
        ("name: x\nmodel: {name: lenet5}\ndata: {name: cifar}\nsteps: [{prune: {sparsity: 0.5}}]", "data.name"),
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
    c, b = report["compressed"], report["baseline"]
    assert b["accuracy"] > 0.9 and c["accuracy"] > 0.85
    assert c["ratio"] > 10 and c["bytes"] == (tmp_path / "a" / "tiny.tslim").stat().st_size
    assert 0 <= c["agreement"] <= 1 and c["latency"]["batch8"]["median_ms"] > 0
    md = (tmp_path / "a" / "report.md").read_text()
    assert "## Before / after" in md and "| fc1.weight |" in md
    assert report["plan"]["fc1"] == {"sparsity": pytest.approx(0.9, abs=1e-3), "bits": 4}
    again = run_recipe(tiny_recipe(tmp_path / "b"))
    assert again["baseline_cached"] and not report["baseline_cached"]
    assert (tmp_path / "a" / "tiny.tslim").read_bytes() == (tmp_path / "b" / "tiny.tslim").read_bytes()


def test_failed_run_keeps_earlier_outputs(tmp_path):
    run_recipe(tiny_recipe(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    bad = tiny_recipe(tmp_path).model_copy(update={"data": tiny_recipe(tmp_path).data.model_copy(update={"name": "nope"})})
    from torchslim.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown dataset"):
        run_recipe(bad)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
