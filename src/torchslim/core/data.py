"""A model's data: :class:`Data` holds any loaders of batches and the task that reads them;
the built-in datasets are instances of it with seeded train / calibration / evaluation splits.

Fashion-MNIST is read from the gzip IDX files of Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``; override with ``TORCHSLIM_FASHION_MNIST``).
scikit-learn's 8x8 digits ship inside scikit-learn. Both are small enough to live in memory,
so each split is served by :class:`TensorBatches`, which indexes whole batches at once.
"""

from __future__ import annotations

import gzip
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, RandomSampler

from torchslim.core.device import model_device
from torchslim.core.task import Classification, Task, call_model, check_finite, move
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


class TensorBatches:
    """Batches of rows of equal-length in-memory tensors: what the built-in datasets are served
    as, and a quick way to hand torchslim tensors. Iterating gives ``tuple(t[rows])`` batches in
    order, or shuffled when ``shuffle`` (the order of :meth:`epoch` depends only on ``seed`` and
    the epoch's seed). Indexing whole batches at once avoids a per-sample collate.

    Example:
        >>> batches = TensorBatches((torch.zeros(10, 3), torch.arange(10)), batch_size=4)
        >>> [len(y) for _, y in batches]
        [4, 4, 2]
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int, *, shuffle: bool = False, seed: int = 0):
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise DataError(
                f"TensorBatches needs tensors with the same first dimension, got {[len(t) for t in tensors]}"
            )
        self.tensors, self.batch_size, self.shuffle, self.seed = tuple(tensors), batch_size, shuffle, seed

    @property
    def rows(self) -> int:
        """The number of samples."""
        return len(self.tensors[0])

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return (batch for batch, _ in self.epoch(0))

    def epoch(self, epoch_seed: int = 0) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        """``(batch, rows)`` pairs of one pass: ``rows`` are the batch's indices into the tensors
        (what per-sample caches, such as a teacher's logits, are keyed by)."""
        if not self.shuffle:
            for start in range(0, self.rows, self.batch_size):
                rows = torch.arange(start, min(start + self.batch_size, self.rows))
                yield tuple(t[start : start + self.batch_size] for t in self.tensors), rows
            return
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch_seed)
        for chunk in BatchSampler(RandomSampler(range(self.rows), generator=gen), self.batch_size, False):
            rows = torch.as_tensor(chunk)
            yield tuple(t[rows] for t in self.tensors), rows

    def subset(self, rows: torch.Tensor) -> TensorBatches:
        """The same batching over the samples ``rows``."""
        return TensorBatches(
            tuple(t[rows] for t in self.tensors), self.batch_size, shuffle=self.shuffle, seed=self.seed
        )


