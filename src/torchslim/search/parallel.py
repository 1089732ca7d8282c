"""Where trials run: one at a time in this process, or several at once on Ray.

Both executors take ``submit(key, params)`` and hand results back through ``wait()``, so the
study loop does not care which one runs. On Ray, each worker is an actor that holds one copy
of the model and the data (rebuilt from the zoo name, the baseline's safetensors bytes and the
data spec: nothing is pickled but plain values and plans), so no node reads the driver's files;
trial results come back through Ray. A local Ray gets ``workers x threads``
CPUs; each actor reserves ``threads`` of them and, on a local machine, pins its process to
its own cores (``os.sched_setaffinity``) and sets torch's thread count to match, so two
trials never share a core and their latency measurements do not disturb each other. On an
existing cluster Ray's CPU accounting keeps ``threads`` CPUs per actor; cores are not pinned.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from torchslim.errors import ConfigError

log = logging.getLogger(__name__)


class Inline:
    """Trials one after another in this process."""

    def __init__(self, evaluate: Callable[[Mapping[str, Any]], dict]) -> None:
        self.evaluate, self.done, self.slots = evaluate, deque(), 1
        self.description = "1 worker in this process"

    def submit(self, key: Any, params: Mapping[str, Any]) -> None:
        self.done.append((key, self.evaluate(params)))

    def wait(self) -> tuple[Any, dict]:
        return self.done.popleft()

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class WorkerSpec:
    """What a Ray worker rebuilds its evaluator from: plain values only."""

    zoo: str
    kwargs: dict
    weights: bytes  # the baseline's state, safetensors bytes (sent through Ray: no shared storage)
    data: dict  # a DataSpec's fields
    config: Any  # the SearchConfig
    threads: int


class TrialWorker:
    """A Ray actor's body: pinned to its cores, one model and dataset, runs trials on request."""

    def __init__(self, spec: WorkerSpec, index: int, pin: bool) -> None:
        from safetensors.torch import load

        from torchslim.core.data import DataSpec, load_data
        from torchslim.core.models import build_model
        from torchslim.search.trial import Evaluator

        if pin and hasattr(os, "sched_setaffinity"):
            cores = sorted(os.sched_getaffinity(0))
            mine = cores[index * spec.threads : (index + 1) * spec.threads]
            if len(mine) == spec.threads:
                os.sched_setaffinity(0, mine)
        torch.set_num_threads(spec.threads)
        model = build_model(spec.zoo, **spec.kwargs)
        model.load_state_dict(load(spec.weights))
        data = load_data(DataSpec(**spec.data))
        self.evaluate = Evaluator(model, data, spec.config, {"zoo": spec.zoo, "kwargs": spec.kwargs})

    def cores(self) -> list[int]:
        return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

    def node(self) -> str:
        """The Ray node this worker runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, params: Mapping[str, Any]) -> dict:
        return self.evaluate(params)


class RayPool:
    """Trials on Ray actors, ``workers`` at once."""

    def __init__(self, spec: WorkerSpec, workers: int, address: str | None = None) -> None:
        import ray

        self.ray, self.started = ray, not ray.is_initialized()
        if self.started:
            if address:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            else:
                tmp = os.path.join(tempfile.gettempdir(), "torchslim-ray")
                ray.init(
                    num_cpus=workers * spec.threads,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                    _temp_dir=tmp,
                )
        actor = ray.remote(num_cpus=spec.threads)(TrialWorker)
        self.free = deque(actor.remote(spec, i, address is None) for i in range(workers))
        self.pinned = ray.get([a.cores.remote() for a in self.free])
        self.nodes = len(set(ray.get([a.node.remote() for a in self.free])))
        self.running: dict[Any, tuple[Any, Any]] = {}
        self.slots = workers
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        self.description = (
            f"{workers} Ray worker{'s' if workers > 1 else ''} on {where} ({self.nodes} node"
            f"{'s' if self.nodes > 1 else ''}), {spec.threads} thread(s) each, cores {self.pinned}"
        )

    def submit(self, key: Any, params: Mapping[str, Any]) -> None:
        worker = self.free.popleft()
        self.running[worker.run.remote(dict(params))] = (key, worker)

    def wait(self) -> tuple[Any, dict]:
        ready, _ = self.ray.wait(list(self.running), num_returns=1)
        key, worker = self.running.pop(ready[0])
        self.free.append(worker)
        try:
            return key, self.ray.get(ready[0])
        except self.ray.exceptions.RayError as exc:  # a worker died: the trial fails, the search goes on
            return key, {"error": f"Ray worker failed: {type(exc).__name__}: {exc}"}

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def _ray_missing() -> bool:
    """Whether Ray cannot be imported (a ``None`` entry in ``sys.modules`` blocks an import)."""
    if "ray" in sys.modules:
        return sys.modules["ray"] is None
    return importlib.util.find_spec("ray") is None


def runs_inline(workers: int, address: str | None, use_ray: bool) -> bool:
    """Whether trials run in this process: one worker, no Ray asked for, or Ray not installed."""
    return (workers == 1 and address is None and not use_ray) or _ray_missing()


def check_rebuildable(rebuildable: bool, workers: int, address: str | None, use_ray: bool) -> None:
    """A :class:`ConfigError` when trials would run on Ray but a worker cannot rebuild the model and data."""
    if not rebuildable and not runs_inline(workers, address, use_ray):
        raise ConfigError(
            "parallel trials rebuild the model and the data in each Ray worker by name: give a zoo model "
            "(zoo={'zoo': name, 'kwargs': {...}}) and a built-in dataset, or run your own model and loaders "
            "with workers=1"
        )


def make_executor(
    evaluate: Callable[[Mapping[str, Any]], dict],
    spec: Callable[[], WorkerSpec] | None,
    workers: int,
    address: str | None,
    use_ray: bool = False,
) -> tuple[Inline | RayPool, str | None]:
    """The executor for ``workers``, and a message when Ray was asked for but cannot run."""
    if workers == 1 and address is None and not use_ray:
        return Inline(evaluate), None
    if _ray_missing():
        return Inline(evaluate), (
            f"Ray is not installed, so trials run one at a time instead of {workers} at once; "
            "install it with pip install 'torchslim[ray]' (or pip install ray)"
        )
    check_rebuildable(spec is not None, workers, address, use_ray)
    return RayPool(spec(), workers, address), None
