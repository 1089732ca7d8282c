"""Data-parallel training under torchrun: one process against two at the same global batch, and
a run whose rank is killed mid-training, then resumed.

The built-in recipe ``lenet_300_100`` (LeNet-300-100 on Fashion-MNIST: baseline training, then
magnitude pruning and weight sharing, each fine-tuned) runs through ``torchslim compress``:

* once on one process and once with ``--nproc 2`` (gloo, each process on half of every global
  batch), each with an empty baseline cache so the baseline trains under the same launch: the
  baseline's and the compressed model's accuracy compared, the output folder listed;
* once with ``--nproc 2`` whose rank 1 is sent SIGKILL during the baseline's training (after its
  ``KILL_AFTER``-th epoch checkpoint): the run must stop with torchslim's error; the same command
  run again must resume from the checkpoint and end where the uninterrupted two-process run did.

    .venv/bin/python benchmarks/ddp.py [--no-docs] [--render]

Writes benchmarks/results/ddp.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench_common import TMP, cpu, cpu_name, end_section, markers, mcnemar, output_args, publish, saved_results

NAME = "ddp"
START, END = markers(NAME)
RECIPE = "lenet_300_100"
KILL_AFTER = 4  # baseline epochs checkpointed before rank 1 is killed
TAG = "TORCHSLIM_DDP_BENCH"


def compress(label: str, nproc: int, tag: str = "", recipe: str = RECIPE) -> subprocess.Popen:
    """Start ``torchslim compress`` on ``nproc`` processes, into its own output folder and cache."""
    out, cache = TMP / label / "out", TMP / label / "cache"
    cmd = [sys.executable, "-m", "torchslim.cli", "compress", recipe, "--out", str(out), "-q"]
    cmd += ["--nproc", str(nproc)] if nproc > 1 else []
    env = os.environ | {"TORCHSLIM_CACHE": str(cache), "COLUMNS": "200", TAG: tag}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen, label: str, started: float) -> dict:
    stdout, stderr = proc.communicate(timeout=1800)
    out = TMP / label / "out"
    row = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - started, 1)}
    row["files"] = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if proc.returncode == 0:
        report = json.loads((out / "report.json").read_text())
        row |= {"baseline_accuracy": report["baseline"]["accuracy"], "accuracy": report["compressed"]["accuracy"]}
        row["tables_printed"] = stdout.count("before / after")
    text = " ".join((stdout + "\n" + stderr).split())  # rich wraps long lines
    row["clear_error"] = "Rerun the same command" in text
    row["resumed"] = "resumed training from" in text
    row["output_tail"] = (stdout[-1000:] + "\n" + stderr[-1000:]).strip()
    return row


def run_one(label: str, nproc: int, recipe: str = RECIPE) -> dict:
    started = time.perf_counter()
    row = finish(compress(label, nproc, recipe=recipe), label, started)
    print(f"{label}: {json.dumps({k: v for k, v in row.items() if k != 'output_tail'})}", flush=True)
    return row


def checkpoint_epochs(folder: Path) -> int:
    """Epochs saved in the first fit's checkpoint (the baseline's), 0 when none yet."""
    from safetensors import safe_open

    from torchslim.train.checkpoint import META

    for path in folder.glob("fit-1-*.safetensors"):
        try:
            with safe_open(str(path), "pt") as f:
                return json.loads(f.metadata()[META])["epochs"]
        except Exception:  # noqa: BLE001 -- a file being replaced: look again
            return 0
    return 0


def rank_pid(tag: str, rank: int) -> int | None:
    """The process of ``rank`` among those launched with ``tag`` (read from /proc)."""
    want = (f"{TAG}={tag}".encode(), f"RANK={rank}".encode())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(w in env for w in want):
            return int(proc.name)
    return None


def killed_and_resumed() -> dict:
    label, tag = "killed", str(os.getpid())
    started = time.perf_counter()
    proc = compress(label, 2, tag)
    folder = TMP / label / "out" / "checkpoints"
    while checkpoint_epochs(folder) < KILL_AFTER:
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before its checkpoint: {proc.communicate()[1][-1500:]}")
        time.sleep(0.2)
    victim = rank_pid(tag, 1)
    if victim is None:
        raise SystemExit("rank 1's process was not found")
    killed_at = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    first = finish(proc, label, started)
    first["stopped_s_after_kill"] = round(time.perf_counter() - killed_at, 1)
    first["epochs_checkpointed"] = checkpoint_epochs(folder)
    print(f"killed: {json.dumps({k: v for k, v in first.items() if k != 'output_tail'})}", flush=True)
    rerun = run_one(label, 2)
    return {"killed": first, "rerun": rerun}


def one_thread_recipe() -> str:
    """The built-in recipe at 1 thread: the same run with only the order of float sums changed."""
    from torchslim.recipe.schema import BUILTIN

    text = (BUILTIN / f"{RECIPE}.yaml").read_text()
    path = TMP / f"{RECIPE}_1thread.yaml"
    path.write_text(text.replace("threads: 2", "threads: 1"))
    return str(path)


def test_hits(label: str):
    """Which test images the run's delivered model classifies right (loaded from its file)."""
    import torch

    import torchslim as ts
    from torchslim.core.data import DataSpec, load_data

    model = ts.load(TMP / label / "out" / f"{RECIPE}.tslim")
    hits = []
    with torch.no_grad():
        for x, y in load_data(DataSpec("fashion_mnist")).eval:
            hits.append(model(x).argmax(1) == y)
    return torch.cat(hits)


