"""Federated training with compressed updates: clients send top-k, int8 or k-means updates
with error feedback, entropy-coded by the `.tslim` codecs; the server decodes and checks each
before FedAvg averages it; Flower runs the clients and the rounds.

The codec, the server's checks and the client partitions need only torch. The Flower names
(:func:`simulate`, :func:`client_app`, :class:`CompressedFedAvg`) import ``flwr`` and ``ray``
when first used (``pip install 'torchslim[federated]'``).

Example:
    >>> from torchslim.federated import DirichletClients, FederatedConfig, UpdateCodecConfig, simulate
    >>> clients = DirichletClients(ts.data.DataSpec("fashion_mnist", batch_size=32), count=10, alpha=0.5)
    >>> config = FederatedConfig(rounds=20, codec=UpdateCodecConfig(density=0.1, values="int8"))
    >>> result = simulate(ts.models.lenet_300_100, clients, config, eval_data=ts.data.fashion_mnist())  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from torchslim.federated.codec import UpdateCodecConfig, decode_update, encode_update, update_names
from torchslim.federated.config import FederatedConfig, FederatedResult, RoundRecord
from torchslim.federated.partition import ClientData, DirichletClients, dirichlet_split
from torchslim.federated.server import Reply, RoundOutcome, aggregate, check_reply, fedavg

_FLOWER = ("CompressedFedAvg", "client_app", "simulate", "train_client", "wire_bytes")
"""Names that live in :mod:`torchslim.federated.flower` and load Flower on first use."""

__all__ = [
    "ClientData",
    "CompressedFedAvg",
    "DirichletClients",
    "FederatedConfig",
    "FederatedResult",
    "Reply",
    "RoundOutcome",
    "RoundRecord",
    "UpdateCodecConfig",
    "aggregate",
    "check_reply",
    "client_app",
    "decode_update",
    "dirichlet_split",
    "encode_update",
    "fedavg",
    "simulate",
    "train_client",
    "update_names",
    "wire_bytes",
]


def __getattr__(name: str) -> Any:
    if name in _FLOWER:
        try:
            module = importlib.import_module("torchslim.federated.flower")
        except ModuleNotFoundError as exc:
            from torchslim.errors import ConfigError

            if (exc.name or "").split(".")[0] not in ("flwr", "ray"):
                raise

            raise ConfigError(
                f"torchslim.federated.{name} needs Flower ({exc.name} is missing): pip install 'torchslim[federated]'"
            ) from exc
        return getattr(module, name)
    raise AttributeError(f"module 'torchslim.federated' has no attribute {name!r}")
