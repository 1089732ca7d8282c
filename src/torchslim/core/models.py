"""The built-in model zoo: builder functions, one per architecture.

Builders are plain functions returning a freshly initialised ``nn.Module``; ``load`` uses
them (or a builder the caller passes) to rebuild a model from a ``.tslim`` file, so a file
never names code to import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


class MLP(nn.Module):
    """A ReLU MLP of ``depth`` hidden layers of ``width`` units, with optional dropout (as the
    teacher of Hinton et al.'s MNIST distillation experiment: 2 x 1200, dropout)."""

    def __init__(
        self, in_features: int = 784, width: int = 1200, depth: int = 2, num_classes: int = 10, dropout_percent: int = 0
    ) -> None:
        super().__init__()
        if not 0 <= dropout_percent < 100:
            raise ConfigError(f"dropout_percent={dropout_percent}: use a whole number from 0 to 99")
        sizes = [in_features] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.dropout = nn.Dropout(dropout_percent / 100)
        self.fc = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, in_features)
        for layer in self.hidden:
            x = self.dropout(torch.relu(layer(x)))  # (B, width)
        return self.fc(x)


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


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual add; a 1x1 conv-BN shortcut when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))  # (B, C_out, H / stride, W / stride)
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetMini(nn.Module):
    """A ResNet for 28x28 images: a stride-2 stem, three basic blocks (widths w, 2w, 4w), pooling.

    ``blocks`` < 3 keeps only the first blocks (a shallower student of the same family).

    Residual adds couple the stem with ``layer1.conv2`` and each block's ``conv2`` with its
    shortcut, so channels there can only be removed together.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, blocks: int = 3) -> None:
        super().__init__()
        if type(blocks) is not int or blocks not in (1, 2, 3):
            raise ConfigError(f"blocks={blocks!r}: resnet_mini has 1 to 3 blocks (the first ones are kept)")
        self.stem = nn.Conv2d(in_channels, width, 3, 2, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        stages = [(width, width, 1), (width, 2 * width, 2), (2 * width, 4 * width, 2)][:blocks]
        for i, (c_in, c_out, stride) in enumerate(stages, 1):
            self.add_module(f"layer{i}", BasicBlock(c_in, c_out, stride))
        self.blocks = blocks
        self.fc = nn.Linear(stages[-1][1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))  # (B, w, 14, 14) for 28x28 inputs
        for i in range(1, self.blocks + 1):
            x = getattr(self, f"layer{i}")(x)  # (B, 4w, 4, 4) after three blocks
        return self.fc(x.mean((2, 3)))  # (B, num_classes)


class SeparableBlock(nn.Module):
    """MobileNet's depthwise 3x3 conv-BN-ReLU followed by a pointwise 1x1 conv-BN-ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False)
        self.dw_bn = nn.BatchNorm2d(in_ch)
        self.pw = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw_bn(self.dw(x)))  # (B, C_in, H / stride, W / stride)
        return torch.relu(self.pw_bn(self.pw(x)))  # (B, C_out, H / stride, W / stride)


