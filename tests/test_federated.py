"""Federated updates: the codec round trip and error feedback, the server's checks (a refused
update is logged and leaves the global model as it was), bytes from Flower's serialisation, a
Dirichlet split, and a small Flower simulation with clients that drop out mid-round."""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from torchslim.artifact.codecs import encode_tensor, varints
from torchslim.core.data import Data, DataSpec, load_data
from torchslim.core.models import lenet_300_100
from torchslim.errors import ConfigError, DataError, TrainingError, UpdateRejectedError
from torchslim.federated import (
    DirichletClients,
    FederatedConfig,
    Reply,
    UpdateCodecConfig,
    aggregate,
    check_reply,
    decode_update,
    dirichlet_split,
    encode_update,
    fedavg,
    update_names,
)
from torchslim.federated.codec import MAGIC
from torchslim.train.fit import TrainConfig

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower reads it when imported: tests send no telemetry
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
DIGITS = DataSpec("digits", batch_size=32, eval_batch_size=256, calib_size=64)


def digits_model() -> torch.nn.Module:
    return lenet_300_100(in_features=64)


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in digits_model().state_dict().items()}


def shapes(state):
    return {k: tuple(state[k].shape) for k in update_names(state)}


def random_delta(state, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(state[k].shape, generator=gen) * 0.01 for k in update_names(state)}


def frame(items: list[tuple[str, torch.Tensor, float | None]]) -> bytes:
    """A payload written by hand as codec.py's docstring lays it out (a client that sends what it likes)."""
    entries, blobs = [], []
    for name, t, scale in items:
        coded = encode_tensor(t)
        entries.append({"name": name, **({"scale": scale} if scale is not None else {}), **coded.entry})
        blobs.append(coded.blob)
    manifest = zlib.compress(json.dumps({"version": 1, "tensors": entries}).encode())
    return MAGIC + varints(np.array([len(manifest)])) + manifest + b"".join(blobs)


# --- codec -------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["int8", "kmeans"])
def test_round_trip_sends_top_k_and_keeps_the_rest(state, values):
    delta = random_delta(state)
    config = UpdateCodecConfig(density=0.1, values=values, bits=3)
    payload, left = encode_update(delta, config)
    sent = decode_update(payload, shapes(state), max_bytes=1 << 22)
    assert payload[:4] == MAGIC and set(sent) == set(delta)
    for name, d in delta.items():
        assert sent[name].dtype == torch.float32 and sent[name].shape == d.shape
        assert int((sent[name] != 0).sum()) <= max(1, int(np.ceil(0.1 * d.numel())))
        assert torch.allclose(sent[name] + left[name], d, atol=1e-7)  # nothing lost: sent + residual
        if values == "kmeans":
            assert len(torch.unique(sent[name][sent[name] != 0])) <= 8
    big = "fc1.weight"  # the kept entries are the largest: every sent one beats every unsent one
    assert sent[big][sent[big] != 0].abs().min() >= delta[big][sent[big] == 0].abs().max() * 0.99 - 1e-4


def test_payload_is_a_fraction_of_float32(state):
    delta = random_delta(state)
    dense = sum(d.numel() * 4 for d in delta.values())
    small, _ = encode_update(delta, UpdateCodecConfig(density=0.05))
    large, _ = encode_update(delta, UpdateCodecConfig(density=0.25))
    assert dense / len(small) > 30 and dense / len(large) > 8 and len(small) < len(large)


def test_error_feedback_delivers_what_was_left_out(state):
    delta = random_delta(state)
    rounds, totals = 40, {}
    for feedback in (True, False):
        config = UpdateCodecConfig(density=0.05, error_feedback=feedback)
        residual, total = None, {k: torch.zeros_like(v) for k, v in delta.items()}
        for _ in range(rounds):
            payload, residual = encode_update(delta, config, residual)
            for k, v in decode_update(payload, shapes(state), 1 << 22).items():
                total[k] += v
        want = torch.cat([v.flatten() * rounds for v in delta.values()])
        got = torch.cat([total[k].flatten() for k in delta])
        totals[feedback] = float((got - want).norm() / want.norm())
        if feedback:  # what was sent plus what is left is everything the client had to send
            assert all(torch.allclose(total[k] + residual[k], delta[k] * rounds, atol=1e-5) for k in delta)
    assert totals[True] < 0.3 and totals[False] > 0.75  # without feedback the small entries never go


