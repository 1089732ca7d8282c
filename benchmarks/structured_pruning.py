"""Structured pruning on Fashion-MNIST: every torchslim criterion against Torch-Pruning's MetaPruner.

For the zoo ResNet and MobileNet-style nets: train the dense baseline (cached), then for each
MAC target (2x and 3x fewer) prune with each torchslim criterion, and with Torch-Pruning's
MetaPruner and its default magnitude importance, recover every result with the same epochs,
learning rate and teacher (the dense model), and measure accuracy, MACs, parameters, real
`.tslim` bytes and latency (eager at batch 1 and 64, and `torch.compile` at batch 64 for the
dense model, the best torchslim result and MetaPruner's). Every pruned model is saved, loaded
into a freshly built full-size model, and checked to give the same outputs.

    .venv/bin/python benchmarks/structured_pruning.py [--nets resnet_mini mobilenet_mini]
        [--targets 2 3] [--criteria l1 l2 ...] [--epochs 3] [--no-docs]

Writes benchmarks/results/structured_pruning.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

from bench_common import TMP, end_section, markers, output_args, publish  # noqa: E402  (sets the cache folders)

START, END = markers("structured_pruning")

import torch  # noqa: E402

import torchslim as ts  # noqa: E402
from torchslim.analysis.cost import count_params, layer_macs  # noqa: E402
from torchslim.analysis.importance import CRITERIA  # noqa: E402
from torchslim.core.data import fashion_mnist  # noqa: E402
from torchslim.core.models import ZOO  # noqa: E402
from torchslim.evaluate.latency import measure_latency  # noqa: E402
from torchslim.evaluate.metrics import accuracy, fp32_safetensors_bytes  # noqa: E402
from torchslim.train.baseline import trained_baseline  # noqa: E402
from torchslim.train.fit import TrainConfig  # noqa: E402
from torchslim.transforms.channels import ChannelPruneConfig, channel_prune_  # noqa: E402

THREADS = 2
BASELINE = TrainConfig(epochs=15, lr=3e-3, weight_decay=1e-4, seed=0)
ROUND_TO = 16  # AVX-512 holds 16 floats: widths in multiples of 16 keep oneDNN's kernels full


def recovery(epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=1e-3, weight_decay=1e-4, seed=0, distill_weight=0.5, temperature=2.0)


def macs_of(model: torch.nn.Module) -> int:
    return sum(layer_macs(model, torch.zeros(1, 1, 28, 28)).values())


def latency(model: torch.nn.Module, data, compiled: bool) -> dict:
    x = data.eval.tensors[0]
    out = {f"eager_b{b}": measure_latency(model, x[:b], THREADS, 10, 60).median_ms for b in (1, 64)}
    if compiled:
        try:
            fast = torch.compile(copy.deepcopy(model).eval())
            out["compiled_b64"] = measure_latency(fast, x[:64], THREADS, 5, 60).median_ms
        except Exception as exc:  # noqa: BLE001 -- compile failures are reported, not fatal
            out["compiled_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def paired_speedup(dense: torch.nn.Module, pruned: torch.nn.Module, data, rounds: int = 5) -> float:
    """Median of dense/pruned batch-64 latency ratios, measured alternately to cancel machine drift."""
    x = data.eval.tensors[0][:64]
    ratios = [
        measure_latency(dense, x, THREADS, 5, 30).median_ms / measure_latency(pruned, x, THREADS, 5, 30).median_ms
        for _ in range(rounds)
    ]
    return sorted(ratios)[rounds // 2]


def measure(name: str, model: torch.nn.Module, data, compiled: bool = False) -> dict:
    model.eval()
    path = ts.save(model, TMP / f"{name}.tslim")
    restored = ts.load(path, model=ZOO[name])  # a freshly built full-size model, resized from the file
    same = all(torch.equal(model(x), restored(x)) for x, _ in list(data.eval_loader())[:2])
    return {
        "accuracy": accuracy(model, data.eval_loader()),
        "macs": macs_of(model),
        "params": count_params(model),
        "tslim_bytes": path.stat().st_size,
        "fp32_bytes": fp32_safetensors_bytes(model),
        "roundtrip_equal": same,
        "latency_ms": latency(model, data, compiled),
    }


def metapruner(model: torch.nn.Module, goal: int) -> tuple[torch.nn.Module, float]:
    """Torch-Pruning's MetaPruner, default magnitude importance, uniform ratio searched to meet ``goal`` MACs."""
    import torch_pruning as tp

    def pruned(ratio: float) -> torch.nn.Module:
        clone = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(
            clone,
            torch.zeros(1, 1, 28, 28),
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=[clone.fc],
        )
        pruner.step()
        return clone

    lo, hi = 0.0, 0.95
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if macs_of(pruned(mid)) <= goal else (mid, hi)
    return pruned(hi), hi


