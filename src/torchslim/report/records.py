"""A compression run's report as typed records with a versioned JSON form.

``RunReport`` is what ``torchslim compress`` measured: the baseline and the compressed file
side by side, each step with the plan it realised, and the per-technique detail tables.
``report.json`` is ``RunReport.to_dict()`` with ``schema_version``; ``RunReport.from_dict``
reads it back, reads the untyped reports written before the schema had a version (version 1:
the same keys, no steps), and refuses a newer or malformed one with a :class:`ReportError`
that says what to do. The Markdown renderer and the CLI read the fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torchslim.core.serial import versioned_record
from torchslim.core.task import Classification
from torchslim.errors import ReportError

REPORT_SCHEMA = 2
"""Version of ``report.json``; 1 is the untyped layout written before it carried a version."""
_RERUN = "rerun `torchslim compress` to rewrite the report"


@dataclass
class Measurement:
    """One model measured: accuracy on the evaluation split, real bytes, size and speed."""

    accuracy: float
    bytes: int
    params: int
    macs: int
    nonzero: int
    latency: dict[str, dict[str, Any]]  # "batch<N>" -> the latency measurement's fields
    agreement: float | None = None  # top-1 agreement with the baseline (compressed model only)
    ratio: float | None = None  # baseline bytes / these bytes


@dataclass
class StepRecord:
    """One recipe step: what it was, how long it took, and the plan it realised."""

    index: int
    kind: str
    seconds: float
    plan: dict[str, Any] = field(default_factory=dict)
    summary: str | None = None  # the verb's one-line account, where it gives one (the one-shot methods)


@dataclass
class RunReport:
    """Everything ``torchslim compress`` measured and wrote."""

    recipe: str
    model: dict[str, Any]
    data: dict[str, Any]
    threads: int
    baseline_cached: bool
    baseline: Measurement
    compressed: Measurement
    plan: dict[str, Any]
    layers: list[dict[str, Any]]  # per tensor in the file (artifact.inspect rows)
    artifact: str
    steps: list[StepRecord] = field(default_factory=list)
    structure: list[dict[str, Any]] = field(default_factory=list)  # each channels step: groups, layers
    oneshot: list[dict[str, Any]] = field(default_factory=list)  # each lowrank / sparsify / gptq / awq step: layers
    quantization: dict[str, Any] | None = None  # the quantize step: layers, calibration, backend
    distillation: dict[str, Any] | None = None  # teacher, student alone, student distilled
    timings: dict[str, float] = field(default_factory=dict)
    metric: dict[str, Any] = field(default_factory=lambda: asdict(Classification.metric))  # what "accuracy" holds
    fidelity: dict[str, Any] = field(default_factory=lambda: asdict(Classification.fidelity))  # what "agreement" holds
    kind: str = "compress"
    schema_version: int = REPORT_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``report.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "report.json") -> RunReport:
        """Read a report of this version or of version 1; anything else is a :class:`ReportError`."""
        if not isinstance(data, dict):
            raise ReportError(f"{source}: a report is a JSON object; {_RERUN}")
        return versioned_record(cls, data, source, REPORT_SCHEMA, _RERUN)
