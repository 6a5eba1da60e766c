"""``ctprep build-shards`` and ``ctprep status``: Typer-compatible command functions.

Registered by ``ctprep.cli``; all logic lives in ``ctprep.runner`` and ``ctprep.status`` (and
``ctprep.cluster`` for the scheduler and its TLS). Exit codes of ``build-shards``: 0 = ran
(quarantined cases are reported, not fatal); 1 = nothing could be processed (no case completed
the last requested stage) or an expected failure (bad arguments, unreachable scheduler,
unwritable or full ``--out``, ...); 2 = ``--strict`` and some case is quarantined; other codes as
:class:`~ctprep.errors.UserError` subclasses set them (3 = ``--out`` is locked by another build).

An expected failure is one line on stderr, ``error: <path or address>: <cause>``, and no
traceback; ``--debug`` re-raises it with its traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import typer

from ctprep.cluster import TLS_ENV, check_scheduler, tls_config, tls_files
from ctprep.config import load_config, with_cot_files, with_mask_options
from ctprep.errors import UserError

DEBUG_HELP = "Show the traceback of an error instead of the one-line message."


# A write that fails with one of these and no file name (write(), flush() and close() carry none)
# is reported against the output folder: that is where the driver writes.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO})


def one_line_error(exc: BaseException, out: Path | None = None, manifest: Path | None = None) -> str | None:
    """The user's line for an expected failure (None: a bug, let it raise).

    UserError, ValueError (bad arguments / config) and FileNotFoundError carry their own message;
    any other OSError (read-only or full disk, not a folder, permission) is named by its path (or
    ``out`` for a failed write that names none) and its cause; an SQLite error by ``manifest``.
    """
    if isinstance(exc, (UserError, ValueError)) and not isinstance(exc, UnicodeError):
        return " ".join(str(exc).split())
    if isinstance(exc, OSError):
        cause = exc.strerror or str(exc) or type(exc).__name__
        if exc.filename is not None:
            return f"{exc.filename}: {cause}" + (f" -> {exc.filename2}" if exc.filename2 else "")
        if out is not None and exc.errno in WRITE_ERRNOS:
            return f"{out}: {cause} (while writing the output)"
        return " ".join(cause.split())
    if isinstance(exc, sqlite3.OperationalError):  # "database or disk is full", "readonly database", ...
        return f"{manifest if manifest else 'the manifest'}: {exc} (SQLite)"
    return None


@contextlib.contextmanager
def reported_errors(debug: bool, out: Path | None = None, manifest: Path | None = None) -> Iterator[None]:
    """Turn an expected failure inside the block into ``error: <line>`` and a non-zero exit."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - one_line_error() picks the expected ones
        line = None if debug else one_line_error(e, out, manifest)
        if line is None:
            raise
        typer.echo(f"error: {line}", err=True)
        raise typer.Exit(getattr(e, "exit_code", 1) if isinstance(e, UserError) else 1) from None


def check_sources(srcs: list[Path]) -> None:
    """Each ``--src`` is an existing folder (before anything is scanned or started)."""
    for s in srcs:
        if not s.exists():
            raise UserError(f"--src {s}: no such folder")
        if not s.is_dir():
            raise UserError(f"--src {s}: not a folder")


def check_cot_files(files: list[Path] | None) -> None:
    """Each ``--cot`` is an existing regular file."""
    for f in files or []:
        if not f.exists():
            raise UserError(f"--cot {f}: no such file")
        if not f.is_file():
            raise UserError(f"--cot {f}: not a file")


def recorded_config(manifest_path: Path):
    """The config the last build recorded in its manifest (what ``status`` compares against by default)."""
    from ctprep.config import config_from_dict
    from ctprep.manifest import Manifest

    if not manifest_path.exists():
        raise FileNotFoundError(f"no manifest at {manifest_path}: run `ctprep build-shards` first")
    with Manifest(manifest_path, readonly=True) as manifest:
        recorded = manifest.get_setting("config") or {}
    return config_from_dict(recorded, name=recorded.get("name", "recorded"))


