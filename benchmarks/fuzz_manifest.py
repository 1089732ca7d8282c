"""Structure-aware fuzz of the `.tslim` reader: decode the manifest, mutate its fields and the
stored tensors, re-sign (recompute the fingerprint), re-pack, then load and inspect.

The fingerprint covers the stored tensors, so a byte flip alone only ever meets the
fingerprint check. Here every case is a well-formed container with a valid fingerprint, and
the reader's own checks are all that stand between the edit and the model: manifest keys,
coded entries, module sizes, quantized layers (Linear, Conv, int4 groups, GRU), BatchNorm
folds, tied tensors. Each case must load into a model that runs, or raise :class:`ArtifactError`; and
``inspect_file`` likewise. Any other exception is a failure, recorded with the case's seed.

    .venv/bin/python benchmarks/fuzz_manifest.py [--cases 10000] [--seed 0] [--no-docs]
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import random
import sys
import time

from bench_common import TMP, cpu, end_section, markers, output_args, publish  # noqa: E402  (sets the cache folders)

START, END = markers("fuzz_manifest")
INTS = (-(2**70), -(2**63), -(2**31), -1, 0, 1, 2, 3, 4, 7, 8, 16, 255, 256, 2**31, 2**63, 2**70)
FLOATS = (-0.0, 0.5, -1.5, 1e-30, 1e308, -1e308, 3.0)


def _models():
    """Four compressed models covering every kind of manifest entry: channels removed, pruned
    and shared weights, static int8 with a folded BatchNorm; int4 weight-only groups; a dynamic
    int8 GRU; an embedding tied to the output layer."""
    import torch
    from torch import nn

    import torchslim as ts

    class Rnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru, self.head = nn.GRU(6, 16, batch_first=True), nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.gru(x)[0][:, -1])

    torch.manual_seed(0)
    cnn, x = _cnn().eval(), torch.randn(64, 1, 8, 8)
    ts.channel_prune_(cnn, ts.ChannelPruneConfig(ratio={"4": 0.5}, round_to=1, min_channels=1), example=x[:4])
    ts.prune_(cnn, ts.MagnitudePruneConfig(sparsity={"4": 0.8}, finetune=None))
    ts.share_(cnn, ts.ShareConfig(bits={"4": 4}, finetune=None))
    ts.quantize_(cnn, ts.QuantizeConfig(exclude=("4",), bias_correction=False), [x[:32], x[32:]])
    mlp = _mlp().eval()
    ts.quantize_(mlp, ts.QuantizeConfig(scheme="weight", bits=4, group_size=32), example=torch.randn(4, 64))
    tied = _tied().eval()
    ts.prune_(tied, ts.MagnitudePruneConfig(sparsity={"2": 0.5}, finetune=None))
    ts.share_(tied, ts.ShareConfig(bits={"2": 4}, finetune=None))
    rnn = Rnn().eval()
    ts.quantize_(rnn, ts.QuantizeConfig(scheme="dynamic"), example=torch.randn(4, 5, 6))
    return [
        ("cnn: channels, sparsity, codebook, static int8, folded BatchNorm", cnn, _cnn, torch.randn(2, 1, 8, 8)),
        ("mlp: int4 weight-only groups", mlp, _mlp, torch.randn(2, 64)),
        ("rnn: dynamic int8 GRU", rnn, Rnn, torch.randn(2, 5, 6)),
        ("lm: embedding tied to the output layer, pruned and shared", tied, _tied, torch.randint(0, 40, (2, 5))),
    ]


def _cnn():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def _tied():
    from torch import nn

    model = nn.Sequential(nn.Embedding(40, 12), nn.ReLU(), nn.Linear(12, 40, bias=False))
    model[2].weight = model[0].weight
    return model


def _mlp():
    from torch import nn

    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _value(rng: random.Random, pool: list, depth: int = 0):
    """A random JSON value, biased to the manifest's own strings and small numbers."""
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(INTS)
    if kind == 3:
        return rng.choice(FLOATS)
    if kind == 4:
        return rng.choice(pool)
    if kind == 5:
        return "".join(rng.choice("abc.:_0") for _ in range(rng.randrange(6)))
    if kind in (6, 7):
        return [_value(rng, pool, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(pool): _value(rng, pool, depth + 1) for _ in range(rng.randrange(3))}


def _nudge(rng: random.Random, old, pool: list):
    """A value near ``old``: an integer moved a little, a list with an element dropped or
    repeated, another string of the manifest, or a value of another type."""
    if isinstance(old, bool) or rng.random() < 0.35:
        return _value(rng, pool)
    if isinstance(old, int):
        return rng.choice((old + 1, old - 1, old * 2, -old, old // 2, 0))
    if isinstance(old, float):
        new = rng.choice((old * 2, -old, old + 1.0, 0.0))
        return new if math.isfinite(new) else -old  # JSON holds finite numbers only
    if isinstance(old, str):
        return rng.choice(pool)
    if isinstance(old, list) and old:
        out = list(old)
        i = rng.randrange(len(out))
        if rng.random() < 0.5:
            out.pop(i)
        else:
            out.insert(i, copy.deepcopy(out[i]))
        return out
    return _value(rng, pool)


def _paths(node, prefix=()):
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from _paths(value, (*prefix, key))


def _strings(node) -> list:
    if isinstance(node, str):
        return [node]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    out = []
    for key, value in items:
        out += ([key] if isinstance(key, str) else []) + _strings(value)
    return out


def _edit_manifest(rng: random.Random, manifest: dict, pool: list) -> str:
    paths = [p for p in _paths(manifest) if p and p[0] != "fingerprint"]
    path = rng.choice(paths)
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.15:
        parent.pop(path[-1])
        return f"delete {path}"
    parent[path[-1]] = _nudge(rng, parent[path[-1]], pool)
    return f"set {path}"


def _edit_tensor(rng: random.Random, stored: dict) -> str:
    import torch

    name = rng.choice(sorted(stored))
    t = stored[name].contiguous()
    raw = bytearray(t.view(torch.uint8).flatten().numpy().tobytes()) if t.numel() else bytearray()
    op = rng.randrange(4)
    if op == 0 and raw:
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        stored[name] = torch.frombuffer(raw, dtype=torch.uint8).view(t.dtype).reshape(t.shape).clone()
    elif op == 1:
        keep = rng.randrange(len(raw) + 1)
        stored[name] = torch.frombuffer(bytearray(raw[:keep]) or bytearray(1), dtype=torch.uint8).clone()
    elif op == 2:
        stored[name] = torch.cat(
            [t.flatten().view(torch.uint8), torch.randint(0, 256, (rng.randrange(1, 9),), dtype=torch.uint8)]
        )
    else:
        stored[name] = t.flatten() if t.dim() != 1 else t.reshape(1, -1)
    return f"tensor {name} op {op}"


def run(cases: int, seed: int) -> dict:
    import torch
    from safetensors.torch import save as st_save

    import torchslim as ts
    from torchslim.artifact.inspect import inspect_file
    from torchslim.artifact.tslim import encode, fingerprint, pack_manifest, read
    from torchslim.errors import ArtifactError

    models = _models()
    bases = []
    for label, model, build, x in models:
        path = TMP / "base.tslim"
        path.write_bytes(encode(model))
        manifest, stored = read(path)
        bases.append((label, manifest.raw, stored, build, x))
    rng, failures = random.Random(seed), []
    counts = {"loaded": 0, "loaded_fails_to_run": 0, "artifact_error": 0, "other": 0}
    per_model = {label: 0 for label, *_ in bases}
    file = TMP / "case.tslim"
    start = time.perf_counter()
    for case in range(cases):
        label, base, stored0, build, x = bases[case % len(bases)]
        manifest, stored = copy.deepcopy(base), dict(stored0)
        pool = _strings(base)
        edits = [_edit_manifest(rng, manifest, pool) for _ in range(rng.randrange(1, 4))]
        if rng.random() < 0.25:
            edits.append(_edit_tensor(rng, stored))
        try:
            manifest["fingerprint"] = fingerprint(stored)  # re-signed: the reader's own checks decide
        except ArtifactError:
            pass
        file.write_bytes(st_save(stored, metadata=pack_manifest(manifest)))
        per_model[label] += 1
        outcome, errors, model = "loaded", [], None
        for step in ("load", "inspect", "run"):
            try:
                if step == "load":
                    model = ts.load(file, model=build)
                elif step == "inspect":
                    inspect_file(file)
                elif model is not None:
                    with torch.no_grad():
                        model(x)
            except ArtifactError:
                outcome = outcome if outcome == "other" else "artifact_error"
            except Exception as exc:  # noqa: BLE001  (what this benchmark looks for)
                kind = "other" if step != "run" else "loaded_fails_to_run"
                outcome = "other" if "other" in (kind, outcome) else kind
                errors.append((step, exc))
        counts[outcome] += 1
        for step, exc in errors:
            if len(failures) < 40:
                failures.append(
                    {
                        "case": case,
                        "model": label,
                        "step": step,
                        "edits": edits,
                        "error": f"{type(exc).__name__}: {exc}"[:300],
                    }
                )
    return {
        "cases": cases,
        "seed": seed,
        "per_model": per_model,
        "outcomes": counts,
        "failures": failures,
        "seconds": time.perf_counter() - start,
    }


def markdown(res: dict, env: dict) -> str:
    lines = [
        START,
        "## Structure-aware fuzz of the `.tslim` reader",
        "",
        f"`benchmarks/fuzz_manifest.py`, {env['when']}, {env['cpu'].get('name', env['machine'])}. "
        f"{res['cases']:,} cases (seed {res['seed']}) over four compressed models ("
        + "; ".join(res["per_model"])
        + "). Each case decodes the manifest, changes one to three of its fields (a value moved a "
        "little, another type, another string of the manifest, or deleted) and in a quarter of the "
        "cases a stored tensor (a bit flipped, truncated, extended or reshaped), recomputes the "
        "fingerprint, re-packs the file, then loads it into a fresh model and runs it, and inspects it.",
        "",
        "| outcome | cases |",
        "|---|---|",
        f"| loaded, and the model runs | {res['outcomes']['loaded']:,} |",
        f"| loaded, but the model fails when run | {res['outcomes']['loaded_fails_to_run']:,} |",
        f"| `ArtifactError` from load or inspect | {res['outcomes']['artifact_error']:,} |",
        f"| any other exception from load or inspect | {res['outcomes']['other']:,} |",
        f"| time | {res['seconds']:.0f} s |",
    ]
    return end_section(lines, res["checks"], END)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    output_args(parser, render=False)
    args = parser.parse_args()
    res = run(args.cases, args.seed)
    res["checks"] = {
        "at_least_10000_cases": res["cases"] >= 10_000,
        "no_exception_other_than_ArtifactError": res["outcomes"]["other"] == 0,
        "some_cases_load_and_some_are_refused": res["outcomes"]["loaded"] > 0 and res["outcomes"]["artifact_error"] > 0,
    }
    env = {"when": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpu": cpu()}
    print({k: v for k, v in res.items() if k not in ("checks", "failures")})
    for f in res["failures"]:
        print(f)
    return publish("fuzz_manifest", {"env": env, **res}, None if args.no_docs else markdown(res, env))


if __name__ == "__main__":
    sys.exit(main())
