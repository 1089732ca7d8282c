"""Compressing over a streamed dataset larger than comfortable memory, with bounded RSS.

A user-style CNN is trained and compressed on generated 3x48x48 float32 images streamed by an
``IterableDataset`` (one pass is at least 1 GB, made batch by batch and never stored): dense
training for one pass, magnitude pruning with one pass of fine-tuning, weight sharing with one
pass of centroid training, static int8 with calibration on the first training batches, then
save, load into a fresh model and compare outputs. The peak resident set size of the process
(``ru_maxrss``, which includes torch itself) must stay under 2 GB.

    .venv/bin/python benchmarks/streamed_data.py [--gigabytes 1.0] [--no-docs]
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time

from bench_common import TMP, cpu, end_section, markers, output_args, publish  # noqa: E402  (sets the cache folders)

START, END = markers("streamed_data")
SHAPE, BATCH, CLASSES = (3, 48, 48), 64, 10
RSS_LIMIT_MB = 2048


def _model():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * 16, 64),
        nn.ReLU(),
        nn.Linear(64, CLASSES),
    )


def _stream_class():
    import torch
    from torch.utils.data import IterableDataset

    class Generated(IterableDataset):
        """Images made batch by batch: each class is a sinusoid of its own frequency and
        orientation under noise. ``streamed`` counts the image bytes produced."""

        streamed = 0

        def __init__(self, batches: int, seed: int) -> None:
            self.batches, self.seed = batches, seed
            h, w = SHAPE[1:]
            yy, xx = torch.meshgrid(
                torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
            )
            angle = torch.arange(CLASSES, dtype=torch.float32) * (3.14159 / CLASSES)
            freq = 0.15 + 0.05 * (torch.arange(CLASSES) % 3)
            phase = (torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy) * freq[:, None, None]
            self.patterns = torch.sin(phase)  # (CLASSES, H, W)

        def __len__(self) -> int:
            return self.batches

        def __iter__(self):
            g = torch.Generator().manual_seed(self.seed)
            for _ in range(self.batches):
                y = torch.randint(0, CLASSES, (BATCH,), generator=g)
                x = torch.randn(BATCH, *SHAPE, generator=g) + self.patterns[y].unsqueeze(1)  # (B, 3, H, W)
                Generated.streamed += x.numel() * x.element_size()
                yield x, y

    return Generated


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(gigabytes: float) -> dict:
    import torch
    from torch.utils.data import DataLoader

    import torchslim as ts
    from torchslim.train.fit import TrainConfig, fit

    torch.set_num_threads(2)
    torch.manual_seed(0)
    Generated = _stream_class()
    per_batch = BATCH * torch.Size(SHAPE).numel() * 4
    batches = int(-(-gigabytes * 1e9 // per_batch))
    data = ts.data.Data(
        train=DataLoader(Generated(batches, seed=0), batch_size=None),
        eval=DataLoader(Generated(40, seed=1), batch_size=None),
    )
    out: dict = {"pass_bytes": batches * per_batch, "batches_per_pass": batches, "rss_mb": {"start": _rss_mb()}}
    model, times = _model(), {}
    t0 = time.perf_counter()
    fit(model, data, TrainConfig(epochs=1, lr=3e-3))
    times["train_s"] = time.perf_counter() - t0
    out["dense_accuracy"] = ts.evaluate(model, data.eval, data.task)
    out["rss_mb"]["after_training"] = _rss_mb()
    dense = _model()
    dense.load_state_dict(model.state_dict())
    t0 = time.perf_counter()
    ts.prune_(model, ts.MagnitudePruneConfig(sparsity=0.7, steps=1, finetune=TrainConfig(epochs=1, lr=1e-3)), data=data)
    times["prune_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ts.share_(model, ts.ShareConfig(bits=5, finetune=TrainConfig(epochs=1, lr=3e-4)), data=data)
    times["share_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ts.quantize_(model, ts.QuantizeConfig(scheme="static", calib_batches=8), data=data)
    times["quantize_s"] = time.perf_counter() - t0
    out["compressed_accuracy"] = ts.evaluate(model, data.eval, data.task)
    out["agreement"] = ts.fidelity(model, dense, data.eval, data.task)
    path = ts.save(model, TMP / "streamed.tslim")
    restored = ts.load(path, model=_model())
    x = next(iter(data.eval))[0]
    out["reloaded_equal"] = bool(torch.equal(restored(x), model(x)))
    out["tslim_bytes"] = path.stat().st_size
    out["fp32_bytes"] = sum(t.numel() * 4 for t in dense.state_dict().values())
    out["streamed_bytes"] = Generated.streamed
    out["rss_mb"]["peak"] = _rss_mb()
    out["times"] = times
    return out


def markdown(res: dict, env: dict) -> str:
    gb = res["pass_bytes"] / 1e9
    lines = [
        START,
        "## Compressing over a streamed dataset",
        "",
        f"`benchmarks/streamed_data.py`, {env['when']}, {env['cpu'].get('name', env['machine'])}, 2 threads. "
        f"A CNN of {res['fp32_bytes']:,} fp32 bytes on generated 3x48x48 float32 images streamed by an "
        f"`IterableDataset`: one pass is {gb:.2f} GB ({res['batches_per_pass']} batches of {BATCH}), made batch by "
        f"batch. Dense training, pruning to 70 % with fine-tuning and sharing with centroid training take one "
        f"pass each; static int8 calibrates on the first 8 training batches. In all "
        f"{res['streamed_bytes'] / 1e9:.2f} GB went through the process.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| peak RSS (ru_maxrss, torch included) | {res['rss_mb']['peak']:.0f} MB |",
        f"| RSS after `import torch` and setup | {res['rss_mb']['start']:.0f} MB |",
        f"| accuracy dense / compressed | {100 * res['dense_accuracy']:.2f} % / {100 * res['compressed_accuracy']:.2f} % |",
        f"| top-1 agreement with the dense model | {100 * res['agreement']:.2f} % |",
        f"| file | {res['tslim_bytes']:,} B ({res['fp32_bytes'] / res['tslim_bytes']:.1f}x smaller than fp32) |",
        "| time: train / prune / share / quantize | "
        + " / ".join(f"{res['times'][k]:.0f} s" for k in ("train_s", "prune_s", "share_s", "quantize_s"))
        + " |",
    ]
    return end_section(lines, res["checks"], END)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=1.0, help="bytes of images in one pass (1e9 units)")
    output_args(parser, render=False)
    args = parser.parse_args()
    res = run(args.gigabytes)
    res["checks"] = {
        "one_pass_at_least_1GB": res["pass_bytes"] >= 1e9,
        "peak_rss_under_2GB": res["rss_mb"]["peak"] < RSS_LIMIT_MB,
        "reloaded_file_gives_equal_outputs": res["reloaded_equal"],
        "compressed_within_2_points": res["dense_accuracy"] - res["compressed_accuracy"] <= 0.02,
    }
    env = {"when": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpu": cpu()}
    print({k: v for k, v in res.items() if k != "checks"})
    payload = {"env": env, **res}
    return publish("streamed_data", payload, None if args.no_docs else markdown(res, env))


if __name__ == "__main__":
    sys.exit(main())
