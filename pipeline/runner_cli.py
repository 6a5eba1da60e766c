"""``ctprep build-shards`` and ``ctprep status``: Typer-compatible command functions.

Registered by ``ctprep.cli``; all logic lives in ``ctprep.runner``.
Exit codes of ``build-shards``: 0 = ran (quarantined cases are reported, not
fatal); 1 = nothing could be processed (no case completed the last requested
stage) or bad arguments; 2 = ``--strict`` and some case is quarantined.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ctprep.config import load_config, with_mask_options


def build_shards(
    src: list[Path] = typer.Option(..., "--src", help="Source folder (repeatable): a CT-RATE or OmniAbnorm-CT root."),
    out: Path = typer.Option(..., "--out", help="Output folder: shards, index.json, quarantine.jsonl (and work/)."),
    config: Optional[str] = typer.Option(None, "--config", help="Pipeline preset (demo, ctclip, seed) or a YAML file. Default: demo."),
    work: Optional[Path] = typer.Option(None, "--work", help="Work folder (manifest, zarr, ...). Default: OUT/work."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Comma-separated stages to run, e.g. scan,resample. Default: all."),
    source: Optional[str] = typer.Option(None, "--source", help="Source layout (ctrate, omniabnorm). Default: detected."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of an existing Dask scheduler, e.g. tcp://host:8786."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Local Dask worker processes (1 thread each). Default: min(2, CPUs); 0 = in process."),
    retries: int = typer.Option(2, "--retries", help="Re-run a task that raised on a Dask worker up to N times (a dead worker's tasks are re-run anyway)."),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help="Per local worker process, e.g. 6GiB (default: Dask's share of RAM). With --scheduler, set it on the workers."),
    masks: Optional[list[str]] = typer.Option(None, "--masks", help="CT-RATE mask tree NAME=DIR (repeatable), e.g. a MedSAM2 output folder; the first one is the anatomy map unless --anatomy-masks names another."),
    anatomy_masks: Optional[str] = typer.Option(None, "--anatomy-masks", help="Name of the mask tree that drives regions (default: ts_total if present, else masks/, else the only tree)."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero (2) if any case is quarantined."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Preprocess raw CT sources into zarr and WebDataset shards, incrementally."""
    from ctprep.runner import build

    try:
        cfg = with_mask_options(load_config(config), masks, anatomy_masks)
        report = build(src, out, cfg, work=work, stages=stages, source=source, scheduler=scheduler,
                       workers=workers, retries=retries, memory_limit=memory_limit, strict=strict,
                       progress=progress)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    raise typer.Exit(report.exit_code)


def status(
    out: Path = typer.Option(..., "--out", help="Output folder of a previous build-shards run."),
    work: Optional[Path] = typer.Option(None, "--work", help="Work folder if it was not OUT/work."),
    config: Optional[str] = typer.Option(None, "--config", help="Compare against this config instead of the last run's."),
    src: Optional[list[Path]] = typer.Option(None, "--src", help="Source folders to check (default: those of the last run)."),
    source: Optional[str] = typer.Option(None, "--source", help="Source layout for --src (default: detected)."),
    max_cases: int = typer.Option(50, "--max-cases", help="Quarantined cases to list."),
) -> None:
    """Per stage: done / stale (and why) / quarantined (and why)."""
    from ctprep.runner import status as run_status

    try:
        cfg = load_config(config) if config else None
        report = run_status(out, work=work, config=cfg, srcs=src or None, source=source)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(report.render(max_cases=max_cases))
