"""Quantization-aware training: the float layers train through their int8 grids, then
:func:`~torchslim.transforms.quantize.quantize_` converts them to the same int8 layers."""

from __future__ import annotations

import torch
from torch import nn

from torchslim.core.data import Data
from torchslim.core.qlayers import activation_qparams, weight_scales
from torchslim.train.fit import Progress, TrainConfig, fit


class _FakeQuant(nn.Module):
    """A float layer trained through its int8 grids: per-channel (or per-tensor) weights
    (straight-through estimator), the input and the output on their calibrated uint8 grids."""

    def __init__(
        self, layer: nn.Module, ranges: tuple[tuple[float, float], tuple[float, float]], per_channel: bool
    ) -> None:
        super().__init__()
        self.layer, self.per_channel = layer, per_channel
        self.input_q, self.output_q = (activation_qparams(*r) if r is not None else None for r in ranges)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(x, *self.input_q, 0, 255)
        w = self.layer.weight
        scales = weight_scales(w, per_channel=self.per_channel).detach()
        if self.per_channel:
            w = torch.fake_quantize_per_channel_affine(
                w, scales, torch.zeros(len(scales), dtype=torch.int32), 0, -128, 127
            )
        else:
            w = torch.fake_quantize_per_tensor_affine(w, float(scales[0]), 0, -128, 127)
        if isinstance(self.layer, nn.Linear):
            y = nn.functional.linear(x, w, self.layer.bias)
        else:
            y = self.layer._conv_forward(x, w, self.layer.bias)
        return torch.fake_quantize_per_tensor_affine(y, *self.output_q, 0, 255) if self.output_q else y


def train_fake_quant(
    model: nn.Module,
    targets: dict[str, nn.Module],
    ranges: dict,
    train: TrainConfig,
    data: Data,
    *,
    per_channel: bool = True,
    progress: Progress | None = None,
    teacher: nn.Module | None = None,
) -> list[dict]:
    """QAT: train with every target layer behind fake quantization, then unwrap them."""
    for name, layer in targets.items():
        model.set_submodule(name, _FakeQuant(layer, ranges[name], per_channel))
    try:
        loss = fit(model, data, train, progress, teacher=teacher)
    finally:
        for name, layer in targets.items():
            model.set_submodule(name, layer)
        model.eval()
    return [{"qat_epochs": train.epochs, "loss": loss}]
