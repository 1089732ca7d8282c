"""The ``torchslim`` command: ``compress`` runs a recipe, ``search`` finds a plan under a budget,
``report`` rewrites a run's report, ``inspect`` explains a `.tslim` file, ``export`` writes ONNX."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from torchslim.errors import TorchslimError

if TYPE_CHECKING:
    from torchslim.report.records import RunReport
    from torchslim.search.result import SearchResult

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress and accelerate trained PyTorch models.")
console = Console()


@contextlib.contextmanager
def _bars(quiet: bool = False) -> Iterator[Progress | None]:
    """One live display for every long step; a task's ``note`` field carries extra text.
    ``quiet`` shows none (``None``)."""
    if quiet:
        yield None
        return
    columns = (
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield progress


def _step_bars(progress: Progress | None):
    """Given a step's description, the ``progress(done, total)`` callback of its bar."""
    if progress is None:
        return None

    def factory(description: str):
        task = None  # created on the first update, so steps that train nothing show no bar

        def update(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = progress.add_task(description, total=total, note="")
            progress.update(task, completed=done, total=total)

        return update

    return factory


def _fail(exc: TorchslimError) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(code=2)


@app.command()
def compress(
    recipe: str | None = typer.Argument(None, help="recipe YAML path or built-in name (default: lenet_300_100)"),
    out: Path | None = typer.Option(None, "--out", help="output folder (overrides the recipe's)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars (compress: only the before/after table)"),
    nproc: int = typer.Option(
        1, "--nproc", min=1, help="train on N processes, data-parallel (torchrun; same global batch, same results)"
    ),
) -> None:
    """Run a recipe: train (or reuse) the baseline, compress, save the .tslim, write the report."""
    from torchslim.recipe.run import run_recipe
    from torchslim.recipe.schema import load_recipe
    from torchslim.report.render import summary_rows
    from torchslim.train.distributed import init_from_env, is_main

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch(
            nproc, [*([recipe] if recipe else []), *(["--out", str(out)] if out else []), *(["-q"] if quiet else [])]
        )
        return
    if init_from_env() and not is_main():
        console.quiet = True  # rank 0 alone prints
    try:
        spec = load_recipe(recipe)
        if out is not None:
            spec = spec.model_copy(update={"outputs": spec.outputs.model_copy(update={"dir": str(out)})})
        console.print(f"recipe [bold]{spec.name}[/]: {spec.model.label} on {spec.data.label}, {spec.threads} threads")
        with _bars(quiet) as progress:
            report = run_recipe(spec, _step_bars(progress))
    except TorchslimError as exc:
        _fail(exc)
        return
    if report.model.get("weights"):
        console.print(f"baseline: the trained weights in {report.model['weights']} (no training)", highlight=False)
    elif report.model.get("pretrained"):
        console.print(f"baseline: as {report.model['builder']} returns it, trained (no training)", highlight=False)
    elif report.baseline_cached:
        console.print("baseline: loaded from the cache (no training)")
    _show("before / after", ("metric", "baseline", "compressed"), summary_rows(report))
    if not quiet:
        _details(report)
    out_dir = Path(report.artifact).parent
    console.print(f"wrote {report.artifact}, {out_dir / 'report.json'}, {out_dir / 'report.md'}")


def _launch(nproc: int, args: list[str]) -> None:
    """Run ``compress ARGS`` on ``nproc`` processes under torchrun; a failed process stops the
    run with a clear error (a rerun resumes the training from its epoch checkpoints)."""
    from torchslim.errors import TrainingError

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["--module", "torchslim.cli", "compress", *args]
    code = subprocess.run(cmd, check=False).returncode
    if code != 0:
        _fail(
            TrainingError(
                f"a training process of the {nproc} failed (torchrun exited with {code}; its message is above). "
                "Rerun the same command: training resumes from the last finished epoch (checkpoints in the run's "
                "output folder, removed once a run succeeds)"
            )
        )


def _details(report: RunReport) -> None:
    """The per-technique and per-tensor tables of a compression report."""
    from torchslim.report.render import (
        GROUP_COLUMNS,
        LAYER_COLUMNS,
        QUANT_COLUMNS,
        STRUCTURE_COLUMNS,
        distill_columns,
        distill_rows,
        group_rows,
        layer_rows,
        oneshot_rows,
        quant_rows,
        structure_rows,
    )

    if report.distillation:
        from torchslim.core.task import Metric

        metric = Metric(**report.metric)
        _show("distillation", distill_columns(metric), distill_rows(report.distillation, metric))
    for i, step in enumerate(report.structure, 1):
        _show(f"channels removed (step {i}), per group", GROUP_COLUMNS, group_rows(step))
        _show(f"channels removed (step {i}), per layer", STRUCTURE_COLUMNS, structure_rows(step))
    if report.quantization:
        q = report.quantization
        _show(f"quantized layers (latency on {q['backend']})", QUANT_COLUMNS, quant_rows(q["quantization"]))
    for step in report.oneshot:
        _show(f"{step['kind']} (step {step['step']}), per layer", *oneshot_rows(step))
    _show("per tensor in the file", LAYER_COLUMNS, layer_rows(report.layers))
    for s in report.steps:
        if s.summary:
            console.print(f"step {s.index} ({s.kind}): {s.summary}", highlight=False)


@app.command()
def search(
    recipe: str | None = typer.Argument(None, help="recipe YAML path or built-in name (default: lenet_300_100)"),
    budget: str | None = typer.Option(
        None,
        "--budget",
        help="quality allowed to go: '1pt' (points of accuracy, absolute) or '1%' (relative to the baseline)",
    ),
    objective: str | None = typer.Option(None, "--objective", help="size (bytes on disk) or latency (measured)"),
    trials: int | None = typer.Option(None, "--trials", help="trials in the study in all (finished ones count)"),
    timeout: float | None = typer.Option(None, "--timeout", help="stop starting trials after this many seconds"),
    workers: int | None = typer.Option(None, "--workers", help="trials at once; more than 1 runs them on Ray"),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="an existing Ray cluster (default: a local Ray)"
    ),
    out: Path | None = typer.Option(None, "--out", help="run folder (overrides the recipe's); rerunning resumes there"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars (compress: only the before/after table)"),
) -> None:
    """Search per-layer plans under a quality budget; deliver the best .tslim and report.html."""
    from torchslim.recipe.run import run_search
    from torchslim.recipe.schema import load_recipe

    try:
        spec = load_recipe(recipe)
        if out is not None:
            spec = spec.model_copy(update={"outputs": spec.outputs.model_copy(update={"dir": str(out)})})
        overrides = {
            "budget": budget,
            "objective": objective,
            "trials": trials,
            "timeout_s": timeout,
            "workers": workers,
            "ray_address": ray_address,
        }
        console.print(
            f"search [bold]{spec.name}[/]: {spec.model.label} on {spec.data.label}, run folder {spec.out_dir()}"
        )
        with _bars(quiet) as progress:
            report = run_search(spec, _step_bars(progress), _trial_line(progress), **overrides)
    except TorchslimError as exc:
        _fail(exc)
        return
    _print_search(report, spec.out_dir())


def _trial_line(progress: Progress | None):
    """The trials bar: done of the total, time spent and left, and the best plan so far."""
    if progress is None:
        return None
    task = None

    def update(info: dict) -> None:
        nonlocal task
        best = info["best"]
        if best is None:
            note = "best: none yet"
        else:
            ms = "" if best.get("latency_ms") is None else f", {best['latency_ms']:.3f} ms"
            note = (
                f"best: trial {best['trial']}, {best['bytes']:,} B{ms}, -{info['metric'].show_drop(best['drop'])}"
                f"{'' if best['met_budget'] else ' (over budget)'}"
            )
        if task is None:
            task = progress.add_task("trials", total=info["total"], note=note)
        progress.update(task, completed=info["done"], total=info["total"], note=note)

    return update


def _print_search(report: SearchResult, out_dir: Path) -> None:
    from torchslim.report.html import plan_rows, summary_rows

    if report.search and report.search.execution_note:
        console.print(f"[yellow]note:[/] {report.search.execution_note}", highlight=False)
    from torchslim.core.task import Metric

    console.print(report.chosen.message, highlight=False)
    _show("before / after", ("metric", "baseline", "delivered file"), summary_rows(report))
    _show(
        "per-layer plan",
        ("layer", "channels removed", "sparsity", "codebook bits", "int8", "skipped because"),
        plan_rows(report),
    )
    final = report.final
    if final:
        verdict = "within" if final.within_budget else "NOT within"
        lost = Metric(**report.metric).show_drop(final.drop_holdout)
        console.print(f"held-out split: {lost} lost, {verdict} the budget", highlight=False)
    console.print(f"wrote {out_dir / 'report.html'}, report.json, report.md" + (f", {final.artifact}" if final else ""))


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run folder with report.json (from compress or search)")) -> None:
    """Regenerate a run's report files (report.md, and report.html for a search) from its report.json."""
    import json

    from torchslim.report.html import write_search_report
    from torchslim.report.records import RunReport
    from torchslim.report.render import write_report
    from torchslim.search.result import SearchResult

    path = run_dir / "report.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        console.print(
            f"[bold red]error:[/] {path} does not exist: run `torchslim search` (it resumes) or `torchslim compress` first"
        )
        raise typer.Exit(code=2) from None
    except ValueError as exc:
        console.print(
            f"[bold red]error:[/] {path} is not valid JSON ({exc}); rerun the search or compress to rewrite it"
        )
        raise typer.Exit(code=2) from exc
    try:
        if isinstance(data, dict) and data.get("kind") == "search":
            written = write_search_report(SearchResult.from_dict(data, str(path)), run_dir)
        else:
            written = write_report(RunReport.from_dict(data, str(path)), run_dir)
    except TorchslimError as exc:
        _fail(exc)
        return
    console.print("wrote " + ", ".join(str(p) for p in written))