def build_shards(
    src: list[Path] = typer.Option(..., "--src", help="Source folder (repeatable): a CT-RATE or OmniAbnorm-CT root."),
    out: Path = typer.Option(..., "--out", help="Output folder: shards, index.json, quarantine.jsonl (and work/)."),
    config: Optional[str] = typer.Option(None, "--config", help="Pipeline preset (demo, ctclip, seed) or a YAML file. Default: demo."),
    work: Optional[Path] = typer.Option(None, "--work", help="Work folder (manifest, zarr, ...). Default: OUT/work."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Comma-separated stages to run, e.g. scan,resample. Default: all."),
    source: Optional[str] = typer.Option(None, "--source", help="Source layout (ctrate, omniabnorm). Default: detected."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of an existing Dask scheduler: tls://host:8786 (with --tls-*), or tcp://host:8786 on a trusted network only."),
    tls_ca_file: Optional[Path] = typer.Option(None, "--tls-ca-file", envvar=TLS_ENV["ca_file"], help="The cluster CA's certificate (PEM) for a tls:// --scheduler."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", envvar=TLS_ENV["cert"], help="This client's certificate (PEM), signed by that CA."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", envvar=TLS_ENV["key"], help="This client's private key (PEM), unless it is inside --tls-cert."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Local Dask worker processes (1 thread each). Default: min(2, CPUs); 0 = in process."),
    retries: int = typer.Option(2, "--retries", help="Re-run a task that raised on a Dask worker up to N times (a dead worker's tasks are re-run anyway)."),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help="Per local worker process, e.g. 6GiB (default: Dask's share of RAM). With --scheduler, set it on the workers."),
    task_timeout: float = typer.Option(3600.0, "--task-timeout", min=0, help="Seconds one case may spend in one stage before the run stops waiting (a stuck read); the case is retried on the next run. 0 = no limit."),
    masks: Optional[list[str]] = typer.Option(None, "--masks", help="CT-RATE mask tree NAME=DIR (repeatable), e.g. a MedSAM2 output folder; the first one is the anatomy map unless --anatomy-masks names another."),
    cot: Optional[list[Path]] = typer.Option(None, "--cot", help="A CoT JSONL file for existing cases (repeatable), merged after the source trees' own CoT files, later files winning (docs/pipeline.md, CoT deliveries)."),
    anatomy_masks: Optional[str] = typer.Option(None, "--anatomy-masks", help="Name of the mask tree that drives regions (default: ts_total if present, else masks/, else the only tree)."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero (2) if any case is quarantined."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Preprocess raw CT sources into zarr and WebDataset shards, incrementally."""
    from ctprep.manifest import MANIFEST_FILE, work_dir_for
    from ctprep.runner import build

    with reported_errors(debug, out=out, manifest=work_dir_for(out, work) / MANIFEST_FILE):
        # Everything that can be checked without work is checked first: a wrong --src or an
        # unreachable scheduler fails in seconds, before any scanning or writing.
        check_sources(src)
        tls = tls_files(scheduler, tls_ca_file, tls_cert, tls_key)
        check_cot_files(cot)
        cfg = with_cot_files(with_mask_options(load_config(config), masks, anatomy_masks), cot)
        if scheduler:
            check_scheduler(scheduler, tls)
        with tls_config(tls):
            report = build(src, out, cfg, work=work, stages=stages, source=source, scheduler=scheduler,
                           workers=workers, retries=retries, memory_limit=memory_limit, strict=strict,
                           progress=progress, task_timeout=task_timeout or None)
    raise typer.Exit(report.exit_code)


def status(
    out: Path = typer.Option(..., "--out", help="Output folder of a previous build-shards run."),
    work: Optional[Path] = typer.Option(None, "--work", help="Work folder if it was not OUT/work."),
    config: Optional[str] = typer.Option(None, "--config", help="Compare against this config instead of the last run's."),
    src: Optional[list[Path]] = typer.Option(None, "--src", help="Source folders to check (default: those of the last run)."),
    source: Optional[str] = typer.Option(None, "--source", help="Source layout for --src (default: detected)."),
    cot: Optional[list[Path]] = typer.Option(None, "--cot", help="CoT JSONL files to check instead of the last run's --cot files (repeatable)."),
    max_cases: int = typer.Option(50, "--max-cases", help="Quarantined cases to list."),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Per stage: done / stale (and why) / quarantined (and why). Reads only: works on a read-only --out."""
    from ctprep.manifest import MANIFEST_FILE, work_dir_for
    from ctprep.status import status as run_status

    with reported_errors(debug, manifest=work_dir_for(out, work) / MANIFEST_FILE):
        if src:
            check_sources(src)
        cfg = load_config(config) if config else None
        if cot:  # these CoT files instead of the last run's
            check_cot_files(cot)
            cfg = with_cot_files(cfg or recorded_config(work_dir_for(out, work) / MANIFEST_FILE), cot, replace=True)
        report = run_status(out, work=work, config=cfg, srcs=src or None, source=source)
    typer.echo(report.render(max_cases=max_cases))


def compact_shards(
    out: Path = typer.Option(..., "--out", help="Output folder of build-shards (holds index.json)."),
    threshold: float = typer.Option(0.25, "--threshold", help="Rewrite a shard when at least this fraction of its samples is superseded (0 < t <= 1)."),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Rewrite shards whose samples are mostly superseded; commits through index.json under the output lock."""
    from ctprep.compact import compact

    with reported_errors(debug, out=out):
        if not (out / "index.json").is_file():
            raise UserError(f"--out {out}: no index.json; is it a build-shards output folder?")
        compact(out, threshold, log=typer.echo)
