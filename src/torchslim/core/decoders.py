"""A Hugging Face causal language model read from a folder on disk, and text packed into its
batches: the model and data builders of the ``llm_int4`` recipe.

:func:`causal_lm` reads any ``AutoModelForCausalLM`` folder (``config.json``, ``*.safetensors``)
with ``transformers``, offline, without unpickling and without running code from the folder
(``trust_remote_code`` stays off): a folder whose weights are only a pickle
(``pytorch_model.bin``, ``.pt``) is refused unread. :func:`lm_text_data` makes the ``lm``
task's batches from the shipped Debian package descriptions (:mod:`torchslim.core.text`),
tokenized by the folder's own tokenizer: the texts are joined with the tokenizer's EOS token
and cut into rows of a fixed number of tokens (packed, as the one-shot papers calibrate on
contiguous text), so no row is padded and every token is scored.
``transformers`` is imported inside the functions (an optional extra).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.core.data import Data
from torchslim.core.task import LanguageModel
from torchslim.errors import ConfigError, WeightsError

KEYS = "model.kwargs.folder and data.kwargs.folder"
"""The recipe keys that name the checkpoint folder (what an error about the folder says to set)."""
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_TOKENIZE_CHUNK = 256  # texts tokenized at once while packing


def checkpoint_folder(folder: str | Path) -> Path:
    """``folder`` as a path, checked to be a Hugging Face model folder (``config.json``)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"{folder}: no such folder. Point it at a Hugging Face causal language model saved with "
            f"save_pretrained (config.json, *.safetensors, the tokenizer's files); in a recipe set {KEYS} "
            "(copy the built-in recipe to a YAML file of your own to edit it)"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{folder} is not a Hugging Face model folder (no config.json): pass the folder save_pretrained wrote "
            f"(in a recipe: {KEYS})"
        )
    return path


def causal_lm(folder: str | Path) -> nn.Module:
    """The Hugging Face causal language model (``AutoModelForCausalLM``) saved in ``folder``,
    read offline from safetensors in float32, in eval mode, its forward pass without the
    key/value cache (``generate`` still uses one). A recipe's model builder
    (``pretrained: true``), and the model ``ts.load`` fills with a `.tslim` of it.

    Example:
        >>> llm = causal_lm("models/my-llama")  # doctest: +SKIP
        >>> ts.gptq_(llm, ts.GPTQConfig(), data=lm_text_data("models/my-llama"))  # doctest: +SKIP
    """
    path = checkpoint_folder(folder)
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in _PICKLES for p in path.glob(pattern))
        raise WeightsError(
            f"{folder} has no .safetensors weights"
            + (
                f" ({', '.join(pickled)}: a pickle, which runs code when loaded; torchslim does not read it)"
                if pickled
                else ""
            )
            + ": convert the checkpoint to safetensors -- load it where you trust it and save it with "
            "model.save_pretrained(folder, safe_serialization=True)"
        )
    auto = _transformers().AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, local_files_only=True, use_safetensors=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"{folder}: transformers cannot read a causal language model there ({type(exc).__name__}: {exc}); "
            "save an AutoModelForCausalLM with save_pretrained"
        ) from exc
    model.config.use_cache = False  # whole sequences: outputs are the logits alone (generate() still caches)
    return model.eval()


def lm_text_data(
    folder: str | Path,
    train: int = 256,
    eval: int = 64,
    calib: int = 128,
    tokens: int = 256,
    batch_size: int = 8,
) -> Data:
    """Debian package descriptions as ``lm``-task batches for the causal LM in ``folder``,
    tokenized by its own tokenizer. A recipe's data builder.

    ``train``, ``eval`` and ``calib`` count **sequences** (rows of ``tokens`` tokens), not
    texts. Each part of the corpus (:func:`torchslim.core.text.text_splits`; disjoint, no
    package in two) is read in its seeded order, each package as its synopsis and description,
    joined with the tokenizer's EOS token and cut into rows of ``tokens`` tokens; the ragged
    tail is dropped. Calibration comes from the calibration part, evaluation from the index
    part, training (used only by steps that fine-tune) from the rest. Batches are
    ``{"input_ids": (batch_size, tokens)}``: the ``lm`` task scores every next token, and its
    metric is the perplexity. 128 calibration sequences of 256 tokens in batches of 8 are the
    16 batches GPTQ and AWQ take by default.

    Example:
        >>> data = lm_text_data("models/my-llama", calib=128, tokens=512)  # doctest: +SKIP
        >>> next(iter(data.calib))["input_ids"].shape  # doctest: +SKIP
        torch.Size([8, 512])
    """
    from torchslim.core.text import text_splits

    sizes = {"train": train, "eval": eval, "calib": calib, "tokens": tokens, "batch_size": batch_size}
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ConfigError(f"lm_text_data: {bad} must be whole numbers >= 1")
    tokenizer, eos = _tokenizer(checkpoint_folder(folder), tokens)
    parts = text_splits()

    def batches(records: Sequence[Any], rows: int, part: str) -> list[dict[str, torch.Tensor]]:
        texts = [f"{r.synopsis}\n{r.description}" for r in records]
        ids = pack(tokenizer, texts, rows, tokens, eos, part)  # (rows, tokens)
        return [{"input_ids": ids[i : i + batch_size]} for i in range(0, rows, batch_size)]

    return Data(
        train=batches(parts.distillation, train, "train (the distillation part)"),
        eval=batches(parts.index, eval, "eval (the index part)"),
        calib=batches(parts.calibration, calib, "calib (the calibration part)"),
        task=LanguageModel(),
    )


def pack(tokenizer: Any, texts: Sequence[str], rows: int, tokens: int, eos: int, part: str = "texts") -> torch.Tensor:
    """The first ``rows * tokens`` token ids of ``texts`` joined with ``eos`` (each text
    followed by it), as ``(rows, tokens)``; texts are tokenized only as far as needed."""
    need = rows * tokens
    ids: list[int] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = list(texts[start : start + _TOKENIZE_CHUNK])
        for seq in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(seq)
            ids.append(eos)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ConfigError(
            f"lm_text_data: {part} holds {len(ids):,} tokens, fewer than {rows} sequences of {tokens} "
            f"({need:,}): ask for fewer or shorter sequences"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(rows, tokens)  # (rows, tokens)


def _tokenizer(path: Path, tokens: int) -> tuple[Any, int]:
    """The tokenizer in ``path`` and its EOS id, checked against the model's ``config.json``:
    no token beyond the model's vocabulary, rows of ``tokens`` within its positions."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path / 'config.json'} is not readable JSON ({exc}): save the model again") from exc
    positions = next((config[k] for k in ("max_position_embeddings", "n_positions") if k in config), None)
    if isinstance(positions, int) and tokens > positions:
        raise ConfigError(
            f"lm_text_data: tokens={tokens} is more than the {positions} positions the model in {path} takes: "
            f"use tokens <= {positions}"
        )
    try:
        tokenizer = _transformers().AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"{path} has no tokenizer transformers can read ({exc}); save the model's tokenizer there"
        ) from exc
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ConfigError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the model embeds {vocab}: they do not belong "
            "together (save the model's own tokenizer with it)"
        )
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"the tokenizer in {path} has no EOS token, which separates the packed texts: set its eos_token"
        )
    return tokenizer, tokenizer.eos_token_id


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(
            "reading a Hugging Face model needs transformers: pip install 'torchslim[transformer]'"
        ) from exc
    return transformers
