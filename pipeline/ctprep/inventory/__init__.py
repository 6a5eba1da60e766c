"""``ctprep inventory``: what a source folder holds, before any work is done.

The pipeline's counterpart of nnU-Net's dataset fingerprint: per ``--src`` root
it runs the source's own ``scan`` (so it sees exactly what ``build-shards``
would), reads only NIfTI *headers* (a few hundred inflated bytes per file), a
small sample of whole volumes for the HU distribution, and writes
``OUT/inventory.json`` + ``OUT/inventory.png``. It never writes under a source
folder and creates no zarr, shard or manifest.

Layers (as in the stages): :mod:`.headers` (:func:`read_nifti_header`, cheap I/O,
one file, and :func:`volume_geometry`), the per-source parts :mod:`.ctrate` and
:mod:`.omniabnorm` (records, then pure summaries such as :func:`summarize_ctrate`,
:func:`summarize_omni`), :mod:`.hu` (the HU sample), this module's
:func:`build_inventory` (scan + thread pool), :mod:`.render`
(:func:`render_table` / :func:`plot_inventory`, presentation), and the Typer
command :func:`inventory`.

Axis names: every spacing / shape here is given as (z, y, x) = (slice axis,
row axis, column axis) of the *file's* voxel grid, where the slice axis is
the voxel axis most aligned with patient superior-inferior (so a coronal
acquisition reports its true slice spacing as z).
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer

from ctprep.inventory.ctrate import (
    ctrate_volume_record,
    derive_ctrate_layout,
    mask_grid_problem,
    sample_ctrate_hu,
    summarize_ctrate,
    summarize_duplicates,
    summarize_volumes,
)
from ctprep.inventory.headers import (
    HEADER_BYTES,
    SPACING_RANGE_MM,
    NiftiHeaderInfo,
    obliquity_deg,
    read_nifti_header,
    spacing_problem,
    volume_geometry,
)
from ctprep.inventory.hu import (
    HU_BIN,
    HU_RANGE,
    HU_VOXELS_PER_VOLUME,
    HuAccumulator,
    sample_indices,
    sample_loaded_hu,
    subsample_voxels,
)
from ctprep.inventory.omniabnorm import omni_case_record, summarize_omni
from ctprep.inventory.render import INVENTORY_JSON, INVENTORY_PNG, plot_inventory, render_table, write_inventory
from ctprep.inventory.summary import EXAMPLES, histogram, quantiles, summarize_quarantine

if TYPE_CHECKING:  # the command stays cheap to import: numpy/nibabel/matplotlib load on use
    from ctprep.config import PipelineConfig

__all__ = [
    "EXAMPLES", "HEADER_BYTES", "HU_BIN", "HU_RANGE", "HU_VOXELS_PER_VOLUME", "INVENTORY_JSON", "INVENTORY_PNG",
    "INVENTORY_VERSION", "SPACING_RANGE_MM", "HuAccumulator", "NiftiHeaderInfo", "build_inventory",
    "ctrate_volume_record", "derive_ctrate_layout", "histogram", "inventory", "inventory_root", "mask_grid_problem",
    "obliquity_deg", "omni_case_record", "plot_inventory", "quantiles", "read_nifti_header", "render_table",
    "sample_ctrate_hu", "sample_indices", "sample_loaded_hu", "spacing_problem", "subsample_voxels",
    "summarize_ctrate", "summarize_duplicates", "summarize_omni", "summarize_quarantine", "summarize_volumes",
    "volume_geometry", "write_inventory",
]

INVENTORY_VERSION = 1


# --------------------------------------------------------------------- driver
def _map(fn: Callable[[Any], dict[str, Any]], items: list[Any], workers: int,
         log: Optional[Callable[[str], None]], what: str) -> list[dict[str, Any]]:
    """``[fn(x) for x in items]`` on a thread pool (header reads wait on I/O, not the GIL), in order."""
    import concurrent.futures as cf

    every = max(1000, len(items) // 10)
    out: list[dict[str, Any]] = []
    with cf.ThreadPoolExecutor(max(1, workers)) as pool:
        for i, rec in enumerate(pool.map(fn, items, chunksize=64), 1):
            out.append(rec)
            if log and i % every == 0:
                log(f"  {what}: {i}/{len(items)}")
    return out


def inventory_root(root: Path, source_name: str, cfg: PipelineConfig, hu_sample: int = 16, workers: int = 8,
                   log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Inventory of one source root (reads only; see the module docstring)."""
    from ctprep.sources import get_source

    root = Path(root).resolve()
    policy = getattr(getattr(cfg, "ctrate", None), "missing_mask", None)
    if source_name == "ctrate" and policy not in (None, "allow"):
        # Scan with missing masks allowed: an image-only download must still show its volumes
        # (spacing, headers, HU); the table says how many build-shards would quarantine.
        cfg = dataclasses.replace(cfg, ctrate=dataclasses.replace(cfg.ctrate, missing_mask="allow"))
    source = get_source(source_name, cfg)
    if log:
        log(f"{root}: scanning as {source_name}")
    cases, quarantined = source.scan(root)
    entry: dict[str, Any] = {"root": str(root), "source": source_name, "scanned": len(cases) + len(quarantined),
                             "cases": len(cases), "quarantined_at_scan": len(quarantined)}
    if source_name == "ctrate":
        layout = source.layout(root) if hasattr(source, "layout") else derive_ctrate_layout(root, cases)
        if log:
            log(f"  reading {len(cases)} volume headers")
        records = _map(lambda c: ctrate_volume_record(c, root), cases, workers, log, "headers")
        limit = float(getattr(cfg.ctrate, "max_oblique_deg", 1.0))
        entry["ctrate"] = summarize_ctrate(root, cases, quarantined, layout, records, limit)
        entry["ctrate"]["missing_mask_policy"] = policy
        readable = {r["case"] for r in records if "error" not in r and "spacing_problem" not in r}
        if log and hu_sample:
            log(f"  sampling HU of {min(hu_sample, len(readable))} volumes")
        entry["hu"] = sample_ctrate_hu(cases, readable, hu_sample, getattr(cfg.ctrate, "max_oblique_deg", None))
        entry["per_volume"] = records
    elif source_name == "omniabnorm":
        records = _map(omni_case_record, cases, workers, log, "cases")
        batches = [Path(b).name for b in source.batches(root)] if hasattr(source, "batches") else []
        entry["omniabnorm"] = summarize_omni(cases, quarantined, records, batches)
        entry["hu"] = sample_loaded_hu(source, cases, hu_sample)
        entry["hu"]["approximate"] = "8-bit JPEG: HU from inverting the record's window"
        entry["per_case"] = records
    else:  # a source registered later: the generic fields only
        entry["generic"] = {"by_split": dict(sorted(Counter(c.split for c in cases).items())),
                            "quarantine": summarize_quarantine(quarantined)}
        entry["hu"] = sample_loaded_hu(source, cases, hu_sample)
    return entry


