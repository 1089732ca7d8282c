"""The search's settings: the accuracy budget, the objective, the space and the trial budget."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from torchslim.errors import ConfigError
from torchslim.search.space import Recovery, SearchSpace

OBJECTIVES = ("size", "latency")
SAMPLERS = ("tpe", "nsga2")
BACKENDS = ("eager", "inductor", "onnxruntime")


@dataclass(frozen=True)
class Budget:
    """How much accuracy the compressed model may lose, stated explicitly.

    Attributes:
        value: the allowed loss as a fraction: absolute accuracy (0.01 = 1 point) or, when
            ``relative``, a fraction of the baseline's accuracy (0.01 = 1 % of it).
        relative: whether ``value`` scales with the baseline's accuracy.

    Example:
        >>> Budget.parse("1pt").max_drop(0.92), round(Budget.parse("1%").max_drop(0.92), 4)
        (0.01, 0.0092)
    """

    value: float
    relative: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not 0 <= self.value < 1:
            raise ConfigError(f"budget {self.value!r}: the allowed accuracy loss is a fraction in [0, 1), e.g. 0.01")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``"1pt"`` (1 point of accuracy, absolute) or ``"1%"`` (1 % of the baseline's accuracy)."""
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(pt|pts|point|points|%)\s*", str(text))
        if not m or not math.isfinite(float(m.group(1))):
            raise ConfigError(
                f"budget {text!r}: write '1pt' for at most 1 point of accuracy lost (absolute) or '1%' for at "
                "most 1 % of the baseline's accuracy (relative)"
            )
        return cls(float(m.group(1)) / 100, relative=m.group(2) == "%")

    def max_drop(self, baseline: float) -> float:
        """The allowed accuracy drop as an absolute fraction, given the baseline's accuracy."""
        return self.value * baseline if self.relative else self.value

    def text(self) -> str:
        amount = f"{100 * self.value:g}"
        return (
            f"{amount} % of the baseline's accuracy (relative)"
            if self.relative
            else f"{amount} point(s) of accuracy (absolute)"
        )


@dataclass(frozen=True)
class LatencySetting:
    """Where and how a candidate's latency is measured."""

    backend: str = "onnxruntime"
    batch: int = 64
    threads: int = 2
    warmup: int = 5
    repeats: int = 20

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"latency backend {self.backend!r}: choose one of {list(BACKENDS)}")
        for key in ("batch", "threads", "repeats"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"latency {key}={getattr(self, key)!r}: use a whole number >= 1")


@dataclass(frozen=True)
class SearchConfig:
    """Everything the search decides with.

    Attributes:
        budget: the accuracy the delivered model may lose.
        objective: ``"size"`` (bytes of the `.tslim` file) or ``"latency"`` (measured).
        sampler: Optuna's ``"tpe"`` or ``"nsga2"``.
        trials: trials in the study in all (finished ones of an earlier run count).
        timeout_s: stop starting trials after this many seconds (``None``: no limit).
        space: the per-layer choices (``None``: ``SearchSpace.default_for(objective)``).
        recovery: the short recovery of each trial.
        final: the recovery of the chosen plan (distillation from the uncompressed model).
        latency: backend, batch size and threads of the latency measurement.
        seeds: multiples of the budget given to the sensitivity-seeded plans.
        workers: trials run at once (more than one needs Ray).
        ray_address: an existing Ray cluster's address (``None``: a local Ray).
        use_ray: run trials on Ray actors even with one worker (so that 1 and N workers are
            compared on equal terms); more than one worker or an address always uses Ray.
        seed: seeds the sampler, the recovery subsets and the split.
    """

    budget: Budget
    objective: str = "size"
    sampler: str = "tpe"
    trials: int = 40
    timeout_s: float | None = None
    space: SearchSpace | None = None
    recovery: Recovery = field(default_factory=Recovery)
    final: Recovery = field(default_factory=lambda: Recovery(samples=0, epochs=3, lr=1e-3, share_epochs=1))
    latency: LatencySetting = field(default_factory=LatencySetting)
    seeds: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    workers: int = 1
    ray_address: str | None = None
    use_ray: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective={self.objective!r}: choose 'size' (bytes on disk) or 'latency' (measured)")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler={self.sampler!r}: choose one of {list(SAMPLERS)}")
        if not isinstance(self.trials, int) or self.trials < 1:
            raise ConfigError(f"trials={self.trials!r}: use a whole number >= 1")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers={self.workers!r}: use a whole number >= 1")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ConfigError(f"timeout_s={self.timeout_s!r}: use a positive number of seconds, or None")
        if self.space is None:
            object.__setattr__(self, "space", SearchSpace.default_for(self.objective))

    def identity(self) -> dict[str, Any]:
        """The settings a resumed study must share with the one that started it."""
        keep = ("budget", "objective", "space", "recovery", "latency", "seed")
        return {k: v for k, v in asdict(self).items() if k in keep}
