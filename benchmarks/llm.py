"""A Llama-architecture language model compressed by every one-shot LLM method, on real text.

The model is the ~29 M-parameter Llama that ``llm_model.py`` trains on torchslim's snapshot of
Debian package descriptions (cached under ``.cache/llm``). Every method starts from that fp32
model and changes the Linear layers of its decoder blocks, calibrated on sequences of the
training text (``CALIB`` sequences of 256 tokens), and is measured on held-out packages the
model never saw:

* perplexity over the held-out text (``EVAL`` sequences of 256 tokens);
* the file: ``ts.save`` of the compressed model against the fp32 ``model.safetensors``
  (``save_pretrained``; the tied table stored once). The int4 rows also store the tied
  embedding / output table k-means-shared at 4 bits (``share_``), as the ``+ table`` rows say;
* speed at batch 1 on 2 threads, each against fp32 eager in the same run (alternating
  rounds): prefill tokens/s over a 256-token prompt and decode tokens/s, one token at a time
  with the key/value cache, after a 32-token prompt;
* compiled: prefill of the same prompt with the W8A8 models and fp32 compiled by inductor;
* deployed: in a fresh process, the fp32 model and the int4 ``.tslim`` loaded and generating
  64 tokens, RSS once loaded and at its peak;
* memory: GPTQ over the whole model in a fresh process, its peak RSS above the RSS the process
  had with its libraries imported and warmed up, against the fp32 model's bytes plus one
  block's calibration activations (the hidden states entering a block for every calibration
  token).

Methods: round-to-nearest (RTN), GPTQ and AWQ int4 (and int3) with groups of 128; W8A8
(dynamic int8 activations per tensor or per token, int8 weights per channel) plain and with
SmoothQuant (α 0.5); magnitude, Wanda and SparseGPT at 50 % unstructured and 2:4; SVD low-rank
by energy kept. Peers: torchao's ``Int4WeightOnlyConfig`` and
``Int8DynamicActivationInt8WeightConfig`` where they run on CPU.

    .venv/bin/python benchmarks/llm.py [--methods ...] [--add] [--memory] [--generation] [--quick] [--no-docs] [--render]

Writes benchmarks/results/llm.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import TMP, cpu, cpu_name, end_section, input_outliers, markers, output_args, publish, saved_results  # noqa: E402

START, END = markers("llm")

import torch  # noqa: E402

import torchslim as ts  # noqa: E402
from torchslim.core.data import Data  # noqa: E402
from torchslim.core.linears import is_linear  # noqa: E402
from torchslim.transforms.gptq import rtn_layer  # noqa: E402
from torchslim.transforms.layerwise import release_free_memory  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_model  # noqa: E402

CALIB = 128  # calibration sequences of 256 tokens (GPTQ's paper: 128 x 2048)
CALIB_BATCH = 8
EVAL = 96  # held-out sequences of 256 tokens
GROUP = 128
TABLE_BITS = 4
BLOCKS = r"re:model\.layers\.\d+\..*"
METHODS = {
    "fp32": "the trained model",
    "rtn int4": "round-to-nearest int4, groups of 128",
    "gptq int4": "GPTQ int4, groups of 128, act-order",
    "gptq int4 + head": "the same with the output head in int4 too (untied from the embedding table)",
    "awq int4": "AWQ int4, groups of 128, scale and clip search",
    "rtn int3": "round-to-nearest int3 (int4 layout), groups of 128",
    "gptq int3": "GPTQ int3 (int4 layout), groups of 128",
    "awq int3": "AWQ int3 (int4 layout), groups of 128",
    "w8a8": "dynamic int8 activations (per tensor), int8 weights (per channel)",
    "smoothquant w8a8": "the same after SmoothQuant's migration, alpha 0.5",
    "smoothquant w8a8 per-token": "the same with one activation scale per token",
    "magnitude 50%": "magnitude, 50 % unstructured",
    "wanda 50%": "Wanda, 50 % unstructured",
    "sparsegpt 50%": "SparseGPT, 50 % unstructured",
    "magnitude 2:4": "magnitude, 2:4",
    "wanda 2:4": "Wanda, 2:4",
    "sparsegpt 2:4": "SparseGPT, 2:4",
    "sparsegpt 2:4 + gptq int4": "SparseGPT 2:4, then GPTQ int4 (groups of 128) keeping the zeros",
    "svd 0.8": "SVD low-rank, each layer's rank keeping 80 % of its squared singular values (dense where that saves < 10 %)",
    "svd 0.9": "the same keeping 90 %",
    "torchao int4 weight-only": "torchao's CPU int4 weight-only (PrototypeInt4WeightOnlyConfig, group 128) on the model in bfloat16",
    "torchao int8 dynamic": "torchao Int8DynamicActivationInt8WeightConfig",
}
SPEED = ("gptq int4 + head", "gptq int4", "awq int4", "torchao int4 weight-only")  # timed against fp32 eager
DEPLOY = "gptq int4 + head"  # the int4 model a user ships: the file, perplexity and decode checks


def texts(recipe: llm_model.Recipe, tokenizer, quick: bool) -> tuple[list[dict], list[torch.Tensor]]:
    """Calibration batches (training text, seeded) and held-out evaluation sequences."""
    calib_n, eval_n = (16, 8) if quick else (CALIB, EVAL)
    return token_rows(recipe, tokenizer, calib_n, eval_n, recipe.context, CALIB_BATCH, 8, pool=8)


def token_rows(
    recipe: llm_model.Recipe, tokenizer, calib_n: int, eval_n: int, context: int, batch: int, eval_batch: int, pool: int
) -> tuple[list[dict], list[torch.Tensor]]:
    """``calib_n`` calibration rows of ``context`` tokens from ``pool * calib_n`` training packages
    (a seeded draw), in batches of ``batch``, and ``eval_n`` held-out rows in batches of
    ``eval_batch``; every text tokenized by ``tokenizer``."""
    train, held = llm_model.split_records(recipe)
    g = torch.Generator().manual_seed(1)
    drawn = [train[int(i)] for i in torch.randperm(len(train), generator=g)[: calib_n * pool]]
    calib = llm_model.chunks(llm_model.token_stream(tokenizer, [llm_model.record_text(r) for r in drawn]), context)[
        :calib_n
    ]
    held_stream = llm_model.token_stream(tokenizer, [llm_model.record_text(r) for r in held])
    evals = llm_model.chunks(held_stream, context)[:eval_n]
    if len(calib) < calib_n or len(evals) < eval_n:
        raise SystemExit(f"too little text: {len(calib)} calibration and {len(evals)} held-out sequences")
    batches = [{"input_ids": calib[i : i + batch]} for i in range(0, len(calib), batch)]
    return batches, [evals[i : i + eval_batch] for i in range(0, len(evals), eval_batch)]


@torch.no_grad()
def perplexity(model, evals: list[torch.Tensor]) -> float:
    task = ts.LanguageModel()
    total = count = 0.0
    for ids in evals:
        t, c = task.score(model(input_ids=ids), ids)
        total, count = total + t, count + c
    return float(torch.tensor(total / count).exp())


def block_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if is_linear(m) and n.startswith("model.layers.")]


def rtn_(model, bits: int, group: int = GROUP) -> None:
    for name in block_linears(model):
        model.set_submodule(name, rtn_layer(model.get_submodule(name), bits, group))


def share_table_(model) -> None:
    """The tied embedding / output table k-means-shared (stored as a codebook and entropy-coded indices)."""
    ts.share_(model, ts.ShareConfig(bits={"model.embed_tokens": TABLE_BITS}, finetune=None))


def apply(name: str, model, calib: list[dict], group: int = GROUP) -> dict:
    """Compress ``model`` in place by method ``name`` (int4 / int3 in groups of ``group`` input
    features); what the method reported."""
    n = len(calib)
    bits = 3 if "int3" in name else 4
    if "+ gptq" in name:  # one-shot sparsity, then int4 on the sparse weights
        ts.sparsify_(model, ts.SparsifyConfig("sparsegpt", pattern="2:4", calib_batches=n), data=calib)
        config = ts.GPTQConfig(group_size=group, calib_batches=n)
        names = block_linears(model)  # the int4 layers that replace them are not Linear layers
        zeros = sum(int((model.get_submodule(k).weight == 0).sum()) for k in names)
        summary = ts.gptq_(model, config, data=calib).summary()
        kept = sum(int((model.get_submodule(k).dequantized_weight() == 0).sum()) for k in names)
        return {"summary": summary, "zeros_kept": kept / zeros}
    if name.startswith("rtn"):
        rtn_(model, bits, group)
    elif name.startswith("gptq"):
        config = ts.GPTQConfig(group_size=group, bits=bits, calib_batches=n, head=name.endswith("head"))
        return {"summary": ts.gptq_(model, config, data=calib).summary()}
    elif name.startswith("awq"):
        config = ts.AWQConfig(group_size=group, bits=bits, calib_batches=n)
        return {"summary": ts.awq_(model, config, data=calib).summary()}
    elif "w8a8" in name:
        smooth = 0.5 if name.startswith("smoothquant") else None
        data = Data(train=calib, eval=calib, calib=calib, task=ts.LanguageModel(), calib_batches=n)
        activations = "token" if name.endswith("per-token") else "tensor"
        config = ts.QuantizeConfig(
            scheme="dynamic", activations=activations, smooth=smooth, layers=(BLOCKS,), calib_batches=n
        )
        ts.quantize_(model, config, data=data)
    elif name.split()[0] in ("magnitude", "wanda", "sparsegpt"):
        method, amount = name.split()
        pattern = amount if ":" in amount else None
        config = ts.SparsifyConfig(method, sparsity=0.5, pattern=pattern, calib_batches=n)
        return {"summary": ts.sparsify_(model, config, data=None if method == "magnitude" else calib).summary()}
    elif name.startswith("svd"):
        config = ts.LowRankConfig(energy=float(name.split()[1]), calib_batches=n)
        result = ts.lowrank_(model, config, data=calib)
        return {
            "summary": result.summary(),
            "params_kept": sum(r.params_after for r in result.layers) / sum(r.params_before for r in result.layers),
        }
    elif name.startswith("torchao"):
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        def blocks(module, fqn: str) -> bool:
            return isinstance(module, torch.nn.Linear) and fqn.startswith("model.layers.")

        if "int4" in name:  # its CPU kernel's fast path takes bfloat16 activations
            quantize_(model.to(torch.bfloat16), PrototypeInt4WeightOnlyConfig(group_size=group), filter_fn=blocks)
        else:
            quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=blocks)
    return {}


def tslim_path(name: str) -> Path:
    return TMP / f"{name.replace(' ', '-').replace(':', '-').replace('%', '').replace('+', 'and')}.tslim"


def file_bytes(model, name: str) -> int | None:
    if name.startswith("torchao"):
        return None  # torchao's tensor subclasses are saved by torch.save (a pickle): not compared
    return ts.save(model, tslim_path(name)).stat().st_size


# ---------------------------------------------------------------- speed


@torch.no_grad()
def decode_rate(model, prompt: torch.Tensor, steps: int) -> float:
    """Tokens/s of greedy decoding at batch 1 with the key/value cache (prompt excluded)."""
    out = model(input_ids=prompt, use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - t0)


@torch.no_grad()
def prefill_rate(model, prompt: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=prompt, use_cache=True)
    return prompt.shape[1] / (time.perf_counter() - t0)


def speeds(models: dict, prompt: torch.Tensor, rounds: int, steps: int) -> dict:
    """Per model: median prefill and decode tokens/s over ``rounds`` alternating rounds, and
    the median over rounds of each round's ratio to fp32 eager."""
    names = list(models)
    per = {n: {"prefill": [], "decode": []} for n in names}
    for m in models.values():  # warm-up: int4 weights repacked, allocator settled
        decode_rate(m, prompt[:, :32], 4)
        prefill_rate(m, prompt)
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            per[n]["prefill"].append(statistics.median(prefill_rate(models[n], prompt) for _ in range(3)))
            per[n]["decode"].append(decode_rate(models[n], prompt[:, :32], steps))
    out = {}
    for n in names:
        row = {k: statistics.median(v) for k, v in per[n].items()}
        for k in ("prefill", "decode"):
            row[f"{k}_x_fp32"] = statistics.median(a / b for a, b in zip(per[n][k], per["fp32"][k], strict=True))
        out[n] = row
    return out


