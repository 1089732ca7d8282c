"""Quantization on Fashion-MNIST: every torchslim scheme and calibration method, and two peers.

For LeNet-300-100, LeNet-5 and the zoo CNNs: train the float baseline (cached), then quantize
copies of it -- static int8 with each calibration method (and the default with one weight scale
per tensor, the variant for ONNX Runtime's integer Gemm), dynamic int8, weight-only int8 and
int4, QAT (from the default static configuration, the float model as teacher) and mixed
precision (the most sensitive layers back to float until the drop on the calibration split is
at most 0.3 points) -- and record test accuracy, real `.tslim` bytes and latency at batch 1
and 64 on each backend: PyTorch eager (float only: the int8 eager path is the fake-quant
reference), PyTorch inductor (AOTInductor with freezing) and ONNX Runtime, as ratios
against float eager measured in the same run. The calibration methods share one graph, so
latency is measured for the default method only. In the same run the same models are
quantized by the peers with their defaults: `torch.ao.quantization` FX (`prepare_fx` /
`convert_fx`, the x86 qconfig mapping; PyTorch's quantized eager kernels) and ONNX Runtime's
`quantize_static` on the float ONNX export (QDQ, per-tensor, MinMax).

    .venv/bin/python benchmarks/quantization.py [--nets lenet_300_100 ...] [--qat-epochs 2] [--no-docs]

Writes benchmarks/results/quantization.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import warnings

from bench_common import TMP, cpu, end_section, markers, mcnemar, output_args, publish, saved_results, write_section  # noqa: E402  (sets the cache folders)

START, END = markers("quantization")

import torch  # noqa: E402

import torchslim as ts  # noqa: E402
from torchslim.analysis.ranges import METHODS  # noqa: E402
from torchslim.artifact.runtime import OrtRunner  # noqa: E402
from torchslim.core.data import TensorBatches, fashion_mnist  # noqa: E402
from torchslim.core.models import ZOO  # noqa: E402
from torchslim.evaluate.latency import measure_latency, paired_latency  # noqa: E402
from torchslim.evaluate.metrics import accuracy, fp32_safetensors_bytes  # noqa: E402
from torchslim.train.baseline import trained_baseline  # noqa: E402
from torchslim.train.fit import TrainConfig  # noqa: E402

THREADS = 2
BASELINE = TrainConfig(epochs=15, lr=3e-3, weight_decay=1e-4, seed=0)
DEFAULT = ts.QuantizeConfig()  # static int8, "auto" calibration: the configuration compared with the peers
PER_TENSOR = ts.QuantizeConfig(per_channel=False)  # the same with one weight scale per tensor (ONNX Runtime's Gemm)
PER_TENSOR_LABEL = "static int8, auto, per-tensor weights"
NETS = ["lenet_300_100", "lenet5", "resnet_mini", "mobilenet_mini", "concat_net"]
CNNS = {"lenet5", "resnet_mini", "mobilenet_mini", "concat_net"}
BATCHES = (1, 64)


def images(data) -> torch.Tensor:
    return data.eval.tensors[0]


def correct(fn, data) -> torch.Tensor:
    """Which test images any callable classifies right (bool, one per image), in batches of 500."""
    x, y = data.eval.tensors
    with torch.no_grad():
        preds = torch.cat([fn(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return preds == y


def run_acc(fn, data) -> float:
    """Top-1 accuracy of any callable over the test set."""
    return float(correct(fn, data).float().mean())


def latencies(fn_for_batch, data) -> dict:
    """Median ms at each batch size; ``fn_for_batch(b)`` builds (and compiles) the runner for batch b."""
    out = {}
    for b in BATCHES:
        try:
            out[f"b{b}"] = measure_latency(fn_for_batch(b), images(data)[:b], THREADS, 10, 60).median_ms
        except Exception as exc:  # noqa: BLE001 -- a backend that cannot run this model is reported, not fatal
            out[f"b{b}_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def backend_latency(model, backend: str, data) -> dict:
    torch._dynamo.reset()
    return latencies(lambda b: ts.compile_model(model, backend, images(data)[:b], THREADS), data)


def quantized_row(name: str, label: str, model, data, result=None, timed: tuple[str, ...] = ()) -> dict:
    path = ts.save(model, TMP / f"{name}-{label}.tslim")
    restored = ts.load(path, model=ZOO[name])
    x = images(data)[:500]
    row = {
        "variant": label,
        "accuracy": accuracy(model, data.eval_loader()),
        "tslim_bytes": path.stat().st_size,
        "roundtrip_equal": bool(torch.equal(restored(x), model(x))),
        "latency_ms": {b: backend_latency(model, b, data) for b in timed},
    }
    if result is not None:
        row["skipped"] = {r.name: r.skip for r in result.layers if r.skip}
    print(name, json.dumps(row), flush=True)
    return row


def torchslim_rows(name: str, dense, data, qat_epochs: int) -> tuple[list[dict], dict]:
    rows, extra = [], {}
    for method in ("auto", *METHODS):
        model = copy.deepcopy(dense)
        cfg = ts.QuantizeConfig(calibration=method)
        t = time.perf_counter()
        result = ts.quantize_(model, cfg, data)
        timed = ("inductor", "onnxruntime") if method == DEFAULT.calibration else ()
        if method == "auto":
            moved = sum(m != result.calibration["start"] for m in result.calibration["layers"].values())
            label = f"static int8, auto (from {result.calibration['start']}, {moved} layers changed)"
        else:
            label = f"static int8, {method}"
        row = quantized_row(name, label, model, data, result, timed)
        row["quantize_s"] = time.perf_counter() - t
        if method == DEFAULT.calibration:
            row["default"] = True
            extra["ort_agreement"] = ort_agreement(model, data)
            extra["default_model"] = model
        rows.append(row)
    model = copy.deepcopy(dense)
    result = ts.quantize_(model, PER_TENSOR, data)
    rows.append(quantized_row(name, PER_TENSOR_LABEL, model, data, result, ("inductor", "onnxruntime")))
    extra["per_tensor_model"] = model
    for label, cfg, timed in (
        ("dynamic int8", ts.QuantizeConfig(scheme="dynamic"), ("inductor",)),
        ("weight-only int8", ts.QuantizeConfig(scheme="weight"), ()),
        ("weight-only int4 (groups of 32)", ts.QuantizeConfig(scheme="weight", bits=4, group_size=32), ()),
    ):
        model = copy.deepcopy(dense)
        try:
            result = ts.quantize_(model, cfg, data)
        except ts.TorchslimError as exc:  # e.g. no Linear layer for the dynamic scheme
            rows.append({"variant": label, "error": str(exc)[:200]})
            continue
        rows.append(quantized_row(name, label, model, data, result, timed))
    model = copy.deepcopy(dense)
    mixed = ts.mixed_precision_(model, ts.MixedPrecisionConfig(max_drop=0.003, quantize=DEFAULT), data)
    row = quantized_row(
        name, "mixed precision (<= 0.3 points on the calibration split)", model, data, mixed.quantized, ("inductor",)
    )
    row["kept_float"], row["sensitivity"] = mixed.kept_float, mixed.sensitivity
    rows.append(row)
    model = copy.deepcopy(dense)
    qat = TrainConfig(epochs=qat_epochs, lr=1e-4, weight_decay=0.0, seed=0, distill_weight=0.5, temperature=2.0)
    t = time.perf_counter()
    result = ts.quantize_(model, ts.QuantizeConfig(qat=qat), data, teacher=dense)
    row = quantized_row(name, f"QAT static int8 ({qat_epochs} epochs, float teacher)", model, data, result)
    row["train_s"] = time.perf_counter() - t
    rows.append(row)
    return rows, extra


def ort_agreement(model, data) -> float:
    """Top-1 agreement of ONNX Runtime with the PyTorch int8 model over the whole test set."""
    runner = ts.compile_model(model, "onnxruntime", images(data)[:500], THREADS)
    x = images(data)
    with torch.no_grad():
        same = [(runner(x[i : i + 500]).argmax(1) == model(x[i : i + 500]).argmax(1)) for i in range(0, len(x), 500)]
    return float(torch.cat(same).float().mean())


def calib_batches(data) -> list[torch.Tensor]:
    return [x for x, _ in data.calib_loader()]


PAIRED_HOW = {  # how the paired speed-ups of saved results were timed
    None: "median of nine rounds of calls taken in turn",
    "blocks": "nine rounds of alternating blocks of calls, ONNX Runtime sessions not spinning",
}


def paired(fast, slow, data, batch: int, rounds: int = 9) -> float:
    """Paired speed-up of ``fast`` over ``slow`` (above 1 means ``fast`` is faster), timed in
    alternating blocks (:func:`~torchslim.evaluate.latency.paired_latency`)."""
    with torch.no_grad():
        fast_ms, slow_ms = paired_latency(fast, slow, images(data)[:batch], THREADS, rounds)
    return slow_ms / fast_ms


def head_to_head(dense, ours, per_tensor, fx_model, ort_peer_bytes: bytes, data) -> dict:
    """Paired speed-ups at each batch size: ours (default, and per-tensor weights on ONNX Runtime)
    against the float model (eager) and each peer on its backend."""
    out = {}
    for b in BATCHES:
        x = images(data)[:b]
        torch._dynamo.reset()
        inductor = ts.compile_model(ours, "inductor", x, THREADS)
        # ONNX Runtime sessions that do not spin between calls: timed side by side, spinning ones take each other's cores
        ort = ts.compile_model(ours, "onnxruntime", x, THREADS, spin=False)
        ort_tensor = ts.compile_model(per_tensor, "onnxruntime", x, THREADS, spin=False)
        ort_peer_runner = OrtRunner(ort_peer_bytes, THREADS, spin=False)
        out[f"b{b}"] = {
            "inductor_vs_fp32_eager": paired(inductor, dense, data, b),
            "ort_vs_fp32_eager": paired(ort, dense, data, b),
            "inductor_vs_torch_ao_fx": paired(inductor, fx_model, data, b),
            "ort_vs_ort_quantize_static": paired(ort, ort_peer_runner, data, b),
            "ort_per_tensor_vs_ort_quantize_static": paired(ort_tensor, ort_peer_runner, data, b),
        }
    print("paired", json.dumps(out), flush=True)
    return out


def fx_peer(dense, data, timed: bool = True) -> dict:
    """torch.ao.quantization FX with its x86 defaults, calibrated on the same calibration split."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "x86"
        example = (images(data)[:1],)
        prepared = prepare_fx(copy.deepcopy(dense).eval(), get_default_qconfig_mapping("x86"), example)
        with torch.no_grad():
            for x in calib_batches(data):
                prepared(x)
        model = convert_fx(prepared)
        row = {
            "variant": "peer: torch.ao FX defaults (x86)",
            "backend": "PyTorch eager quantized kernels",
            "accuracy": run_acc(model, data),
            "latency_ms": {"torch.ao": latencies(lambda b: model, data)} if timed else {},
        }
    print("fx peer", json.dumps(row), flush=True)
    return row, model


