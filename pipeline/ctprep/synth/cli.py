"""``ctprep demo-data``: write a synthetic dataset in a real on-disk layout."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from ctprep.synth.grids import GRIDS

SOURCES = ("ctrate", "omniabnorm")
# On-disk layouts per source; the first is the default.
LAYOUTS = {
    # flat: v1 and v2 files mixed in train/ + valid/, masks/ mirroring them (the demo's layout).
    # release: CT-RATE as downloaded: train/ + valid/ (v1) twins for some volumes, train_fixed/ +
    #   valid_fixed/ (v2) for all, ts_seg/<task>/ mask trees, the full metadata CSV.
    # release-fixed: the same with only the *_fixed folders.
    "ctrate": ("flat", "release", "release-fixed"),
    # release: OmniAbnorm-CT-14K's JSON per plane and split (dict keyed by datum id, image and
    #   mask folders); batches: the older list-of-records batch folders.
    "omniabnorm": ("release", "batches"),
}


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def demo_data(
    out: Path = typer.Option(..., "--out", help="Output folder: a CT-RATE root, or one OmniAbnorm batch folder."),
    source: str = typer.Option("ctrate", "--source", help=f"Layout to write: {' | '.join(SOURCES)}."),
    cases: int = typer.Option(40, "--cases", min=0, help="Number of normal cases (CT-RATE: volumes; OmniAbnorm: records)."),
    grid: str = typer.Option("demo", "--grid", help=f"Volume size preset: {' | '.join(GRIDS)} (demo: CPU-fast)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed writes byte-identical files."),
    faults: bool = typer.Option(False, "--faults", help="Also write broken cases, listed in OUT/faults.json."),
    layout: str = typer.Option("", "--layout", help="On-disk layout: ctrate flat | release | release-fixed (default flat); "
                               "omniabnorm release | batches (default release)."),
    workers: int = typer.Option(0, "--workers", min=0, help="CT-RATE: processes rendering volumes (0 = one per CPU core); files are identical for any value."),
    wording: str = typer.Option("default", "--wording", help="CT-RATE report and CoT wording: default | anatomy "
                                "(findings named by side, lobe, cranio-caudal zone and extent, one template per "
                                "statement; same volumes as default; docs/synthetic-data.md)."),
) -> None:
    """Write synthetic chest CTs with matching reports, labels, masks and CoT steps."""
    if source not in SOURCES:
        raise typer.BadParameter(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}", param_hint="--source")
    if grid not in GRIDS:
        raise typer.BadParameter(f"unknown grid {grid!r}; choose one of: {', '.join(GRIDS)}", param_hint="--grid")
    layout = layout or LAYOUTS[source][0]
    if layout not in LAYOUTS[source]:
        raise typer.BadParameter(f"unknown {source} layout {layout!r}; choose one of: {', '.join(LAYOUTS[source])}",
                                 param_hint="--layout")
    from ctprep.synth.reports import WORDINGS

    if wording not in WORDINGS:
        raise typer.BadParameter(f"unknown wording {wording!r}; choose one of: {', '.join(WORDINGS)}", param_hint="--wording")
    if source != "ctrate" and wording != "default":
        raise typer.BadParameter("only --source ctrate has another wording", param_hint="--wording")
    t0 = time.perf_counter()
    if source == "ctrate":
        from ctprep.synth.ctrate import write_ctrate

        res = write_ctrate(out, cases=cases, grid=grid, seed=seed, faults=faults,
                           workers=workers or _usable_cpus(), layout=layout, wording=wording)
        n = len(res["volumes"])
        what = f"{n} volumes"
    else:
        from ctprep.synth.omniabnorm import write_omniabnorm

        res = write_omniabnorm(out, cases=cases, grid=grid, seed=seed, faults=faults, layout=layout)
        what = f"{len(res['records'])} records"
    typer.echo(f"wrote {what} ({len(res['faults'])} fault cases) to {out} in {time.perf_counter() - t0:.1f} s")
