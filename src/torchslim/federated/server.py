"""What the server does with one round's replies: check every update, average the accepted
ones weighted by their clients' sample counts (FedAvg, McMahan et al. 2017), and keep the
global model as it was when none is accepted.

An update is checked completely before any of it is used, so a refused one never touches the
global model: each refusal is logged with its reason and reported in the round's outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from torchslim.errors import UpdateRejectedError
from torchslim.federated.codec import check_finite, check_names, check_shape, decode_update, update_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    """One client's reply as the server received it.

    Attributes:
        client: who sent it (a node id).
        examples: the sample count the client trained on, as it claimed it (checked here).
        wire_bytes: the reply's size as it crossed the network.
        payload: a compressed update (:func:`~torchslim.federated.codec.encode_update`), or
        arrays: an uncompressed one, name -> float32 delta.
        malformed: why the reply's records could not be read, if they could not.
    """

    client: int | str
    examples: object
    wire_bytes: int
    payload: bytes | None = None
    arrays: Mapping[str, np.ndarray] | None = None
    malformed: str | None = None


@dataclass
class RoundOutcome:
    """The new global state (the old tensors when nothing was accepted), the clients whose
    updates went into it, and the refused ones with the reason."""

    state: dict[str, torch.Tensor]
    accepted: list[int | str] = field(default_factory=list)
    rejected: dict[int | str, str] = field(default_factory=dict)


def default_limit(state: Mapping[str, torch.Tensor]) -> int:
    """The default size limit of one reply: twice the update's float32 bytes, plus 64 KiB."""
    return 2 * sum(state[k].numel() * 4 for k in update_names(state)) + 65536


def _dense(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    check_names(list(arrays), expected)
    out = {}
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.dtype != np.float32:
            raise UpdateRejectedError(f"tensor {name!r}: an uncompressed update must be float32 arrays")
        check_shape(name, a.shape, expected[name])
        t = torch.from_numpy(np.array(a))  # a copy the server owns
        check_finite(name, t)
        out[name] = t
    return out


def _examples(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise UpdateRejectedError(f"the client's sample count {value!r} is not a whole number from 1")
    return int(value)


def check_reply(
    reply: Reply, expected: Mapping[str, tuple[int, ...]], max_bytes: int
) -> tuple[dict[str, torch.Tensor], int]:
    """The update a reply carries (name -> float32 delta) and its weight, or an
    :class:`~torchslim.errors.UpdateRejectedError` saying why the server refuses it."""
    if reply.wire_bytes > max_bytes:
        raise UpdateRejectedError(f"oversized: a reply of {reply.wire_bytes} bytes is over the limit of {max_bytes}")
    if reply.malformed is not None:
        raise UpdateRejectedError(f"undecodable: the reply's records cannot be read ({reply.malformed})")
    weight = _examples(reply.examples)
    if reply.payload is not None:
        return decode_update(reply.payload, expected, max_bytes), weight
    if reply.arrays is not None:
        return _dense(reply.arrays, expected), weight
    raise UpdateRejectedError("the reply carries no update")


def fedavg(
    state: Mapping[str, torch.Tensor], updates: Sequence[tuple[Mapping[str, torch.Tensor], int]]
) -> dict[str, torch.Tensor]:
    """``state`` plus the average of the updates weighted by their sample counts, as new
    tensors (``state`` is not changed); entries no update carries are kept."""
    total = float(sum(w for _, w in updates))
    out = dict(state)
    for name in updates[0][0]:
        step = sum(d[name] * (w / total) for d, w in updates)
        out[name] = (state[name].to(torch.float32) + step).to(state[name].dtype)
    return out


def aggregate(
    state: Mapping[str, torch.Tensor], replies: Sequence[Reply], max_bytes: int, server_round: int = 0
) -> RoundOutcome:
    """Check each reply, log every refusal with its reason, and average the accepted updates
    into a new global state.

    Example:
        >>> outcome = aggregate(model.state_dict(), replies, max_bytes=1 << 20)  # doctest: +SKIP
        >>> outcome.rejected  # doctest: +SKIP
        {7: "tensor 'fc1.weight' holds 3 NaN or Inf values"}
    """
    expected = {k: tuple(state[k].shape) for k in update_names(state)}
    good, outcome = [], RoundOutcome(dict(state))
    for reply in replies:
        try:
            good.append(check_reply(reply, expected, max_bytes))
        except UpdateRejectedError as exc:
            log.warning("round %d: rejected the update of client %s: %s", server_round, reply.client, exc)
            outcome.rejected[reply.client] = str(exc)
            continue
        outcome.accepted.append(reply.client)
    if good:
        outcome.state = fedavg(state, good)
    return outcome
