"""Render a compression run's report (:class:`~torchslim.report.records.RunReport`) as JSON and
Markdown, written atomically. The per-technique tables take the detail dicts the verbs' results
write (``to_dict``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torchslim.core.files import write_atomic
from torchslim.core.task import Metric
from torchslim.report.records import RunReport


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def drop_number(metric: Metric, x: float | None) -> str:
    """A drop of ``metric`` as a number in :attr:`Metric.drop_unit` (points for a percentage)."""
    if x is None:
        return "-"
    return f"{100 * x:.2f}" if metric.unit == "%" else f"{x:.4g}"


def summary_rows(report: RunReport) -> list[tuple[str, str, str]]:
    """The before/after table as ``(metric, baseline, compressed)`` strings."""
    b, c = report.baseline, report.compressed
    metric, fidelity = Metric(**report.metric), Metric(**report.fidelity)
    agreement = "top-1 agreement" if fidelity.name == "agreement" else fidelity.name
    rows = [
        (f"test {metric.name}", metric.show(b.accuracy), metric.show(c.accuracy)),
        (
            f"{agreement} with baseline",
            fidelity.show(1.0) if fidelity.unit == "%" else "-",
            "-" if c.agreement is None else fidelity.show(c.agreement),
        ),
        ("bytes on disk", f"{b.bytes:,} (fp32 safetensors)", f"{c.bytes:,} (.tslim)"),
        ("compression ratio", "1.0x", f"{c.ratio:.1f}x" if c.ratio else "-"),
        ("non-zero weights", f"{b.nonzero:,}", f"{c.nonzero:,}"),
        ("multiply-accumulates per sample", f"{b.macs:,}", f"{c.macs:,}"),
    ]
    for key, lat in b.latency.items():
        clat = c.latency[key]
        what = f"latency batch {lat['batch']} ({lat['threads']} threads; baseline eager, compressed {clat.get('backend', 'eager')})"
        rows.append((what, f"{lat['median_ms']:.3f} ms", f"{clat['median_ms']:.3f} ms"))
    return rows


def _value_bits(row: dict[str, Any]) -> str:
    """Codebook bits for shared tensors, else how values are stored (fp16 / fp32 / dense)."""
    if row["codebook_bits"] is not None:
        return str(row["codebook_bits"])
    values = row.get("values", "dense")
    if values.startswith("tied to "):
        return values
    return {"raw": "fp32", "raw16": "fp16"}.get(values, "-")


LAYER_COLUMNS = (
    "tensor",
    "shape",
    "weights",
    "kept",
    "codebook bits / values",
    "bits/index",
    "bits/position",
    "bytes",
    "rate",
    "positions real / H0 / model B",
    "indices real / H0 B",
)


def layer_rows(layers: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """The per-tensor table, as strings in :data:`LAYER_COLUMNS` order."""
    out = []
    for r in layers:
        coded = r["coded"]
        out.append(
            (
                r["name"],
                "x".join(map(str, r["shape"])),
                f"{r['weights']:,}",
                _pct(r["kept"] / r["weights"] if r["weights"] else None),
                _value_bits(r),
                _num(r["index_bits"]),
                _num(r["position_bits"]),
                f"{r['bytes']:,}",
                f"{r['rate']:.1f}x" if r["bytes"] else "-",
                f"{r['position_bytes']:,} / {r['position_h0_bytes']:,.0f} / {r['position_model_bytes']:,.0f}"
                if coded
                else "-",
                f"{r['index_bytes']:,} / {r['index_h0_bytes']:,.0f}" if coded and r["index_bits"] is not None else "-",
            )
        )
    return out


GROUP_COLUMNS = ("group (root layer)", "criterion", "channels before", "after", "coupled layers", "skipped because")
STRUCTURE_COLUMNS = ("layer", "kind", "in before / after", "out before / after", "MACs before / after")


def group_rows(step: dict[str, Any]) -> list[tuple[str, ...]]:
    """One structured-pruning step's coupling groups, in :data:`GROUP_COLUMNS` order."""
    return [
        (g["root"], g["criterion"], str(g["before"]), str(g["after"]), ", ".join(g["members"]), g["skip"] or "")
        for g in step["groups"]
    ]


def structure_rows(step: dict[str, Any]) -> list[tuple[str, ...]]:
    """One structured-pruning step's layers, in :data:`STRUCTURE_COLUMNS` order."""
    return [
        (
            r["layer"],
            r["kind"],
            "{} / {}".format(*r["in"]),
            "{} / {}".format(*r["out"]),
            "{:,} / {:,}".format(*r["macs"]),
        )
        for r in step["layers"]
    ]