COMPILED = (
    "smoothquant w8a8",
    "smoothquant w8a8 per-token",
)  # prefill timed compiled by inductor, against fp32 compiled


def _by_keyword(runner):
    return lambda input_ids, **_: runner(input_ids)


def compiled_prefill(models: dict, prompt: torch.Tensor, rounds: int) -> dict:
    """Per model compiled by inductor (``torch.compile``, static shapes): the median prefill
    tokens/s over ``rounds`` alternating rounds and the median ratio to fp32 compiled, with the
    largest logit difference to the same model in eager mode."""
    runners = {}
    for name, model in models.items():
        runner = torch.compile(lambda ids, m=model: m(input_ids=ids, use_cache=False).logits, dynamic=False)
        with torch.no_grad():
            got, want = runner(prompt), model(input_ids=prompt, use_cache=False).logits
            runner(prompt)
        runners[name] = (runner, float((got - want).abs().max()))
    per: dict[str, list[float]] = {n: [] for n in runners}
    names = list(runners)
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            with torch.no_grad():
                per[n].append(statistics.median(prefill_rate(_by_keyword(runners[n][0]), prompt) for _ in range(3)))
    out = {}
    for n in names:
        ratio = statistics.median(a / b for a, b in zip(per[n], per["fp32"], strict=True))
        out[n] = {
            "prefill": statistics.median(per[n]),
            "prefill_x_fp32_compiled": ratio,
            "max_abs_logit_vs_eager": runners[n][1],
        }
    return out