def run_net(name: str, data, targets: list[float], criteria: list[str], epochs: int) -> dict:
    t0 = time.perf_counter()
    dense, _ = trained_baseline(name, data, BASELINE)
    out = {"net": name, "baseline_train": BASELINE.__dict__, "dense": measure(name, dense, data, compiled=True)}
    print(name, "dense", json.dumps(out["dense"]), flush=True)
    out["targets"] = []
    for factor in targets:
        goal = out["dense"]["macs"] / factor
        rows, models = [], []
        for criterion in criteria:
            model = copy.deepcopy(dense)
            cfg = ChannelPruneConfig(
                macs=1 / factor,
                criterion=criterion,
                round_to=ROUND_TO,
                min_channels=ROUND_TO,
                finetune=recovery(epochs),
            )
            t = time.perf_counter()
            result = channel_prune_(model, cfg, data, teacher=dense)
            row = {"method": f"torchslim {criterion}", "prune_recover_s": time.perf_counter() - t}
            row.update(measure(name, model, data))
            row["widths"] = {g.root: g.after for g in result.groups if not g.skip}
            rows.append(row)
            models.append(model)
            print(name, f"{factor}x", json.dumps(row), flush=True)
        best = max(range(len(rows)), key=lambda i: rows[i]["accuracy"])
        rows[best]["latency_ms"].update(latency(models[best], data, compiled=True))
        rows[best]["best"] = True
        rows[best]["paired_speedup_b64"] = paired_speedup(dense, models[best], data)
        t = time.perf_counter()
        model, ratio = metapruner(dense, int(goal))
        ts.fit(model, data, recovery(epochs), teacher=dense)
        meta = {
            "method": "Torch-Pruning MetaPruner (magnitude, L2)",
            "ratio": ratio,
            "prune_recover_s": time.perf_counter() - t,
        }
        meta.update(measure(name, model, data, compiled=True))
        print(name, f"{factor}x", json.dumps(meta), flush=True)
        rows.append(meta)
        out["targets"].append({"factor": factor, "goal_macs": int(goal), "rows": rows})
    out["wall_s"] = time.perf_counter() - t0
    return out


def checks(nets: list[dict]) -> dict[str, bool]:
    out = {}
    for net in nets:
        n, dense = net["net"], net["dense"]
        if n == "resnet_mini":
            out["resnet_mini: dense baseline at least 92 % accurate"] = dense["accuracy"] >= 0.92
        for t in net["targets"]:
            ours = [r for r in t["rows"] if r["method"].startswith("torchslim")]
            meta = next(r for r in t["rows"] if r["method"].startswith("Torch-Pruning"))
            best = max(ours, key=lambda r: r["accuracy"])
            out[f"{n} {t['factor']:g}x: best torchslim criterion at least as accurate as MetaPruner"] = (
                best["accuracy"] >= meta["accuracy"]
            )
            out[f"{n} {t['factor']:g}x: every torchslim result meets the MAC target"] = all(
                r["macs"] <= t["goal_macs"] for r in ours
            )
            if n == "resnet_mini" and t["factor"] == 2:
                ratio = dense["macs"] / best["macs"]
                out["resnet_mini 2x: loses at most 0.5 points"] = dense["accuracy"] - best["accuracy"] <= 0.005
                out["resnet_mini 2x: batch-64 speed-up at least 0.8 x MAC ratio and 1.6x"] = best[
                    "paired_speedup_b64"
                ] >= max(0.8 * ratio, 1.6)
        out[f"{n}: every pruned model round-trips through .tslim"] = all(
            r["roundtrip_equal"] for t in net["targets"] for r in t["rows"]
        )
    return out


def _ms(lat: dict, key: str) -> str:
    return f"{lat[key]:.2f}" if key in lat else "-"