def structure_parts(structure: list[dict[str, Any]]) -> list[str]:
    """Markdown for each structured-pruning step: per coupling group and per layer."""
    parts = []
    for i, s in enumerate(structure, 1):
        groups, layers = group_rows(s), structure_rows(s)
        parts += [
            f"## Channels removed (structured step {i})",
            f"MACs per sample {s['macs_before']:,} -> {s['macs_after']:,} "
            f"({s['macs_before'] / max(s['macs_after'], 1):.2f}x fewer); parameters {s['params_before']:,} -> "
            f"{s['params_after']:,}.",
            markdown_table(GROUP_COLUMNS, groups),
            markdown_table(STRUCTURE_COLUMNS, layers),
        ]
    return parts


QUANT_COLUMNS = (
    "layer",
    "type",
    "scheme",
    "bits",
    "input range",
    "output range",
    "weight error",
    "note / skipped because",
)


def quant_rows(quantization: dict[str, Any]) -> list[tuple[str, ...]]:
    """One quantization step's layers, in :data:`QUANT_COLUMNS` order."""
    rows = []
    for r in quantization["layers"]:
        rng_in, rng_out = ("[{:.4g}, {:.4g}]".format(*r[k]) if r[k] else "-" for k in ("input_range", "output_range"))
        err = f"{r['weight_error']:.2%}" if r["weight_error"] is not None else "-"
        rows.append(
            (
                r["name"],
                r["type"],
                r["scheme"] or "float",
                str(r["bits"] or 32),
                rng_in,
                rng_out,
                err,
                r["skip"] or r["note"] or "",
            )
        )
    return rows


def _auto(chosen: dict[str, Any]) -> str:
    """How ``calibration="auto"`` chose: the starting method and the layers that moved off it."""
    if chosen.get("method") != "auto":
        return ""
    moved = {n: m for n, m in chosen["layers"].items() if m != chosen["start"]}
    return f" (from `{chosen['start']}` for all layers" + "".join(f"; `{n}`: `{m}`" for n, m in moved.items()) + ")"


def quant_parts(step: dict[str, Any] | None, metric: Metric) -> list[str]:
    """Markdown for the quantization step: settings, folded BatchNorms and the per-layer table."""
    if not step:
        return []
    q, cfg = step["quantization"], step["quantization"]["config"]
    parts = [
        "## Quantization",
        f"Scheme `{cfg['scheme']}`, int{cfg['bits']} weights, calibration `{cfg['calibration']}`"
        f"{_auto(q.get('calibration') or {})}"
        f"{', QAT' if cfg['qat'] else ''}; latency measured on the `{step['backend']}` backend. "
        f"BatchNorms folded into their convolutions: {', '.join(q['folded']) or 'none'}. Weight error is "
        "the relative RMS error of the dequantized weight.",
        markdown_table(QUANT_COLUMNS, quant_rows(q)),
    ]
    speed = step.get("speed")
    if speed:
        batches = ", ".join(map(str, speed["batches"]))
        verdict = {
            "int8": "int8 kept",
            "mixed": f"int8 slower: {', '.join(speed['kept_float'])} back to float (each slower in int8 timed alone)",
            "float": "int8 slower, and no layer mix beat float: every layer back to float",
        }[speed["delivered"]]
        parts.append(
            f"On `{speed['backend']}` (batch {batches}, ms summed over the batches): float model compiled "
            f"{speed['float_ms']:.3f} ms, int8 {speed['int8_ms']:.3f} ms; {verdict}; delivered {speed['delivered_ms']:.3f} ms."
        )
    mixed = step.get("mixed_precision")
    if mixed:
        m, history = metric, mixed["history"]
        rows = [
            (n, drop_number(m, d), "float" if n in mixed["kept_float"] else "int8")
            for n, d in mixed["sensitivity"].items()
        ]
        parts += [
            "### Mixed precision",
            f"{m.name.capitalize()} of the float model on the calibration split {m.show(mixed['float_accuracy'])}; "
            f"layers returned to float, most sensitive first, until the {m.drop_word} was within budget: "
            f"{', '.join(mixed['kept_float']) or 'none'} ({m.name} with all quantized "
            f"{m.show(history[0]['accuracy'])}, final {m.show(history[-1]['accuracy'])}).",
            markdown_table(("layer", f"{m.drop_word} when only it is quantized ({m.drop_unit})", "kept as"), rows),
        ]
    return parts


def distill_columns(metric: Metric) -> tuple[str, ...]:
    """The distillation table's header, with the task's metric."""
    return ("model", "parameters", f"test {metric.name}", "training s")


def distill_rows(entry: dict[str, Any], metric: Metric) -> list[tuple[str, ...]]:
    """Teacher, student alone and student distilled, in :func:`distill_columns` order."""
    student = f"{entry['student']['name']} {entry['student']['kwargs'] or ''}".strip()
    rows = [
        ("teacher (the baseline)", entry["teacher"]),
        (f"student {student}, alone", entry.get("student_alone")),
        (f"student {student}, distilled", entry["student_distilled"]),
    ]
    return [
        (label, f"{r['params']:,}", metric.show(r["accuracy"]), _num(r["train_s"], "{:.1f}")) for label, r in rows if r
    ]


