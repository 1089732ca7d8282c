"""AWQ (Lin et al., MLSys 2024): int4 weights scaled by how large their inputs are.

A small share of a layer's input channels carries most of the activation magnitude, and the
weights that read them decide most of the output. AWQ multiplies each input column ``j`` of
the weight by ``s_j`` before rounding and divides the input by it at run time: the product is
unchanged in float, but the salient columns now span more of the int4 grid, so their relative
rounding error shrinks. The factors come from the inputs' mean magnitude ``s = mean|x|^α``
(normalised to a geometric mean of 1); ``α`` is searched on a grid per layer for the smallest
output error. Each group's range is then clipped: the group's scale is shrunk by the ratio, on
a grid, that minimises that group's own contribution to the output error.

Both searches measure the output error ``‖(W - Ŵ) X‖²`` on the calibration tokens through the
inputs' second moments ``H = Σ x xᵀ`` (``tr(D H Dᵀ)`` with ``D = W - Ŵ``), so no activation is
held beyond a block's. ``α = 0`` (no scaling, no clipping) is plain round-to-nearest, so the
search never does worse than RTN on the calibration tokens. The result is torchslim's int4
layer with ``input_smooth`` holding the divisors (format section 2.2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from torchslim.core.data import Data
from torchslim.core.linears import weight_matrix
from torchslim.errors import ConfigError
from torchslim.train.fit import Progress
from torchslim.transforms.gptq import dequantized, grouped_layers, int4_layer, relative_output_error, rtn_weight
from torchslim.transforms.layerwise import calibration_inputs, each_layer

_FLOOR = 1e-4


@dataclass(frozen=True)
class AWQConfig:
    """How to run AWQ.

    Attributes:
        bits: 4, or 3 (values in [-4, 3], stored and run in the int4 layout).
        group_size: inputs per int4 scale; must divide every quantized layer's input features.
        grid: points of the ``α`` search in [0, 1) (20 in the paper).
        clip: search each group's clipping ratio too.
        clip_grid: clipping ratios tried, from 1 down to ``min_clip``.
        min_clip: the smallest clipping ratio tried (0.5 in the paper).
        calib_batches: calibration batches (token-id tensors or dicts with ``input_ids``).
        layers: names or ``re:`` patterns of the Linear layers to quantize; ``None``: every
            Linear inside the repeated blocks.
    """

    group_size: int = 128
    bits: int = 4
    grid: int = 20
    clip: bool = True
    clip_grid: int = 11
    min_clip: float = 0.5
    calib_batches: int = 16
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for key in ("group_size", "grid", "clip_grid", "calib_batches"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key}={v!r}: use a whole number >= 1")
        if self.bits not in (3, 4) or isinstance(self.bits, bool):
            raise ConfigError(f"bits={self.bits!r}: use 4 or 3")
        if isinstance(self.min_clip, bool) or not isinstance(self.min_clip, (int, float)) or not 0 < self.min_clip <= 1:
            raise ConfigError(f"min_clip={self.min_clip!r}: use a ratio in (0, 1], e.g. 0.5")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))


@dataclass
class AWQLayer:
    """One layer's search: the chosen ``α``, the mean clipping ratio, and the relative output
    errors of AWQ and of plain round-to-nearest."""

    name: str
    tokens: int
    alpha: float
    mean_clip: float
    output_error: float
    rtn_output_error: float


@dataclass
class AWQResult:
    layers: list[AWQLayer]
    config: AWQConfig

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "layers": [asdict(r) for r in self.layers]}

    def summary(self) -> str:
        n = max(len(self.layers), 1)
        a = sum(r.output_error for r in self.layers) / n
        r = sum(r.rtn_output_error for r in self.layers) / n
        return (
            f"{len(self.layers)} Linear layers to int{self.config.bits} by AWQ (groups of {self.config.group_size}): mean relative "
            f"output error {a:.3g} (round-to-nearest: {r:.3g})"
        )


def _round(
    w: torch.Tensor, group_size: int, bits: int, ratio: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``(out, in)`` to ``bits`` per group with each group's scale shrunk by ``ratio``
    (broadcast to ``(out, groups)``): the integers and float16-exact scales ``(out, groups)``."""
    qmax = 2 ** (bits - 1) - 1
    g = w.reshape(w.shape[0], -1, group_size)
    peak = g.abs().amax(-1) * ratio
    scales = torch.where(peak > 0, peak / qmax, torch.ones_like(peak)).half().to(w.dtype)
    ints = torch.clamp(torch.round(g / scales.unsqueeze(-1)), -qmax - 1, qmax)
    return ints.reshape(w.shape), scales


