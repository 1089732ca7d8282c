"""Knowledge distillation on Fashion-MNIST, in the spirit of Hinton et al.'s MNIST experiment.

1. MLPs: a 2 x 1200 teacher with dropout (cached baseline); a 2 x 800 student trained alone
   and distilled at several temperatures, each over three seeds, with the same epochs,
   learning rate and initial weights per seed. The same student is also distilled from the
   zoo ResNet: on Fashion-MNIST a 2 x 1200 MLP is hardly better than a 2 x 800 one, so its
   soft targets have little to teach, while the ResNet is clearly the better model.
2. CNNs: the zoo ResNet (width 32, the cached baseline of the other benchmarks) teaches a
   half-width (16) and a quarter-width (8) student derived from it; each also trained alone.
3. Recovery: the ResNet pruned to half its multiply-accumulates (structured, L2 criterion),
   recovered for a few epochs with and without the dense model as teacher, over three seeds.

Every row records test accuracy, parameters, latency (eager, batch 1 and 64, 2 threads) and
training wall time.

    .venv/bin/python benchmarks/distillation.py [--parts mlp cnn recovery] [--epochs 15]
        [--temperatures 2 4] [--seeds 0 1 2] [--recovery-epochs 3] [--no-docs]

Writes benchmarks/results/distillation.json (parts not run keep their saved figures) and a
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

from bench_common import end_section, markers, output_args, publish, saved_results, write_section  # noqa: E402  (sets the cache folders)

START, END = markers("distillation")

import torch  # noqa: E402

from torchslim.analysis.cost import count_params  # noqa: E402
from torchslim.core.data import fashion_mnist  # noqa: E402
from torchslim.core.models import build_model  # noqa: E402
from torchslim.evaluate.latency import measure_latency  # noqa: E402
from torchslim.evaluate.metrics import accuracy  # noqa: E402
from torchslim.train.baseline import trained_baseline  # noqa: E402
from torchslim.train.fit import TrainConfig, fit  # noqa: E402
from torchslim.transforms.channels import ChannelPruneConfig, channel_prune_  # noqa: E402
from torchslim.transforms.distill import DistillConfig, derive_student, distill  # noqa: E402

THREADS = 2
BASELINE = TrainConfig(epochs=15, lr=3e-3, weight_decay=1e-4, seed=0)  # the other benchmarks' baselines
TEACHER_MLP = {"width": 1200, "depth": 2, "dropout_percent": 20}
STUDENT_MLP = {"width": 800, "depth": 2}
TEACHER_LABEL = {"mlp": "2 x 1200 MLP", "resnet": "ResNet"}
ALPHA = 0.7  # weight of the soft targets; the labels get 0.3
CNN_T = 4.0


def measure(model: torch.nn.Module, data, seconds: float | None, **extra) -> dict:
    model.eval()
    x = data.eval.tensors[0]
    row = {
        "accuracy": accuracy(model, data.eval_loader()),
        "params": count_params(model),
        "latency_ms": {f"b{b}": measure_latency(model, x[:b], THREADS, 10, 50).median_ms for b in (1, 64)},
        "train_s": seconds,
        **extra,
    }
    print(json.dumps(row), flush=True)
    return row


def train_student(
    name: str, kwargs: dict, data, cfg: TrainConfig, teacher=None, seed: int = 0
) -> tuple[torch.nn.Module, float]:
    """A fresh student (initial weights fixed by ``seed``), trained alone or distilled."""
    torch.manual_seed(seed)
    student = build_model(name, **kwargs)
    t = time.perf_counter()
    if teacher is None:
        fit(student, data, cfg)
    else:
        distill(student, DistillConfig(train=cfg, cache_teacher=True), data, teacher=teacher)
    return student, time.perf_counter() - t


def mlp_part(data, epochs: int, temperatures: list[float], seeds: list[int]) -> dict:
    teachers, out = {}, {"teachers": {}, "alone": [], "distilled": {}}
    for key, name, kwargs in (("mlp", "mlp", TEACHER_MLP), ("resnet", "resnet_mini", {})):
        t = time.perf_counter()
        teachers[key], cached = trained_baseline(name, data, BASELINE, kwargs)
        out["teachers"][key] = measure(teachers[key], data, None if cached else time.perf_counter() - t, cached=cached)
    for seed in seeds:
        cfg = TrainConfig(epochs=epochs, lr=BASELINE.lr, weight_decay=BASELINE.weight_decay, seed=seed)
        student, secs = train_student("mlp", STUDENT_MLP, data, cfg, seed=seed)
        out["alone"].append(measure(student, data, secs, seed=seed))
        for key, teacher in teachers.items():
            for temp in temperatures:
                dcfg = TrainConfig(
                    epochs=epochs,
                    lr=BASELINE.lr,
                    weight_decay=BASELINE.weight_decay,
                    seed=seed,
                    distill_weight=ALPHA,
                    temperature=temp,
                )
                student, secs = train_student("mlp", STUDENT_MLP, data, dcfg, teacher, seed)
                row = measure(student, data, secs, seed=seed, temperature=temp, teacher=key)
                out["distilled"].setdefault(key, {}).setdefault(str(temp), []).append(row)
    return out


def cnn_part(data, epochs: int) -> dict:
    t = time.perf_counter()
    teacher, cached = trained_baseline("resnet_mini", data, BASELINE)
    out = {
        "teacher": measure(teacher, data, None if cached else time.perf_counter() - t, cached=cached),
        "students": [],
    }
    for width in (0.5, 0.25):
        kwargs = {"width": round(32 * width)}
        assert count_params(derive_student("resnet_mini", {}, width=width)) == count_params(
            build_model("resnet_mini", **kwargs)
        )
        cfg = TrainConfig(epochs=epochs, lr=BASELINE.lr, weight_decay=BASELINE.weight_decay, seed=0)
        dcfg = TrainConfig(
            epochs=epochs,
            lr=BASELINE.lr,
            weight_decay=BASELINE.weight_decay,
            seed=0,
            distill_weight=ALPHA,
            temperature=CNN_T,
        )
        alone, secs = train_student("resnet_mini", kwargs, data, cfg)
        row = {"width": kwargs["width"], "alone": measure(alone, data, secs)}
        student, secs = train_student("resnet_mini", kwargs, data, dcfg, teacher)
        row["distilled"] = measure(student, data, secs)
        out["students"].append(row)
    return out


def recovery_part(data, epochs: int, seeds: list[int]) -> dict:
    dense, _ = trained_baseline("resnet_mini", data, BASELINE)
    out = {"dense": measure(dense, data, None), "with_teacher": [], "without": []}
    for seed in seeds:
        for key, teacher in (("without", None), ("with_teacher", dense)):
            model = copy.deepcopy(dense)
            ft = TrainConfig(epochs=epochs, lr=1e-3, weight_decay=1e-4, seed=seed, distill_weight=0.5, temperature=2.0)
            t = time.perf_counter()
            result = channel_prune_(
                model, ChannelPruneConfig(macs=0.5, round_to=16, finetune=ft), data, teacher=teacher
            )
            out[key].append(
                measure(
                    model, data, time.perf_counter() - t, seed=seed, macs_kept=result.macs_after / result.macs_before
                )
            )
    return out


def _mean(rows: list[dict]) -> float:
    return statistics.fmean(r["accuracy"] for r in rows)


def _spread(rows: list[dict]) -> float:
    accs = [r["accuracy"] for r in rows]
    return max(accs) - min(accs)


def checks(res: dict) -> dict[str, bool]:
    out = {}
    if "mlp" in res:
        m = res["mlp"]
        out["2x1200 MLP teacher at least 89.5 %"] = m["teachers"]["mlp"]["accuracy"] >= 0.895
        for key, by_temp in m["distilled"].items():
            for temp, rows in by_temp.items():
                margin = _mean(rows) - _mean(m["alone"])
                out[
                    f"2x800 student distilled from the {TEACHER_LABEL[key]} at T={temp} beats it alone by more than "
                    f"the spread over {len(rows)} seeds"
                ] = margin > max(_spread(rows), _spread(m["alone"]))
    if "cnn" in res:
        c = res["cnn"]
        out["ResNet teacher at least 92 %"] = c["teacher"]["accuracy"] >= 0.92
        half = next(s for s in c["students"] if s["width"] == 16)
        out["half-width ResNet student distilled within 1 point of the teacher"] = (
            c["teacher"]["accuracy"] - half["distilled"]["accuracy"] <= 0.01
        )
    if "recovery" in res:
        r = res["recovery"]
        out[
            f"recovery after 2x structured pruning with the teacher at least as accurate as without (mean of {len(r['without'])} seeds)"
        ] = _mean(r["with_teacher"]) >= _mean(r["without"])
    return out


def _row(label: str, r: dict) -> str:
    secs = "-" if r.get("train_s") is None else f"{r['train_s']:.0f}"
    return (
        f"| {label} | {100 * r['accuracy']:.2f} % | {r['params']:,} | {r['latency_ms']['b1']:.3f} | "
        f"{r['latency_ms']['b64']:.2f} | {secs} |"
    )


def _stats(rows: list[dict]) -> str:
    accs = [100 * r["accuracy"] for r in rows]
    return f"{statistics.fmean(accs):.2f} % (min {min(accs):.2f}, max {max(accs):.2f})"


def markdown(res: dict, env: dict, args: dict, results: dict[str, bool]) -> str:
    head = "| model | accuracy | parameters | eager b1 ms | eager b64 ms | training s |\n|---|---|---|---|---|---|"
    lines = [
        START,
        "## Distillation (issue: knowledge distillation)",
        "",
        f"`python benchmarks/distillation.py`, {env['when']}, {env['machine']}, torch {env['torch']}, {THREADS} threads. "
        f"Fashion-MNIST test set. Students train for {args['epochs']} epochs with the baselines' optimiser (Adam, "
        f"one-cycle lr {BASELINE.lr:g}, weight decay {BASELINE.weight_decay:g}); distilled ones mix soft targets "
        f"(weight {ALPHA:g}) with the labels. Each seed fixes a student's initial weights and batch order for both its "
        "alone and distilled runs. Latency is one median per row, taken right after that row's training: rows of the "
        "same architecture differ only by the machine's noise.",
    ]
    if "mlp" in res:
        m = res["mlp"]
        lines += ["", "### MLP: 2 x 800 student, taught by the 2 x 1200 MLP (dropout 20 %) and by the ResNet", "", head]
        lines += [_row(f"teacher: {TEACHER_LABEL[key]}", r) for key, r in m["teachers"].items()]
        lines += [_row(f"student alone, seed {r['seed']}", r) for r in m["alone"]]
        for key, by_temp in m["distilled"].items():
            for temp, rows in by_temp.items():
                lines += [_row(f"student from the {TEACHER_LABEL[key]}, T={temp}, seed {r['seed']}", r) for r in rows]
        lines += [
            "",
            f"Student alone: {_stats(m['alone'])}. "
            + " ".join(
                f"From the {TEACHER_LABEL[key]} at T={temp}: {_stats(rows)}, {100 * (_mean(rows) - _mean(m['alone'])):+.2f} points."
                for key, by_temp in m["distilled"].items()
                for temp, rows in by_temp.items()
            ),
            "",
            f"The 2 x 1200 teacher is {100 * (m['teachers']['mlp']['accuracy'] - _mean(m['alone'])):+.2f} points from "
            f"the student alone, the ResNet {100 * (m['teachers']['resnet']['accuracy'] - _mean(m['alone'])):+.2f}. Soft "
            "targets are each teacher's logits for the training images, computed once per run (`cache_teacher`, "
            "included in the training time).",
        ]
    if "cnn" in res:
        c = res["cnn"]
        lines += [
            "",
            f"### ResNet teacher (width 32) and derived students (T = {CNN_T:g})",
            "",
            head,
            _row("teacher, width 32", c["teacher"]),
        ]
        for s in c["students"]:
            lines += [
                _row(f"width {s['width']}, alone", s["alone"]),
                _row(f"width {s['width']}, distilled", s["distilled"]),
            ]
    if "recovery" in res:
        r = res["recovery"]
        lines += [
            "",
            f"### Recovery after 2x structured pruning of the ResNet ({args['recovery_epochs']} epochs, L2 channels, "
            "T = 2, soft-target weight 0.5)",
            "",
            head,
            _row("dense", r["dense"]),
        ]
        for key, label in (
            ("without", "pruned, recovered alone"),
            ("with_teacher", "pruned, recovered with the dense teacher"),
        ):
            lines += [_row(f"{label}, seed {row['seed']}", row) for row in r[key]]
        lines += ["", f"Recovered alone: {_stats(r['without'])}; with the teacher: {_stats(r['with_teacher'])}."]
    return end_section(lines, results, END)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["mlp", "cnn", "recovery"], choices=["mlp", "cnn", "recovery"])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--temperatures", nargs="+", type=float, default=[2.0, 4.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--recovery-epochs", type=int, default=3)
    output_args(parser)
    args = parser.parse_args()
    if args.render:
        saved = saved_results("distillation")
        write_section("distillation", markdown(saved["results"], saved["env"], saved["args"], saved["checks"]))
        return 0
    torch.set_num_threads(THREADS)
    data = fashion_mnist()
    res = (saved_results("distillation") or {}).get("results", {})  # parts not rerun keep their saved figures
    t0 = time.perf_counter()
    if "mlp" in args.parts:
        res["mlp"] = mlp_part(data, args.epochs, args.temperatures, args.seeds)
    if "cnn" in args.parts:
        res["cnn"] = cnn_part(data, args.epochs)
    if "recovery" in args.parts:
        res["recovery"] = recovery_part(data, args.recovery_epochs, args.seeds)
    env = {
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch": torch.__version__,
        "wall_s": time.perf_counter() - t0,
    }
    results = checks(res)
    payload = {"env": env, "args": vars(args), "results": res, "checks": results}
    return publish("distillation", payload, None if args.no_docs else markdown(res, env, vars(args), results))


if __name__ == "__main__":
    sys.exit(main())