# ---------------------------------------------------------------- memory


def _status_mb(key: str) -> float:
    """A ``/proc/self/status`` figure (``VmRSS``: now, ``VmHWM``: the peak since the last reset) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def reset_peak() -> None:
    """Start the peak RSS (``VmHWM``) afresh from the current RSS (Linux: ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


LARGE = {
    "hidden_size": 1024,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "intermediate_size": 2816,
}
"""The wider, deeper Llama of the memory check (random weights: memory does not depend on them)."""


def warm_up(config, calib: list[dict]) -> None:
    """A two-block Llama of the same kind, 128 wide, through GPTQ (blocks and head) and a
    forward pass, then dropped: the libraries' lazy imports and one-time set-up happen here,
    before the baseline, so the peak above it is what GPTQ on the measured model costs."""
    from transformers import AutoModelForCausalLM

    small = copy.deepcopy(config)
    for key, value in {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}.items():
        setattr(small, key, value)
    small.num_attention_heads, small.num_key_value_heads, small.head_dim = 2, 1, 64
    model = AutoModelForCausalLM.from_config(small).eval()
    ts.gptq_(model, ts.GPTQConfig(group_size=GROUP, calib_batches=2, head=True), data=calib[:2])
    with torch.no_grad():
        model(calib[0]["input_ids"][:1])
    del model
    gc.collect()
    release_free_memory()


def memory_child(folder: str, quick: bool, large: bool) -> None:
    """Run in a fresh process: GPTQ over the whole model (the trained one, or ``LARGE`` made
    from its config), printing its peak RSS as JSON."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    recipe = llm_model.Recipe()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib, _ = texts(recipe, tokenizer, quick)
    config = AutoConfig.from_pretrained(folder)
    warm_up(config, calib)
    reset_peak()
    base = _status_mb("VmRSS")
    if large:
        torch.manual_seed(0)
        for key, value in LARGE.items():
            setattr(config, key, value)
        model = AutoModelForCausalLM.from_config(config).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    parameters = sum(p.numel() for p in model.parameters())
    tokens = sum(b["input_ids"].numel() for b in calib)
    acts_mb = tokens * model.config.hidden_size * 4 / 2**20
    t0 = time.perf_counter()
    ts.gptq_(model, ts.GPTQConfig(group_size=GROUP, calib_batches=len(calib), head=True), data=calib)
    peak = _status_mb("VmHWM")
    print(
        json.dumps(
            {
                "rss_with_libraries_mb": base,
                "peak_rss_mb": peak,
                "peak_above_libraries_mb": peak - base,
                "parameters": parameters,
                "fp32_model_mb": model_mb,
                "block_activations_mb": acts_mb,
                "calibration_tokens": tokens,
                "bound_mb": 1.5 * (model_mb + acts_mb),
                "seconds": time.perf_counter() - t0,
            }
        )
    )


def memory(folder: Path, quick: bool, large: bool) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", str(folder)] + (["--quick"] if quick else [])
    cmd += ["--large"] if large else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def generation_child(folder: str, tslim: str | None) -> None:
    """Run in a fresh process: load the model a user deploys (fp32 from its folder, or a
    ``.tslim`` into a model built from the folder's config) and generate 64 tokens at batch 1
    with the key/value cache, printing RSS above the warmed-up libraries as JSON: once
    loaded, and the peak over loading and generating."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    recipe = llm_model.Recipe()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib, evals = texts(recipe, tokenizer, True)
    config = AutoConfig.from_pretrained(folder)
    warm_up(config, calib)
    prompt = evals[0][:1, :32]
    reset_peak()
    base = _status_mb("VmRSS")
    if tslim is None:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    else:
        model = ts.load(tslim, lambda: AutoModelForCausalLM.from_config(config))  # built with no float weights
    gc.collect()
    release_free_memory()
    loaded = _status_mb("VmRSS") - base
    rate = decode_rate(model, prompt, 64)
    print(json.dumps({"loaded_mb": loaded, "peak_mb": _status_mb("VmHWM") - base, "decode": rate}))


def deployed(folder: Path, int4: bool) -> dict:
    """Load-and-generate figures of the fp32 model and (``int4``: its file was saved) the int4 model."""
    out = {"fp32": generation_memory(folder, None)}
    if int4:
        out[DEPLOY] = generation_memory(folder, tslim_path(DEPLOY))
    print(f"generation: {json.dumps(out)}", flush=True)
    return out


def generation_memory(folder: Path, tslim: Path | None, runs: int = 3) -> dict:
    """The child's figures over ``runs`` fresh processes: each field's median (the heap's peak
    varies from process to process), and every run's peak."""
    cmd = [sys.executable, __file__, "--generation-child", str(folder)] + ([str(tslim)] if tslim else [])
    rows = []
    for _ in range(runs):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} | {"peak_mb_runs": [r["peak_mb"] for r in rows]}


# ---------------------------------------------------------------- run


def run(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    recipe = llm_model.Recipe()
    t0 = time.perf_counter()
    folder = llm_model.trained_model(recipe)
    info = json.loads((folder / "torchslim-llm.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fp32 = AutoModelForCausalLM.from_pretrained(folder).eval()
    calib, evals = texts(recipe, tokenizer, args.quick)
    fp32_bytes = (folder / "model.safetensors").stat().st_size
    print(
        f"model: {info['parameters']:,} parameters, {fp32_bytes / 1e6:.1f} MB ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    outliers = input_outliers(fp32, calib[0])
    print(f"input feature RMS, largest / median: {outliers}", flush=True)
    rows: dict[str, dict] = {}
    kept: dict[str, torch.nn.Module] = {"fp32": fp32}
    compiled_kept: dict[str, torch.nn.Module] = {}
    for name in args.methods:
        model = copy.deepcopy(fp32)
        t = time.perf_counter()
        try:
            reported = apply(name, model, calib)
        except Exception as exc:  # noqa: BLE001 -- a peer that does not run on this CPU is recorded, not fatal
            if not name.startswith("torchao"):
                raise
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(f"{name}: did not run ({rows[name]['error']})", flush=True)
            continue
        seconds = time.perf_counter() - t
        row = {"ppl": perplexity(model, evals), "seconds": round(seconds, 1), **reported}
        if name in ("rtn int4", "gptq int4", "gptq int4 + head", "awq int4"):
            share_table_(model)
            row["ppl_with_table"] = perplexity(model, evals)
        size = file_bytes(model, name)
        if size is not None:
            row["file_bytes"] = size
            row["file_x_fp32"] = size / fp32_bytes
        rows[name] = row
        if name in SPEED:
            kept[name] = model
        if name in COMPILED:
            compiled_kept[name] = model
        print(f"{name}: {json.dumps(row)}", flush=True)
    base = rows["fp32"]["ppl"]
    for row in rows.values():
        if "ppl" in row:
            row["ppl_change_pct"] = 100 * (row["ppl"] / base - 1)
    if args.add:  # the other rows, the speed and memory figures come from the saved run
        return {"methods": rows} | ({"generation": deployed(folder, True)} if args.generation else {})
    prompt = evals[0][:1]
    speed = speeds(kept, prompt, rounds=3 if args.quick else 7, steps=16 if args.quick else 64)
    print(f"speed: {json.dumps(speed)}", flush=True)
    compiled = compiled_prefill(
        {"fp32": fp32} | {n: compiled_kept[n] for n in compiled_kept}, prompt, 3 if args.quick else 7
    )
    print(f"compiled: {json.dumps(compiled)}", flush=True)
    del kept, compiled_kept
    generation = deployed(folder, DEPLOY in rows)
    mem = {"trained": memory(folder, args.quick, False), "large": memory(folder, args.quick, True)}
    print(f"memory: {json.dumps(mem)}", flush=True)
    return {
        "cpu": cpu(),
        "torch": torch.__version__,
        "model": info,
        "fp32_file_bytes": fp32_bytes,
        "calibration": {"sequences": sum(len(b["input_ids"]) for b in calib), "tokens_each": recipe.context},
        "eval_sequences": sum(len(e) for e in evals),
        "methods": rows,
        "input_outliers": outliers,
        "speed": speed,
        "compiled": compiled,
        "generation": generation,
        "memory": mem,
        "quick": args.quick,
    }


def checks(r: dict) -> dict[str, bool]:
    m = r["methods"]

    def loss(name: str) -> float:
        return m[name]["ppl"] - m["fp32"]["ppl"]

    out = {}
    for b in ("int4", "int3"):
        if {f"rtn {b}", f"gptq {b}"} <= set(m):
            out[f"GPTQ {b} g128 loses at most half of RTN's perplexity"] = loss(f"gptq {b}") <= 0.5 * loss(f"rtn {b}")
        if {f"rtn {b}", f"awq {b}"} <= set(m):
            out[f"AWQ {b} g128 loses at most RTN's perplexity"] = loss(f"awq {b}") <= loss(f"rtn {b}")
    for amount in ("50%", "2:4"):
        if all(f"{k} {amount}" in m for k in ("magnitude", "wanda", "sparsegpt")):
            for k in ("wanda", "sparsegpt"):
                out[f"{k} {amount} loses less than magnitude {amount}"] = loss(f"{k} {amount}") < loss(
                    f"magnitude {amount}"
                )
    if {"w8a8", "smoothquant w8a8"} <= set(m):
        out["SmoothQuant W8A8 is closer to fp32 than plain W8A8"] = abs(loss("smoothquant w8a8")) < abs(loss("w8a8"))
    if DEPLOY in m:
        g = m[DEPLOY]
        out["GPTQ int4 file <= 0.16x the fp32 safetensors"] = g["file_x_fp32"] <= 0.16
        out["GPTQ int4 perplexity within 5% of fp32"] = abs(g["ppl_with_table"] / m["fp32"]["ppl"] - 1) <= 0.05
    if DEPLOY in r["speed"]:
        out["GPTQ int4 decode >= 2x fp32 eager at batch 1"] = r["speed"][DEPLOY]["decode_x_fp32"] >= 2.0
    for key, mem in r["memory"].items():
        out[f"GPTQ peak memory below 1.5 x (fp32 model + one block's activations), {key} model"] = (
            mem["peak_above_libraries_mb"] < mem["bound_mb"]
        )
    return out


def section(r: dict) -> str:
    m, speed, mem = r["methods"], r["speed"], r["memory"]
    info = r["model"]
    fp32 = m["fp32"]["ppl"]
    lines = [
        START,
        "## Large language models: one-shot methods on a Llama (`benchmarks/llm.py`)",
        "",
        f"A {info['parameters'] / 1e6:.1f} M-parameter Llama ({info['recipe']['layers']} layers, hidden "
        f"{info['recipe']['hidden']}, grouped-query attention, tied embeddings, byte-level BPE of "
        f"{info['recipe']['vocab']} tokens) trained by `benchmarks/llm_model.py` on the Debian descriptions "
        f"({info['training_tokens_seen']:,} tokens, {info['train_seconds']:.0f} s), measured on "
        f"{r['eval_sequences']} held-out sequences of 256 tokens from packages it never saw; calibration: "
        f"{r['calibration']['sequences']} training sequences of 256 tokens. {cpu_name(r['cpu'])}, 2 threads, "
        f"torch {r['torch']}. fp32 perplexity {fp32:.2f}; fp32 file {r['fp32_file_bytes'] / 1e6:.1f} MB.",
        "",
        "| method | perplexity | change | + 4-bit table | file MB | x fp32 file | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in m.items():
        if "error" in row:
            lines.append(f"| {name} | did not run: {row['error'][:90]} | | | | | |")
            continue
        table = f"{row['ppl_with_table']:.2f}" if "ppl_with_table" in row else ""
        size = f"{row['file_bytes'] / 1e6:.1f} | {row['file_x_fp32']:.3f}" if "file_bytes" in row else "n/a | n/a"
        lines.append(
            f"| {name} | {row['ppl']:.2f} | {row['ppl_change_pct']:+.1f} % | {table} | {size} | {row['seconds']:.0f} |"
        )
    lines += [
        "",
        "int4 rows: perplexity with the Linear layers of the blocks in int4; `+ 4-bit table` also shares the tied "
        "embedding / output table at 4 bits (k-means), as the file stores it (with `+ head`, the input table only: "
        "the int4 head is untied from it). int3 rows store 3-bit values in the int4 layout and a float table. Sparse rows keep float weights "
        "with zeros; the file stores the zeros as entropy-coded positions (2:4 costs no more than any 50 % mask "
        "there). No CPU kernel runs 2:4 faster than dense: the sparse rows are smaller, not faster. "
        "`sparsegpt 2:4 + gptq int4`: GPTQ keeps every zero of the 2:4 mask (the share of zeros kept is in the "
        "results file). The file codes each packed int4 weight (two values a byte) where that is smaller: a 2:4 "
        "weight's all-zero bytes become coded positions and the rest a codebook of bytes (float table). "
        "`svd` rows: each layer's rank the smallest keeping that share of its squared singular values; the "
        "results file gives the parameters kept.",
        "",
        "| model | prefill tokens/s | x fp32 | decode tokens/s | x fp32 |",
        "|---|---|---|---|---|",
    ]
    for name, row in speed.items():
        lines.append(
            f"| {name} | {row['prefill']:.0f} | {row['prefill_x_fp32']:.2f} | {row['decode']:.0f} | {row['decode_x_fp32']:.2f} |"
        )
    lines += [
        "",
        "Batch 1, eager, 2 threads; int4 layers on PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`). "
        "Prefill: a 256-token prompt; decode: 64 tokens after a 32-token prompt with the key/value cache.",
        "",
        "Compiled by inductor (`torch.compile`, static shapes), prefill of the same 256-token prompt, against "
        "fp32 compiled in the same run (int8 layers as oneDNN int8 GEMMs):",
        "",
        "| model | prefill tokens/s | x fp32 compiled | largest logit difference to eager |",
        "|---|---|---|---|",
        *(
            f"| {k} | {v['prefill']:.0f} | {v['prefill_x_fp32_compiled']:.2f} | {v['max_abs_logit_vs_eager']:.2g} |"
            for k, v in r.get("compiled", {}).items()
        ),
        "",
        "Deployed: a fresh process loads the model (fp32 from its folder; the int4 model's `.tslim` into a model "
        "of the folder's config) and generates 64 tokens at batch 1; RSS above the warmed-up libraries, the median of 3 fresh processes:",
        "",
        "| model | RSS once loaded MB | peak over loading and generating MB | decode tokens/s |",
        "|---|---|---|---|",
        *(
            f"| {k} | {v['loaded_mb']:.0f} | {v['peak_mb']:.0f} | {v['decode']:.0f} |"
            for k, v in r.get("generation", {}).items()
        ),
        "",
        "transformers maps the fp32 safetensors file, so its RSS once loaded counts only the pages read so far; "
        "generating reads every weight. The int4 model is built by `ts.load` from a builder "
        "(`model=lambda: AutoModelForCausalLM.from_config(config)`), which it runs with the parameters on the meta "
        "device: no fp32 weights are made, the file's tensors become the model's.",
        "",
        "GPTQ over the whole model (blocks and head) in a fresh process: peak RSS above the RSS of the process "
        "with the calibration text made and its libraries imported and warmed up (a two-block Llama of the same "
        "kind through GPTQ and a forward pass first, then dropped), against 1.5 x (fp32 model + one block's "
        "calibration activations, the hidden states entering a block for every calibration token). `large`: a "
        "wider, deeper Llama of random weights (memory does not depend on them).",
        "",
        "| model | parameters | fp32 MB | activations MB | bound MB | peak above libraries MB | seconds |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {k} | {v['parameters'] / 1e6:.0f} M | {v['fp32_model_mb']:.0f} | {v['block_activations_mb']:.0f} | "
            f"{v['bound_mb']:.0f} | {v['peak_above_libraries_mb']:.0f} | {v['seconds']:.0f} |"
            for k, v in mem.items()
        ),
        "",
        f"Input features of the blocks' Linear layers: the largest one's RMS is {r['input_outliers']['median']:.1f}x "
        f"the median feature's (median over layers; at most {r['input_outliers']['max']:.1f}x). Wanda does no "
        "better than magnitude on this decoder, trained for minutes; on a decoder pretrained by its authors, "
        "SmolLM2-135M, whose largest input feature reaches 1092x the median, magnitude pruning collapses and "
        "Wanda and SparseGPT keep it usable, at 50 % and 2:4, and every other ordering holds too (section "
        "`llm_pretrained`); on the pretrained all-MiniLM-L6-v2 Wanda also beats magnitude (section "
        "`sparsify_minilm`).",
        "",
    ]
    return end_section(lines, r["checks"], END)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="a smoke run on a few sequences (figures not comparable)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--generation-child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--large", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help="only measure GPTQ's memory again, into the saved run")
    parser.add_argument(
        "--generation",
        action="store_true",
        help=f"only make the {DEPLOY!r} file again and measure deployed generation, into the saved run",
    )
    parser.add_argument(
        "--add",
        action="store_true",
        help="run only --methods and merge their rows into the saved run (no speed, memory)",
    )
    output_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.memory_child:
        torch.set_num_threads(2)
        memory_child(args.memory_child, args.quick, args.large)
        return 0
    if args.generation_child:
        torch.set_num_threads(2)
        folder, *tslim = args.generation_child
        generation_child(folder, tslim[0] if tslim else None)
        return 0
    name = "llm_quick" if args.quick else "llm"
    if args.render:
        r = saved_results(name)
        return publish(name, r, section(r))
    if "fp32" not in args.methods:
        args.methods = ["fp32", *args.methods]
    if args.memory:  # only the memory figures, measured again and merged into the saved run
        r = saved_results(name)
        r["memory"] = {k: memory(llm_model.trained_model(), args.quick, k == "large") for k in ("trained", "large")}
        r["checks"] = checks(r)
        return publish(name, r, None if (args.quick or args.no_docs) else section(r))
    if args.generation:
        args.add, args.methods = True, ["fp32", DEPLOY]
    r = run(args)
    if args.add:
        saved = saved_results(name)
        if saved is None or saved["methods"]["fp32"]["ppl"] != r["methods"]["fp32"]["ppl"]:
            raise SystemExit(
                "--add needs a saved full run of the same model (its fp32 perplexity differs or is absent)"
            )
        saved["methods"] = {k: r["methods"].get(k, v) for k, v in saved["methods"].items()} | r["methods"]
        saved["methods"] = {k: saved["methods"][k] for k in METHODS if k in saved["methods"]}
        saved |= {k: r[k] for k in ("generation",) if k in r}
        r = saved
    r["checks"] = checks(r)
    return publish(name, r, None if (args.quick or args.no_docs) else section(r))


if __name__ == "__main__":
    sys.exit(main())
