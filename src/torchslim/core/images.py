"""Folders of images, one subfolder per class: the most common layout of a user's image data.

``ROOT/train/<class>/*.png`` with ``ROOT/val/<class>/...`` (or ``test`` / ``eval``), or simply
``ROOT/<class>/*`` split by a seeded draw. Images are read lazily with Pillow (already a
dependency through matplotlib), converted to RGB or grayscale, resized to ``size`` x ``size``
and normalised; nothing is held in memory beyond the batches in flight. Written here rather
than taken from torchvision because torchvision's wheels pin one torch build each, and this
needs only a directory walk and a resize.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from torchslim.core.data import Data
from torchslim.core.task import Classification
from torchslim.errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
EVAL_FOLDERS = ("val", "eval", "test")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageFolderSpec:
    """How to read an image folder.

    Attributes:
        root: the folder (see the module docstring for the layouts).
        size: images are resized to ``size`` x ``size``.
        channels: 3 (RGB) or 1 (grayscale).
        batch_size: training batch size; evaluation batches are the same size.
        eval_fraction: without a val/eval/test folder, this share of each class is held out.
        mean, std: per-channel normalisation after scaling to [0, 1] (default: ImageNet's, or
            0.5 / 0.5 for grayscale).
        workers: DataLoader worker processes (0 reads in the main process).
        seed: seeds the held-out draw and the shuffling.
    """

    root: str
    size: int = 224
    channels: int = 3
    batch_size: int = 32
    eval_fraction: float = 0.2
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    workers: int = 0
    seed: int = 0


class ImageFiles(Dataset):
    """``(image, label)`` samples from a list of files, read and resized on access."""

    def __init__(self, files: list[tuple[Path, int]], spec: ImageFolderSpec) -> None:
        self.files, self.spec = files, spec
        default = (IMAGENET_MEAN, IMAGENET_STD) if spec.channels == 3 else ((0.5,), (0.5,))
        mean, std = spec.mean or default[0], spec.std or default[1]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.files[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB" if self.spec.channels == 3 else "L")
                img = img.resize((self.spec.size, self.spec.size), Image.Resampling.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{path}: not a readable image ({exc}); remove it from the folder") from exc
        x = torch.from_numpy(pixels.reshape(self.spec.size, self.spec.size, -1)).permute(2, 0, 1)  # (C, H, W)
        return (x - self.mean) / self.std, label


def _scan(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    files = []
    for label, name in enumerate(classes):
        for dirpath, _dirs, names in sorted(os.walk(folder / name)):
            files += [(Path(dirpath) / n, label) for n in sorted(names) if n.lower().endswith(EXTENSIONS)]
    return files


def _classes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_folder(spec: ImageFolderSpec) -> Data:
    """Training and evaluation loaders over an image folder, for classification.

    Example:
        >>> data = image_folder(ImageFolderSpec("photos", size=64))  # doctest: +SKIP
    """
    root = Path(spec.root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    held = next((root / n for n in EVAL_FOLDERS if (root / n).is_dir()), None)
    if held is not None and (root / "train").is_dir():
        classes = _classes(root / "train")
        train, evaluation = _scan(root / "train", classes), _scan(held, classes)
    else:
        classes = _classes(root)
        train, evaluation = _split(_scan(root, classes), spec)
    if not classes or not train:
        raise DataError(
            f"image folder {root} has no images ({', '.join(EXTENSIONS)}) in class subfolders: lay it out as "
            f"{root}/<class>/<image> or {root}/train/<class>/<image> with {root}/val/<class>/<image>"
        )
    gen = torch.Generator().manual_seed(spec.seed)
    loader = {"batch_size": spec.batch_size, "num_workers": spec.workers}
    return Data(
        train=DataLoader(ImageFiles(train, spec), shuffle=True, generator=gen, **loader),
        eval=DataLoader(ImageFiles(evaluation or train, spec), **loader),
        task=Classification(),
    )


def _split(files: list[tuple[Path, int]], spec: ImageFolderSpec) -> tuple[list, list]:
    """A seeded ``eval_fraction`` of each class held out (at least one image where a class has two)."""
    gen = torch.Generator().manual_seed(spec.seed)
    train, held = [], []
    for label in sorted({lab for _, lab in files}):
        mine = [f for f in files if f[1] == label]
        order = torch.randperm(len(mine), generator=gen).tolist()
        cut = min(len(mine) - 1, max(1, round(spec.eval_fraction * len(mine)))) if len(mine) > 1 else 0
        held += [mine[i] for i in sorted(order[:cut])]
        train += [mine[i] for i in sorted(order[cut:])]
    return train, held