def ort_peer(name: str, dense, data, timed: bool = True) -> dict:
    """ONNX Runtime quantize_static with its defaults on the float ONNX export."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    fp32 = TMP / f"{name}-fp32.onnx"
    fp32.write_bytes(ts.export_onnx(copy.deepcopy(dense).eval(), images(data)[:1]))
    import onnx

    input_name = onnx.load(str(fp32)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calib_batches(data))

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {input_name: x.numpy()}

    out = TMP / f"{name}-ort-int8.onnx"
    quantize_static(str(fp32), str(out), Reader())
    runner = OrtRunner(out.read_bytes(), THREADS)
    row = {
        "variant": "peer: ONNX Runtime quantize_static defaults",
        "backend": "onnxruntime",
        "accuracy": run_acc(runner, data),
        "onnx_bytes": out.stat().st_size,
        "latency_ms": {"onnxruntime": latencies(lambda b: runner, data)} if timed else {},
    }
    print("ort peer", json.dumps(row), flush=True)
    return row, runner


def calibration_draws(data, draws: int) -> list:
    """The data's own calibration split, then ``draws - 1`` more seeded draws of as many training
    images (the training split and test set unchanged)."""
    out = [data]
    x, y = data.train.tensors
    for k in range(1, draws):
        rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + k))[: data.calib.rows]
        out.append(dataclasses.replace(data, calib=TensorBatches((x[rows], y[rows]), data.calib.batch_size)))
    return out


def draw_accuracies(name: str, dense, data, draws: int, first: dict[str, float]) -> dict[str, list[float]]:
    """Test accuracy of torchslim's two static int8 configurations and of both peers, each
    calibrated on every calibration draw (``first`` holds draw 0's, measured by the main run)."""
    out = {k: [v] for k, v in first.items()}
    for draw in calibration_draws(data, draws)[1:]:
        for key, cfg in (("default", DEFAULT), ("per-tensor", PER_TENSOR)):
            model = copy.deepcopy(dense)
            ts.quantize_(model, cfg, draw)
            out[key].append(run_acc(model, data))
        out["torch.ao FX"].append(fx_peer(dense, draw, timed=False)[0]["accuracy"])
        out["ONNX Runtime"].append(ort_peer(name, dense, draw, timed=False)[0]["accuracy"])
    print(name, "draws", json.dumps(out), flush=True)
    return out


def optimized_ops(onnx_bytes: bytes, tag: str) -> list[str]:
    """The nodes of the graph ONNX Runtime actually runs (after its ORT_ENABLE_ALL optimizations,
    as our runner sets them), in order: type and the shapes of its constant inputs (so one
    weight scale per channel differs from one per tensor)."""
    import onnx
    import onnxruntime as ort

    path = TMP / f"{tag}-ort-optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(path)).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    return [
        f"{n.domain + '.' if n.domain else ''}{n.op_type}{[shapes[i] for i in n.input if i in shapes]}"
        for n in graph.node
    ]


