"""Client datasets for a federated run: a dataset's training split divided among clients by a
Dirichlet draw over the labels (Hsu, Qi and Brown 2019), the usual way to make clients
non-IID: each class is split among the clients in proportions drawn from
``Dirichlet(alpha, ..., alpha)``, so a small ``alpha`` gives each client a few dominant classes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from torchslim.core.data import Data, DataSpec, TensorBatches, load_data
from torchslim.errors import ConfigError, DataError

_DRAWS = 100
"""Dirichlet draws tried before giving up on giving every client ``min_size`` samples."""


class ClientData(Protocol):
    """What a federated run needs of its clients' data: how many clients there are, and each
    client's :class:`~torchslim.core.data.Data` by its index (only ``train`` is used). It is
    sent to the processes that run the clients, so it must pickle (a frozen dataclass that
    loads its data when called does)."""

    count: int

    def __call__(self, client: int) -> Data: ...


def dirichlet_split(
    labels: torch.Tensor, clients: int, alpha: float, seed: int = 0, min_size: int = 1
) -> list[torch.Tensor]:
    """Each client's sample indices (sorted): every class's samples, shuffled, are cut among the
    clients in proportions drawn from ``Dirichlet(alpha)``; draws again until every client has
    at least ``min_size`` samples.

    Example:
        >>> parts = dirichlet_split(torch.arange(1000) % 10, clients=5, alpha=0.5)
        >>> sum(len(p) for p in parts)
        1000
    """
    if not isinstance(clients, int) or clients < 1:
        raise ConfigError(f"clients={clients!r}: use a whole number of clients from 1")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"alpha={alpha!r}: use a positive Dirichlet concentration such as 0.5")
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    for _ in range(_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, float(alpha))))[:-1] * len(idx)).astype(np.int64)
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return [torch.from_numpy(p) for p in out]
    raise DataError(
        f"{_DRAWS} Dirichlet draws (alpha={alpha}) all left a client with fewer than {min_size} of "
        f"{len(y)} samples: use fewer clients, a larger alpha or more data"
    )


@functools.lru_cache(maxsize=4)
def _load(spec: DataSpec) -> Data:
    return load_data(spec)


@dataclass(frozen=True)
class DirichletClients:
    """A built-in dataset's training split divided among ``count`` clients by a Dirichlet label
    draw (:func:`dirichlet_split`); calling it with a client's index gives that client's data,
    shuffled batches of ``spec.batch_size``. Each process loads the dataset from disk once.

    Attributes:
        spec: the built-in dataset.
        count: number of clients.
        alpha: Dirichlet concentration (0.5: strongly skewed labels; large: nearly IID).
        seed: seeds the draw and the clients' shuffles.
        rows: use only this many training samples (a seeded subset), for quick runs.
        min_size: every client gets at least this many samples.

    Example:
        >>> clients = DirichletClients(DataSpec("digits"), count=5, alpha=0.5)
        >>> clients(0).train.rows > 0
        True
    """

    spec: DataSpec = field(default_factory=DataSpec)
    count: int = 10
    alpha: float = 0.5
    seed: int = 0
    rows: int | None = None
    min_size: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"count={self.count!r}: use a whole number of clients from 1")
        if self.rows is not None and (not isinstance(self.rows, int) or self.rows < self.count * self.min_size):
            raise ConfigError(f"rows={self.rows!r}: give at least min_size={self.min_size} samples per client")

    def parts(self) -> list[torch.Tensor]:
        """Each client's row indices into the dataset's training split."""
        return _parts(self)

    def __call__(self, client: int) -> Data:
        if not isinstance(client, int) or not 0 <= client < self.count:
            raise ConfigError(f"client {client!r}: the clients are numbered 0 to {self.count - 1}")
        data = _load(self.spec)
        rows = self.parts()[client]
        tensors = tuple(t[rows] for t in data.train.tensors)
        train = TensorBatches(tensors, self.spec.batch_size, shuffle=True, seed=self.seed * 1009 + client)
        return Data(train=train, eval=[], task=data.task)


@functools.lru_cache(maxsize=4)
def _parts(clients: DirichletClients) -> list[torch.Tensor]:
    labels = _load(clients.spec).train.tensors[1]
    chosen = torch.arange(len(labels))
    if clients.rows is not None and clients.rows < len(labels):
        gen = torch.Generator().manual_seed(clients.seed)
        chosen = torch.randperm(len(labels), generator=gen)[: clients.rows].sort().values
    parts = dirichlet_split(labels[chosen], clients.count, clients.alpha, clients.seed, clients.min_size)
    return [chosen[p] for p in parts]
