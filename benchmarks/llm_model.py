"""The language model the LLM benchmark compresses: a small Llama trained here, cached.

No pretrained decoder is available offline, so the benchmark makes one from text every machine
has: torchslim's snapshot of Debian package descriptions (``torchslim.core.text``). Packages
are split by a seeded draw into training text and held-out text (perplexity is measured only on
packages the model never saw); a byte-level BPE tokenizer (``tokenizers``) is trained on the
training text, then a ``LlamaConfig`` decoder (grouped-query attention, SwiGLU, RMSNorm,
rotary positions, tied input and output embeddings) is trained on it for a fixed number of
steps. The result is a Hugging Face model folder (``config.json``, ``model.safetensors``,
``tokenizer.json``) under ``.cache/llm``, keyed by a fingerprint of the corpus and every
setting below, so it is made once per machine and reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from torchslim.core.text import corpus_info, debian_descriptions

CACHE = Path(os.environ.get("TORCHSLIM_CACHE", Path(__file__).resolve().parents[1] / ".cache")) / "llm"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained model (its fingerprint)."""

    vocab: int = 8192
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 1536
    context: int = 256
    held_out: int = 1500  # packages kept out of training: the perplexity text
    batch: int = 16  # sequences of `context` tokens per step
    steps: int = 560
    lr: float = 2e-3
    warmup: int = 40
    seed: int = 0


def record_text(r) -> str:
    return f"{r.package}: {r.synopsis}\n{r.description}"


def split_records(recipe: Recipe) -> tuple[list, list]:
    """(training records, held-out records): disjoint packages, seeded."""
    records = list(debian_descriptions())
    random.Random(recipe.seed).shuffle(records)
    return records[recipe.held_out :], records[: recipe.held_out]


def fingerprint(recipe: Recipe) -> str:
    payload = json.dumps([asdict(recipe), corpus_info()["sha256"], torch.__version__.split("+")[0]], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE tokenizer with an end-of-text token, as a transformers tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Every text's ids followed by end-of-text, concatenated (int64)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def chunks(stream: torch.Tensor, context: int) -> torch.Tensor:
    """The stream cut into whole (N, context) sequences."""
    n = stream.numel() // context
    return stream[: n * context].view(n, context)


def build(recipe: Recipe, folder: Path) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    train, _ = split_records(recipe)
    texts = [record_text(r) for r in train]
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(texts, recipe.vocab)
    stream = token_stream(tokenizer, texts)
    data = chunks(stream, recipe.context)
    print(f"llm: tokenizer and {stream.numel():,} training tokens in {time.perf_counter() - t0:.0f} s", flush=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        intermediate_size=recipe.intermediate,
        max_position_embeddings=recipe.context * 4,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(recipe.seed))
    model.train()
    t0 = time.perf_counter()
    seen = 0
    for step in range(recipe.steps):
        idx = order[(torch.arange(recipe.batch) + step * recipe.batch) % data.shape[0]]
        batch = data[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += batch.numel()
        if step % 50 == 0 or step == recipe.steps - 1:
            rate = seen / (time.perf_counter() - t0)
            print(f"llm: step {step + 1}/{recipe.steps} loss {loss.item():.3f} ({rate:,.0f} tokens/s)", flush=True)
    model.eval()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {
        "recipe": asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_tokens_seen": seen,
        "training_stream_tokens": int(stream.numel()),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "corpus": corpus_info()["sha256"],
    }
    (tmp / "torchslim-llm.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # the cache entry appears whole or not at all
    return info


def trained_model(recipe: Recipe = Recipe()) -> Path:
    """The folder of the trained model for ``recipe``: from the cache, or trained now."""
    folder = CACHE / f"llama-{fingerprint(recipe)}"
    if not (folder / "torchslim-llm.json").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        build(recipe, folder)
    return folder


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = trained_model(Recipe(steps=args.steps))
    print(path, (path / "torchslim-llm.json").read_text())
