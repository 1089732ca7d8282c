"""Build the committed text snapshot: Debian package descriptions, one record per package.

Each record is a package's one-line synopsis and its long description, from the English
package descriptions of Debian's ``main`` archive (the ``Translation-en`` index that apt
downloads when asked to). Packages whose synopsis or long description repeats an earlier
package's are left out (as is a package listed twice), so a synopsis has exactly one matching
description (the retrieval task of the transformer benchmark relies on it). The snapshot is
committed, so results do not move with the archive; its metadata records the source, the
archive's date and counts.

    apt-get update -o Acquire::Languages=en      # once: fetches the English descriptions
    .venv/bin/python benchmarks/make_text_corpus.py [--lists /var/lib/apt/lists]

Writes src/torchslim/data/debian-descriptions.jsonl.xz and its .json metadata (atomically).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "torchslim" / "data"
NAME = "debian-descriptions"
_PACKAGE = re.compile(r"^Package: (\S+)$", re.M)
_DESCRIPTION = re.compile(r"^Description-en: (.*)\n((?: .*(?:\n|$))*)", re.M)


def translation_index(lists: Path) -> Path:
    """The English descriptions of the main archive (not its updates), or a clear exit."""
    found = sorted(
        p
        for p in lists.glob("*_dists_*_main_i18n_Translation-en*")
        if "-updates_" not in p.name and "-security_" not in p.name
    )
    if not found:
        sys.exit(f"no Translation-en index under {lists}: run `apt-get update -o Acquire::Languages=en` first")
    return found[0]


def read_index(path: Path) -> str:
    """The index as text, whatever apt compressed it with."""
    return subprocess.run(
        ["/usr/lib/apt/apt-helper", "cat-file", str(path)], capture_output=True, text=True, check=True
    ).stdout


def release_date(index: Path) -> str:
    """The Date field of the archive's InRelease file next to the index."""
    release = index.parent / (index.name.split("_main_")[0] + "_InRelease")
    match = re.search(r"^Date: (.+)$", release.read_text(errors="replace"), re.M) if release.exists() else None
    return match.group(1).strip() if match else "unknown"


def records(text: str) -> list[dict[str, str]]:
    """Package, synopsis and long description of every stanza that has all three, by package
    name; a package, synopsis or description seen before is skipped (the index can list a
    package twice). Paragraph breaks (`` .``) become blank lines."""
    found = []
    for stanza in text.split("\n\n"):
        package, description = _PACKAGE.search(stanza), _DESCRIPTION.search(stanza)
        if not package or not description:
            continue
        lines = [line[1:] for line in description.group(2).splitlines()]
        body = "\n".join("" if line.strip() == "." else line for line in lines).strip()
        synopsis = description.group(1).strip()
        if synopsis and body:
            found.append({"package": package.group(1), "synopsis": synopsis, "description": body})
    found.sort(key=lambda r: r["package"])
    seen: set[str] = set()
    out = []
    for r in found:
        keys = ("package:" + r["package"], "synopsis:" + r["synopsis"], "description:" + r["description"])
        if any(k in seen for k in keys):
            continue
        seen.update(keys)
        out.append(r)
    return out


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lists", type=Path, default=Path("/var/lib/apt/lists"))
    args = parser.parse_args()
    index = translation_index(args.lists)
    rows = records(read_index(index))
    payload = lzma.compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(), preset=9)
    meta = {
        "source": f"Debian {index.name.split('_dists_')[1].split('_')[0]} main, English package descriptions "
        f"({index.name.split('_')[0]}: {index.name.split('_dists_')[1]})",
        "archive_date": release_date(index),
        "extracted": time.strftime("%Y-%m-%d"),
        "records": len(rows),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "built_by": "benchmarks/make_text_corpus.py",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    write_atomic(OUT / f"{NAME}.jsonl.xz", payload)
    write_atomic(OUT / f"{NAME}.json", (json.dumps(meta, indent=1) + "\n").encode())
    print(json.dumps(meta), f"{len(payload) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