def _clip_ratios(w: torch.Tensor, h: torch.Tensor, config: AWQConfig) -> torch.Tensor:
    """Per ``(out, group)``: the clipping ratio whose rounding error costs that group's inputs
    least, ``dᵀ H_gg d`` with ``H_gg`` the group's block of ``H``."""
    gs = config.group_size
    groups = w.shape[1] // gs
    blocks = torch.stack([h[i * gs : (i + 1) * gs, i * gs : (i + 1) * gs] for i in range(groups)])  # (g, gs, gs)
    wg = w.reshape(w.shape[0], groups, gs)
    best = torch.full(wg.shape[:2], float("inf"), dtype=w.dtype)
    ratio = torch.ones(wg.shape[:2], dtype=w.dtype)
    steps = [1.0] if config.clip_grid == 1 else torch.linspace(1.0, config.min_clip, config.clip_grid).tolist()
    for r in steps:
        ints, scales = _round(w, gs, config.bits, r)
        d = (wg - dequantized(ints, scales, gs).reshape(wg.shape)).to(h.dtype)  # (out, g, gs)
        err = torch.einsum("ogi,gij,ogj->og", d, blocks, d)
        better = err < best
        best = torch.where(better, err, best)
        ratio = torch.where(better, torch.full_like(ratio, r), ratio)
    return ratio


@torch.no_grad()
def awq_weight(
    weight: torch.Tensor, hessian: torch.Tensor, abs_mean: torch.Tensor, config: AWQConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    """AWQ for one layer: int4 values ``(out, in)`` of ``weight · diag(s)``, their float16-exact
    group scales, the divisors ``s`` (float32), the chosen ``α`` and the mean clipping ratio."""
    w = weight.detach().double()
    h = hessian.double()
    gs = config.group_size
    mean = abs_mean.double().clamp_min(_FLOOR)
    best: tuple[float, float, torch.Tensor] | None = None
    for i in range(config.grid):
        alpha = i / config.grid
        s = mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        ints, scales = _round(w * s, gs, config.bits)
        err = relative_output_error(w, dequantized(ints, scales, gs) / s, h)
        if best is None or err < best[0]:
            best = (err, alpha, s)
    _, alpha, s = best
    ws = w * s
    ratio = _clip_ratios(ws, h / torch.outer(s, s), config) if config.clip else torch.ones(w.shape[0], w.shape[1] // gs)
    ints, scales = _round(ws, gs, config.bits, ratio.to(w.dtype))
    return ints.to(torch.int8), scales.float(), s.float(), alpha, float(ratio.mean())


def awq_(
    model: nn.Module,
    config: AWQConfig = AWQConfig(),
    data: Data | list | None = None,
    *,
    progress: Progress | None = None,
) -> AWQResult:
    """Quantize the Linear layers of ``model``'s repeated blocks to int4 with AWQ, block by
    block on calibration sequences; in place.

    Example:
        >>> result = ts.awq_(llm, ts.AWQConfig(group_size=128), data=calib)  # doctest: +SKIP
    """
    if data is None:
        raise ConfigError("AWQ scales each weight by its inputs: pass data=<calibration batches>")
    records: list[AWQLayer] = []

    def change(block: nn.Module, prefix: str, name: str, layer: nn.Module, s: dict) -> None:
        w = weight_matrix(layer).float().cpu()
        h = s["hessian"]
        ints, scales, smooth, alpha, clip = awq_weight(w, h, s["abs_sum"] / max(s["tokens"], 1), config)
        approx = dequantized(ints, scales, config.group_size) / smooth
        records.append(
            AWQLayer(
                name=f"{prefix}.{name}",
                tokens=s["tokens"],
                alpha=alpha,
                mean_clip=clip,
                output_error=relative_output_error(w, approx, h),
                rtn_output_error=relative_output_error(w, rtn_weight(w, config.bits, config.group_size), h),
            )
        )
        block.set_submodule(name, int4_layer(layer, ints, scales, config.group_size, smooth))

    each_layer(  # a failure leaves the float model as it was
        model,
        calibration_inputs(data, config.calib_batches),
        grouped_layers(config.layers, config.group_size),
        change,
        progress,
    )
    if not records:
        raise ConfigError("no Linear layer matched config.layers inside the model's repeated blocks")
    return AWQResult(records, config)