def checks(r: dict) -> dict[str, bool]:
    one, two, k = r["one"], r["two"], r["kill"]
    expected = sorted(["report.json", "report.md", f"{RECIPE}.tslim"])
    return {
        "2 processes reach the baseline accuracy of 1 within 0.1 point": abs(
            two["baseline_accuracy"] - one["baseline_accuracy"]
        )
        <= 0.001,
        "2 processes' compressed model is as accurate as 1 process's (McNemar p >= 0.05 on the test images)": r[
            "mcnemar"
        ]["two vs one"]["p"]
        >= 0.05,
        "rank 0 alone writes and prints (one set of outputs, one table)": two["files"] == expected
        and two["tables_printed"] == 1,
        "a SIGKILLed rank stops the run with torchslim's error": k["killed"]["returncode"] != 0
        and k["killed"]["clear_error"],
        "the rerun resumes from the last checkpoint and ends where the uninterrupted run did": k["rerun"]["resumed"]
        and abs(k["rerun"]["accuracy"] - two["accuracy"]) <= 0.001,
    }


def section(r: dict) -> str:
    one, two, k = r["one"], r["two"], r["kill"]
    lines = [
        START,
        "## Data-parallel training under torchrun (`benchmarks/ddp.py`)",
        "",
        f"`torchslim compress {RECIPE}` (baseline training, then pruning and weight sharing, each fine-tuned) "
        f"on one process and with `--nproc 2` (gloo; each process takes half of every global batch, gradients "
        f"averaged), each training its own baseline. {cpu_name(r['cpu'])}, {r['cores']} cores shared by the "
        "processes.",
        "",
        "| run | baseline accuracy | compressed accuracy | seconds | files written |",
        "|---|---|---|---|---|",
        f"| 1 process | {one['baseline_accuracy']:.4f} | {one['accuracy']:.4f} | {one['seconds']:.0f} | {', '.join(one['files'])} |",
        f"| 2 processes | {two['baseline_accuracy']:.4f} | {two['accuracy']:.4f} | {two['seconds']:.0f} | {', '.join(two['files'])} |",
        f"| 1 process, 1 thread | {r['one_1thread']['baseline_accuracy']:.4f} | {r['one_1thread']['accuracy']:.4f} | "
        f"{r['one_1thread']['seconds']:.0f} | {', '.join(r['one_1thread']['files'])} |",
        f"| 2, rank 1 killed, rerun | {k['rerun']['baseline_accuracy']:.4f} | {k['rerun']['accuracy']:.4f} | "
        f"{k['killed']['seconds'] + k['rerun']['seconds']:.0f} (both runs) | {', '.join(k['rerun']['files'])} |",
        "",
        f"Rank 1 was sent SIGKILL after the baseline's epoch {k['killed']['epochs_checkpointed']} was checkpointed; "
        f"the run stopped {k['killed']['stopped_s_after_kill']:.0f} s later with exit status "
        f"{k['killed']['returncode']} and torchslim's message; the same command run again resumed from the "
        "checkpoint. On one machine of 2 cores two processes are not faster than one (they share the cores); "
        "the point is the same result from more machines.",
        "",
        "Two processes take the steps one takes up to the order of float sums; magnitude pruning's thresholds "
        "and k-means turn such differences into different masks and codebooks, so the compressed models differ "
        "by about as much as one process run at 1 thread instead of 2 (the `1 process, 1 thread` row). Compared "
        "image by image on the test set (exact McNemar test; images only one of the two gets right, and p): "
        + "; ".join(f"{k}: {v['only_ours']} / {v['only_peer']}, p = {v['p']:.2f}" for k, v in r["mcnemar"].items())
        + ".",
    ]
    return end_section(lines, r["checks"], END)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    output_args(parser)
    args = parser.parse_args()
    if args.render:
        r = saved_results(NAME)
        return publish(NAME, r, section(r))
    r = {"cpu": cpu(), "cores": os.cpu_count(), "one": run_one("one", 1), "two": run_one("two", 2)}
    r["one_1thread"] = run_one("one_1thread", 1, one_thread_recipe())
    hits = {k: test_hits(k) for k in ("one", "two", "one_1thread")}
    r["mcnemar"] = {
        "two vs one": mcnemar(hits["two"], hits["one"]),
        "one at 1 thread vs one": mcnemar(hits["one_1thread"], hits["one"]),
    }
    print(f"mcnemar: {json.dumps(r['mcnemar'])}", flush=True)
    r["kill"] = killed_and_resumed()
    r["checks"] = checks(r)
    return publish(NAME, r, None if args.no_docs else section(r))


if __name__ == "__main__":
    sys.exit(main())