def same_graphs(name: str, ours, per_tensor, peer_bytes: bytes, data) -> dict:
    """Whether ONNX Runtime runs the same node sequence for torchslim's int8 models as for
    quantize_static's (then their latencies can differ only by noise), with the node counts."""
    x = images(data)[:1]
    peer = optimized_ops(peer_bytes, f"{name}-peer")
    out = {"peer_nodes": len(peer)}
    for key, model in (("default", ours), ("per-tensor", per_tensor)):
        ops = optimized_ops(ts.export_onnx(model, x), f"{name}-{key}")
        out[key] = {"nodes": len(ops), "same_as_peer": ops == peer}
    print(name, "ort graphs", json.dumps(out), flush=True)
    return out


def run_net(name: str, data, qat_epochs: int, draws: int) -> dict:
    t0 = time.perf_counter()
    dense, cached = trained_baseline(name, data, BASELINE)
    dense.eval()
    fp = {
        "variant": "fp32",
        "accuracy": accuracy(dense, data.eval_loader()),
        "fp32_bytes": fp32_safetensors_bytes(dense),
        "latency_ms": {b: backend_latency(dense, b, data) for b in ("eager", "inductor", "onnxruntime")},
    }
    print(name, json.dumps(fp), flush=True)
    rows, extra = torchslim_rows(name, dense, data, qat_epochs)
    (fx, fx_model), (ortp, ort_runner) = fx_peer(dense, data), ort_peer(name, dense, data)
    ours, per_tensor = extra.pop("default_model"), extra.pop("per_tensor_model")
    hits = {"default": correct(ours, data), "per-tensor": correct(per_tensor, data)}
    peer_hits = {"torch.ao FX": correct(fx_model, data), "ONNX Runtime": correct(ort_runner, data)}
    extra["mcnemar"] = {f"{a} vs {p}": mcnemar(h, ph) for a, h in hits.items() for p, ph in peer_hits.items()}
    extra["paired"] = head_to_head(
        dense, ours, per_tensor, fx_model, (TMP / f"{name}-ort-int8.onnx").read_bytes(), data
    )
    extra["ort_graphs"] = same_graphs(name, ours, per_tensor, (TMP / f"{name}-ort-int8.onnx").read_bytes(), data)
    first = {k: float(h.float().mean()) for k, h in (*hits.items(), *peer_hits.items())}
    extra["draws"] = draw_accuracies(name, dense, data, draws, first)
    return {
        "net": name,
        "baseline_cached": cached,
        "fp32": fp,
        "rows": rows,
        "peers": [fx, ortp],
        **extra,
        "wall_s": time.perf_counter() - t0,
    }


