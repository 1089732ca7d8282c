"""The ``torchslim`` command: ``compress`` runs a recipe, ``inspect`` explains a `.tslim` file."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from torchslim.errors import TorchslimError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress and accelerate trained PyTorch models.")
console = Console()


@contextlib.contextmanager
def _bars() -> Iterator:
    columns = (TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=False) as progress:

        def factory(description: str):
            task = None  # created on the first update, so steps that train nothing show no bar

            def update(done: int, total: int) -> None:
                nonlocal task
                if task is None:
                    task = progress.add_task(description, total=total)
                progress.update(task, completed=done, total=total)

            return update

        yield factory


def _fail(exc: TorchslimError) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(code=2)


@app.command()
def compress(
    recipe: Optional[str] = typer.Argument(None, help="recipe YAML path or built-in name (default: lenet_300_100)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (overrides the recipe's)"),
) -> None:
    """Run a recipe: train (or reuse) the baseline, compress, save the .tslim, write the report."""
    from torchslim.recipe.run import run_recipe
    from torchslim.recipe.schema import load_recipe
    from torchslim.report.render import (
        DISTILL_COLUMNS, GROUP_COLUMNS, LAYER_COLUMNS, QUANT_COLUMNS, STRUCTURE_COLUMNS, distill_rows, group_rows,
        layer_rows, quant_rows, structure_rows, summary_rows,
    )  # fmt: skip

    try:
        spec = load_recipe(recipe)
        if out is not None:
            spec = spec.model_copy(update={"outputs": spec.outputs.model_copy(update={"dir": str(out)})})
        console.print(f"recipe [bold]{spec.name}[/]: {spec.model.name} on {spec.data.name}, {spec.threads} threads")
        with _bars() as factory:
            report = run_recipe(spec, factory)
    except TorchslimError as exc:
        _fail(exc)
        return
    if report["baseline_cached"]:
        console.print("baseline: loaded from the cache (no training)")
    console.print(_rich_table("before / after", ("metric", "baseline", "compressed"), summary_rows(report)))
    if report.get("distillation"):
        console.print(_rich_table("distillation", DISTILL_COLUMNS, distill_rows(report["distillation"])))
    for i, step in enumerate(report.get("structure", []), 1):
        console.print(_rich_table(f"channels removed (step {i}), per group", GROUP_COLUMNS, group_rows(step)))
        console.print(_rich_table(f"channels removed (step {i}), per layer", STRUCTURE_COLUMNS, structure_rows(step)))
    if report.get("quantization"):
        q = report["quantization"]
        console.print(_rich_table(f"quantized layers (latency on {q['backend']})", QUANT_COLUMNS, quant_rows(q["quantization"])))
    console.print(_rich_table("per tensor in the file", LAYER_COLUMNS, layer_rows(report["layers"])))
    out_dir = Path(report["artifact"]).parent
    console.print(f"wrote {report['artifact']}, {out_dir / 'report.json'}, {out_dir / 'report.md'}")


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
    console.print(_rich_table(str(file), LAYER_COLUMNS, layer_rows(table)))
    payload = sum(r.bytes for r in rows)
    console.print(
        f"file {total:,} bytes = payload {payload:,} + container header {total - payload:,}; "
        f"fp32 weights {fp32:,} bytes ({fp32 / total:.1f}x); model {manifest.get('model')}"
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
        console.print(f"[bold red]error:[/] --shape {shape!r}: give positive integers separated by commas, e.g. 1,1,28,28")
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


def _rich_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
    table = Table(title=title, title_justify="left")
    for h in header:
        table.add_column(h, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def main() -> None:  # pragma: no cover - console entry point
    logging.basicConfig(level=logging.WARNING)
    app()
