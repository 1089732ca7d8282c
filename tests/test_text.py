"""The shipped text snapshot: checked on load, one match per synopsis, disjoint seeded splits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from torchslim.core import text
from torchslim.errors import ConfigError, DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from make_text_corpus import records  # noqa: E402

STANZAS = """Package: alpha
Description-md5: 1
Description-en: Tool for the alpha task
 Alpha does one thing.
 .
 It does it well.

Package: beta
Description-en: Tool for the alpha task
 A different description under a repeated synopsis.

Package: gamma
Description-en: Gamma library
 Alpha does one thing.
 .
 It does it well.

Package: delta
Description-en: Delta, with no long description

Package: epsilon
Description-en: Epsilon runtime
 Runs epsilon programs."""


def test_the_builder_keeps_one_record_per_synopsis_and_description_with_paragraphs():
    rows = records(STANZAS)
    assert rows == [
        {
            "package": "alpha",
            "synopsis": "Tool for the alpha task",
            "description": "Alpha does one thing.\n\nIt does it well.",
        },
        {"package": "epsilon", "synopsis": "Epsilon runtime", "description": "Runs epsilon programs."},
    ]  # beta repeats a synopsis, gamma a description, delta has no long description


def test_the_snapshot_matches_its_metadata_and_repeats_nothing():
    rows, info = text.debian_descriptions(), text.corpus_info()
    assert len(rows) == info["records"] > 50_000 and "Debian" in info["source"]
    assert (
        len({r.synopsis for r in rows})
        == len({r.description for r in rows})
        == len({r.package for r in rows})
        == len(rows)
    )


def test_splits_are_seeded_and_disjoint():
    parts = text.text_splits(index=500, retrieval=200, calibration=100)
    names = [{r.package for r in getattr(parts, k)} for k in ("index", "retrieval", "calibration", "distillation")]
    assert [len(n) for n in names[:3]] == [500, 200, 100] and sum(map(len, names)) == len(text.debian_descriptions())
    assert len(set().union(*names)) == sum(map(len, names))  # no package in two parts
    assert text.text_splits(index=500, retrieval=200, calibration=100) == parts
    assert text.text_splits(index=500, retrieval=200, calibration=100, seed=1).index != parts.index
    with pytest.raises(ConfigError, match="leave texts for distillation"):
        text.text_splits(index=60_000)


def test_a_damaged_or_missing_snapshot_is_a_clear_error(tmp_path, monkeypatch):
    good = text._file(f"{text.CORPUS}.json")
    (tmp_path / f"{text.CORPUS}.json").write_text(good.read_text())
    (tmp_path / f"{text.CORPUS}.jsonl.xz").write_bytes(b"not the snapshot")
    monkeypatch.setattr(text, "_file", lambda name: tmp_path / name)
    text.debian_descriptions.cache_clear()
    try:
        with pytest.raises(DataError, match="does not match its recorded sha256"):
            text.debian_descriptions()
    finally:
        text.debian_descriptions.cache_clear()
    monkeypatch.undo()
    monkeypatch.setattr(text.resources, "files", lambda _pkg: tmp_path / "nowhere")
    with pytest.raises(DataError, match="is missing: reinstall torchslim"):
        text.corpus_info()
