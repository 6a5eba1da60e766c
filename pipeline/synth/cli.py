"""``ctprep demo-data``: write a synthetic dataset in a real on-disk layout."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from ctprep.synth.grids import GRIDS

SOURCES = ("ctrate", "omniabnorm")


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def demo_data(
    out: Path = typer.Option(..., "--out", help="Output folder: a CT-RATE root, or one OmniAbnorm batch folder."),
    source: str = typer.Option("ctrate", "--source", help=f"Layout to write: {' | '.join(SOURCES)}."),
    cases: int = typer.Option(40, "--cases", min=0, help="Number of normal cases (CT-RATE: volumes; OmniAbnorm: records)."),
    grid: str = typer.Option("demo", "--grid", help=f"Volume size preset: {' | '.join(GRIDS)} (demo: CPU-fast)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed writes byte-identical files."),
    faults: bool = typer.Option(False, "--faults", help="Also write broken cases, listed in OUT/faults.json."),
    workers: int = typer.Option(0, "--workers", min=0, help="CT-RATE: processes rendering volumes (0 = one per CPU core); files are identical for any value."),
) -> None:
    """Write synthetic chest CTs with matching reports, labels, masks and CoT steps."""
    if source not in SOURCES:
        raise typer.BadParameter(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}", param_hint="--source")
    if grid not in GRIDS:
        raise typer.BadParameter(f"unknown grid {grid!r}; choose one of: {', '.join(GRIDS)}", param_hint="--grid")
    t0 = time.perf_counter()
    if source == "ctrate":
        from ctprep.synth.ctrate import write_ctrate

        res = write_ctrate(out, cases=cases, grid=grid, seed=seed, faults=faults,
                           workers=workers or _usable_cpus())
        n = len(res["volumes"])
        what = f"{n} volumes"
    else:
        from ctprep.synth.omniabnorm import write_omniabnorm

        res = write_omniabnorm(out, cases=cases, grid=grid, seed=seed, faults=faults)
        what = f"{len(res['records'])} records"
    typer.echo(f"wrote {what} ({len(res['faults'])} fault cases) to {out} in {time.perf_counter() - t0:.1f} s")
