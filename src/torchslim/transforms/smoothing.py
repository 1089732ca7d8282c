"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before int8.

A few input channels of a transformer's Linear layers (those after a LayerNorm most of all)
carry values tens of times larger than the rest, so one int8 scale per token spends its range
on them and rounds the others coarsely. Dividing input channel ``j`` by ``s_j`` and
multiplying the weight's column ``j`` by it leaves the layer's output unchanged in float and
evens the channels out:

    s_j = max|x_j| ** alpha / max|W_:j| ** (1 - alpha)

with ``max|x_j|`` measured on calibration batches. Layers that read the same input (a block's
query, key and value projections) share one ``s``, taken over all their weights, so the
division is worked out once for them.
"""

from __future__ import annotations

import torch
from torch import nn

from torchslim.analysis.ranges import run_with_hooks

_FLOOR = 1e-5  # keeps a channel that is zero in the calibration data (or the weight) finite


@torch.no_grad()
def smoothing_factors(
    model: nn.Module, layers: dict[str, nn.Linear], batches: list, alpha: float
) -> dict[str, torch.Tensor]:
    """One factor per input channel of each Linear in ``layers``, from its inputs' largest
    magnitudes over ``batches`` (the model run eagerly); layers given the same input tensor
    share their factors."""
    peak: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}  # each layer's input on the first batch, held so no address is reused

    def record(key: tuple[str, str], x: torch.Tensor) -> None:
        name, end = key
        if end == "input":
            first.setdefault(name, x)
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            peak[name] = torch.maximum(peak[name], m) if name in peak else m

    run_with_hooks(model, layers, batches, record)
    groups: dict[tuple, list[str]] = {}
    for name in layers:
        if name in first:  # a layer the batches never reach keeps its plain weights
            x = first[name]
            groups.setdefault((x.data_ptr(), tuple(x.shape), x.stride(), x.dtype), []).append(name)
    first.clear()
    factors: dict[str, torch.Tensor] = {}
    for names in groups.values():
        x_max = peak[names[0]]
        w_max = torch.stack([layers[n].weight.detach().abs().amax(0).float().cpu() for n in names]).amax(0)
        s = x_max.cpu().clamp_min(_FLOOR) ** alpha / w_max.clamp_min(_FLOOR) ** (1 - alpha)
        s = s.clamp_min(_FLOOR)
        for n in names:
            factors[n] = s
    return factors