class MobileNetMini(nn.Module):
    """A MobileNet-style net for 28x28 images: a stride-2 stem and four depthwise separable blocks
    (``blocks`` < 4 keeps only the first ones)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, blocks: int = 4) -> None:
        super().__init__()
        if type(blocks) is not int or blocks not in (1, 2, 3, 4):
            raise ConfigError(f"blocks={blocks!r}: mobilenet_mini has 1 to 4 blocks (the first ones are kept)")
        self.stem = nn.Conv2d(in_channels, width, 3, 2, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        widths = [
            (width, 2 * width, 1),
            (2 * width, 4 * width, 2),
            (4 * width, 4 * width, 1),
            (4 * width, 8 * width, 2),
        ][:blocks]
        self.blocks = nn.Sequential(*(SeparableBlock(i, o, s) for i, o, s in widths))
        self.fc = nn.Linear(widths[-1][1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))  # (B, w, 14, 14) for 28x28 inputs
        x = self.blocks(x)  # (B, 8w, 4, 4) after four blocks
        return self.fc(x.mean((2, 3)))  # (B, num_classes)


class ConcatNet(nn.Module):
    """Inception- and DenseNet-style concatenations: branches joined with ``torch.cat``.

    ``mixed`` concatenates a 1x1 branch, a 1x1 -> 3x3 branch and a pool -> 1x1 branch; ``dense``
    concatenates its input with a 3x3 conv of it, so the stem's channels feed both.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 2 * width, 3, 2, 1)
        self.b1 = nn.Conv2d(2 * width, width, 1)
        self.b2_reduce = nn.Conv2d(2 * width, width, 1)
        self.b2 = nn.Conv2d(width, 2 * width, 3, 1, 1)
        self.b3 = nn.Conv2d(2 * width, width, 1)
        self.dense = nn.Conv2d(4 * width, 2 * width, 3, 1, 1)
        self.bn = nn.BatchNorm2d(6 * width)
        self.fc = nn.Linear(6 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))  # (B, 2w, 14, 14)
        pooled = torch.max_pool2d(x, 3, 1, 1)
        x = torch.cat([self.b1(x), self.b2(torch.relu(self.b2_reduce(x))), self.b3(pooled)], 1)  # (B, 4w, 14, 14)
        x = torch.relu(x)
        x = torch.cat([x, self.dense(x)], 1)  # (B, 6w, 14, 14)
        x = torch.relu(self.bn(torch.max_pool2d(x, 2)))  # (B, 6w, 7, 7)
        return self.fc(x.mean((2, 3)))


class RowRNN(nn.Module):
    """A sequence classifier that reads an image row by row with an LSTM or GRU."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(input_size, hidden_size, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1, 2) if x.dim() == 4 else x  # (B, rows, row_width): one row per time step
        out, _ = self.rnn(x)  # (B, rows, hidden)
        return self.fc(out[:, -1])  # (B, num_classes)


def lenet_300_100(in_features: int = 784, num_classes: int = 10) -> nn.Module:
    """Build LeNet-300-100 (266,610 parameters for 28x28 inputs)."""
    return LeNet300100(in_features, num_classes)


def mlp(
    in_features: int = 784, width: int = 1200, depth: int = 2, num_classes: int = 10, dropout_percent: int = 0
) -> nn.Module:
    """Build a ReLU MLP (``depth`` x ``width``; dropout after each hidden layer, in percent)."""
    return MLP(in_features, width, depth, num_classes, dropout_percent)


def lenet5(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Module:
    """Build the Caffe LeNet-5 variant (431,080 parameters for 28x28 inputs)."""
    return LeNet5(in_channels, num_classes, image_size)


def resnet_mini(in_channels: int = 1, num_classes: int = 10, width: int = 32, blocks: int = 3) -> nn.Module:
    """Build the residual CNN for 28x28 images (308,074 parameters at width 32, 3 blocks)."""
    return ResNetMini(in_channels, num_classes, width, blocks)


def mobilenet_mini(in_channels: int = 1, num_classes: int = 10, width: int = 32, blocks: int = 4) -> nn.Module:
    """Build the depthwise separable CNN for 28x28 images (the first ``blocks`` of its four blocks)."""
    return MobileNetMini(in_channels, num_classes, width, blocks)


def concat_net(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> nn.Module:
    """Build the CNN with Inception- and DenseNet-style concatenations."""
    return ConcatNet(in_channels, num_classes, width)


def lstm_classifier(input_size: int = 28, hidden_size: int = 128, num_classes: int = 10) -> nn.Module:
    """Build the row-by-row LSTM classifier for 28x28 images."""
    return RowRNN("lstm", input_size, hidden_size, num_classes)


def gru_classifier(input_size: int = 28, hidden_size: int = 128, num_classes: int = 10) -> nn.Module:
    """Build the row-by-row GRU classifier for 28x28 images."""
    return RowRNN("gru", input_size, hidden_size, num_classes)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "lenet_300_100": lenet_300_100,
    "lenet5": lenet5,
    "resnet_mini": resnet_mini,
    "mobilenet_mini": mobilenet_mini,
    "concat_net": concat_net,
    "lstm_classifier": lstm_classifier,
    "gru_classifier": gru_classifier,
    "mlp": mlp,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a zoo model by name, e.g. ``build_model("lenet5")``."""
    if name not in ZOO:
        raise ConfigError(f"unknown model {name!r}; the zoo has {sorted(ZOO)}")
    try:
        return ZOO[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {name!r}: bad arguments {kwargs}: {exc}") from None
