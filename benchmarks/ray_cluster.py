"""The search on an existing Ray cluster by address: two nodes on this machine's loopback against
one.

A Ray head node is started with ``ray start --head`` (1 CPU), and for the two-node run a second
node joins it with ``ray start --address`` (1 CPU); then ``torchslim search RECIPE --ray-address
127.0.0.1:PORT --workers N`` runs, as a user would against their cluster, and the cluster is
stopped. The recipe is LeNet-5 on Fashion-MNIST with one thread per trial, so each trial takes
one node's CPU. The trials reach the nodes through Ray (the baseline's safetensors bytes and
plain values; no node reads the driver's files) and their results come back the same way; the
delivered plan is measured from its loaded ``.tslim`` by the search itself. Everything Ray
writes goes under a temporary folder; each run is bounded in time.

    .venv/bin/python benchmarks/ray_cluster.py [--trials N] [--no-docs] [--render]

Writes benchmarks/results/ray_cluster.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench_common import TMP, cpu, cpu_name, end_section, markers, output_args, publish, saved_results

NAME = "ray_cluster"
START, END = markers(NAME)
PORT = 6391
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
RECIPE = """name: lenet5_cluster
model: {name: lenet5}
data: {name: fashion_mnist, batch_size: 128}
baseline: {epochs: 12, lr: 0.003}
search: {budget: 1pt, trials: TRIALS, latency_batch: 64}
outputs: {dir: OUT}
threads: 1
"""
ENV = os.environ | {"RAY_TMPDIR": str(TMP / "ray"), "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200"}


def ray(*args: str) -> None:
    subprocess.run([*RAY, *args], check=True, env=ENV, timeout=180, capture_output=True, text=True)


def start_cluster(nodes: int) -> str:
    address = f"127.0.0.1:{PORT}"
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    ray("start", "--head", "--port", str(PORT), "--temp-dir", str(TMP / "ray"), "--include-dashboard", "false", *common)
    for _ in range(nodes - 1):
        ray("start", "--address", address, *common)
    return address


def stop_cluster() -> None:
    subprocess.run([*RAY, "stop", "--force"], env=ENV, timeout=180, capture_output=True, check=False)


def search_on(nodes: int, trials: int) -> dict:
    """``torchslim search`` with one worker per node on a fresh cluster of ``nodes`` nodes."""
    run = TMP / f"nodes{nodes}"
    recipe = TMP / f"lenet5_cluster_{nodes}.yaml"
    recipe.write_text(RECIPE.replace("TRIALS", str(trials)).replace("OUT", str(run)))
    stop_cluster()
    address = start_cluster(nodes)
    try:
        cmd = [sys.executable, "-m", "torchslim.cli", "search", str(recipe), "--ray-address", address]
        cmd += ["--workers", str(nodes), "-q"]
        t = time.perf_counter()
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=3600, check=False)
        seconds = time.perf_counter() - t
    finally:
        stop_cluster()
    if done.returncode != 0:
        raise SystemExit(f"search on {nodes} node(s) failed:\n{(done.stdout + done.stderr)[-3000:]}")
    report = json.loads((run / "report.json").read_text())
    study, final = report["search"], report["final"]
    row = {
        "seconds": round(seconds, 1),
        "trials": study["trials_this_run"],
        "trials_per_hour": study["trials_per_hour"],
        "executor": study["executor"],
        "final": {k: final.get(k) for k in ("accuracy_holdout", "accuracy_test", "bytes", "ratio", "within_budget")},
        "files": sorted(p.name for p in run.iterdir()),
    }
    print(f"{nodes} node(s): {json.dumps(row)}", flush=True)
    return row


def checks(r: dict) -> dict[str, bool]:
    one, two = r["nodes1"], r["nodes2"]
    return {
        "the search ran its trials on both nodes": "(2 nodes)" in two["executor"],
        "a plan within the budget was delivered, measured from its loaded file": "lenet5_cluster.tslim" in two["files"]
        and two["final"]["within_budget"],
        "two loopback nodes reach >= 1.6x the trials per hour of one": two["trials_per_hour"]
        >= 1.6 * one["trials_per_hour"],
    }


def section(r: dict) -> str:
    one, two = r["nodes1"], r["nodes2"]
    rows = [
        f"| {n} | {v['trials']} | {v['trials_per_hour']:.0f} | {v['final']['accuracy_holdout']:.4f} | "
        f"{v['final']['ratio']:.1f}x | {v['executor']} |"
        for n, v in (("1", one), ("2", two))
    ]
    lines = [
        START,
        "## The search on a Ray cluster by address (`benchmarks/ray_cluster.py`)",
        "",
        "A Ray cluster started with `ray start` on this machine's loopback: a head node of 1 CPU, and for the "
        "second run another node of 1 CPU joined to it; `torchslim search` (LeNet-5 on Fashion-MNIST, one "
        f"thread per trial) given its address, one worker per node. {cpu_name(r['cpu'])}.",
        "",
        "| nodes | trials | trials per hour | delivered held-out accuracy | delivered size | executor |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Two nodes ran {two['trials_per_hour'] / one['trials_per_hour']:.2f}x the trials per hour of one. The "
        "trials reach the workers through Ray (the baseline's safetensors bytes and plain values), so the nodes "
        "need the data and torchslim installed but no storage shared with the driver.",
    ]
    return end_section(lines, r["checks"], END)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    output_args(parser)
    args = parser.parse_args()
    if args.render:
        r = saved_results(NAME)
        return publish(NAME, r, section(r))
    r = {"cpu": cpu(), "nodes1": search_on(1, args.trials), "nodes2": search_on(2, args.trials)}
    r["checks"] = checks(r)
    return publish(NAME, r, None if args.no_docs else section(r))


if __name__ == "__main__":
    sys.exit(main())
