"""Figures of a search report as inline SVG strings: the metric/size front and the sensitivity curves.

matplotlib draws them (imported inside the functions: ``import torchslim`` stays free of it). Each
figure is a bare :class:`~matplotlib.figure.Figure`, never pyplot, so no global backend or figure
registry is touched. The SVG is deterministic (a fixed hash salt, no date) and self-contained: text
is drawn as paths, so the viewer needs no fonts. The XML prologue is dropped and every ``id`` is
prefixed with the figure's name, so several figures can sit inline in one HTML document.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from dataclasses import asdict
from typing import Any

from torchslim.core.task import Metric
from torchslim.errors import ConfigError
from torchslim.search.result import SearchResult

X_LABELS = {
    "bytes": "file size (KB, log scale)",
    "latency_ms": "latency per batch of {batch} (ms, {backend}, {threads} threads)",
}
SETTING_LABELS = {
    "sparsity": "sparsity (fraction of weights zeroed)",
    "channels": "fraction of output channels removed",
    "bits": "codebook bits per weight (fewer to the right)",
    "int8": "int8",
}
_RC = {"svg.fonttype": "path", "svg.hashsalt": "torchslim", "font.family": "DejaVu Sans", "font.size": 9}
_METADATA = {"Format": None, "Type": None, "Creator": None, "Date": None}
_FEASIBLE, _INFEASIBLE, _FRONT, _BUDGET = "#9ecae1", "#c7c7c7", "#08519c", "#d62728"


def _figure(width: float, height: float) -> tuple[Any, Any]:
    """A new figure with one axes, after pointing matplotlib's config dir away from $HOME if unset."""
    if "MPLCONFIGDIR" not in os.environ:
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="torchslim-mpl-")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, color="#e5e5e5", linewidth=0.6)
    ax.set_axisbelow(True)
    return fig, ax


