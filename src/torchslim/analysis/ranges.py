"""Activation ranges for static quantization, from a calibration pass.

Two passes over the calibration batches: the first records the minimum and maximum of each
layer's input and output (and rejects NaN / Inf), the second fills a 2048-bin histogram of
the non-zero values over that span (exact zeros, such as ReLU outputs, are on every grid, so
they neither cost error nor should pull the range). A method then picks the range
``[lo, hi]`` that each uint8 grid will cover:

``minmax``      the observed extremes (no clipping; outliers stretch the grid).
``percentile``  the ``p``-th and ``(100 - p)``-th percentiles (clips the rare outliers).
``mse``         the clipping that minimises the expected squared quantization error over the
                histogram (rounding error inside the range, clipping error outside).
``entropy``     the clipping that minimises the KL divergence between the histogram and its
                quantized version (the TensorRT calibration idea, for an affine grid).

Written by hand: torch's observers (``torch.ao.quantization.observer``) belong to the
deprecated namespace and have no MSE method; the methods are short over a histogram.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from torchslim.core.task import call_model
from torchslim.errors import DataError

METHODS = ("minmax", "percentile", "mse", "entropy")
BINS = 2048
LEVELS = 256


@dataclass
class InputStats:
    """What calibration saw at one layer's input."""

    lo: float = float("inf")
    hi: float = float("-inf")
    count: int = 0
    hist: torch.Tensor | None = None  # (BINS,) counts of the non-zero values over [lo, hi]
    zeros: int = 0  # values exactly 0, left out of the histogram