def _lat(row: dict, backend: str, batch: str) -> float | None:
    return row.get("latency_ms", {}).get(backend, {}).get(batch)


def draw_mean(net: dict, key: str) -> float:
    """Mean test accuracy over the calibration draws of torchslim's ``default`` or ``per-tensor``
    configuration or of a peer (``torch.ao FX``, ``ONNX Runtime``), to 6 decimals: the accuracies
    are float32 counts over 10,000 images, and the same count of right answers must compare equal."""
    return round(statistics.fmean(net["draws"][key]), 6)


def best_peer(net: dict) -> float:
    return max(draw_mean(net, "torch.ao FX"), draw_mean(net, "ONNX Runtime"))


def ort_choice(net: dict) -> str | None:
    """The torchslim configuration (default, else per-tensor weights) that is at least as accurate
    as both peers (mean over the calibration draws) and at least as fast as ONNX Runtime's
    quantize_static on ONNX Runtime."""
    for label, key, draws in (
        ("the default int8", "ort_vs_ort_quantize_static", "default"),
        ("per-tensor int8", "ort_per_tensor_vs_ort_quantize_static", "per-tensor"),
    ):
        if draw_mean(net, draws) >= best_peer(net) and all(net["paired"][f"b{b}"][key] >= 1.0 for b in BATCHES):
            return label
    return None


