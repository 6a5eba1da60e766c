"""The older OmniAbnorm-CT layout: batch folders of record lists (rules: :mod:`ctprep.sources.omniabnorm`).

    ROOT/batch_01/records.json   list of records (any *.json holding a list of records works)
    ROOT/batch_01/cot.jsonl      CoT records by id (read with every other CoT file of the tree by the
                                 source: a CoT record applies to its case whichever batch delivered it)
    ROOT/batch_01/<id>/0.jpg, -2.jpg .. 2.jpg, mask_<n>.jpeg

Paths in a record are relative to its batch folder; if two batches hold the same id the batch
that sorts last wins.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ctprep.quarantine import UNREADABLE, UNSAFE_NAME, Quarantine
from ctprep.schema import is_safe_case_id
from ctprep.sources.base import CaseInput
from ctprep.sources.omniabnorm_files import SKIP_JSON, _image_size, _peek, slice_offset
from ctprep.sources.omniabnorm_labels import DEFAULT_WINDOW, label_vector, parse_window


def _inside(batch: Path, rel: str) -> Path | None:
    """``batch / rel`` if it stays inside ``batch`` (no ``..`` escape, no absolute path)."""
    if not rel or os.path.isabs(rel):
        return None
    path = (batch / rel).resolve()
    try:
        path.relative_to(batch.resolve())
    except ValueError:
        return None
    return path


def _record_files(batch: Path) -> list[Path]:
    """Older layout: the batch folder's JSON files that hold a list of records."""
    return [p for p in sorted(batch.glob("*.json")) if p.name not in SKIP_JSON and p.is_file() and _peek(p) == "records"]


def _is_batch(folder: Path) -> bool:
    return folder.is_dir() and (folder / "records.json").is_file() or bool(folder.is_dir() and _record_files(folder))


def batch_folders(root: Path) -> list[Path]:
    """Batch folders under ``root`` in name order (``root`` itself if it is one batch)."""
    root = Path(root)
    if _is_batch(root):
        return [root]
    return [sub for sub in sorted(root.iterdir()) if sub.is_dir() and _is_batch(sub)]


def scan_batches(batches: list[Path], source_name: str) -> tuple[dict[str, CaseInput], dict[str, Quarantine]]:
    """Cases and quarantines of ``batches`` by case id; a later batch replaces an earlier one's case."""
    found: dict[str, CaseInput] = {}
    quarantined: dict[str, Quarantine] = {}
    replaced: dict[str, list[str]] = {}
    for batch in batches:
        for rf in _record_files(batch):
            for record in json.loads(rf.read_text(encoding="utf-8")):
                case, bad = batch_case(batch, record, source_name)
                cid = case.case_id if case else bad.case  # type: ignore[union-attr]
                if cid in found or cid in quarantined:
                    prev = found.get(cid) or quarantined.get(cid)
                    prev_batch = (prev.provenance["batch"] if isinstance(prev, CaseInput)
                                  else prev.paths.get("batch", ""))  # type: ignore[union-attr]
                    replaced.setdefault(cid, []).append(prev_batch)
                    found.pop(cid, None)
                    quarantined.pop(cid, None)
                if case is not None:
                    found[cid] = case
                else:
                    quarantined[cid] = bad  # type: ignore[assignment]
    for cid, batches_before in replaced.items():
        if cid in found:
            found[cid].provenance["replaces_batches"] = batches_before
    return found, quarantined


def batch_case(batch: Path, record: dict[str, Any], source_name: str) -> tuple[CaseInput | None, Quarantine | None]:
    """One record of ``batch`` as a case, or the quarantine that says why not.

    The CoT fields of ``text`` (``steps``, ``cot_findings``, ``cot_impression``) are left empty:
    the source fills them from every CoT file of the tree (``OmniAbnormSource.scan``).
    """
    image_rel = str(record.get("image", ""))
    case_id = str(record.get("id") or Path(image_rel).parent.name)
    where = {"batch": batch.name, "image": str(batch / image_rel)}
    if not is_safe_case_id(case_id):
        return None, Quarantine(case_id, "scan", UNSAFE_NAME, f"record id {case_id!r} is not a safe case id "
                                "(letters, digits, '_' and '-' only)", source_name, where)
    files: dict[str, str] = {}
    offsets: dict[str, int] = {}
    slices = [("image", image_rel)] + [(f"context_{i}", str(c)) for i, c in enumerate(record.get("context") or [])]
    for role, rel in slices:
        path = _inside(batch, rel)
        if path is None:
            return None, Quarantine(case_id, "scan", UNSAFE_NAME,
                                    f"{role} path {rel!r} leaves the batch folder {batch.name}", source_name, where)
        off = 0 if role == "image" else slice_offset(rel)
        if off is None:
            return None, Quarantine(case_id, "scan", UNREADABLE,
                                    f"context slice {rel!r} is not named by its offset (e.g. -1.jpg)",
                                    source_name, where)
        files[role] = str(path)
        offsets[role] = off
    abnormalities = [dict(a) for a in record.get("abnormality") or []]
    masks = list(record.get("mask") or [])
    for j, abn in enumerate(abnormalities):
        rel = abn.get("mask") or (masks[j] if j < len(masks) else None)
        if rel is None:
            continue
        path = _inside(batch, str(rel))
        if path is None:
            return None, Quarantine(case_id, "scan", UNSAFE_NAME,
                                    f"mask path {rel!r} leaves the batch folder {batch.name}", source_name, where)
        files[f"mask_{j}"] = str(path)
    try:
        window = list(parse_window(record.get("windows")))
        window_source = "record"
    except ValueError:
        window, window_source = list(DEFAULT_WINDOW), "default"
    findings = " ".join(str(a.get("rewritten_findings") or "").strip() for a in abnormalities).strip()
    impression = " ".join(str(a.get("description") or "").strip() for a in abnormalities).strip()
    text = {
        "findings": findings,
        "impression": impression,
        "report": " ".join(t for t in (findings, impression) if t),
        "steps": [],  # CoT fields: filled by the source from all CoT files (same place in the dict:
        "cot_findings": "",  # the text key hashes the dict in order)
        "cot_impression": "",
    }
    meta = {
        "modality": record.get("modality", ""),
        "window": window,
        "window_source": window_source,
        "offsets": offsets,
        "image_size_hw": _image_size(Path(files["image"])),
        "abnormality": [{k: a.get(k) for k in ("id", "label", "category", "description")} for a in abnormalities],
    }
    case = CaseInput(case_id=case_id, source=source_name, split=str(record.get("split") or "train"),
                     files=files, meta=meta, text=text, labels=label_vector(abnormalities),
                     provenance={"batch": batch.name})
    return case, None