def test_a_diverged_client_does_not_send(state):
    delta = random_delta(state)
    delta["fc3.bias"][2] = float("inf")
    with pytest.raises(TrainingError, match="fc3.bias"):
        encode_update(delta, UpdateCodecConfig())


def test_codec_config_errors():
    for bad in ({"density": 0}, {"density": 1.5}, {"values": "fp4"}, {"bits": 9}, {"kmeans_iters": 0}):
        with pytest.raises(ConfigError):
            UpdateCodecConfig(**bad)
    for bad in ({"rounds": 0}, {"fraction": 0.0}, {"round_timeout": -1}, {"max_update_bytes": 0}, {"codec": "int8"}):
        with pytest.raises(ConfigError):
            FederatedConfig(**bad)


# --- the server's checks -------------------------------------------------------------------


def bad_payloads(state):
    good, _ = encode_update(random_delta(state), UpdateCodecConfig(density=0.1))
    items = [(k, random_delta(state)[k], None) for k in update_names(state)]
    nan = [
        (k, t.clone().index_fill_(0, torch.tensor([0]), float("nan")) if k == "fc2.bias" else t, s) for k, t, s in items
    ]
    wrong = random_delta(state) | {"fc1.weight": torch.randn(300, 63)}
    ones = [(k, torch.ones(state[k].shape, dtype=torch.int8)) for k in shapes(state)]
    return {
        "nan": (frame(nan), "NaN"),
        "wrong shape": (encode_update(wrong, UpdateCodecConfig())[0], "shape"),
        "missing tensor": (frame(items[1:]), "wrong tensors"),
        "nan scale": (frame([(k, t, float("nan")) for k, t in ones]), "undecodable"),  # not even JSON
        "negative scale": (frame([(k, t, -0.5) for k, t in ones]), "scale"),
        "garbage": (bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "undecodable"),
        "truncated": (good[: len(good) // 2], "undecodable"),
        "oversized": (good + b"\0" * 100, "oversized"),
    }


def test_bad_updates_are_rejected_with_a_logged_reason_and_leave_the_model_untouched(state, caplog):
    before = {k: v.clone() for k, v in state.items()}
    good_payload, _ = encode_update(random_delta(state, seed=7), UpdateCodecConfig(density=0.1))
    good = Reply("good", 40, len(good_payload), payload=good_payload)
    expected_alone = fedavg(state, [(decode_update(good_payload, shapes(state), 1 << 22), 40)])
    limit = len(good_payload) + 50
    for case, (payload, reason) in bad_payloads(state).items():
        bad = Reply("bad", 60, len(payload), payload=payload)
        cap = limit if case == "oversized" else 10**6
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="torchslim.federated.server"):
            outcome = aggregate(state, [bad], max_bytes=cap)
        assert outcome.accepted == [] and reason in outcome.rejected["bad"], case
        assert any("rejected the update of client bad" in r.message and reason in r.message for r in caplog.records)
        assert all(torch.equal(outcome.state[k], before[k]) for k in before), case
        mixed = aggregate(state, [bad, good], max_bytes=cap)
        assert mixed.accepted == ["good"] and list(mixed.rejected) == ["bad"], case
        assert all(torch.equal(mixed.state[k], expected_alone[k]) for k in before), case
    assert all(torch.equal(state[k], before[k]) for k in before)  # the caller's state never changed


def test_uncompressed_updates_are_checked_too(state):
    arrays = {k: v.numpy() for k, v in random_delta(state).items()}
    cases = {
        "NaN": arrays | {"fc3.bias": np.full(10, np.nan, dtype=np.float32)},
        "shape": arrays | {"fc3.bias": np.zeros(11, dtype=np.float32)},
        "float32": arrays | {"fc3.bias": np.zeros(10, dtype=np.float64)},
        "wrong tensors": {k: v for k, v in arrays.items() if k != "fc3.bias"},
    }
    for reason, bad in cases.items():
        outcome = aggregate(state, [Reply(3, 10, 1000, arrays=bad)], max_bytes=10**7)
        assert outcome.accepted == [] and reason in outcome.rejected[3]
        assert all(torch.equal(outcome.state[k], state[k]) for k in state)
    for claimed in (0, -5, 2.5, True, "many"):
        with pytest.raises(UpdateRejectedError, match="sample count"):
            check_reply(Reply(3, claimed, 1000, arrays=arrays), shapes(state), 10**7)


def test_fedavg_weights_by_sample_count(state):
    a = {k: torch.ones_like(state[k]) for k in update_names(state)}
    b = {k: torch.full_like(state[k], 5.0) for k in update_names(state)}
    new = fedavg(state, [(a, 1), (b, 3)])
    for k in update_names(state):
        assert torch.allclose(new[k], state[k] + 4.0)
    assert new is not state and not any(new[k] is state[k] for k in update_names(state))


# --- Dirichlet split ------------------------------------------------------------------------


def test_dirichlet_split_is_a_seeded_skewed_partition():
    labels = torch.arange(6000) % 10
    parts = dirichlet_split(labels, clients=10, alpha=0.5, seed=3, min_size=50)
    assert sorted(torch.cat(parts).tolist()) == list(range(6000))
    assert all(len(p) >= 50 for p in parts)
    assert [p.tolist() for p in parts] == [p.tolist() for p in dirichlet_split(labels, 10, 0.5, seed=3, min_size=50)]
    top_share = [float(torch.bincount(labels[p], minlength=10).max()) / len(p) for p in parts]
    assert max(top_share) > 0.3  # IID would give every client about 0.1 of each class
    iid = dirichlet_split(labels, clients=10, alpha=1000.0, seed=3)
    assert max(float(torch.bincount(labels[p], minlength=10).max()) / len(p) for p in iid) < 0.2
    with pytest.raises(ConfigError):
        dirichlet_split(labels, clients=10, alpha=0.0)
    with pytest.raises(DataError):
        dirichlet_split(labels[:30], clients=10, alpha=0.5, min_size=10)


def test_dirichlet_clients_load_their_own_rows():
    clients = DirichletClients(DIGITS, count=5, alpha=0.5, rows=600)
    parts = clients.parts()
    assert sum(len(p) for p in parts) == 600
    data = clients(2)
    assert data.train.rows == len(parts[2])
    full = load_data(DIGITS).train.tensors[0]
    assert torch.equal(data.train.tensors[0], full[parts[2]])
    with pytest.raises(ConfigError):
        clients(5)


# --- Flower ---------------------------------------------------------------------------------


@pytest.fixture
def flower_task(monkeypatch):
    """The identity Flower gives a ServerApp's process in a run (messages are stamped with it)."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, key, value)


def flower_reply(content, node: int = 5):
    from flwr.app import Message, RecordDict

    ins = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(content, reply_to=ins)


class NodesOnly:
    """The part of a Flower Grid that sampling reads."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_strategy_counts_wire_bytes_and_rejects_before_averaging(state, caplog, flower_task):
    from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

    from torchslim.federated import CompressedFedAvg, wire_bytes

    payload, _ = encode_update(random_delta(state), UpdateCodecConfig(density=0.05))
    good = flower_reply(
        RecordDict({"update": ConfigRecord({"payload": payload}), "metrics": MetricRecord({"num-examples": 8})}), 5
    )
    nan = {k: v.clone() for k, v in random_delta(state).items()}
    nan["fc1.weight"][0, 0] = float("nan")
    poisoned = flower_reply(RecordDict({"arrays": ArrayRecord(nan), "metrics": MetricRecord({"num-examples": 8})}), 6)
    dense = flower_reply(
        RecordDict({"arrays": ArrayRecord(random_delta(state)), "metrics": MetricRecord({"num-examples": 8})}), 7
    )
    dropped = Message(
        Error(code=0, reason="client vanished"), reply_to=Message(RecordDict(), dst_node_id=8, message_type="train")
    )
    float_bytes = sum(state[k].numel() * 4 for k in update_names(state))
    assert len(payload) < wire_bytes(good) < len(payload) + 1024  # the payload plus a few hundred bytes of message
    assert float_bytes < wire_bytes(dense) < float_bytes * 1.02

    strategy = CompressedFedAvg(FederatedConfig(), clients=4)
    sent = list(strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), NodesOnly([5, 6, 7, 8])))
    assert len(sent) == 4 and all(torch.equal(strategy.state[k], state[k]) for k in state)
    with caplog.at_level(logging.WARNING, logger="torchslim.federated.server"):
        arrays, _ = strategy.aggregate_train(1, [good, poisoned, dropped])
    record = strategy.rounds[-1]
    assert (record.accepted, list(record.rejected), list(record.failed), record.missing) == (1, ["6"], ["8"], 1)
    assert "NaN" in record.rejected["6"] and any("client 6" in r.message for r in caplog.records)
    assert record.upload_bytes == wire_bytes(good) + wire_bytes(poisoned) + wire_bytes(dropped)
    want = fedavg(state, [(decode_update(payload, shapes(state), 1 << 22), 8)])
    got = arrays.to_torch_state_dict()
    assert all(torch.equal(got[k], want[k]) for k in state)

    list(strategy.configure_train(2, ArrayRecord(state), ConfigRecord(), NodesOnly([5, 6, 7, 8])))
    odd = RecordDict({"arrays": ConfigRecord({"fc1.weight": 1.0}), "metrics": MetricRecord({"num-examples": 8})})
    assert strategy.aggregate_train(2, [poisoned, flower_reply(odd, 7)]) == (None, None)  # Flower keeps the old model
    assert "undecodable" in strategy.rounds[-1].rejected["7"]
    assert all(torch.equal(strategy.state[k], state[k]) for k in state)


