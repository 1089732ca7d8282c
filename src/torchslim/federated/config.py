"""A federated run's settings and its record, round by round (no Flower needed to read either)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from torch import nn

from torchslim.errors import ConfigError
from torchslim.federated.codec import UpdateCodecConfig
from torchslim.train.fit import TrainConfig


@dataclass(frozen=True)
class FederatedConfig:
    """FedAvg rounds, each client's local training and update codec, and what the server accepts.

    Attributes:
        rounds: FedAvg rounds.
        local: each client's training in a round (epochs over its own data, learning rate);
            its seed is varied per client and round.
        codec: how clients compress their updates; ``None`` sends them uncompressed (float32
            arrays: plain FedAvg).
        fraction: fraction of the clients sampled for each round (at least one).
        round_timeout: seconds the server waits for a round's replies; a client that has not
            replied by then is left out of that round.
        max_update_bytes: the largest reply the server accepts; ``None``: twice the model's
            float32 bytes plus 64 KiB.
        seed: seeds the initial model and the local training.

    Example:
        >>> FederatedConfig(rounds=20, codec=UpdateCodecConfig(density=0.1)).codec.density
        0.1
    """

    rounds: int = 20
    local: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, lr=1e-3))
    codec: UpdateCodecConfig | None = field(default_factory=UpdateCodecConfig)
    fraction: float = 1.0
    round_timeout: float = 600.0
    max_update_bytes: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds!r}: use a whole number of rounds from 1")
        if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction={self.fraction!r}: use a fraction of the clients in (0, 1]")
        if not isinstance(self.round_timeout, (int, float)) or not math.isfinite(self.round_timeout):
            raise ConfigError(f"round_timeout={self.round_timeout!r}: use a number of seconds")
        if self.round_timeout <= 0:
            raise ConfigError(f"round_timeout={self.round_timeout!r}: use a positive number of seconds")
        if self.max_update_bytes is not None and (
            not isinstance(self.max_update_bytes, int) or self.max_update_bytes < 1
        ):
            raise ConfigError(f"max_update_bytes={self.max_update_bytes!r}: use a positive number of bytes or None")
        if not isinstance(self.local, TrainConfig):
            raise ConfigError(f"local={self.local!r}: use a torchslim TrainConfig")
        if self.codec is not None and not isinstance(self.codec, UpdateCodecConfig):
            raise ConfigError(f"codec={self.codec!r}: use an UpdateCodecConfig, or None for uncompressed updates")


@dataclass
class RoundRecord:
    """What happened in one round.

    Attributes:
        round: the round, from 1.
        sampled: clients sent the global model.
        replied: replies that carried an update.
        failed: clients that replied with an error (they dropped out mid-round) -> the error.
        missing: sampled clients with no reply by the round's timeout.
        accepted: updates averaged into the global model.
        rejected: client -> why the server refused its update.
        upload_bytes: bytes of every reply, as Flower serialises messages for its transport.
        download_bytes: bytes of the messages that sent the global model.
        seconds: wall time of the round, from sending to aggregating.
        accuracy: the global model's metric on the server's evaluation data after the round.
    """

    round: int
    sampled: int
    replied: int
    failed: dict[str, str]
    missing: int
    accepted: int
    rejected: dict[str, str]
    upload_bytes: int
    download_bytes: int
    seconds: float
    accuracy: float | None = None


@dataclass
class FederatedResult:
    """The final global model, the initial model's metric and every round's record."""

    model: nn.Module
    rounds: list[RoundRecord]
    initial_accuracy: float | None = None

    @property
    def upload_bytes(self) -> int:
        """Bytes uploaded by the clients over all rounds."""
        return sum(r.upload_bytes for r in self.rounds)

    @property
    def accuracy(self) -> float | None:
        """The final global model's metric on the server's evaluation data."""
        return self.rounds[-1].accuracy if self.rounds else self.initial_accuracy

    def summary(self) -> dict:
        """The record as JSON-ready data."""
        return {
            "initial_accuracy": self.initial_accuracy,
            "accuracy": self.accuracy,
            "upload_bytes": self.upload_bytes,
            "download_bytes": sum(r.download_bytes for r in self.rounds),
            "rounds": [asdict(r) for r in self.rounds],
        }
