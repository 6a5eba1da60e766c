"""The OmniAbnorm-CT part of the inventory: per-case records (file stats + one JPEG header) and their summary."""

from __future__ import annotations

import os
from collections import Counter
from typing import TYPE_CHECKING, Any, Optional

from ctprep.inventory.summary import EXAMPLES, histogram, quantiles, summarize_quarantine

if TYPE_CHECKING:
    from ctprep.quarantine import Quarantine
    from ctprep.sources.base import CaseInput

def _first(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if d.get(k) not in (None, "", [], {}):
            return d[k]
    return None


def _image_size_hw(path: str) -> Optional[list[int]]:
    try:
        from PIL import Image

        with Image.open(path) as im:  # header only; no decode
            return [int(im.size[1]), int(im.size[0])]
    except Exception:  # noqa: BLE001 - unreadable images are counted, not raised
        return None


def _omni_missing(prov: dict[str, Any]) -> dict[str, int]:
    """Missing files the source recorded, counted as {"context": n, "mask": n}.

    Reads ``provenance["missing"]`` (a list of file descriptions; mask entries start with
    "mask") and any ``missing_*`` key (``missing_context``, ``missing_masks``, ...).
    """
    out: Counter[str] = Counter()
    for key, value in prov.items():
        if not key.startswith("missing") or not value:
            continue
        items = value if isinstance(value, (list, tuple, dict)) else [value]
        for item in items:
            what = key if key != "missing" else str(item)
            out["mask" if "mask" in what.lower() else "context"] += 1
    return dict(out)


def omni_case_record(case: CaseInput) -> dict[str, Any]:
    """Facts of one OmniAbnorm-CT case from the generic CaseInput fields (I/O: stats + one JPEG header).

    Keys of ``meta`` / ``provenance`` are read with ``.get`` and several spellings, so this works with
    both the batch reader and the released-JSON reader of the OmniAbnorm source.
    """
    meta, prov = case.meta or {}, case.provenance or {}
    abn = _first(meta, "abnormality", "abnormalities") or _first(prov, "abnormality", "abnormalities") or []
    normal = _first(prov, "normal")
    if normal is None:
        normal = _first(meta, "normal")
    if normal is None:
        normal = not abn
    files = case.files or {}
    absent = sorted(role for role, p in files.items() if not os.path.exists(p))
    rec: dict[str, Any] = {
        "case": case.case_id,
        "split": case.split or "?",
        "plane": str(_first(prov, "plane") or _first(meta, "plane") or "unknown"),
        "json": str(_first(prov, "json", "json_file", "record_file", "file", "batch") or _first(meta, "json", "batch") or "?"),
        "normal": bool(normal),
        "context": sum(1 for r in files if r.startswith("context")),
        "masks": sum(1 for r in files if r.startswith("mask")),
        "absent_files": absent,
        "missing": _omni_missing(prov),
        "also_in": len(prov.get("also_in") or []),
        "plane_from": str(prov.get("plane_from") or "?"),
    }
    size = meta.get("image_size_hw") or prov.get("image_size_hw")
    if not size and files.get("image") and "image" not in absent:
        size = _image_size_hw(files["image"])
    rec["image_size_hw"] = [int(s) for s in size] if size else None
    return rec


def summarize_omni(cases: list[CaseInput], quarantined: list[Quarantine], records: list[dict[str, Any]],
                   batches: list[str]) -> dict[str, Any]:
    """The OmniAbnorm-CT part of the inventory (pure)."""
    missing: Counter[str] = Counter()
    missing_files: Counter[str] = Counter()
    for r in records:
        missing.update({k: 1 for k in r["missing"]})
        missing_files.update(r["missing"])
    absent_role = Counter(role.split("_")[0] for r in records for role in r["absent_files"])
    sizes = Counter("x".join(map(str, r["image_size_hw"])) for r in records if r["image_size_hw"])
    return {
        "cases": len(cases),
        "batches": batches,
        "by_plane": dict(sorted(Counter(r["plane"] for r in records).items())),
        "by_split": dict(sorted(Counter(r["split"] for r in records).items())),
        "by_json": dict(sorted(Counter(r["json"] for r in records).items())),
        "normal": sum(r["normal"] for r in records),
        "abnormal": sum(not r["normal"] for r in records),
        "cases_missing": dict(sorted(missing.items())),  # cases with >= 1 missing context / mask file
        "files_missing": dict(sorted(missing_files.items())),
        "missing_examples": [{"case": r["case"], "missing": r["missing"]} for r in records if r["missing"]][:EXAMPLES],
        "listed_in_several_json": sum(1 for r in records if r["also_in"]),
        "plane_from": dict(sorted(Counter(r["plane_from"] for r in records).items())),
        "absent_files": {"cases": sum(1 for r in records if r["absent_files"]), "by_role": dict(sorted(absent_role.items())),
                         "examples": [{"case": r["case"], "roles": r["absent_files"]}
                                      for r in records if r["absent_files"]][:EXAMPLES]},
        "image_size_hw": dict(sizes.most_common()),
        "unreadable_images": [r["case"] for r in records if r["image_size_hw"] is None and "image" not in r["absent_files"]],
        "context_slices": {"quantiles": quantiles([r["context"] for r in records]),
                           "histogram": histogram([r["context"] for r in records])},
        "masks_per_case": dict(sorted(Counter(r["masks"] for r in records).items())),
        "quarantine": summarize_quarantine(quarantined),
    }