@dataclass(frozen=True)
class Data:
    """A model's data and what the model is for: training, evaluation and (optional)
    calibration batches, and the :class:`~torchslim.core.task.Task` that reads them.

    Each split is any re-iterable of batches: a ``torch.utils.data.DataLoader`` over a
    map-style or iterable dataset, a list, or :class:`TensorBatches`. Nothing here loads a
    split into memory; each pass iterates it again. Without ``calib``, calibration draws the
    first ``calib_batches`` training batches. ``spec`` is set for the built-in datasets (it
    says how to load them again, e.g. in a search worker).

    Example:
        >>> loader = torch.utils.data.DataLoader(my_dataset, batch_size=32, shuffle=True)  # doctest: +SKIP
        >>> data = Data(train=loader, eval=eval_loader, task=Regression())  # doctest: +SKIP
    """

    train: Iterable
    eval: Iterable
    calib: Iterable | None = None
    task: Task = field(default_factory=Classification)
    calib_batches: int = 16
    spec: DataSpec | None = None

    def __post_init__(self) -> None:
        for key in ("train", "eval", "calib"):
            value = getattr(self, key)
            if value is None and key == "calib":
                continue
            if not isinstance(value, Iterable):
                raise ConfigError(f"data.{key} is {type(value).__name__}: pass a DataLoader or an iterable of batches")
            if isinstance(value, Iterator):
                raise ConfigError(
                    f"data.{key} is an iterator ({type(value).__name__}), which runs out after one pass: wrap the "
                    "generator in a torch.utils.data.IterableDataset and pass DataLoader(dataset, batch_size=None)"
                )
        if not all(hasattr(self.task, a) for a in ("split", "loss", "score", "compare", "metric")):
            raise ConfigError(f"task {self.task!r} lacks the methods of torchslim.core.task.Task")

    @property
    def name(self) -> str:
        """The built-in dataset's name, or ``"user"``."""
        return self.spec.name if self.spec is not None else "user"

    def train_batches(self, epoch_seed: int = 0) -> Iterator[tuple[Any, torch.Tensor | None]]:
        """``(batch, rows)`` for one training pass; ``rows`` index the samples of an in-memory
        split (:class:`TensorBatches`, seeded by ``epoch_seed``) and are ``None`` otherwise."""
        if isinstance(self.train, TensorBatches):
            yield from self.train.epoch(epoch_seed)
            return
        sampler = getattr(self.train, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler and the like reshuffle per epoch
            sampler.set_epoch(epoch_seed)
        for batch in self.train:
            yield batch, None

    def train_steps(self) -> int | None:
        """Batches in one training pass, or ``None`` when the loader has no length."""
        try:
            return len(self.train)  # type: ignore[arg-type]
        except TypeError:
            return None

    def eval_loader(self) -> Iterable:
        """Evaluation batches."""
        return self.eval

    def calib_loader(self) -> Iterable:
        """Calibration batches: ``calib``, or the first ``calib_batches`` training batches."""
        if self.calib is not None:
            return self.calib
        return _FirstBatches(self.train, self.calib_batches)

    def example_batch(self) -> Any:
        """The first evaluation batch (e.g. for tracing, probing shapes or checking devices)."""
        for batch in self.eval:
            return batch
        raise DataError("the evaluation loader yielded no batches; give it at least one batch")

    def example_input(self, batch: int = 1) -> Any:
        """The model input of the first ``batch`` evaluation samples, e.g. for tracing or latency."""
        return take_rows(self.task.split(self.example_batch())[0], batch)

    def check(self, model: nn.Module) -> None:
        """Run ``model`` on the first batch of each split and raise a :class:`DataError` that
        says what to do when a split is empty, a batch has a structure the task cannot read,
        holds NaN or Inf, sits on a device other than the CPU or the model's, or has labels the
        model cannot predict. The verbs call this before any work."""
        device = model_device(model)
        if device.type == "meta":
            raise DataError("the model's parameters are on the meta device (no weights): load its weights first")
        for name, loader in (("train", self.train), ("eval", self.eval), ("calib", self.calib)):
            if loader is None:
                continue
            batch = next(iter(loader), None)
            if batch is None:
                raise DataError(f"the {name} loader yielded no batches: give it at least one batch")
            _check_batch(model, self.task, batch, f"the first {name} batch", device)


def _devices(batch: Any) -> set[torch.device]:
    if isinstance(batch, torch.Tensor):
        return {batch.device}
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    return set().union(*(_devices(v) for v in values)) if values else set()


def _check_batch(model: nn.Module, task: Task, batch: Any, where: str, device: torch.device) -> None:
    inputs, _ = task.split(batch)
    stray = {d for d in _devices(batch) if d.type != "cpu" and d != device}
    if stray:
        raise DataError(
            f"{where} is on {', '.join(sorted(map(str, stray)))} but the model is on {device}: yield CPU batches "
            "(torchslim moves each to the model's device) or move the model with device=..."
        )
    check_finite(batch, where)
    batch = move(batch, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = call_model(model, task.split(batch)[0])
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        kind = type(inputs).__name__
        raise DataError(
            f"the model fails on {where} (inputs: {kind}; {type(exc).__name__}: {exc}); a tuple is passed as "
            "positional arguments and a dict as keyword arguments: check the loader yields what the model takes"
        ) from exc
    finally:
        model.train(was_training)
    task.check(batch, output)
    probe = getattr(task, "check_model", None)  # a task that needs more than one output to check the model
    if probe is not None:
        model.eval()
        try:
            with torch.no_grad():
                probe(model, batch, output)
        finally:
            model.train(was_training)


class _FirstBatches:
    """The first ``count`` batches of a loader, re-iterable."""

    def __init__(self, source: Iterable, count: int) -> None:
        self.source, self.count = source, count

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.source), self.count)


def take_rows(inputs: Any, n: int, *, cycle: bool = False) -> Any:
    """The first ``n`` samples of a model input (a tensor, or tuples and dicts of them); with
    ``cycle``, an input of fewer samples is repeated up to ``n``."""
    if isinstance(inputs, torch.Tensor):
        if cycle and 0 < inputs.shape[0] < n:
            inputs = inputs.repeat(-(-n // inputs.shape[0]), *([1] * (inputs.dim() - 1)))
        return inputs[:n]
    if isinstance(inputs, Mapping):
        return {k: take_rows(v, n, cycle=cycle) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(take_rows(v, n, cycle=cycle) for v in inputs)
    return inputs


def batch_rows(inputs: Any) -> int:
    """Samples in a model input: the first dimension of its first tensor (0 when it holds none)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else ()
    for value in values:
        if rows := batch_rows(value):
            return rows
    return 0


def load_data(spec: DataSpec | None = None) -> Data:
    """Load a built-in dataset by its spec: shuffled training batches, evaluation and
    calibration batches in a fixed order, the classification task.

    Example:
        >>> data = load_data(DataSpec("digits"))
        >>> tuple(data.train.tensors[0].shape[1:])
        (1, 8, 8)
    """
    spec = spec or DataSpec()
    (train_x, train_y), (eval_x, eval_y), _classes = _BUILDERS[spec.name](spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    calib_idx = torch.randperm(len(train_x), generator=gen)[: spec.calib_size]
    return Data(
        train=TensorBatches((train_x, train_y), spec.batch_size, shuffle=True, seed=spec.seed),
        eval=TensorBatches((eval_x, eval_y), spec.eval_batch_size),
        calib=TensorBatches((train_x[calib_idx], train_y[calib_idx]), spec.eval_batch_size),
        task=Classification(),
        spec=spec,
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
