"""Federated learning with compressed updates: FedAvg on Flower, uncompressed against torchslim's codecs.

Ten clients hold Fashion-MNIST's training split divided by a Dirichlet(0.5) draw over the
labels (non-IID: most clients see a few classes). Each arm trains LeNet-300-100 with FedAvg in
Flower's simulation engine for the same rounds from the same initial model, every client doing
one local epoch per round. The uncompressed arm sends float32 updates; the compressed arms send
top-k updates with error feedback, int8 or k-means values, positions and values entropy-coded
by the `.tslim` codecs, which the server decodes and checks before averaging. Upload traffic is
the bytes of every reply as Flower serialises it for its transport. The server evaluates the
global model on the 10,000 test images after every round. The compressed arm's final global
model is then compressed by ``ts.compress`` (one-shot magnitude pruning and 5-bit weight
sharing, without data: the server holds none) and saved as a `.tslim` file.

    .venv/bin/python benchmarks/federated.py [--quick] [--no-docs] [--render]

``--quick`` runs five rounds on 6,000 training images (a smoke run: figures not comparable;
saved as federated_quick.json, docs untouched). The full run takes about 10 minutes on 2 cores.

Writes benchmarks/results/federated.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import TMP, cpu, cpu_name, end_section, markers, output_args, publish, saved_results  # noqa: E402

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported
os.environ.setdefault("FLWR_HOME", str(TMP / "flwr"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

import torchslim as ts  # noqa: E402
from torchslim.core.data import DataSpec, load_data  # noqa: E402
from torchslim.evaluate.metrics import file_bytes, fp32_safetensors_bytes  # noqa: E402
from torchslim.federated import DirichletClients, FederatedConfig, UpdateCodecConfig, simulate  # noqa: E402

NAME = "federated"
START, END = markers(NAME)
CLIENTS, ALPHA, SEED = 10, 0.5, 0
ROUNDS, QUICK_ROUNDS, QUICK_ROWS = 30, 5, 6000
LOCAL = ts.TrainConfig(epochs=1, lr=1e-3)
BATCH = 32
ARMS = {
    "FedAvg, float32": None,
    "top-25 %, int8": UpdateCodecConfig(density=0.25, values="int8"),
    "top-15 %, 2-bit k-means": UpdateCodecConfig(density=0.15, values="kmeans", bits=2),
}
FINAL = {"re:fc.*": {"sparsity": 0.5, "bits": 5}}
"""The plan ``ts.compress`` applies to the final global model (LeNet-300-100's fc1, fc2, fc3)."""


def run_arm(codec: UpdateCodecConfig | None, clients: DirichletClients, rounds: int, data) -> dict:
    config = FederatedConfig(rounds=rounds, local=LOCAL, codec=codec, seed=SEED)
    t0 = time.perf_counter()
    result = simulate(ts.models.lenet_300_100, clients, config, eval_data=data, client_threads=1)
    seconds = time.perf_counter() - t0
    summary = result.summary()
    for r in result.rounds:
        print(f"  round {r.round}: accuracy {r.accuracy:.4f}, {r.upload_bytes:,} B up, {r.seconds:.1f} s", flush=True)
    return {
        "codec": None if codec is None else {"density": codec.density, "values": codec.values, "bits": codec.bits},
        "seconds": round(seconds, 1),
        **summary,
        "model": result.model,
    }


def compress_final(model: torch.nn.Module, data) -> dict:
    """The final global model through ``ts.compress`` (data-free), saved and loaded back."""
    plan = ts.CompressionPlan.from_dict(FINAL)
    settings = ts.CompressSettings(
        prune=ts.MagnitudePruneConfig(finetune=None), share=ts.ShareConfig(finetune=None, half_biases=True)
    )
    small = ts.compress(model, plan, settings=settings).model
    path = TMP / "federated-global.tslim"
    ts.save(small, path)
    restored = ts.load(path, model=ts.models.lenet_300_100)
    return {
        "plan": FINAL,
        "accuracy_before": ts.accuracy(model, data.eval),
        "accuracy": ts.accuracy(small, data.eval),
        "accuracy_loaded": ts.accuracy(restored, data.eval),
        "file_bytes": file_bytes(path),
        "fp32_bytes": fp32_safetensors_bytes(model),
    }


def run(quick: bool) -> dict:
    torch.set_num_threads(2)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    spec = DataSpec("fashion_mnist", batch_size=BATCH, eval_batch_size=1000, seed=SEED)
    data = load_data(spec)
    clients = DirichletClients(spec, count=CLIENTS, alpha=ALPHA, seed=SEED, rows=QUICK_ROWS if quick else None)
    sizes = [len(p) for p in clients.parts()]
    rounds = QUICK_ROUNDS if quick else ROUNDS
    arms = {}
    for name, codec in ARMS.items():
        print(f"{name}:", flush=True)
        arms[name] = run_arm(codec, clients, rounds, data)
    final_model = arms[list(ARMS)[-1]].pop("model")
    for arm in arms.values():
        arm.pop("model", None)
    base = arms[list(ARMS)[0]]
    for arm in arms.values():
        arm["upload_ratio"] = base["upload_bytes"] / arm["upload_bytes"]
        arm["accuracy_drop"] = base["accuracy"] - arm["accuracy"]
    return {
        "cpu": cpu(),
        "torch": torch.__version__,
        "flwr": version("flwr"),
        "ray": version("ray"),
        "quick": quick,
        "cpus": os.cpu_count(),
        "clients": CLIENTS,
        "alpha": ALPHA,
        "client_sizes": sizes,
        "rounds": rounds,
        "local": {"epochs": LOCAL.epochs, "lr": LOCAL.lr, "batch": BATCH},
        "arms": arms,
        "final": compress_final(final_model, data),
    }


def checks(r: dict) -> dict[str, bool]:
    arms = [a for a in r["arms"].values() if a["codec"] is not None]
    every = [x for a in r["arms"].values() for x in a["rounds"]]
    f = r["final"]
    return {
        ">= 10x less upload than FedAvg within 1 point of its accuracy": any(
            a["upload_ratio"] >= 10 and a["accuracy_drop"] <= 0.01 for a in arms
        ),
        ">= 30x less upload than FedAvg within 2 points of its accuracy": any(
            a["upload_ratio"] >= 30 and a["accuracy_drop"] <= 0.02 for a in arms
        ),
        "the server accepted every update of every round": all(
            x["accepted"] == x["sampled"] == r["clients"] for x in every
        ),
        "the compressed global model loads from its file with the same accuracy": f["accuracy_loaded"] == f["accuracy"],
    }


def versus(arm: dict) -> str:
    """An arm's accuracy against FedAvg's, in points ("-" for FedAvg itself)."""
    return "-" if arm["codec"] is None else f"{-100 * arm['accuracy_drop']:+.2f} pt"


def section(r: dict) -> str:
    f = r["final"]
    sizes = r["client_sizes"]
    lines = [
        START,
        "## Federated learning with compressed updates (`benchmarks/federated.py`)",
        "",
        f"FedAvg in Flower's simulation engine (flwr {r['flwr']}, Ray {r['ray']}: each client a Ray actor with "
        f"one thread, {r['cpus']} at a time), {r['clients']} clients holding Fashion-MNIST's training images split by a "
        f"Dirichlet({r['alpha']}) draw over the labels ({min(sizes):,} to {max(sizes):,} images a client), "
        f"LeNet-300-100, {r['rounds']} rounds of {r['local']['epochs']} local epoch (Adam, one-cycle to "
        f"{r['local']['lr']}, batch {r['local']['batch']}), the same initial model and seeds in every arm. Upload: "
        "the bytes of every client reply as Flower serialises it for its transport. Accuracy: the global model "
        f"on the 10,000 test images after the last round. CPU: {cpu_name(r['cpu'])}, torch {r['torch']}.",
        "",
        "| arm | upload | less than FedAvg | final accuracy | vs FedAvg | minutes |",
        "|---|---|---|---|---|---|",
        *(
            f"| {k} | {a['upload_bytes'] / 1e6:.2f} MB | {a['upload_ratio']:.1f}x | {100 * a['accuracy']:.2f} % | "
            f"{versus(a)} | {a['seconds'] / 60:.1f} |"
            for k, a in r["arms"].items()
        ),
        "",
        "Compressed updates: per tensor, the given fraction of the entries of `update + residual` with the largest "
        "magnitude, the residual being what earlier rounds left out (error feedback); values rounded to int8 with "
        "one scale per tensor, or to a 4-value k-means codebook per tensor (2 bits); positions and values "
        "entropy-coded with the `.tslim` codecs. "
        "The server decodes each and checks names, shapes, finiteness and size before averaging.",
        "",
        f"The last arm's global model through `ts.compress` without data ({100 * f['plan']['re:fc.*']['sparsity']:.0f} % "
        f"of each layer's weights pruned by magnitude, {f['plan']['re:fc.*']['bits']}-bit shared weights): "
        f"{f['file_bytes']:,} B as `.tslim`, {f['fp32_bytes'] / f['file_bytes']:.1f}x smaller than float32 "
        f"safetensors, accuracy {100 * f['accuracy_before']:.2f} -> {100 * f['accuracy']:.2f} % "
        f"({100 * f['accuracy_loaded']:.2f} % loaded back from the file).",
    ]
    return end_section(lines, r["checks"], END)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="five rounds on 6,000 images (figures not comparable)")
    output_args(parser)
    args = parser.parse_args()
    name = f"{NAME}_quick" if args.quick else NAME
    if args.render:
        r = saved_results(name)
        return publish(name, r, section(r))
    r = run(args.quick)
    r["checks"] = checks(r)
    for k, a in r["arms"].items():
        print(f"{k}: {a['upload_bytes']:,} B up ({a['upload_ratio']:.1f}x less), accuracy {a['accuracy']:.4f}")
    f = r["final"]
    print(f"final model compressed: {f['file_bytes']:,} B, accuracy {f['accuracy_before']:.4f} -> {f['accuracy']:.4f}")
    return publish(name, r, None if (args.quick or args.no_docs) else section(r))


if __name__ == "__main__":
    sys.exit(main())
