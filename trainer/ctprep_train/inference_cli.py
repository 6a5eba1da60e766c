"""``ctprep embed`` and ``ctprep classify``: Typer command functions over ``ctprep_train.inference``.

Registered by ``ctprep.cli``. torch and the model load inside the commands, so ``ctprep --help``
and the pipeline commands stay cheap. A scan that cannot be read or preprocessed is one line on
stderr, ``error: <file>: <kind>: <reason>`` (the pipeline's quarantine kinds), and the other scans
go on; the exit code is 0 when at least one scan was embedded, 1 when none was.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

NOT_FOUND_EXIT = 1


def _metadata_rows(path: Path | None) -> dict[str, dict[str, str]]:
    """CT-RATE metadata CSV rows by ``VolumeName`` (needed for v1 files, whose headers are blank)."""
    if path is None:
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["VolumeName"]: row for row in csv.DictReader(fh) if row.get("VolumeName")}


def _mask_for(scan: Path, mask_dir: Path | None) -> Path | None:
    if mask_dir is None:
        return None
    mask = mask_dir / scan.name
    return mask if mask.is_file() else None


def failure_line(scan: Path, exc: BaseException) -> str:
    """``<file>: <kind>: <reason>`` on one line (QuarantineError keeps its kind)."""
    from ctprep.quarantine import STAGE_ERROR, UNREADABLE, QuarantineError, one_line

    if isinstance(exc, QuarantineError):
        kind, reason = exc.kind, exc.reason
    elif isinstance(exc, (OSError, ValueError)):
        kind, reason = UNREADABLE, f"{type(exc).__name__}: {exc}"
    else:
        kind, reason = STAGE_ERROR, f"{type(exc).__name__}: {exc}"
    return f"{scan}: {kind}: {one_line(reason)}"


def _preprocess_one(preprocess, scan: Path, mask_dir: Path | None, rows: dict[str, dict[str, str]]):
    return preprocess(scan, mask=_mask_for(scan, mask_dir), meta=rows.get(scan.name))


def embed(
    scans: list[Path] = typer.Argument(..., help="CT volumes (.nii / .nii.gz)"),
    encoder: Path = typer.Option(..., "--encoder", help="export folder (python -m ctprep_train.export) or RUN/encoder"),
    out: Path = typer.Option(..., "--out", help="embeddings .npy (N, E) float32; ids go to the same name .json"),
    mask_dir: Optional[Path] = typer.Option(None, "--mask-dir", help="label maps named like the scans (optional)"),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="CT-RATE metadata CSV (v1 files need it)"),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="volumes per forward pass"),
    device: str = typer.Option("cpu", "--device"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Embed scans with an exported encoder: OUT.npy (N, E) and OUT.json (ids, files, failures)."""
    import numpy as np
    from tqdm import tqdm

    from ctprep_train.inference import collate, load_encoder

    model, preprocess, _ = load_encoder(encoder, device=device)
    rows = _metadata_rows(metadata)
    embeddings, ids, files, failed = [], [], [], []
    pending: list[tuple[Path, dict[str, Any]]] = []

    def flush() -> None:
        if pending:
            embeddings.append(model.encode_image(collate([b for _, b in pending])).numpy())
            ids.extend(b["ids"][0] for _, b in pending)
            files.extend(str(s) for s, _ in pending)
            pending.clear()

    for scan in tqdm(scans, desc="embed", unit="scan", disable=not progress, file=sys.stderr):
        try:
            pending.append((scan, _preprocess_one(preprocess, scan, mask_dir, rows)))
        except Exception as exc:  # noqa: BLE001 - a bad file is reported and skipped, like a quarantined case
            line = failure_line(scan, exc)
            failed.append(line)
            tqdm.write(f"error: {line}", file=sys.stderr)
            continue
        if len(pending) >= batch_size:
            flush()
    flush()
    dim = model.clip.cfg.embed_dim
    matrix = np.concatenate(embeddings).astype(np.float32) if embeddings else np.zeros((0, dim), np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, matrix, allow_pickle=False)
    record = {"encoder": str(encoder), "embed_dim": dim, "ids": ids, "files": files, "failed": failed,
              "normalized": True}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    typer.echo(f"embedded {len(ids)} of {len(scans)} scan(s) -> {out} {tuple(matrix.shape)}"
               + (f"; {len(failed)} failed (see above and {out.with_suffix('.json').name})" if failed else ""),
               err=True)
    if not ids:
        raise typer.Exit(NOT_FOUND_EXIT)


def read_prompts(path: Path) -> dict[str, list[str]]:
    """``{"finding": ["positive sentence", "negative sentence", ...], ...}`` from a JSON file."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a JSON object finding -> [positive prompt, negative prompt, ...]")
    for name, texts in data.items():
        if not isinstance(texts, list) or len(texts) < 2 or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"{path}: {name!r} must map to a list of >= 2 sentences (positive first)")
    return {str(k): list(v) for k, v in data.items()}


def classify(
    scan: Path = typer.Argument(..., help="CT volume (.nii / .nii.gz)"),
    encoder: Path = typer.Option(..., "--encoder", help="export folder (python -m ctprep_train.export) or RUN/encoder"),
    prompts: Path = typer.Option(..., "--prompts", help='JSON {"finding": ["positive", "negative", ...]}'),
    mask: Optional[Path] = typer.Option(None, "--mask", help="label map on the scan's grid (optional)"),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="CT-RATE metadata CSV (v1 files need it)"),
    map_png: Optional[Path] = typer.Option(None, "--map", help="also draw the first finding's positive prompt map"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of lines"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Zero-shot scores of one scan: per finding, P(positive prompt) among its prompts."""
    from ctprep_train.inference import load_encoder

    try:
        table = read_prompts(prompts)
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(NOT_FOUND_EXIT) from None
    model, preprocess, _ = load_encoder(encoder, device=device)
    try:
        batch = preprocess(scan, mask=mask, meta=_metadata_rows(metadata).get(scan.name))
    except Exception as exc:  # noqa: BLE001 - one line, as embed does
        typer.echo(f"error: {failure_line(scan, exc)}", err=True)
        raise typer.Exit(NOT_FOUND_EXIT) from None
    scores = model.classify(batch, table)
    if as_json:
        typer.echo(json.dumps({"scan": str(scan), "id": batch["ids"][0], "scores": scores}))
    else:
        width = max(len(k) for k in scores)
        for name, p in scores.items():
            typer.echo(f"{name:<{width}}  {p:.4f}  ({table[name][0]!r} vs {', '.join(map(repr, table[name][1:]))})")
    if map_png is not None:
        first = next(iter(table))
        model.save_similarity_map(batch, table[first][0], map_png)
        typer.echo(f"wrote {map_png}", err=True)
