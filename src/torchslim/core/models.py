"""The built-in model zoo: builder functions, one per architecture.

Builders are plain functions returning a freshly initialised ``nn.Module``; ``load`` uses
them (or a builder the caller passes) to rebuild a model from a ``.tslim`` file, so a file
never names code to import.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from torchslim.errors import ConfigError


class LeNet300100(nn.Module):
    """LeNet-300-100: a 784-300-100-10 ReLU MLP (LeCun et al. 1998; Deep Compression Table 2)."""

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, in_features)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """The Caffe LeNet-5 variant of Deep Compression: conv 20@5x5, conv 50@5x5, fc 500, fc 10.

    431,080 parameters for 28x28 inputs. ReLU follows every hidden layer.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ConfigError(f"lenet5 needs images of at least 12x12 pixels, got image_size={image_size}")
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)  # (B, 20, 12, 12)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)  # (B, 50, 4, 4)
        x = torch.relu(self.fc1(x.flatten(1)))  # (B, 500)
        return self.fc2(x)


def lenet_300_100(in_features: int = 784, num_classes: int = 10) -> nn.Module:
    """Build LeNet-300-100 (266,610 parameters for 28x28 inputs)."""
    return LeNet300100(in_features, num_classes)


def lenet5(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Module:
    """Build the Caffe LeNet-5 variant (431,080 parameters for 28x28 inputs)."""
    return LeNet5(in_channels, num_classes, image_size)


ZOO: dict[str, Callable[..., nn.Module]] = {"lenet_300_100": lenet_300_100, "lenet5": lenet5}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a zoo model by name, e.g. ``build_model("lenet5")``."""
    if name not in ZOO:
        raise ConfigError(f"unknown model {name!r}; the zoo has {sorted(ZOO)}")
    try:
        return ZOO[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {name!r}: bad arguments {kwargs}: {exc}") from None
