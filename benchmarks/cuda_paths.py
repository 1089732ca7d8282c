"""The CUDA paths, exercised end to end on a GPU: prune, share, static-int8 calibration,
distillation, channel pruning, save on the GPU and load onto the GPU and the CPU.

Without a CUDA device it prints why it skipped and exits 0 (the CPU suite covers the same
verbs). Each step checks that the model's parameters are on the GPU, that the result matches
the CPU run's shape of result, and that a file saved from the GPU reloads with equal outputs.

    .venv/bin/python benchmarks/cuda_paths.py [--no-docs]
"""

from __future__ import annotations

import argparse
import sys
import time

from bench_common import TMP, cpu, output_args, save_results  # noqa: E402  (sets the cache folders)


def _on_cuda(model) -> bool:
    return all(p.device.type == "cuda" for p in model.parameters())


def run() -> dict:
    import torch

    import torchslim as ts
    from torchslim.core.data import DataSpec, load_data
    from torchslim.train.fit import TrainConfig

    data = load_data(DataSpec("digits", batch_size=64, eval_batch_size=128, calib_size=256))
    tune = TrainConfig(epochs=1, lr=1e-3)
    steps: dict[str, dict] = {}

    def step(name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            steps[name] = {"ok": bool(fn()), "seconds": round(time.perf_counter() - t0, 2)}
        except Exception as exc:  # noqa: BLE001  (report every path, even after one fails)
            steps[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(name, steps[name], flush=True)

    torch.manual_seed(0)
    teacher = ts.models.mlp(in_features=64, width=128)
    ts.fit(teacher.to("cuda"), data, TrainConfig(epochs=3))
    model = ts.models.mlp(in_features=64, width=128)
    model.load_state_dict(teacher.state_dict())
    accuracy = {"dense": ts.evaluate(teacher, data.eval, data.task)}

    step("fit", lambda: _on_cuda(teacher) and accuracy["dense"] > 0.8)
    step(
        "prune",
        lambda: (
            ts.prune_(model, ts.MagnitudePruneConfig(sparsity=0.7, steps=1, finetune=tune), data, device="cuda")
            and _on_cuda(model)
        ),
    )
    step(
        "share",
        lambda: ts.share_(model, ts.ShareConfig(bits=5, finetune=tune), data, device="cuda") and _on_cuda(model),
    )
    step("quantize", lambda: ts.quantize_(model, ts.QuantizeConfig(scheme="static"), data) is not None)
    accuracy["compressed"] = ts.evaluate(model, data.eval, data.task)

    def save_load() -> bool:
        path = ts.save(model, TMP / "cuda.tslim")
        x = data.example_input(16).to("cuda")
        on_gpu = ts.load(path, model=ts.models.mlp(in_features=64, width=128), device="cuda")
        on_cpu = ts.load(path, model=ts.models.mlp(in_features=64, width=128), device="cpu")
        same = torch.equal(on_gpu(x).argmax(1).cpu(), model(x).argmax(1).cpu())
        close = torch.allclose(on_cpu(x.cpu()), model(x).cpu(), atol=1e-4)
        return _on_cuda(on_gpu) and same and close

    step("save_load", save_load)

    def distill() -> bool:
        student = ts.derive_student("mlp", {"in_features": 64, "width": 128}, width=0.5)
        ts.distill(student, ts.DistillConfig(train=TrainConfig(epochs=8)), data, teacher=teacher, device="cuda")
        accuracy["student"] = ts.evaluate(student, data.eval, data.task)
        return _on_cuda(student) and accuracy["student"] > 0.5

    step("distill", distill)

    def channels() -> bool:
        net = ts.models.resnet_mini(width=32, blocks=1)
        cfg = ts.ChannelPruneConfig(macs=0.5, criterion="taylor", finetune=tune)
        result = ts.channel_prune_(net, cfg, data, device="cuda")
        return _on_cuda(net) and result.macs_after < result.macs_before

    step("channels", channels)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "steps": steps,
        "accuracy": accuracy,
        "checks": {f"{k}_on_cuda": v["ok"] for k, v in steps.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    output_args(parser, render=False)
    parser.parse_args()
    import torch

    env = {"when": time.strftime("%Y-%m-%d"), "cpu": cpu(), "torch": torch.__version__}
    if not torch.cuda.is_available():
        reason = f"skipped: no CUDA device (torch {torch.__version__}, cuda build: {torch.version.cuda or 'none'})"
        print(reason)
        save_results("cuda_paths", {"env": env, "skipped": reason, "checks": {}})
        return 0
    res = run()
    save_results("cuda_paths", {"env": env, **res})
    for k, v in res["checks"].items():
        print(f"{k}: {'yes' if v else 'NO'}")
    return 0 if all(res["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