def checks(nets: list[dict]) -> dict[str, bool]:
    out = {}
    for net in nets:
        n, fp = net["net"], net["fp32"]
        ours = next(r for r in net["rows"] if r.get("default"))
        p64 = net["paired"]["b64"]
        if n in CNNS:
            out[f"{n}: static int8 loses at most 0.3 points"] = fp["accuracy"] - ours["accuracy"] <= 0.003
            out[f"{n}: static int8 at least 2x faster than fp32 eager at batch 64 on one backend"] = (
                max(p64["inductor_vs_fp32_eager"], p64["ort_vs_fp32_eager"]) >= 2.0
            )
        out[f"{n}: int8 .tslim at least 3.5x smaller than fp32 safetensors"] = (
            fp["fp32_bytes"] / ours["tslim_bytes"] >= 3.5
        )
        out[
            f"{n}: default int8 at least as accurate as torch.ao FX and ONNX Runtime defaults "
            f"(mean over {len(net['draws']['default'])} calibration draws)"
        ] = draw_mean(net, "default") >= best_peer(net)
        for b in BATCHES:
            pb = net["paired"][f"b{b}"]
            out[
                f"{n}: default int8 at least as fast as torch.ao FX in PyTorch (inductor vs its eager kernels, batch {b})"
            ] = pb["inductor_vs_torch_ao_fx"] >= 1.0
        out[
            f"{n}: on ONNX Runtime, {ort_choice(net) or 'no configuration'} at least as accurate as both peers and "
            "at least as fast as quantize_static at batch 1 and 64"
        ] = ort_choice(net) is not None
        qat = next(r for r in net["rows"] if r["variant"].startswith("QAT"))
        loss = fp["accuracy"] - ours["accuracy"]
        if loss > 0.003:
            out[f"{n}: QAT recovers at least half of the PTQ loss above 0.3 points"] = (
                fp["accuracy"] - qat["accuracy"] <= loss - (loss - 0.003) / 2
            )
        out[f"{n}: ONNX Runtime top-1 agreement with the PyTorch int8 model at least 99.5 %"] = (
            net["ort_agreement"] >= 0.995
        )
        out[f"{n}: every quantized file loads back with equal outputs"] = all(
            r.get("roundtrip_equal", True) for r in net["rows"]
        )
    return out


def graphs_text(net: dict) -> str:
    g = net.get("ort_graphs")
    if not g:
        return ""
    same = [k for k in ("default", "per-tensor") if g[k]["same_as_peer"]]
    return (
        f" After its optimizations ONNX Runtime runs {g['default']['nodes']} nodes for the default, "
        f"{g['per-tensor']['nodes']} for per-tensor weights and {g['peer_nodes']} for quantize_static's model"
        + (
            f"; the {' and '.join(same)} graph{'s are' if len(same) > 1 else ' is'} node for node the peer's."
            if same
            else "."
        )
    )


def cpu_text(env: dict) -> str:
    c = env.get("cpu")
    return f" ({c['name']}; {', '.join(c['int8_isa']) or 'no AVX2'})" if c else ""