@app.command()
def inspect(file: Path = typer.Argument(..., help="a .tslim file")) -> None:
    """Print a per-layer table of a .tslim file: kept weights, bits, bytes, Shannon bounds."""
    from torchslim.artifact.inspect import inspect_file
    from torchslim.report.render import LAYER_COLUMNS, layer_rows

    try:
        rows, manifest = inspect_file(file)
    except TorchslimError as exc:
        _fail(exc)
        return
    table = [r.to_dict() for r in rows]
    total, fp32 = file.stat().st_size, sum(r.fp32_bytes for r in rows)
    _show(str(file), LAYER_COLUMNS, layer_rows(table))
    payload = sum(r.bytes for r in rows)
    console.print(
        f"file {total:,} bytes = payload {payload:,} + container header {total - payload:,}; "
        f"fp32 weights {fp32:,} bytes ({fp32 / total:.1f}x); model {manifest.model}"
    )


@app.command()
def export(
    file: Path = typer.Argument(..., help="a .tslim file of a zoo model"),
    onnx: Path = typer.Option(..., "--onnx", help="where to write the ONNX model"),
    shape: str = typer.Option("1,1,28,28", "--shape", help="example input shape; the batch dimension stays dynamic"),
) -> None:
    """Write a .tslim model as one self-contained ONNX file and check it in ONNX Runtime."""
    import torch

    from torchslim.artifact.runtime import OrtRunner, export_onnx
    from torchslim.artifact.tslim import load
    from torchslim.core.files import write_atomic

    try:
        dims = tuple(int(d) for d in shape.split(","))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        console.print(
            f"[bold red]error:[/] --shape {shape!r}: give positive integers separated by commas, e.g. 1,1,28,28"
        )
        raise typer.Exit(code=2)
    try:
        model = load(file)
        example = torch.randn(*dims, generator=torch.Generator().manual_seed(0))
        data = export_onnx(model, example)
        batch = torch.randn(8, *dims[1:], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(batch)
        got = OrtRunner(data)(batch)
    except TorchslimError as exc:
        _fail(exc)
        return
    write_atomic(onnx, data)
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    console.print(
        f"wrote {onnx} ({len(data):,} bytes); ONNX Runtime vs PyTorch on 8 random inputs: "
        f"max |difference| {float((got - ref).abs().max()):.4g}, top-1 agreement {agree:.1%}"
    )


def _show(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A table when it fits the console's width; otherwise one block per row with a
    ``column: value`` line per cell, so that narrow terminals and pipes stay readable."""
    widths = [max([len(h), *(len(str(r[i])) for r in rows)]) for i, h in enumerate(header)]
    if sum(widths) + 3 * len(widths) + 1 <= console.width:
        table = Table(title=title, title_justify="left")
        for h in header:
            table.add_column(h, no_wrap=True)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    console.print(f"[italic]{title}[/]")
    key = max(len(h) for h in header)
    for row in rows:
        console.print(f"  {row[0]}", highlight=False)
        for h, cell in zip(header[1:], row[1:]):
            console.print(f"    {h + ':':<{key + 1}} {cell}", highlight=False)


def main() -> None:  # pragma: no cover - console entry point
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":  # pragma: no cover - python -m torchslim.cli
    main()
