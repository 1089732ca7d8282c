"""A search's result as typed records with a versioned JSON form (a search run's ``report.json``).

``search()`` returns a :class:`SearchResult`; ``to_dict`` is what ``report.json`` holds (with
``schema_version``) and ``from_dict`` reads it back: this version, or version 1 (the layout
written before the report carried a version, whose later additions take their defaults). A
newer version, or a file that is not a search report, is a :class:`ReportError` that says what
to do. The HTML, Markdown, plots and CLI read the fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torchslim.core.serial import versioned_record
from torchslim.errors import ReportError

SEARCH_REPORT_SCHEMA = 2
"""Version of a search's report.json; 1 is the layout written before it carried a version."""
_RERUN = "rerun `torchslim search` (it resumes) to rewrite the report"


@dataclass
class BudgetFacts:
    """The budget as given and the drop of the metric it allows on the search split."""

    kind: str  # "absolute" or "relative"
    value: float
    max_drop: float
    text: str


@dataclass
class LatencySetting:
    """How latency was measured: the backend, the batch and the threads."""

    backend: str
    batch: int
    threads: int


ACCURACY = {"name": "accuracy", "unit": "%", "higher_is_better": True}
"""The metric of a classification search, and of every report written before reports named it."""


@dataclass
class Baseline:
    """The uncompressed model measured on each split. The ``accuracy_*`` fields hold the task's
    metric (see :attr:`SearchResult.metric`); they keep the name for readers of older reports."""

    accuracy_search: float
    accuracy_holdout: float
    accuracy_test: float | None
    bytes: int
    params: int | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)  # "batch<N>" -> milliseconds


@dataclass
class Delivered:
    """The delivered ``.tslim`` file, measured after loading it back."""

    artifact: str
    bytes: int
    ratio: float
    accuracy_search: float
    accuracy_holdout: float
    accuracy_test: float | None
    drop_holdout: float
    within_budget: bool
    latency_ms: dict[str, float] = field(default_factory=dict)
    plan: dict[str, Any] | None = None  # as realised; the same as in the file's manifest


@dataclass
class Choice:
    """Which trial was chosen and whether it met the budget, in a sentence."""

    trial: int | None
    met_budget: bool
    message: str


@dataclass
class TrialRow:
    """One trial of the study, with whether it is on the Pareto fronts of the feasible trials."""

    number: int
    state: str
    origin: str = "sampler"
    plan: dict[str, Any] | None = None
    accuracy: float | None = None
    drop: float | None = None
    bytes: int | None = None
    latency_ms: float | None = None
    seconds: float | None = None
    error: str | None = None
    feasible: bool = False
    pareto_bytes: bool | None = None
    pareto_latency_ms: bool | None = None
    pareto: bool = False  # on the front of the search's objective


@dataclass
class PlanRow:
    """One weight layer in the delivered plan, or why the plan left it alone."""

    layer: str
    channels: float | None = None
    sparsity: float | None = None
    bits: int | None = None
    int8: bool = False
    skip: str | None = None


@dataclass
class Sensitivity:
    """Per technique and layer, ``[[setting, drop], ...]`` measured with that layer alone compressed."""

    curves: dict[str, Any] = field(default_factory=dict)
    split: str = "search"
    cached: bool = False


@dataclass
class LayerFacts:
    """The layers the search could touch, and the channel groups it could not shrink and why."""

    weights: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    skipped_groups: dict[str, str] = field(default_factory=dict)


@dataclass
class SearchFacts:
    """How the study ran: trials done, failed and per hour, the executor, resumption."""

    sampler: str
    trials_done: int
    workers: int
    wall_s: float
    trials_per_hour: float | None = None
    trials_this_run: int | None = None
    trials_failed: int = 0
    executor: str | None = None
    execution_note: str | None = None
    storage: str | None = None
    resumed: bool = False
    interrupted_trials: list[int] = field(default_factory=list)
    study: str | None = None


@dataclass
class SearchResult:
    """Everything a search measured and delivered."""

    recipe: str
    model: dict[str, Any]  # {"name", "kwargs"}
    data: dict[str, Any]  # {"name"}
    threads: int
    budget: BudgetFacts
    objective: str  # "size" or "latency"
    latency_setting: LatencySetting
    baseline: Baseline
    chosen: Choice
    final: Delivered | None = None
    trials: list[TrialRow] = field(default_factory=list)
    sensitivity: Sensitivity | None = None
    layers: LayerFacts = field(default_factory=LayerFacts)
    plan_table: list[PlanRow] = field(default_factory=list)
    search: SearchFacts | None = None
    timings: dict[str, float] = field(default_factory=dict)
    baseline_cached: bool | None = None  # set when a recipe trained or read its baseline
    metric: dict[str, Any] = field(default_factory=lambda: dict(ACCURACY))  # the task's Metric's fields
    kind: str = "search"
    schema_version: int = SEARCH_REPORT_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``report.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "report.json") -> SearchResult:
        """Read a search report of this version or of version 1; anything else is a :class:`ReportError`.

        Example:
            >>> SearchResult.from_dict({"kind": "compress"})  # doctest: +IGNORE_EXCEPTION_DETAIL
            Traceback (most recent call last):
            torchslim.errors.ReportError: report.json: not a search report (kind 'compress') ...
        """
        if not isinstance(data, dict) or data.get("kind", "search") != "search":
            kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
            raise ReportError(f"{source}: not a search report (kind {kind!r}); {_RERUN}")
        return versioned_record(cls, data, source, SEARCH_REPORT_SCHEMA, _RERUN, "search report")