def markdown(nets: list[dict], env: dict, epochs: int, results: dict[str, bool]) -> str:
    lines = [
        START,
        "## Structured pruning (issue: channels, neurons and heads physically removed)",
        "",
        f"`python benchmarks/structured_pruning.py`, {env['when']}, {env['machine']}, torch {env['torch']}, "
        f"Torch-Pruning {env['torch_pruning']}, {THREADS} threads. Fashion-MNIST test set. Dense baselines: "
        f"{BASELINE.epochs} epochs, Adam one-cycle to {BASELINE.lr}, weight decay {BASELINE.weight_decay}. "
        f"Every pruned model is recovered for {epochs} epochs (lr {recovery(epochs).lr}, the dense model as teacher, "
        f"soft-target weight {recovery(epochs).distill_weight}, T = {recovery(epochs).temperature}) -- MetaPruner's "
        "too. torchslim keeps widths in multiples of 16 and at least 16 channels; MetaPruner runs with its "
        "defaults (no rounding), its uniform ratio searched to the same MAC target. Latencies are eager "
        "PyTorch medians (ms); `compiled` is `torch.compile` (inductor) at batch 64, measured for the dense "
        "model, the most accurate torchslim result and MetaPruner's. MACs count convolutions and Linear "
        "layers per image.",
    ]
    for net in nets:
        d = net["dense"]
        for t in net["targets"]:
            lines += [
                "",
                f"### {net['net']}: {t['factor']:g}x fewer MACs (target {t['goal_macs']:,})",
                "",
                "| method | acc | drop (points) | MACs | MAC ratio | params | .tslim bytes | b1 ms | b64 ms | b64 speed-up | compiled b64 ms |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
                f"| dense | {100 * d['accuracy']:.2f} % | - | {d['macs']:,} | 1.00x | {d['params']:,} | "
                f"{d['tslim_bytes']:,} | {_ms(d['latency_ms'], 'eager_b1')} | {_ms(d['latency_ms'], 'eager_b64')} | "
                f"1.00x | {_ms(d['latency_ms'], 'compiled_b64')} |",
            ]
            for r in t["rows"]:
                lat = r["latency_ms"]
                speed = d["latency_ms"]["eager_b64"] / lat["eager_b64"]
                name = f"**{r['method']}**" if r.get("best") else r["method"]
                lines.append(
                    f"| {name} | {100 * r['accuracy']:.2f} % | {100 * (d['accuracy'] - r['accuracy']):.2f} | "
                    f"{r['macs']:,} | {d['macs'] / r['macs']:.2f}x | {r['params']:,} | {r['tslim_bytes']:,} | "
                    f"{_ms(lat, 'eager_b1')} | {_ms(lat, 'eager_b64')} | {speed:.2f}x | {_ms(lat, 'compiled_b64')} |"
                )
            best = next(r for r in t["rows"] if r.get("best"))
            lines += [
                "",
                f"Most accurate torchslim criterion (picked on this test set) in bold; its batch-64 speed-up measured "
                f"in alternation with the dense model, five rounds, median: **{best['paired_speedup_b64']:.2f}x** (the "
                "speed-up column divides medians taken minutes apart and moves with the machine's load). Its widths: "
                + ", ".join(f"{k} {v}" for k, v in best["widths"].items())
                + ".",
            ]
    return end_section(lines, results, END)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=["resnet_mini", "mobilenet_mini"])
    parser.add_argument("--targets", nargs="+", type=float, default=[2.0, 3.0])
    parser.add_argument("--criteria", nargs="+", default=sorted(CRITERIA), choices=sorted(CRITERIA))
    parser.add_argument("--epochs", type=int, default=3, help="recovery epochs for every pruned model")
    output_args(parser, render=False)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    import torch_pruning as tp

    data = fashion_mnist()
    nets = [run_net(n, data, args.targets, args.criteria, args.epochs) for n in args.nets]
    env = {
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch": torch.__version__,
        "torch_pruning": tp.__version__,
    }
    results = checks(nets)
    payload = {"env": env, "epochs": args.epochs, "nets": nets, "checks": results}
    return publish("structured_pruning", payload, None if args.no_docs else markdown(nets, env, args.epochs, results))


if __name__ == "__main__":
    sys.exit(main())