def build_inventory(srcs: list[Path], cfg: PipelineConfig, source: Optional[str] = None, hu_sample: int = 16,
                    workers: int = 8, log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Inventory of every ``--src`` root (JSON-able).

    Args:
        srcs: source roots; each is detected with ``detect_source`` unless ``source`` is given.
        cfg: pipeline config (the CT-RATE source reads its ``ctrate`` section: mask trees, copy rule).
        hu_sample: volumes per root read whole for the HU histogram (0 = none).
        workers: threads for header reads.
    """
    from ctprep.sources import detect_source

    roots = []
    for src in srcs:
        src = Path(src)
        if not src.is_dir():
            raise FileNotFoundError(f"--src {src} is not a folder")
        roots.append((src, source or detect_source(src)))
    return {
        "inventory_version": INVENTORY_VERSION,
        "config": cfg.name,
        "ctrate_config": {k: v for k, v in cfg.to_json().get("ctrate", {}).items()},
        "hu_sample": hu_sample,
        "sources": [inventory_root(src, name, cfg, hu_sample=hu_sample, workers=workers, log=log)
                    for src, name in roots],
    }


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------- command
def inventory(
    src: list[Path] = typer.Option(..., "--src", help="Source folder (repeatable): a CT-RATE dataset/ root or an OmniAbnorm-CT root."),
    source: Optional[str] = typer.Option(None, "--source", help="Source layout (ctrate, omniabnorm). Default: detected per --src."),
    config: Optional[str] = typer.Option(None, "--config", help="Pipeline preset (demo, ctclip, seed) or a YAML file. Default: demo."),
    masks: Optional[list[str]] = typer.Option(None, "--masks", help="Extra CT-RATE mask tree NAME=DIR (repeatable)."),
    anatomy_masks: Optional[str] = typer.Option(None, "--anatomy-masks", help="Name of the mask tree that is the anatomy map."),
    out: Path = typer.Option(Path("inventory"), "--out", help="Folder for inventory.json and inventory.png (not inside a --src)."),
    hu_sample: int = typer.Option(16, "--hu-sample", min=0, help="Volumes per source read whole for the HU histogram (0 = none)."),
    workers: int = typer.Option(8, "--workers", min=1, help="Threads reading headers (I/O bound: more than the cores helps on network disks)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines on stderr."),
) -> None:
    """What a source folder holds (folders, masks, side tables, duplicates, spacing, HU); writes nothing there."""
    from ctprep.config import load_config, with_mask_options
    from ctprep.errors import UserError

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        for s in src:
            if not Path(s).is_dir():
                raise FileNotFoundError(f"--src {s} is not a folder")
            if _inside(out, Path(s)):
                raise ValueError(f"--out {out} is inside --src {s}; the inventory never writes into a source folder")
        if out.exists() and not out.is_dir():
            raise ValueError(f"cannot write the inventory to {out}: it is a file, not a folder")
        cfg = with_mask_options(load_config(config), masks, anatomy_masks)
        report = build_inventory(src, cfg, source=source, hu_sample=hu_sample, workers=workers, log=log)
    except (ValueError, FileNotFoundError, UserError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(render_table(report))
    try:
        js, png = write_inventory(report, out)
    except OSError as e:
        typer.echo(f"error: cannot write the inventory to {out}: {e.strerror or e}", err=True)
        raise typer.Exit(1)
    typer.echo(f"wrote {js} and {png}")