def _ms(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _speed(fp: dict, value: float | None, batch: str, backend: str = "eager") -> str:
    """The float model's latency on ``backend`` over ``value``: above 1x, faster than that float."""
    base = _lat(fp, backend, batch)
    return f"{base / value:.2f}x" if value and base else "-"


def _vs_compiled(fp: dict, row: dict, backend: str) -> str:
    """Against the float model compiled on the same backend, at batch 1 and 64 (bold below 1x:
    int8 slower there than the float model a user would otherwise run)."""
    out = []
    for b in ("b1", "b64"):
        text = _speed(fp, _lat(row, backend, b), b, backend)
        base, value = _lat(fp, backend, b), _lat(row, backend, b)
        out.append(f"**{text}**" if base and value and value > base else text)
    return " / ".join(out)


def markdown(nets: list[dict], env: dict, qat_epochs: int, results: dict[str, bool]) -> str:
    lines = [
        START,
        "## Quantization (issue: PTQ, calibration, QAT, mixed precision, ONNX Runtime)",
        "",
        f"`python benchmarks/quantization.py`, {env['when']}, {env['machine']}{cpu_text(env)}, torch {env['torch']}, ONNX Runtime "
        f"{env['onnxruntime']}, {THREADS} threads. Fashion-MNIST test set; float baselines trained on this machine "
        f"({BASELINE.epochs} epochs, lr {BASELINE.lr:g}, seed {BASELINE.seed}; cached). Bytes: the `.tslim` file against the float model's fp32 safetensors. Latency: "
        "medians in ms; `x` columns divide the float model's eager latency at the same batch size, measured in the "
        "same run, and `vs float` columns the float model's latency compiled on the same backend (what a user would "
        "otherwise run; in bold where int8 is slower -- there `ts.keep_faster_`, which the recipe's quantize step "
        "runs, hands layers back to float: see the int8 speed section). `inductor` is AOTInductor with freezing (oneDNN int8 kernels), `ort` ONNX Runtime on the "
        "exported QDQ model. The int8 eager path is the fake-quant reference and is not timed; the calibration "
        "methods share one graph, so latency is timed for the default (`auto`, in bold). Peers run with their "
        "defaults, calibrated on the same 2,048 training images; the accuracy comparison with them averages "
        "several calibration draws (the last paragraph of each net).",
    ]
    for net in nets:
        fp = net["fp32"]
        lines += [
            "",
            f"### {net['net']}",
            "",
            "| variant | acc | drop (points) | bytes | size ratio | inductor b1 | b64 | b64 x | vs float inductor b1 / b64 "
            "| ort b1 | b64 | b64 x | vs float ort b1 / b64 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| fp32 (eager b1 {_ms(_lat(fp, 'eager', 'b1'))}, b64 {_ms(_lat(fp, 'eager', 'b64'))}) | "
            f"{100 * fp['accuracy']:.2f} % | - | {fp['fp32_bytes']:,} | 1.00x | {_ms(_lat(fp, 'inductor', 'b1'))} | "
            f"{_ms(_lat(fp, 'inductor', 'b64'))} | {_speed(fp, _lat(fp, 'inductor', 'b64'), 'b64')} | 1.00x / 1.00x | "
            f"{_ms(_lat(fp, 'onnxruntime', 'b1'))} | {_ms(_lat(fp, 'onnxruntime', 'b64'))} | "
            f"{_speed(fp, _lat(fp, 'onnxruntime', 'b64'), 'b64')} | 1.00x / 1.00x |",
        ]
        for r in net["rows"]:
            if "error" in r:
                lines.append(f"| {r['variant']} | {r['error'][:90]} | | | | | | | | | | | |")
                continue
            name = f"**{r['variant']}**" if r.get("default") else r["variant"]
            if r.get("kept_float") is not None:
                name += f" (float: {', '.join(r['kept_float']) or 'none'})"
            ind, ort = (lambda b, k=k, r=r: _lat(r, k, b) for k in ("inductor", "onnxruntime"))
            lines.append(
                f"| {name} | {100 * r['accuracy']:.2f} % | {100 * (fp['accuracy'] - r['accuracy']):.2f} | "
                f"{r['tslim_bytes']:,} | {fp['fp32_bytes'] / r['tslim_bytes']:.3f}x | {_ms(ind('b1'))} | {_ms(ind('b64'))} | "
                f"{_speed(fp, ind('b64'), 'b64')} | {_vs_compiled(fp, r, 'inductor')} | {_ms(ort('b1'))} | {_ms(ort('b64'))} | "
                f"{_speed(fp, ort('b64'), 'b64')} | {_vs_compiled(fp, r, 'onnxruntime')} |"
            )
        fx, ortp = net["peers"]
        fx64, ort64 = _lat(fx, "torch.ao", "b64"), _lat(ortp, "onnxruntime", "b64")
        lines += [
            f"| {fx['variant']} (its eager kernels: b1 {_ms(_lat(fx, 'torch.ao', 'b1'))}, b64 {_ms(fx64)}, "
            f"{_speed(fp, fx64, 'b64')}) | {100 * fx['accuracy']:.2f} % | {100 * (fp['accuracy'] - fx['accuracy']):.2f} "
            "| - | - | - | - | - | - | - | - | - | - |",
            f"| {ortp['variant']} ({ortp['onnx_bytes']:,} B .onnx) | {100 * ortp['accuracy']:.2f} % | "
            f"{100 * (fp['accuracy'] - ortp['accuracy']):.2f} | - | - | - | - | - | - | {_ms(_lat(ortp, 'onnxruntime', 'b1'))} | "
            f"{_ms(ort64)} | {_speed(fp, ort64, 'b64')} | {_vs_compiled(fp, ortp, 'onnxruntime')} |",
            "",
            f"ONNX Runtime agrees with the PyTorch int8 model on {100 * net['ort_agreement']:.2f} % of the test images. "
            f"Paired speed-ups of the default int8 model ({PAIRED_HOW.get(env.get('paired'), PAIRED_HOW[None])}; above 1 is faster): "
            + "; ".join(
                f"batch {b[1:]}: inductor {p['inductor_vs_fp32_eager']:.2f}x and ort {p['ort_vs_fp32_eager']:.2f}x vs fp32 eager, "
                f"inductor {p['inductor_vs_torch_ao_fx']:.2f}x vs torch.ao FX, ort {p['ort_vs_ort_quantize_static']:.2f}x "
                f"(per-tensor weights {p['ort_per_tensor_vs_ort_quantize_static']:.2f}x) vs ONNX Runtime quantize_static"
                for b, p in net["paired"].items()
            )
            + "."
            + graphs_text(net),
        ]
        if "mcnemar" in net:
            lines += [
                "",
                "Paired accuracy on the same 10,000 test images (images only torchslim / only the peer "
                "classifies right; exact McNemar p-value, small when the difference is unlikely to be chance): "
                + "; ".join(
                    f"{k}: {m['only_ours']} / {m['only_peer']}, p = {m['p']:.2f}" for k, m in net["mcnemar"].items()
                )
                + ".",
            ]
        if "draws" in net:
            d = net["draws"]
            lines += [
                "",
                f"Accuracy over {len(d['default'])} calibration draws of 2,048 training images (draw 0 is the "
                "split of the table; mean, then each draw): "
                + "; ".join(
                    f"{k} {100 * draw_mean(net, k):.2f} % ({' / '.join(f'{100 * a:.2f}' for a in v)})"
                    for k, v in d.items()
                )
                + ".",
            ]
    return end_section(lines, results, END, f"QAT: {qat_epochs} epochs at lr 1e-4 from the calibrated grids. ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=NETS, choices=NETS)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument(
        "--calib-draws",
        type=int,
        default=3,
        help="calibration draws the accuracy comparison with the peers averages over",
    )
    output_args(parser)
    args = parser.parse_args()
    if args.render:
        saved = saved_results("quantization")
        write_section("quantization", markdown(saved["nets"], saved["env"], saved["qat_epochs"], saved["checks"]))
        return 0
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import onnxruntime

    data = fashion_mnist()
    nets = [run_net(n, data, args.qat_epochs, args.calib_draws) for n in args.nets]
    env = {
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": cpu(),
        "paired": "blocks",
    }
    results = checks(nets)
    payload = {"env": env, "qat_epochs": args.qat_epochs, "nets": nets, "checks": results}
    return publish("quantization", payload, None if args.no_docs else markdown(nets, env, args.qat_epochs, results))


if __name__ == "__main__":
    sys.exit(main())
