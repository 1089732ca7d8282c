"""Flower glue: a ClientApp that trains locally and replies with a compressed update, a FedAvg
strategy whose server decodes and checks every update before averaging it, and
:func:`simulate`, which runs both in Flower's simulation engine.

Flower's simulation runs each client's ClientApp in a Ray actor (a process; as many at once as
the CPUs allow, ``client_threads`` CPUs each) and the ServerApp in a thread of the caller's
process. Messages carry the global model as Flower arrays (NumPy ``.npy`` bytes, no pickle)
and each update as the bytes of :func:`~torchslim.federated.codec.encode_update` (or, without
a codec, float32 arrays); their sizes are those of Flower's own serialisation of each message
for its transport. A client's error-feedback residual lives in its Flower ``Context.state``,
which the simulation keeps from round to round.

This module imports Flower and Ray; ``torchslim.federated`` loads it only when one of its
names is used.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

import ray
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from torch import nn

from torchslim.core.data import Data, TensorBatches, batch_rows
from torchslim.errors import ConfigError, TrainingError
from torchslim.evaluate.metrics import evaluate
from torchslim.federated.codec import encode_update, update_names
from torchslim.federated.config import FederatedConfig, FederatedResult, RoundRecord
from torchslim.federated.partition import ClientData
from torchslim.federated.server import Reply, aggregate, default_limit
from torchslim.train.fit import fit

log = logging.getLogger(__name__)

Builder = Callable[[], nn.Module]
RESIDUAL = "torchslim.residual"
"""The key of a client's error-feedback residual in its Flower context state."""
UPDATE, PAYLOAD, ARRAYS, METRICS, CONFIG = "update", "payload", "arrays", "metrics", "config"
EXAMPLES = "num-examples"


def wire_bytes(message: Message) -> int:
    """A message's bytes as Flower ships them: every object of its tree (the message, its
    record dict, each record, each array chunk) serialised."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def _examples(data: Data) -> int:
    if isinstance(data.train, TensorBatches):
        return data.train.rows
    return sum(batch_rows(data.task.split(batch)[0]) for batch in data.train)


def _residual(context: Context) -> dict[str, torch.Tensor] | None:
    record = context.state.get(RESIDUAL)
    return None if record is None else dict(record.to_torch_state_dict())


def train_client(
    msg: Message, context: Context, build: Builder, clients: ClientData, config: FederatedConfig
) -> Message:
    """One client's round: load the global model, train on the client's data, reply with the
    change (compressed by ``config.codec``, its residual kept in the context)."""
    client = int(context.node_config["partition-id"])
    server_round = int(msg.content[CONFIG]["server-round"])
    start = msg.content[ARRAYS].to_torch_state_dict()
    model = build()
    model.load_state_dict(start)
    data = clients(client)
    local = replace(config.local, seed=config.seed * 1_000_003 + server_round * 1009 + client)
    losses = fit(model, data, local)
    trained = model.state_dict()
    delta = {k: trained[k].detach().float() - start[k].float() for k in update_names(start)}
    metrics = MetricRecord({EXAMPLES: _examples(data), "train-loss": float(losses[-1]) if losses else 0.0})
    if config.codec is None:
        return Message(RecordDict({ARRAYS: ArrayRecord(delta), METRICS: metrics}), reply_to=msg)
    payload, left = encode_update(delta, config.codec, _residual(context))
    context.state[RESIDUAL] = ArrayRecord(left)
    return Message(RecordDict({UPDATE: ConfigRecord({PAYLOAD: payload}), METRICS: metrics}), reply_to=msg)


def client_app(build: Builder, clients: ClientData, config: FederatedConfig, threads: int = 1) -> ClientApp:
    """The ClientApp of a run: each message trains one client (:func:`train_client`) on
    ``threads`` torch threads."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        return train_client(msg, context, build, clients, config)

    return app


def _reply(msg: Message) -> Reply:
    """What a reply carries, read without trusting its layout (a malformed one becomes a
    reply the server refuses, with the reason)."""
    size = wire_bytes(msg)
    try:
        content = msg.content
        examples = content[METRICS].get(EXAMPLES) if METRICS in content else None
        payload = content[UPDATE].get(PAYLOAD) if UPDATE in content else None
        arrays = {k: v.numpy() for k, v in content[ARRAYS].items()} if ARRAYS in content else None
    except (AttributeError, TypeError, ValueError, KeyError, EOFError, OSError) as exc:
        return Reply(msg.metadata.src_node_id, None, size, malformed=f"{type(exc).__name__}: {exc}")
    return Reply(msg.metadata.src_node_id, examples, size, payload if isinstance(payload, bytes) else None, arrays)


def _reason(msg: Message) -> str:
    lines = [line.strip() for line in msg.error.reason.splitlines() if line.strip()]
    return (lines[-1] if lines else f"error code {msg.error.code}")[:300]


