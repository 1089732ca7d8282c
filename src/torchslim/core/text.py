"""Real text, offline: Debian package descriptions shipped with torchslim.

The snapshot (``torchslim/data/debian-descriptions.jsonl.xz``, built by
``benchmarks/make_text_corpus.py``; its ``.json`` names the archive and its date) holds one
record per package: the one-line synopsis and the long description, no synopsis or
description repeated. :func:`text_splits` draws seeded, disjoint parts of it: an index whose
embeddings are compared with the original model's, held-out packages for synopsis ->
description retrieval, and calibration and distillation texts that evaluation never sees.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import dataclass
from functools import cache
from importlib import resources

import torch

from torchslim.errors import ConfigError, DataError

CORPUS = "debian-descriptions"


@dataclass(frozen=True)
class TextRecord:
    """One Debian package: its name, one-line synopsis and long description."""

    package: str
    synopsis: str
    description: str


@dataclass(frozen=True)
class TextSplits:
    """Disjoint parts of the corpus (no package in two of them)."""

    index: list[TextRecord]  # fidelity: embeddings against the original model's, neighbours kept
    retrieval: list[TextRecord]  # task: each synopsis should find its own description
    calibration: list[TextRecord]  # int8 ranges, importance, sensitivity
    distillation: list[TextRecord]  # unlabeled text for recovery training (the rest)


def corpus_info() -> dict:
    """The snapshot's metadata: source, archive date, record count, sha256."""
    return json.loads(_file(f"{CORPUS}.json").read_text())


@cache
def debian_descriptions() -> tuple[TextRecord, ...]:
    """Every record of the snapshot, by package name; checked against its recorded sha256."""
    payload = _file(f"{CORPUS}.jsonl.xz").read_bytes()
    info = corpus_info()
    if hashlib.sha256(payload).hexdigest() != info["sha256"]:
        raise DataError(
            f"the text snapshot {CORPUS}.jsonl.xz does not match its recorded sha256: reinstall torchslim, or "
            "rebuild both files with benchmarks/make_text_corpus.py"
        )
    rows = lzma.decompress(payload).decode().splitlines()
    return tuple(TextRecord(**json.loads(line)) for line in rows)


def text_splits(index: int = 5000, retrieval: int = 2000, calibration: int = 2048, seed: int = 0) -> TextSplits:
    """Seeded, disjoint parts of the corpus; the distillation part is every record left.

    Example:
        >>> parts = text_splits()
        >>> len(parts.index), len(parts.retrieval)
        (5000, 2000)
    """
    records = debian_descriptions()
    sizes = {"index": index, "retrieval": retrieval, "calibration": calibration}
    if any(n < 1 for n in sizes.values()) or sum(sizes.values()) >= len(records):
        raise ConfigError(
            f"split sizes {sizes} must be positive and leave texts for distillation: "
            f"the corpus has {len(records)} records"
        )
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    parts, start = {}, 0
    for name, n in sizes.items():
        parts[name] = [records[i] for i in order[start : start + n]]
        start += n
    return TextSplits(**parts, distillation=[records[i] for i in order[start:]])


def _file(name: str):
    path = resources.files("torchslim") / "data" / name
    if not path.is_file():
        raise DataError(f"torchslim's text snapshot {name} is missing: reinstall torchslim (it ships in the package)")
    return path