def _svg(fig: Any, name: str) -> str:
    """``fig`` as an inline ``<svg>`` element whose ids all start with ``name``."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({**_RC, "svg.id": name}):
        fig.savefig(buf, format="svg", metadata=_METADATA)
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    ids = set(re.findall(r'\bid="([^"]+)"', text)) - {name}
    if ids:
        pattern = "|".join(sorted(map(re.escape, ids), key=len, reverse=True))
        text = re.sub(rf'(\bid="|href="#|url\(#)({pattern})(?=[")])', rf"\g<1>{name}-\g<2>", text)
    return text.strip()


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """The non-dominated ``(x, quality)`` points (lower x, better quality: higher, or lower when
    not ``higher_is_better``), sorted by x."""
    sign = 1.0 if higher_is_better else -1.0
    front: list[tuple[float, float]] = []
    for x, q in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not front or sign * q > sign * front[-1][1]:
            front.append((x, q))
    return front


def _x_of(report: SearchResult, x_key: str, value: Any) -> float | None:
    """A trial's or the baseline's x in plot units: KB, or ms at the searched latency batch."""
    if isinstance(value, dict):  # baseline / final latency: {"batch1": .., "batch64": ..}
        value = value.get(f"batch{report.latency_setting.batch}")
    if value is None:
        return None
    return value / 1000 if x_key == "bytes" else float(value)


def _x_label(report: SearchResult, x_key: str) -> str:
    return X_LABELS[x_key].format(**asdict(report.latency_setting))


def _trial_points(report: SearchResult, x_key: str) -> dict[bool, list[tuple[float, float, int]]]:
    """Completed trials with both figures as ``(x, metric as shown, number)``, split by feasibility."""
    scale = Metric(**report.metric).scale
    out: dict[bool, list[tuple[float, float, int]]] = {True: [], False: []}
    for t in report.trials:
        x = _x_of(report, x_key, getattr(t, x_key))
        if t.state == "COMPLETE" and t.accuracy is not None and x is not None:
            out[t.feasible].append((x, scale * t.accuracy, t.number))
    return out


def _mark(ax: Any, xy: tuple[float, float], label: str, style: dict[str, Any], left: bool = False) -> None:
    """One highlighted point with a text label beside it (to its ``left`` for a point at the right edge)."""
    ax.scatter(*xy, s=90, zorder=5, label=label, edgecolors="black", linewidths=0.8, **style)
    ax.annotate(
        label,
        xy,
        xytext=(-9 if left else 9, 6),
        textcoords="offset points",
        fontsize=8,
        zorder=6,
        ha="right" if left else "left",
    )


def _plot_trials(ax: Any, points: dict[bool, list[tuple[float, float, int]]], higher_is_better: bool) -> None:
    """Light dots for every completed trial, and the front of the feasible ones as a step line."""
    for feasible, color, marker in ((True, _FEASIBLE, "o"), (False, _INFEASIBLE, "x")):
        if points[feasible]:
            xs, ys, _ = zip(*points[feasible])
            label = "feasible trial" if feasible else "infeasible trial (over budget)"
            ax.scatter(xs, ys, s=18, color=color, marker=marker, label=label, zorder=2)
    front = pareto_front([(x, y) for x, y, _ in points[True]], higher_is_better)
    if front:
        xs, ys = zip(*front)
        ax.plot(
            xs,
            ys,
            drawstyle="steps-post",
            color=_FRONT,
            marker="o",
            markersize=4,
            linewidth=1.4,
            label="Pareto front (feasible)",
            zorder=3,
        )


def pareto_svg(report: SearchResult, x_key: str) -> str:
    """The task's metric against file size (``x_key="bytes"``) or latency (``"latency_ms"``) as
    inline SVG; a lower-is-better metric is drawn with its axis inverted, so better is up.

    Example:
        >>> svg = pareto_svg(report, "bytes")  # doctest: +SKIP
    """
    if x_key not in X_LABELS:
        raise ConfigError(f"pareto_svg: x_key {x_key!r} is not one of {sorted(X_LABELS)}")
    fig, ax = _figure(8.0, 4.5)
    m = Metric(**report.metric)
    points = _trial_points(report, x_key)
    _plot_trials(ax, points, m.higher_is_better)
    base, budget = report.baseline, report.budget
    label = f"budget ({budget.text})"
    limit = base.accuracy_search - budget.max_drop if m.higher_is_better else base.accuracy_search + budget.max_drop
    ax.axhline(m.scale * limit, color=_BUDGET, linestyle="--", linewidth=1, label=label)
    base_x = _x_of(report, x_key, getattr(base, x_key))
    if base_x is not None:
        base_xy = (base_x, m.scale * base.accuracy_search)
        _mark(ax, base_xy, "baseline (uncompressed)", {"marker": "D", "color": "black"}, left=True)
    chosen = report.chosen.trial
    for x, y, number in points[True] + points[False]:
        if number == chosen:
            _mark(ax, (x, y), f"chosen: trial {number}", {"marker": "*", "color": "#ffbf00"})
    if x_key == "bytes":
        ax.set_xscale("log")
    ax.set_xlabel(_x_label(report, x_key))
    ax.set_ylabel(f"{m.name} on the search split" + (f" ({m.unit})" if m.unit else ""))
    if not m.higher_is_better:
        ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=7, framealpha=0.9)
    return _svg(fig, f"pareto-{x_key.replace('_', '-')}")


def _curves(report: SearchResult, technique: str) -> dict[str, list[list[float]]]:
    curves = report.sensitivity.curves.get(technique) if report.sensitivity else None
    if not curves:
        raise ConfigError(
            f"sensitivity_svg: the report has no sensitivity curves for {technique!r}; "
            "plot only the techniques the search measured"
        )
    return curves


def sensitivity_svg(report: SearchResult, technique: str) -> str:
    """The metric's drop per layer against the setting of ``technique``, as inline SVG.

    One line per layer; for ``int8`` (one setting per layer) a horizontal bar per layer.

    Example:
        >>> svg = sensitivity_svg(report, "sparsity")  # doctest: +SKIP
    """
    curves, m = _curves(report, technique), Metric(**report.metric)
    budget = m.scale * report.budget.max_drop
    fig, ax = _figure(8.0, max(2.5, 0.3 * len(curves) + 1.2) if technique == "int8" else 4.0)
    if technique == "int8":
        layers = list(curves)
        ax.barh(layers, [m.scale * pts[0][1] for pts in curves.values()], color=_FRONT, height=0.6)
        ax.invert_yaxis()
        ax.axvline(budget, color=_BUDGET, linestyle="--", linewidth=1, label="budget")
        ax.set_xlabel(f"{m.name} {m.drop_word} when only this layer is int8 ({m.drop_unit})")
    else:
        for i, (layer, pts) in enumerate(curves.items()):  # ten colours, then the next line style
            style = ("-", "-.", ":")[i // 10 % 3]
            ax.plot(
                [p[0] for p in pts],
                [m.scale * p[1] for p in pts],
                marker="o",
                markersize=3,
                linestyle=style,
                label=layer,
            )
        ax.axhline(budget, color=_BUDGET, linestyle="--", linewidth=1, label="budget")
        ax.set_xlabel(SETTING_LABELS[technique])
        ax.set_ylabel(f"{m.name} {m.drop_word} ({m.drop_unit})")
        if technique == "bits":
            ax.invert_xaxis()
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    return _svg(fig, f"sensitivity-{technique}")
