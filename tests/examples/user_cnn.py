"""A user's own CNN and map-style dataset, written as a user would, outside the torchslim package.

The images are 16x16 grayscale pictures of four shapes (horizontal bar, vertical bar, square
outline, diagonal) at random positions with noise, drawn from a seed per index so the
dataset needs no files.
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

SIZE = 16


class ShapesCNN(nn.Module):
    def __init__(self, width: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, classes)


def build(width: int = 8) -> nn.Module:
    return ShapesCNN(width)


class Shapes(Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = i % 4
        img = torch.randn(1, SIZE, SIZE, generator=g) * 0.3
        r, c = (int(v) for v in torch.randint(2, SIZE - 8, (2,), generator=g))
        if label == 0:
            img[0, r + 3, c : c + 7] += 2
        elif label == 1:
            img[0, r : r + 7, c + 3] += 2
        elif label == 2:
            img[0, r : r + 6, c : c + 6] += 2
            img[0, r + 1 : r + 5, c + 1 : c + 5] -= 2
        else:
            idx = torch.arange(7)
            img[0, r + idx, c + idx] += 2
        return img, label


def loaders(train: int = 512, eval: int = 256, batch_size: int = 32) -> dict:
    """What a recipe's data builder returns: the training and evaluation loaders."""
    g = torch.Generator().manual_seed(0)
    return {
        "train": DataLoader(Shapes(train, seed=0), batch_size=batch_size, shuffle=True, generator=g),
        "eval": DataLoader(Shapes(eval, seed=1), batch_size=64),
    }
