"""What every benchmark script shares: paths, caches kept in the repo and the temp dir, and the
rewrite of its own section of docs/benchmarks.md and its results file (both atomic)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
TMP = Path(tempfile.mkdtemp(prefix="torchslim-bench-"))
os.environ.setdefault("TORCHSLIM_CACHE", str(ROOT / ".cache"))  # baselines stay inside the repo
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(TMP / "inductor"))  # nothing under $HOME


def markers(name: str) -> tuple[str, str]:
    """The comments that delimit a script's section of docs/benchmarks.md."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(name: str, section: str) -> None:
    """Replace (or append) the section between ``name``'s markers in docs/benchmarks.md."""
    from torchslim.core.files import write_atomic

    start, end = markers(name)
    text = (
        DOCS.read_text()
        if DOCS.exists()
        else "# torchslim benchmarks\n\nFigures printed by the scripts in `benchmarks/`.\n"
    )
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_atomic(DOCS, text)


def save_results(name: str, payload: dict) -> Path:
    """Write benchmarks/results/<name>.json."""
    from torchslim.core.files import write_atomic

    RESULTS.mkdir(parents=True, exist_ok=True)
    return write_atomic(RESULTS / f"{name}.json", json.dumps(payload, indent=1))


def saved_results(name: str) -> dict | None:
    """benchmarks/results/<name>.json as a script last saved it, or None."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def end_section(lines: list[str], results: dict[str, bool], end: str, lead: str = "") -> str:
    """A section's Markdown: ``lines``, then the acceptance checks as a list (after ``lead``, a
    sentence of the paragraph that introduces them), then the ``end`` marker."""
    checks = [f"- {k}: {'yes' if v else 'NO'}" for k, v in results.items()]
    return "\n".join([*lines, "", f"{lead}Acceptance checks (computed by the script):", "", *checks, end]) + "\n"


def output_args(parser: argparse.ArgumentParser, render: bool = True) -> None:
    """The options every script takes about its outputs: ``--no-docs`` and ``--render``."""
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    if render:
        parser.add_argument(
            "--render", action="store_true", help="only rewrite the docs section from the saved results"
        )


def publish(name: str, payload: dict, section: str | None) -> int:
    """Save the results, rewrite the docs section (unless ``section`` is None), print the
    checks; the exit status is 0 only when every check holds."""
    save_results(name, payload)
    if section is not None:
        write_section(name, section)
    checks = payload["checks"]
    for k, v in checks.items():
        print(f"{k}: {'yes' if v else 'NO'}")
    return 0 if all(checks.values()) else 1


def cpu() -> dict:
    """The processor's name, family / model numbers (one name covers several generations: AMD
    family 25 is Zen 3 / 4, 26 Zen 5) and the int8-relevant instruction sets it reports (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first: dict[str, str] = {}  # the first processor's fields
    for line in info.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            first.setdefault(key.strip(), value.strip())
    flags = first.get("flags", "").split()
    return {
        "name": first.get("model name", platform.processor()),
        "family": f"{first.get('cpu family', '?')}/{first.get('model', '?')}",
        "int8_isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags],
    }


def cpu_name(c: dict) -> str:
    """The processor as the docs name it: its name, and its family / model when recorded."""
    return c.get("name", "?") + (f" family {c['family']}" if c.get("family") else "")


def input_outliers(model, batch: dict) -> dict:
    """How uneven the inputs of the Linear layers in a transformer's blocks are, on one batch:
    per layer, the largest input feature's RMS over the median feature's; the median and the
    largest over layers (the activation outliers Wanda, AWQ and SmoothQuant exploit reach
    ratios of tens to hundreds in large trained LLMs)."""
    import statistics

    import torch

    from torchslim.transforms.layerwise import linear_layers, repeated_blocks

    ratios: list[float] = []

    def record(_m, args) -> None:
        rms = args[0].reshape(-1, args[0].shape[-1]).float().pow(2).mean(0).sqrt()
        ratios.append(float(rms.max() / rms.median().clamp_min(1e-12)))

    _, blocks = repeated_blocks(model)
    hooks = [m.register_forward_pre_hook(record) for b in blocks for m in linear_layers(b).values()]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return {"median": statistics.median(ratios), "max": max(ratios)}


def mcnemar(ours, peer) -> dict:
    """Paired comparison on the same test images (boolean tensors, right or not): how many only
    ours / only the peer gets right, and the exact two-sided McNemar p-value (a binomial test on
    those discordant images)."""
    import math

    b, c = int((ours & ~peer).sum()), int((~ours & peer).sum())
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n if n else 1.0
    return {"only_ours": b, "only_peer": c, "p": min(1.0, 2 * tail)}