def distill_parts(entry: dict[str, Any] | None, metric: Metric) -> list[str]:
    """Markdown for the distillation step: settings and the side-by-side table."""
    if not entry:
        return []
    cfg = entry["config"]
    pairs = ", ".join(f"`{s}` <- `{t}`" for s, t in cfg["features"]) or "none"
    return [
        "## Distillation",
        f"Soft targets at T = {cfg['train']['temperature']:g}, alpha = {cfg['train']['distill_weight']:g} (labels "
        f"{1 - cfg['train']['distill_weight']:g}), {cfg['train']['epochs']} epochs at lr {cfg['train']['lr']:g}; feature "
        f"pairs ({cfg['feature_kind']}, weight {cfg['feature_weight']:g}): {pairs}. The student alone starts from the "
        "same weights and trains with the same epochs and seed, without the teacher. The distilled student is then "
        "compressed by the later steps.",
        markdown_table(distill_columns(metric), distill_rows(entry, metric)),
    ]


def oneshot_rows(step: dict[str, Any]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """One one-shot step's per-layer table (``lowrank``, ``sparsify``, ``gptq``, ``awq``): the
    columns are the fields of its layer rows, as the verb's ``to_dict`` gives them."""
    layers = step.get("layers") or []
    header = tuple(layers[0]) if layers else ("name",)
    return header, [tuple(_cell(r.get(k)) for k in header) for r in layers]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def oneshot_parts(steps: list[dict[str, Any]], records: list[Any]) -> list[str]:
    """Markdown for each one-shot step: its summary line, its settings and its per-layer table.
    Output errors are relative, ``‖(W - Ŵ) X‖² / ‖W X‖²`` over the calibration tokens."""
    summaries = {r.index: r.summary for r in records}
    parts = []
    for step in steps:
        settings = ", ".join(f"{k}={v}" for k, v in step.get("config", {}).items())
        parts += [
            f"## {step['kind']} (step {step['step']})",
            f"{summaries.get(step['step']) or ''}. Settings: {settings}. Output errors are relative: "
            "‖(W - Ŵ) X‖² / ‖W X‖² over the calibration tokens.",
            markdown_table(*oneshot_rows(step)),
        ]
    return parts


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _label(spec: dict) -> str:
    """A model's or dataset's zoo name, builder or folder."""
    return str(spec.get("name") or spec.get("builder") or spec.get("image_folder") or "?")


def to_markdown(report: RunReport) -> str:
    """The report as Markdown: summary, before/after table, per-layer table, plan, timings."""
    c = report.compressed
    parts = [
        f"# torchslim report: {report.recipe}",
        f"Model `{_label(report.model)}` on `{_label(report.data)}`, {report.threads} threads. "
        f"Artifact `{report.artifact}`: {c.bytes:,} bytes, {c.ratio or 0:.1f}x smaller than fp32 "
        f"safetensors. The {report.metric['name']} is measured on the model loaded back from that file.",
        "## Before / after",
        markdown_table(("metric", "baseline", "compressed"), summary_rows(report)),
        "Latency runs the model loaded from the file on the backend the table names. In eager mode int4 "
        "layers run PyTorch's CPU int4 kernel and the others dense float kernels (int8 layers on their "
        "dequantized weights; compiled backends run int8 GEMMs): removed channels and low-rank factors make "
        "them faster; unstructured zeros and shared values make the file small, not the matmuls faster.",
        *distill_parts(report.distillation, Metric(**report.metric)),
        *structure_parts(report.structure),
        *quant_parts(report.quantization, Metric(**report.metric)),
        *oneshot_parts(report.oneshot, report.steps),
        "## Per tensor in the file",
        "Bytes are payload bytes; H0 is the order-0 Shannon bound of the stream, model the ideal "
        "code length under the coder's adaptive position model (docs/format.md).",
        markdown_table(LAYER_COLUMNS, layer_rows(report.layers)),
        "## Plan",
        "```json\n" + json.dumps(report.plan, indent=2, sort_keys=True) + "\n```",
        "## Steps",
        markdown_table(("step", "kind", "seconds", "layers decided", "summary"), _step_rows(report)),
        "## Timings",
        markdown_table(("phase", "seconds"), [(k, f"{v:.1f}") for k, v in report.timings.items()]),
    ]
    return "\n\n".join(parts) + "\n"


def _step_rows(report: RunReport) -> list[tuple[str, ...]]:
    return [(str(s.index), s.kind, f"{s.seconds:.1f}", str(len(s.plan)), s.summary or "") for s in report.steps]


def write_report(report: RunReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` (with its ``schema_version``) and ``report.md`` into ``out_dir``."""
    out = Path(out_dir)
    j = write_atomic(out / "report.json", json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    m = write_atomic(out / "report.md", to_markdown(report))
    return j, m
