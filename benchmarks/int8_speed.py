"""int8 against the float model compiled on the same backend, and what calibration costs.

For each zoo net on Fashion-MNIST (float baselines as in the quantization benchmark, cached):

1. Calibration cost: the wall time of ``ts.quantize_`` (static int8, bias correction on) with
   ``calibration="minmax"`` and with the default ``"auto"``, and the test accuracy of each.
2. Speed on each compiling backend (inductor, ONNX Runtime): the default int8 model timed
   against the float model compiled on the same backend, paired call by call at batch 1 and 64
   (``ts.keep_faster_``, which hands layers back to float where int8 is slower), then the model
   it delivers timed again against compiled float in a separate paired measurement.

    .venv/bin/python benchmarks/int8_speed.py [--nets mobilenet_mini ...] [--no-docs]

Writes benchmarks/results/int8_speed.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings

from bench_common import cpu, cpu_name, end_section, markers, output_args, publish, saved_results, write_section  # noqa: E402  (sets the cache folders)

START, END = markers("int8_speed")

import torch  # noqa: E402

import torchslim as ts  # noqa: E402
from torchslim.core.data import fashion_mnist  # noqa: E402
from torchslim.evaluate.latency import paired_latency  # noqa: E402
from torchslim.evaluate.metrics import accuracy  # noqa: E402
from torchslim.train.baseline import trained_baseline  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from quantization import BASELINE, NETS, THREADS, optimized_ops  # noqa: E402

BACKENDS = ("inductor", "onnxruntime")
BATCHES = (1, 64)
CALIBRATION_TARGET = 3.0  # auto within this many times the cost of minmax


def calibration(dense, data) -> tuple[dict, torch.nn.Module]:
    out, model = {}, None
    for method in ("minmax", "auto"):
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        result = ts.quantize_(model, ts.QuantizeConfig(calibration=method), data)
        out[method] = {"seconds": time.perf_counter() - t, "accuracy": accuracy(model, data.eval_loader())}
        if method == "auto":
            out[method]["start"] = result.calibration["start"]
    out["ratio"] = out["auto"]["seconds"] / out["minmax"]["seconds"]
    print("calibration", json.dumps(out), flush=True)
    return out, model


def speed(dense, quantized, backend: str, data) -> dict:
    images = data.eval.tensors[0]
    examples = [images[:b] for b in BATCHES]
    delivered = copy.deepcopy(quantized)
    t = time.perf_counter()
    check = ts.keep_faster_(delivered, dense, backend, examples, THREADS)
    seconds = time.perf_counter() - t
    again = {}
    for x in examples:  # the delivered model against compiled float, measured apart from the decision
        torch._dynamo.reset()
        fast = ts.compile_model(delivered, backend, x, THREADS, spin=False)
        base = ts.compile_model(copy.deepcopy(dense), backend, x, THREADS, spin=False)
        ms, float_ms = paired_latency(fast, base, x, THREADS, rounds=15)
        again[f"b{len(x)}"] = {"delivered_ms": ms, "float_ms": float_ms}
    row = check.to_dict() | {"check_s": seconds, "again": again, "accuracy": accuracy(delivered, data.eval_loader())}
    if backend == "onnxruntime":  # the program ONNX Runtime runs for each, after its graph optimizations
        x = examples[0]
        row["same_graph_as_float"] = optimized_ops(ts.export_onnx(delivered, x), "delivered") == optimized_ops(
            ts.export_onnx(copy.deepcopy(dense), x), "float"
        )
    print(backend, json.dumps(row), flush=True)
    return row


def run_net(name: str, data) -> dict:
    t0 = time.perf_counter()
    dense, cached = trained_baseline(name, data, BASELINE)
    dense.eval()
    calib, quantized = calibration(dense, data)
    return {
        "net": name,
        "baseline_cached": cached,
        "float_accuracy": accuracy(dense, data.eval_loader()),
        "calibration": calib,
        "speed": {b: speed(dense, quantized, b, data) for b in BACKENDS},
        "wall_s": time.perf_counter() - t0,
    }


def summed(again: dict, key: str) -> float:
    return sum(v[key] for v in again.values())


def checks(nets: list[dict]) -> dict[str, bool]:
    out = {}
    for net in nets:
        n = net["net"]
        if n == "mobilenet_mini":
            out[f"{n}: auto calibration within {CALIBRATION_TARGET:g}x the time of minmax"] = (
                net["calibration"]["ratio"] <= CALIBRATION_TARGET
            )
        for backend, row in net["speed"].items():
            again = row["again"]
            out[
                f"{n}: on {backend}, the delivered model at least as fast as the float model compiled there "
                "(batch 1 + 64 re-measured, 5 % noise allowance; or the very graph ONNX Runtime runs for float)"
            ] = row.get("same_graph_as_float", False) or summed(again, "delivered_ms") <= 1.05 * summed(
                again, "float_ms"
            )
    return out


def markdown(nets: list[dict], env: dict, results: dict[str, bool]) -> str:
    c = env.get("cpu") or {}
    lines = [
        START,
        "## int8 against compiled float, and the cost of calibration",
        "",
        f"`python benchmarks/int8_speed.py`, {env['when']}, {env['machine']} ({cpu_name(c)}; "
        f"{', '.join(c.get('int8_isa', [])) or 'no AVX2'}), torch {env['torch']}, {THREADS} threads. The default "
        "static int8 model (`auto` calibration, bias correction) of each zoo net, timed against the float model "
        "compiled on the same backend: paired medians in ms, batch 1 and 64 (alternating blocks of calls; ONNX Runtime "
        "sessions that do not spin between calls, so two side by side do not take each other's cores). "
        "`ts.keep_faster_` decides "
        "(int8 kept; `mixed`: the layers slower in int8 timed alone back to float; `float`: every layer back), "
        "then the delivered model is timed again against compiled float in a separate measurement; for ONNX "
        "Runtime, `same graph` marks a delivered model whose optimized graph is node for node the float model's "
        "(the same program: any difference in its times is noise). "
        "Calibration: wall seconds of `ts.quantize_` with `minmax` and with `auto`.",
        "",
        "| net | calibration minmax s | auto s | auto / minmax | backend | float b1 / b64 | int8 b1 / b64 "
        "| delivered | layers back to float | delivered again b1 / b64 | float again b1 / b64 | test acc float / delivered |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for net in nets:
        cal = net["calibration"]
        for i, (backend, row) in enumerate(net["speed"].items()):
            head = (
                f"| {net['net']} | {cal['minmax']['seconds']:.1f} | {cal['auto']['seconds']:.1f} | {cal['ratio']:.2f}x"
                if i == 0
                else "| | | |"
            )
            kept = (
                ", ".join(row["kept_float"]) if row["delivered"] == "mixed" else ("all" if row["kept_float"] else "-")
            )
            if row.get("same_graph_as_float"):
                kept += " (same graph)"
            again = row["again"]
            lines.append(
                f"{head} | {backend} | {row['float_ms']:.3f} (sum) | {row['int8_ms']:.3f} (sum) | {row['delivered']} | "
                f"{kept} | {again['b1']['delivered_ms']:.3f} / {again['b64']['delivered_ms']:.3f} | "
                f"{again['b1']['float_ms']:.3f} / {again['b64']['float_ms']:.3f} | "
                f"{100 * net['float_accuracy']:.2f} / {100 * row['accuracy']:.2f} % |"
            )
    return end_section(lines, results, END)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=NETS, choices=NETS)
    output_args(parser)
    args = parser.parse_args()
    if args.render:
        saved = saved_results("int8_speed")
        write_section("int8_speed", markdown(saved["nets"], saved["env"], saved["checks"]))
        return 0
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    data = fashion_mnist()
    nets = [run_net(n, data) for n in args.nets]
    env = {
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch": torch.__version__,
        "cpu": cpu(),
    }
    results = checks(nets)
    payload = {"env": env, "nets": nets, "checks": results}
    return publish("int8_speed", payload, None if args.no_docs else markdown(nets, env, results))


if __name__ == "__main__":
    sys.exit(main())