def observe(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[torch.Tensor],
    histogram: bool,
    relu_outputs: Iterable[str] = (),
) -> dict[tuple[str, str], InputStats]:
    """Run ``batches`` through ``model`` and gather, for each named layer, the statistics of its
    input and of its output, keyed ``(name, "input")`` and ``(name, "output")``. The outputs
    of the layers in ``relu_outputs`` are observed after a ReLU (the one that follows them)."""
    batches, clamped = list(batches), set(relu_outputs)
    stats = {(name, end): InputStats() for name in layers for end in ("input", "output")}

    def minmax(key: tuple[str, str], x: torch.Tensor) -> None:
        s = stats[key]
        if not torch.isfinite(x).all():
            raise DataError(
                f"layer {key[0]!r}: its {key[1]} holds NaN or Inf during calibration; check the calibration data "
                "(and the model's earlier layers) for non-finite values"
            )
        s.lo, s.hi, s.count = min(s.lo, float(x.min())), max(s.hi, float(x.max())), s.count + x.numel()

    def fill(key: tuple[str, str], x: torch.Tensor) -> None:
        s = stats[key]
        x = x.detach().float()
        zeros = int((x == 0).sum())  # exact zeros (ReLU outputs) sit on the grid whatever the range:
        if s.hi <= s.lo:  # counted apart, out of the histogram
            h = torch.zeros(BINS)
        elif zeros < 2**24:  # counts exact in float32: histogram all, take the zeros out of their bin
            h = torch.histc(x, BINS, s.lo, s.hi) - torch.histc(torch.zeros(1), BINS, s.lo, s.hi) * zeros
        else:
            h = torch.histc(x[x != 0], BINS, s.lo, s.hi)
        s.hist = h if s.hist is None else s.hist + h
        s.zeros += zeros

    def seen(fn: Callable[[tuple[str, str], torch.Tensor], None]) -> Callable[[tuple[str, str], torch.Tensor], None]:
        return lambda key, x: fn(key, torch.relu(x) if key[1] == "output" and key[0] in clamped else x)

    run_with_hooks(model, layers, batches, seen(minmax))
    if histogram:
        run_with_hooks(model, layers, batches, seen(fill))
    return stats


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layers it watches have run."""


def run_with_hooks(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: list,
    fn: Callable[[tuple[str, str], torch.Tensor], None],
    stop_after: str | None = None,
) -> None:
    """Run ``batches`` through ``model`` without gradients, calling ``fn((name, "input" | "output"),
    tensor)`` with each named layer's input and output. With ``stop_after``, each forward pass
    ends as soon as that layer has produced its output (the rest of the model is not run)."""

    def output(name: str, out: torch.Tensor) -> None:
        fn((name, "output"), out)
        if name == stop_after:
            raise _Stop

    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: fn((n, "input"), args[0])) for n, m in layers.items()]
    hooks += [m.register_forward_hook(lambda _m, _args, out, n=n: output(n, out)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for x in batches:
                try:
                    call_model(model, x)
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()


def choose_range(stats: InputStats, method: str, percentile: float = 99.99) -> tuple[float, float]:
    """The range ``[lo, hi]`` the uint8 grid covers for one layer input."""
    if method == "minmax" or stats.hi <= stats.lo or stats.hist is None or not stats.hist.any():
        return stats.lo, stats.hi
    hist = stats.hist.double()
    edges = torch.linspace(stats.lo, stats.hi, BINS + 1, dtype=torch.float64)
    if method == "percentile":
        hist = hist.clone()
        hist[min(BINS - 1, int(-stats.lo / (stats.hi - stats.lo) * BINS))] += stats.zeros
        cdf = hist.cumsum(0) / hist.sum()
        q = (100.0 - percentile) / 100.0
        lo_bin = int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64)))
        hi_bin = int(torch.searchsorted(cdf, torch.tensor(1.0 - q, dtype=torch.float64)))
        return float(edges[lo_bin]), float(edges[min(hi_bin + 1, BINS)])
    candidates = _candidates(stats.lo, stats.hi)
    if method == "mse":
        losses = _mse(hist, edges, candidates)
    else:
        losses = torch.stack([_kl(hist, edges, lo, hi) for lo, hi in candidates])
    return candidates[int(torch.argmin(losses))]


def _candidates(lo: float, hi: float) -> list[tuple[float, float]]:
    """Ranges that clip the observed span from either end by 0 to 80 % (both ends keep 0 inside)."""
    fracs = torch.linspace(0.2, 1.0, 80 if lo >= 0 else 28).tolist()
    return [(min(lo * a, 0.0), max(hi * b, 0.0)) for a in (fracs if lo < 0 else [1.0]) for b in fracs]


def _mse(hist: torch.Tensor, edges: torch.Tensor, ranges: list[tuple[float, float]]) -> torch.Tensor:
    """Expected squared error of quantizing the histogram's values onto the grid over each
    range ``[lo, hi]`` (one loss per range, all ranges at once)."""
    centers = (edges[:-1] + edges[1:]) / 2  # (BINS,)
    bounds = torch.tensor(ranges, dtype=torch.float64)
    lo, hi = bounds[:, :1].clamp(max=0.0), bounds[:, 1:].clamp(min=0.0)  # (ranges, 1)
    scale = (hi - lo).clamp(min=1e-12) / (LEVELS - 1)
    zp = torch.round(-lo / scale)
    q = torch.clamp(torch.round(centers / scale) + zp, 0, LEVELS - 1)
    clipped = (centers - (q - zp) * scale) ** 2
    inside = (centers >= lo) & (centers <= hi)
    err = torch.where(inside, scale**2 / 12, clipped)  # rounding noise inside the range
    return (hist * err).sum(1) / hist.sum()


def _kl(hist: torch.Tensor, edges: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """KL(P || Q): P is the histogram inside the range with the clipped tails folded into its end
    bins; Q is the inside alone, merged into the grid's levels and spread back uniformly over the
    non-empty bins, so clipping pays for the mass it moves."""
    width = float(edges[1] - edges[0])
    a = max(0, min(BINS - 1, int((lo - float(edges[0])) / width)))
    b = max(a + 1, min(BINS, int(round((hi - float(edges[0])) / width))))
    inner = hist[a:b]
    p = inner.clone()
    p[0] += hist[:a].sum()
    p[-1] += hist[b:].sum()
    levels = torch.clamp((torch.arange(len(p), dtype=torch.float64) * LEVELS / len(p)).long(), max=LEVELS - 1)
    mass = torch.zeros(LEVELS, dtype=torch.float64).index_add_(0, levels, inner)  # Q leaves the tails out
    nonzero = torch.zeros(LEVELS, dtype=torch.float64).index_add_(0, levels, (inner > 0).double())
    q = torch.where(inner > 0, mass[levels] / nonzero[levels].clamp_min(1), torch.zeros_like(p))
    p, q = p / p.sum(), q / q.sum().clamp_min(1e-12)
    keep = p > 0
    return (p[keep] * torch.log(p[keep] / q[keep].clamp_min(1e-12))).sum()
