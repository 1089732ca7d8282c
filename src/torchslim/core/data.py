"""Built-in datasets with seeded train / calibration / evaluation splits.

Fashion-MNIST is read from the gzip IDX files of Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``; override with ``TORCHSLIM_FASHION_MNIST``).
scikit-learn's 8x8 digits ship inside scikit-learn. Both are small enough to live in memory,
so each split is a ``TensorDataset`` served by a ``DataLoader`` that indexes whole batches
at once (no per-sample collate).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from torchslim.errors import ConfigError, DataError, DatasetNotFoundError

FASHION_MNIST_ENV = "TORCHSLIM_FASHION_MNIST"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "eval_x": "t10k-images-idx3-ubyte.gz",
    "eval_y": "t10k-labels-idx1-ubyte.gz",
}


@dataclass(frozen=True)
class DataSpec:
    """Which built-in dataset, and how it is split and batched.

    Attributes:
        name: ``"fashion_mnist"`` or ``"digits"``.
        batch_size: training batch size.
        eval_batch_size: batch size for evaluation and calibration.
        calib_size: number of training samples drawn (seeded) for calibration.
        seed: seed for the calibration draw, the digits split and training shuffles.
    """

    name: str = "fashion_mnist"
    batch_size: int = 128
    eval_batch_size: int = 1000
    calib_size: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in _BUILDERS:
            raise ConfigError(f"unknown dataset {self.name!r}; built-in datasets: {sorted(_BUILDERS)}")
        for key in ("batch_size", "eval_batch_size", "calib_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be at least 1")


@dataclass(frozen=True)
class Data:
    """The three splits of one dataset, as in-memory tensors, plus how to batch them."""

    spec: DataSpec
    train: TensorDataset
    calib: TensorDataset
    eval: TensorDataset
    num_classes: int

    def train_loader(self, epoch_seed: int = 0) -> DataLoader:
        """Shuffled training batches; the order depends only on ``spec.seed`` and ``epoch_seed``."""
        return DataLoader(self.train, sampler=self._train_sampler(epoch_seed), batch_size=None)

    def train_batches(self, epoch_seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of :meth:`train_loader` with their rows in the training split:
        ``(x, y, indices)`` (what per-sample caches, such as a teacher's logits, are keyed by)."""
        x, y = self.train.tensors
        for rows in self._train_sampler(epoch_seed):
            idx = torch.as_tensor(rows)
            yield x[idx], y[idx], idx

    def _train_sampler(self, epoch_seed: int) -> BatchSampler:
        gen = torch.Generator().manual_seed(self.spec.seed * 100_003 + epoch_seed)
        return BatchSampler(RandomSampler(self.train, generator=gen), self.spec.batch_size, False)

    def eval_loader(self) -> DataLoader:
        """Evaluation batches in file order."""
        return _ordered(self.eval, self.spec.eval_batch_size)

    def calib_loader(self) -> DataLoader:
        """Calibration batches (a seeded subset of the training set) in a fixed order."""
        return _ordered(self.calib, self.spec.eval_batch_size)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """The first ``batch`` evaluation inputs, e.g. for tracing or latency."""
        return self.eval.tensors[0][:batch]


def _ordered(ds: TensorDataset, batch_size: int) -> DataLoader:
    return DataLoader(ds, sampler=BatchSampler(SequentialSampler(ds), batch_size, False), batch_size=None)


def load_data(spec: DataSpec | None = None) -> Data:
    """Load a built-in dataset by its spec.

    Example:
        >>> data = load_data(DataSpec("digits"))
        >>> tuple(data.train.tensors[0].shape[1:])
        (1, 8, 8)
    """
    spec = spec or DataSpec()
    (train_x, train_y), (eval_x, eval_y), num_classes = _BUILDERS[spec.name](spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    calib_idx = torch.randperm(len(train_x), generator=gen)[: spec.calib_size]
    return Data(
        spec,
        TensorDataset(train_x, train_y),
        TensorDataset(train_x[calib_idx], train_y[calib_idx]),
        TensorDataset(eval_x, eval_y),
        num_classes,
    )


def fashion_mnist(**spec: object) -> Data:
    """Fashion-MNIST: 60k train / 10k test, (N, 1, 28, 28) normalised with mean 0.2860, std 0.3530."""
    return load_data(DataSpec("fashion_mnist", **spec))  # type: ignore[arg-type]


def digits(**spec: object) -> Data:
    """scikit-learn's digits: 1797 images (N, 1, 8, 8), seeded 80 / 20 split."""
    return load_data(DataSpec("digits", **spec))  # type: ignore[arg-type]


def fashion_mnist_dir() -> Path:
    """Where the Fashion-MNIST IDX files are read from."""
    return Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DIR))


def _read_idx(path: Path) -> np.ndarray:
    """Read one gzip IDX file (big-endian header: magic, then one uint32 per dimension)."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip IDX file ({exc}); reinstall dataset-fashion-mnist") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims.tolist()} but holds {body.size} bytes; file truncated?")
    return body.reshape(dims)


def _fashion_mnist(seed: int):
    root = fashion_mnist_dir()
    missing = [name for name in _FASHION_FILES.values() if not (root / name).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}). Install it with "
            f"'apt-get install -y dataset-fashion-mnist', or point {FASHION_MNIST_ENV} at a "
            "folder holding the four gzip IDX files."
        )
    arrays = {key: _read_idx(root / name) for key, name in _FASHION_FILES.items()}

    def images(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)  # (N, 1, 28, 28)
        return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    train = images(arrays["train_x"]), labels(arrays["train_y"])
    evaluation = images(arrays["eval_x"]), labels(arrays["eval_y"])
    return train, evaluation, 10


def _digits(seed: int):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    train, evaluation = perm[:cut], perm[cut:]
    return (x[train], y[train]), (x[evaluation], y[evaluation]), 10


_BUILDERS = {"fashion_mnist": _fashion_mnist, "digits": _digits}