@dataclass(frozen=True)
class FlakyClients:
    """Digits clients, one of which loses its connection mid-training every round and one of
    which goes silent for longer than the round's timeout (in its first round only)."""

    base: DirichletClients
    drop: int
    hang: int
    hang_seconds: float
    marker: str

    @property
    def count(self) -> int:
        return self.base.count

    def __call__(self, client: int) -> Data:
        data = self.base(client)
        if client == self.drop:
            return Data(train=DropsMidway(data.train), eval=[], task=data.task)
        if client == self.hang and not Path(self.marker).exists():
            Path(self.marker).touch()
            time.sleep(self.hang_seconds)
        return data


@dataclass(frozen=True)
class DropsMidway:
    batches: object

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == 1:
                raise ConnectionError("the client lost its connection mid-round")
            yield batch


def test_simulation_survives_clients_that_drop_out(tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    from torchslim.federated import simulate

    monkeypatch.setenv("HOME", str(tmp_path))  # ray and flwr write under $HOME
    timeout = 20.0
    clients = FlakyClients(
        DirichletClients(DIGITS, count=4, alpha=0.5, rows=800), 0, 1, timeout + 1, str(tmp_path / "hung")
    )
    config = FederatedConfig(
        rounds=2, local=TrainConfig(epochs=1, lr=3e-3), codec=UpdateCodecConfig(density=0.1), round_timeout=timeout
    )
    result = simulate(digits_model, clients, config, eval_data=load_data(DIGITS), num_cpus=2)
    first, second = result.rounds
    assert (first.sampled, first.accepted, first.missing, len(first.failed)) == (4, 2, 1, 1)
    assert first.seconds < timeout + 2  # the round did not wait for the silent client
    assert "lost its connection" in next(iter(first.failed.values()))
    assert (second.accepted, second.missing, len(second.failed)) == (3, 0, 1)
    float_bytes = sum(v.numel() * 4 for v in digits_model().state_dict().values())
    assert 0 < second.upload_bytes < float_bytes / 3  # three compressed updates and an error, under 1/3 of one model
    assert result.accuracy > result.initial_accuracy + 0.2