class CompressedFedAvg(FedAvg):
    """FedAvg whose server decodes and checks each client's update before averaging it.

    Flower's strategies are classes run by a template method (``start``: sample, send,
    wait with a timeout, aggregate, evaluate); this one replaces the two steps that touch the
    model, so sampling, timeouts and the round loop stay Flower's. Each round waits until
    ``clients`` clients are connected and samples ``config.fraction`` of them. ``state`` is the
    global model; ``rounds`` records each round. A round in which no update is accepted leaves
    the global model as it was.
    """

    def __init__(self, config: FederatedConfig, clients: int) -> None:
        sampled = max(1, math.ceil(config.fraction * clients))  # also while clients are still connecting
        super().__init__(
            fraction_train=config.fraction,
            fraction_evaluate=0.0,
            min_train_nodes=sampled,
            min_available_nodes=clients,
        )
        self.max_update_bytes = config.max_update_bytes
        self.state: dict[str, torch.Tensor] = {}
        self.rounds: list[RoundRecord] = []
        self._sent: tuple[int, int, float] = (0, 0, 0.0)  # messages, bytes, start time

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.state = dict(arrays.to_torch_state_dict())
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = (len(messages), sum(wire_bytes(m) for m in messages), time.perf_counter())
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        errors = [m for m in replies if m.has_error()]
        received = [_reply(m) for m in replies if not m.has_error()]
        limit = self.max_update_bytes or default_limit(self.state)
        outcome = aggregate(self.state, received, limit, server_round)
        sampled, download, started = self._sent
        record = RoundRecord(
            round=server_round,
            sampled=sampled,
            replied=len(received),
            failed={str(m.metadata.src_node_id): _reason(m) for m in errors},
            missing=sampled - len(replies),
            accepted=len(outcome.accepted),
            rejected={str(k): v for k, v in outcome.rejected.items()},
            upload_bytes=sum(wire_bytes(m) for m in replies),
            download_bytes=download,
            seconds=time.perf_counter() - started,
        )
        self.rounds.append(record)
        log.info("round %d: %s", server_round, record)
        if not outcome.accepted:
            return None, None
        self.state = outcome.state
        metrics = {"accepted": record.accepted, "rejected": len(record.rejected), "upload-bytes": record.upload_bytes}
        return ArrayRecord(self.state), MetricRecord(metrics)


def _evaluator(build: Builder, data: Data, strategy: CompressedFedAvg, initial: list[float]):
    model = build()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        score = evaluate(model, data.eval_loader(), data.task)
        if server_round == 0:
            initial.append(score)
        elif strategy.rounds and strategy.rounds[-1].round == server_round:
            strategy.rounds[-1].accuracy = score
        return MetricRecord({"accuracy": score})

    return evaluate_fn


def simulate(
    build: Builder,
    clients: ClientData,
    config: FederatedConfig,
    *,
    eval_data: Data | None = None,
    client_threads: int = 1,
    num_cpus: int | None = None,
) -> FederatedResult:
    """Train ``build()``'s model with FedAvg over ``clients`` in Flower's simulation engine.

    Args:
        build: makes the model (the same architecture on the server and every client); the
            initial global model is ``build()`` under ``torch.manual_seed(config.seed)``.
        clients: the clients' data (e.g. :class:`~torchslim.federated.partition.DirichletClients`);
            it and ``build`` are sent to the client processes, so both must pickle.
        config: rounds, local training, update codec, timeout and size limit.
        eval_data: the server evaluates the global model on ``eval_data.eval`` before the
            first round and after each.
        client_threads: CPUs (and torch threads) per simulated client.
        num_cpus: CPUs Ray may use (default: all); ``num_cpus // client_threads`` clients
            train at once.

    Example:
        >>> clients = DirichletClients(DataSpec("fashion_mnist", batch_size=32), count=10, alpha=0.5)
        >>> result = simulate(ts.models.lenet_300_100, clients, FederatedConfig(rounds=20))  # doctest: +SKIP
        >>> result.upload_bytes, result.accuracy  # doctest: +SKIP
    """
    for key, value in (("client_threads", client_threads), ("num_cpus", num_cpus), ("clients.count", clients.count)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}={value!r}: use a whole number from 1")
    torch.manual_seed(config.seed)
    model = build()
    strategy = CompressedFedAvg(config, clients.count)
    initial: list[float] = []
    evaluate_fn = None if eval_data is None else _evaluator(build, eval_data, strategy, initial)
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        start = ArrayRecord(model.state_dict())
        strategy.start(grid, start, config.rounds, config.round_timeout, evaluate_fn=evaluate_fn)

    backend = {"client_resources": {"num_cpus": client_threads, "num_gpus": 0.0}, "init_args": {}}
    if num_cpus is not None:
        backend["init_args"]["num_cpus"] = num_cpus
    started = not ray.is_initialized()
    try:
        run_simulation(
            server, client_app(build, clients, config, client_threads), clients.count, backend_config=backend
        )
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    if len(strategy.rounds) != config.rounds:
        raise TrainingError(f"the simulation ran {len(strategy.rounds)} of {config.rounds} rounds; see Flower's log")
    if strategy.state:
        model.load_state_dict(strategy.state)
    return FederatedResult(model.eval(), strategy.rounds, initial[0] if initial else None)
