"""A search report as one self-contained HTML page and as Markdown, written atomically.

The page works opened from disk with no network: the style sheet is inline, the figures are inline
SVG from :mod:`torchslim.report.plots`, and there is no JavaScript. Every piece of text taken from
the report is escaped. The Markdown has the same tables without the figures. The PNG of a page shown in
the docs is made by ``benchmarks/chromium.py``, outside the library.
"""

from __future__ import annotations

import json
import re
from html import escape
from pathlib import Path
from typing import Any

from torchslim.core.files import write_atomic
from torchslim.core.task import Metric
from torchslim.report import plots
from torchslim.report.render import _num, _pct, drop_number, markdown_table
from torchslim.search.result import ACCURACY, BudgetFacts, SearchResult

TECHNIQUES = {
    "channels": "Channels removed (structured pruning)",
    "sparsity": "Unstructured sparsity",
    "bits": "Weight sharing (codebook bits)",
    "int8": "int8 quantization",
}
OBJECTIVES = {"size": "the smallest file", "latency": "the lowest latency"}
SPLITS = (
    ("search split", "accuracy_search"),
    ("held-out split", "accuracy_holdout"),
    ("full test set", "accuracy_test"),
)
SUMMARY_COLUMNS = ("metric", "baseline (uncompressed)", "delivered file")
PLAN_COLUMNS = ("layer", "channels removed", "sparsity", "codebook bits", "int8", "skipped because")


def trial_columns(report: SearchResult) -> tuple[str, ...]:
    """The trials table's header, named after the search's metric."""
    m = _metric(report)
    return (
        "trial",
        "origin",
        "state",
        m.name,
        f"{m.drop_word} ({m.drop_unit})",
        "bytes",
        "latency (ms)",
        "feasible",
        "on front",
        "seconds",
    )


def sensitivity_columns(report: SearchResult) -> tuple[str, str, str]:
    """The sensitivity table's header, named after the search's metric."""
    m = _metric(report)
    return ("technique", "layer", f"setting: {m.drop_word} ({m.drop_unit})")


CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1b1b;margin:0;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:24px 32px;background:#fff}
h1{font-size:1.6em;margin:0 0 .4em}h2{font-size:1.25em;margin:1.6em 0 .5em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.92em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;white-space:nowrap}
th{background:#f0f3f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.chosen td{background:#fff3c4;font-weight:600}
figure{margin:1em 0}figure svg{max-width:100%;height:auto}
figcaption{font-size:.88em;color:#555;max-width:900px}
.verdict-ok,.verdict-bad{border-left:4px solid #1a7f37;padding-left:12px}.verdict-bad{border-left-color:#b42318}
table.plan td:last-child{white-space:normal}
""".strip()


def _metric(report: SearchResult) -> Metric:
    """The search's metric (accuracy for reports written before reports named it)."""
    return Metric(**report.metric)


def _value(m: Metric, x: float | None) -> str:
    """A value of the metric as shown: ``91.23 %``, ``12.4 ppl``; ``-`` when missing."""
    return "-" if x is None else m.show(x)


def _fact(x: Any) -> str:
    """A search fact or table cell as text: ``-`` for missing, yes/no for booleans."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return f"{x:,.1f}" if isinstance(x, float) else str(x)


def budget_text(budget: BudgetFacts, metric: Metric | None = None) -> str:
    """The budget in words, absolute points or relative percent, with the drop it allows."""
    m = metric or Metric(**ACCURACY)
    if budget.kind == "relative":
        return (
            f"at most {100 * budget.value:.2f} % of the baseline {m.name} lost (relative), "
            f"i.e. {drop_number(m, budget.max_drop)} {m.drop_unit}"
        )
    return f"at most {drop_number(m, budget.max_drop)} {m.drop_unit} of {m.name} lost (absolute)"


def summary_text(report: SearchResult) -> str:
    """One paragraph: what was searched, the budget, the objective and whether the chosen plan met it."""
    chosen, final, m = report.chosen, report.final, _metric(report)
    text = (
        f"Adaptive compression search of model {report.model['name']} on {report.data['name']} "
        f"(recipe {report.recipe}, {report.threads} threads). Budget: {budget_text(report.budget, m)}, "
        f"on the search split against the uncompressed baseline. Objective: "
        f"{OBJECTIVES.get(report.objective, report.objective)} within the budget. "
    )
    if chosen.trial is None:
        text += "No trial met the budget, so no plan was chosen."
    else:
        met = "met" if chosen.met_budget else "did not meet"
        text += f"The chosen plan (trial {chosen.trial}) {met} the budget."
    if chosen.message:
        text += f" {chosen.message.rstrip('.')}."
    if final:
        within = "within" if final.within_budget else "outside"
        text += (
            f" On the held-out split the delivered file loses {m.show_drop(final.drop_holdout)}: {within} the budget."
        )
    else:
        text += " No compressed file was delivered."
    return text


def summary_rows(report: SearchResult) -> list[tuple[str, str, str]]:
    """The before/after table as ``(metric, baseline, delivered)`` strings."""
    b, f, m = report.baseline, report.final, _metric(report)
    rows = [(f"{m.name}, {name}", _value(m, getattr(b, key)), _value(m, f and getattr(f, key))) for name, key in SPLITS]
    rows += [
        (f"{m.name} {m.drop_word}, held-out split ({m.drop_unit})", "-", drop_number(m, f and f.drop_holdout)),
        ("bytes on disk", f"{b.bytes:,} (fp32)", "-" if f is None else f"{f.bytes:,} (.tslim)"),
        ("compression ratio", "1.0x", "-" if f is None else f"{f.ratio:.1f}x"),
    ]
    for key, ms in b.latency_ms.items():
        other = f.latency_ms.get(key) if f else None
        rows.append(
            (f"latency per batch of {key.removeprefix('batch')} (ms)", _num(ms, "{:.3f}"), _num(other, "{:.3f}"))
        )
    return rows


def plan_rows(report: SearchResult) -> list[tuple[str, ...]]:
    """The chosen per-layer plan, in :data:`PLAN_COLUMNS` order."""
    return [
        (r.layer, _pct(r.channels), _pct(r.sparsity), _fact(r.bits), _fact(r.int8), r.skip or "")
        for r in report.plan_table
    ]


def trial_rows(report: SearchResult) -> list[tuple[str, ...]]:
    """Every trial by number, in :func:`trial_columns` order; the chosen one is labelled."""
    chosen, m = report.chosen.trial, _metric(report)
    rows = []
    for t in sorted(report.trials, key=lambda t: t.number):
        label = f"{t.number} (chosen)" if t.number == chosen else str(t.number)
        rows.append(
            (
                label,
                t.origin,
                t.state,
                _value(m, t.accuracy),
                drop_number(m, t.drop),
                _num(t.bytes, "{:,}"),
                _num(t.latency_ms, "{:.3f}"),
                _fact(t.feasible),
                _fact(t.pareto),
                _fact(t.seconds),
            )
        )
    return rows


def sensitivity_rows(report: SearchResult) -> list[tuple[str, str, str]]:
    """Every sensitivity curve as ``(technique, layer, "setting: drop, ...")``."""
    curves, m = (report.sensitivity.curves if report.sensitivity else {}), _metric(report)
    return [
        (tech, layer, ", ".join(f"{s:g}: {drop_number(m, d)}" for s, d in pts))
        for tech in TECHNIQUES
        for layer, pts in (curves.get(tech) or {}).items()
    ]


def search_rows(report: SearchResult) -> list[tuple[str, str]]:
    """Facts about the search run: sampler, trials, workers, wall time, storage, phase timings."""
    s, lat = report.search, report.latency_setting
    keys = ("sampler", "trials_done", "trials_failed", "workers", "trials_per_hour", "study", "storage", "resumed")
    rows = [(key.replace("_", " "), _fact(s and getattr(s, key))) for key in keys]
    rows.insert(4, ("wall time (s)", _fact(s and s.wall_s)))
    rows.append(("latency measured with", f"{lat.backend}, batch {lat.batch}, {lat.threads} threads"))
    rows.append(("artifact", _fact(report.final and report.final.artifact)))
    rows += [(f"time: {k.removesuffix('_s')} (s)", _num(v, "{:.1f}")) for k, v in report.timings.items()]
    return rows


def _title(report: SearchResult) -> str:
    return f"torchslim search report: {report.recipe}"


_NUMBER = re.compile(r"-|[-+]?[\d.,]+(?: %|x)?(?: \(.*\))?")


def _cell(value: Any) -> str:
    """A table cell, escaped; numbers (and ``-`` for none) align right."""
    text = str(value)
    return f'<td class="n">{escape(text)}</td>' if _NUMBER.fullmatch(text) else f"<td>{escape(text)}</td>"


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]], marked: str | None = None, cls: str = "") -> str:
    """An HTML table, every cell escaped; the row whose first cell is ``marked`` gets class chosen."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = [
        ('<tr class="chosen">' if row[0] == marked else "<tr>") + "".join(map(_cell, row)) + "</tr>" for row in rows
    ]
    table = f'<table class="{cls}">' if cls else "<table>"
    return f"{table}<thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>"


def _p(text: str, cls: str = "") -> str:
    return f'<p class="{cls}">{escape(text)}</p>' if cls else f"<p>{escape(text)}</p>"


def _section(title: str, *body: str) -> str:
    return f"<section>\n<h2>{escape(title)}</h2>\n" + "\n".join(body) + "\n</section>"


def _figure(svg: str, caption: str) -> str:
    return f"<figure>\n{svg}\n<figcaption>{escape(caption)}</figcaption>\n</figure>"


_PARETO_CAPTION = (
    "{} on the search split against {}. Light dots: completed trials (crosses: over the "
    "budget); dark steps: the Pareto front of the feasible trials; dashed red: the budget; "
    "diamond: the uncompressed baseline; star: the chosen trial."
)


def _pareto_section(report: SearchResult) -> str:
    name = _metric(report).name
    return _section(
        f"{name.capitalize()} against size and latency",
        _figure(plots.pareto_svg(report, "bytes"), _PARETO_CAPTION.format(name.capitalize(), "file size")),
        _figure(plots.pareto_svg(report, "latency_ms"), _PARETO_CAPTION.format(name.capitalize(), "latency")),
    )


def _sensitivity_section(report: SearchResult) -> str:
    sens, m = report.sensitivity, _metric(report)
    curves = sens.curves if sens else {}
    present = [t for t in TECHNIQUES if curves.get(t)]
    if not present:
        return _section("Sensitivity", _p("This report has no sensitivity analysis."))
    body = [
        _p(
            f"{m.name.capitalize()} {m.drop_word} on the {sens.split} split when one layer alone is compressed at "
            "one setting, all others left as they are; the dashed red line is the budget."
        )
    ]
    body += [_figure(plots.sensitivity_svg(report, t), TECHNIQUES[t]) for t in present]
    missing = [t for t in TECHNIQUES if t not in present]
    if missing:
        body.append(_p(f"Not measured (technique not searched): {', '.join(missing)}."))
    table = _table(sensitivity_columns(report), sensitivity_rows(report))
    body.append(f"<details><summary>The numbers</summary>\n{table}\n</details>")
    return _section("Sensitivity", *body)


def _before_after(report: SearchResult) -> list[str]:
    out = [_table(SUMMARY_COLUMNS, summary_rows(report))]
    if report.final is None:
        out.append(_p("No compressed file was delivered: no trial met the budget.", "verdict-bad"))
    return out


def to_html(report: SearchResult) -> str:
    """The search report as one self-contained HTML5 document (inline CSS and SVG, no scripts).

    Example:
        >>> Path("report.html").write_text(to_html(report))  # doctest: +SKIP
    """
    chosen = report.chosen.trial
    plan = plan_rows(report)
    body = [
        f"<h1>{escape(_title(report))}</h1>",
        _p(summary_text(report), "verdict-ok" if report.final and report.final.within_budget else "verdict-bad"),
        _section("Before / after", *_before_after(report)),
        _pareto_section(report),
        _section("Per-layer plan", _table(PLAN_COLUMNS, plan, cls="plan") if plan else _p("No plan was chosen.")),
        _sensitivity_section(report),
        _section(
            "Trials",
            _table(trial_columns(report), trial_rows(report), None if chosen is None else f"{chosen} (chosen)"),
        ),
        _section("Search", _table(("fact", "value"), search_rows(report))),
    ]
    head = "\n".join(
        (
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<link rel="icon" href="data:,">',
            f"<title>{escape(_title(report))}</title>",
            f"<style>\n{CSS}\n</style>",
        )
    )
    page = "\n".join(("<!DOCTYPE html>", '<html lang="en">', "<head>", head, "</head>", "<body>", "<main>", *body))
    return page + "\n</main>\n</body>\n</html>\n"


def _md_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """:func:`markdown_table` with pipes and newlines in cells escaped."""
    clean = [tuple(str(c).replace("|", "\\|").replace("\n", " ") for c in row) for row in rows]
    return markdown_table(header, clean)


def to_search_markdown(report: SearchResult) -> str:
    """The search report as Markdown: the same tables as :func:`to_html`, without the figures."""
    plan, sens = plan_rows(report), sensitivity_rows(report)
    parts = [
        f"# {_title(report)}",
        summary_text(report),
        "## Before / after",
        _md_table(SUMMARY_COLUMNS, summary_rows(report)),
        f"The plots of {_metric(report).name} against size and latency are in report.html.",
        "## Per-layer plan",
        _md_table(PLAN_COLUMNS, plan) if plan else "No plan was chosen.",
        "## Sensitivity",
        _md_table(sensitivity_columns(report), sens) if sens else "This report has no sensitivity analysis.",
        "## Trials",
        _md_table(trial_columns(report), trial_rows(report)),
        "## Search",
        _md_table(("fact", "value"), search_rows(report)),
    ]
    return "\n\n".join(parts) + "\n"


def write_search_report(report: SearchResult, out_dir: str | Path) -> tuple[Path, Path, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out_dir``.

    All three are rendered before any is written, so a report that fails to render (a value JSON
    cannot hold) leaves the files of an earlier report as they were. A report read from a file
    goes through :meth:`SearchResult.from_dict` first, which refuses another schema version.

    Example:
        >>> write_search_report(result, "runs/lenet5_search")  # doctest: +SKIP
    """
    out = Path(out_dir)
    data = json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n"
    texts = (data, to_search_markdown(report), to_html(report))
    names = ("report.json", "report.md", "report.html")
    j, m, h = (write_atomic(out / name, text) for name, text in zip(names, texts))
    return j, m, h
