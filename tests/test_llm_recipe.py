"""The one-shot LLM methods from a recipe, on a causal LM saved on disk (a tiny random Llama and a
byte-level BPE tokenizer trained here on Debian descriptions): `torchslim compress` writes a
`.tslim` that loads back into the same folder's model with the compressed model's logits, and
the report gives each step's summary; bad folders and bad recipes are clear torchslim errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import torchslim as ts  # noqa: E402
from torchslim.cli import app  # noqa: E402
from torchslim.core.decoders import causal_lm, lm_text_data  # noqa: E402
from torchslim.core.lowrank import LowRankLinear  # noqa: E402
from torchslim.core.plan import CompressionPlan  # noqa: E402
from torchslim.core.qlayers import QuantizedLayer  # noqa: E402
from torchslim.core.text import text_splits  # noqa: E402
from torchslim.errors import ConfigError, RecipeError, WeightsError  # noqa: E402
from torchslim.evaluate.metrics import evaluate  # noqa: E402
from torchslim.recipe.run import run_recipe  # noqa: E402
from torchslim.recipe.schema import load_recipe, parse_recipe  # noqa: E402

DATA = {"train": 4, "eval": 8, "calib": 8, "tokens": 32, "batch_size": 4}  # sequences of 32 tokens


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    """A tiny random Llama (hidden 64, 2 layers) and its byte-level BPE tokenizer, saved together."""
    folder = tmp_path_factory.mktemp("llm")
    texts = [f"{r.synopsis}\n{r.description}" for r in text_splits().distillation[:300]]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _recipe(folder, out, steps: str) -> str:
    return (
        "name: tiny_llm\ntask: lm\n"
        f"model: {{builder: 'torchslim.core.decoders:causal_lm', pretrained: true, kwargs: {{folder: '{folder}'}}}}\n"
        f"data: {{builder: 'torchslim.core.decoders:lm_text_data', kwargs: {json.dumps({'folder': str(folder), **DATA})}}}\n"
        f"steps:\n{steps}"
        f"latency: {{batches: [1], repeats: 2, warmup: 1}}\noutputs: {{dir: '{out}'}}\n"
    )


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lm_text_data_packs_disjoint_sequences_of_the_folders_tokens(llm_folder):
    data = lm_text_data(llm_folder, train=4, eval=8, calib=12, tokens=32, batch_size=4)
    assert isinstance(data.task, ts.LanguageModel)
    calib = torch.cat([b["input_ids"] for b in data.calib])  # (12, 32)
    evals = torch.cat([b["input_ids"] for b in data.eval])
    assert [tuple(b["input_ids"].shape) for b in data.calib] == [(4, 32)] * 3 and calib.shape == (12, 32)
    assert len(data.eval) == 2 and len(data.train) == 1
    assert int(calib.max()) < 320 and not torch.equal(calib[:8], evals)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm_folder)
    first = text_splits().calibration[0]
    want = tokenizer(f"{first.synopsis}\n{first.description}", add_special_tokens=False)["input_ids"]
    assert len(want) < calib.numel() and tokenizer.eos_token_id == 0
    assert calib.flatten()[: len(want) + 1].tolist() == [*want, 0]  # each text, then EOS, packed across rows
    model = causal_lm(llm_folder)
    data.check(model)  # the lm task's checks: ids inside the vocabulary, a causal model
    with pytest.raises(ConfigError, match="tokens=65 is more than the 64 positions"):
        lm_text_data(llm_folder, tokens=65)
    with pytest.raises(ConfigError, match="fewer than 100000 sequences"):
        lm_text_data(llm_folder, calib=100_000, tokens=64)


def test_a_gptq_recipe_runs_from_the_cli_and_its_file_loads_back_with_the_same_logits(
    tmp_path, llm_folder, compress_cli
):
    steps = "  - gptq: {group_size: 32, head: true, calib_batches: 2}\n"
    output, report = compress_cli(_recipe(llm_folder, "OUT", steps))
    assert "step 1 (gptq): 15 Linear layers to int4 (groups of 32)" in output  # 7 per block and the head
    (step,) = report["steps"]
    assert step["kind"] == "gptq" and step["summary"].startswith("15 Linear layers to int4")
    (table,) = report["oneshot"]
    assert len(table["layers"]) == 15 and table["layers"][-1]["name"] == "lm_head"
    errors = [(r["output_error"], r["rtn_output_error"]) for r in table["layers"]]
    assert sum(g for g, _ in errors) < sum(r for _, r in errors)  # GPTQ beats rounding on the calibration tokens
    md = (tmp_path / "report.md").read_text()
    assert "## gptq (step 1)" in md and "15 Linear layers to int4" in md
    assert report["metric"]["name"] == "perplexity"
    ppl = report["compressed"]["accuracy"]
    assert math.isfinite(ppl) and ppl > 1 and math.isfinite(report["baseline"]["accuracy"])

    restored = ts.load(tmp_path / "tiny_llm.tslim", model=causal_lm(llm_folder))
    assert sum(isinstance(m, QuantizedLayer) for m in restored.modules()) == 15
    data = lm_text_data(llm_folder, **DATA)
    assert evaluate(restored, data.eval_loader(), data.task) == pytest.approx(ppl, rel=1e-6)
    recipe = load_recipe(str(tmp_path / "r.yaml"))  # the same step from Python, on the same data
    _, settings, _ = recipe.steps[0].compile(recipe.seed)
    torch.set_num_threads(recipe.threads)
    python = ts.compress(causal_lm(llm_folder), CompressionPlan(), data, settings=settings)
    assert python.results["gptq"].summary() == step["summary"]
    ids = next(iter(data.eval))["input_ids"]
    assert torch.equal(_logits(restored, ids), _logits(python.model, ids))


def test_lowrank_then_sparsify_2_4_from_a_recipe(tmp_path, llm_folder):
    steps = (
        "  - lowrank: {energy: 0.5, min_saving: 0.0, rank_multiple: 8, layers: ['re:.*mlp.*'], calib_batches: 2}\n"
        "  - sparsify: {method: sparsegpt, pattern: '2:4', calib_batches: 2}\n"
    )
    path = tmp_path / "r.yaml"
    path.write_text(_recipe(llm_folder, tmp_path / "out", steps))
    report = run_recipe(load_recipe(str(path)))
    low, sparse = report.steps
    assert (low.kind, sparse.kind) == ("lowrank", "sparsify")
    assert low.summary.startswith("6 of 6 Linear layers factorised at energy 0.5")
    assert sparse.summary.startswith("20 Linear layers made sparse by sparsegpt 2:4: 50.0% zeros")  # 4 + 2 x 6 factors
    assert [t["kind"] for t in report.oneshot] == ["lowrank", "sparsify"]
    assert math.isfinite(report.compressed.accuracy)
    restored = ts.load(tmp_path / "out" / "tiny_llm.tslim", model=causal_lm(llm_folder))
    factors = [m for m in restored.modules() if isinstance(m, LowRankLinear)]
    assert len(factors) == 6 and all(float((f.up.weight == 0).float().mean()) == 0.5 for f in factors)
    data = lm_text_data(llm_folder, **DATA)
    assert evaluate(restored, data.eval_loader(), data.task) == pytest.approx(report.compressed.accuracy, rel=1e-6)


def test_a_folder_without_safetensors_or_without_a_model_is_a_clear_error(tmp_path, llm_folder):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((llm_folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(
        WeightsError, match=r"no \.safetensors weights \(pytorch_model\.bin: a pickle.*safe_serialization"
    ):
        causal_lm(pickled)
    with pytest.raises(ConfigError, match="no such folder.*model.kwargs.folder and data.kwargs.folder"):
        causal_lm(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no config.json"):
        lm_text_data(tmp_path)
    other = tmp_path / "other"  # the tokenizer of another model
    other.mkdir()
    for f in llm_folder.glob("tok*"):
        (other / f.name).write_bytes(f.read_bytes())
    (other / "config.json").write_text(
        json.dumps({**json.loads((llm_folder / "config.json").read_text()), "vocab_size": 256})
    )
    with pytest.raises(ConfigError, match="has 320 tokens but the model embeds 256"):
        lm_text_data(other, tokens=32)
    with pytest.raises(ConfigError, match="GPTQ measures each layer's inputs"):
        ts.compress(causal_lm(llm_folder), CompressionPlan(), settings=ts.CompressSettings(gptq=ts.GPTQConfig()))


def test_the_builtin_recipe_fails_fast_naming_the_folder_keys(tmp_path, monkeypatch):
    recipe = load_recipe("llm_int4")
    assert recipe.task == "lm" and recipe.steps[0].gptq.group_size == 128 and recipe.steps[0].gptq.head
    assert recipe.latency.batches == [1]
    monkeypatch.chdir(tmp_path)  # the recipe's placeholder folder does not exist here
    printed = CliRunner().invoke(app, ["compress", "llm_int4"], env={"COLUMNS": "250"})
    assert printed.exit_code == 2 and "Traceback" not in printed.output
    assert "error: path/to/your/causal-lm: no such folder" in printed.output
    assert "model.kwargs.folder and data.kwargs.folder" in printed.output


@pytest.mark.parametrize(
    "steps, message",
    [
        ("[{gptq: {group_size: 32}}, {awq: {group_size: 32}}]", "gptq and awq both quantize"),
        ("[{gptq: {group_sise: 32}}]", r"steps\.0\.gptq\.group_sise: unknown key"),
        ("[{gptq: {group_size: 0}}]", r"steps\.0\.gptq: group_size=0: use a whole number >= 1"),
        ("[{awq: {}}, {quantize: {scheme: dynamic}}]", "awq turns the Linear layers into int4 layers"),
        ("[{sparsify: {pattern: '4:2'}}]", "pattern='4:2': use 'N:M' with N < M"),
        ("[{gptq: {}}, {lowrank: {}}]", "steps run in the order"),
    ],
)
def test_bad_one_shot_steps_are_recipe_errors(steps, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(
            f"name: x\ntask: lm\nmodel: {{builder: 'torchslim.core.decoders:causal_lm', pretrained: true}}\nsteps: {steps}\n"
        )


def test_one_shot_steps_compile_to_settings_that_round_trip():
    from torchslim.core.serial import from_dict, to_dict
    from torchslim.recipe.schema import CONFIG_TYPES

    recipe = parse_recipe(
        "name: x\ntask: lm\nmodel: {builder: 'torchslim.core.decoders:causal_lm', pretrained: true}\n"
        "steps: [{lowrank: {layers: ['re:.*mlp.*']}}, {sparsify: {method: wanda}}, {awq: {group_size: 64}}]\n"
    )
    for step in recipe.steps:
        plan, settings, teaches = step.compile(seed=0)
        assert plan == CompressionPlan() and not teaches
        assert getattr(settings, step.kind) == getattr(step, step.kind).config()
        assert from_dict(json.loads(json.dumps(to_dict(settings))), CONFIG_TYPES) == settings
    assert recipe.steps[0].lowrank.config().layers == ("re:.*mlp.*",)
    with pytest.raises(ConfigError, match="gptq or awq, not both"):
        ts.CompressSettings(gptq=ts.GPTQConfig(), awq=ts.AWQConfig())
