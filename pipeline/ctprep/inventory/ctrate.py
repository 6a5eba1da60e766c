"""The CT-RATE part of the inventory: per-volume header records (I/O), layout, coverage,
duplicates and spacing summaries (pure), and the HU sample read as the pipeline reads it."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ctprep.inventory.headers import (
    NiftiHeaderInfo,
    obliquity_deg,
    read_nifti_header,
    spacing_problem,
    volume_geometry,
)
from ctprep.inventory.hu import HuAccumulator, sample_indices
from ctprep.inventory.summary import EXAMPLES, _rel, _with_without, histogram, quantiles, summarize_quarantine

if TYPE_CHECKING:
    from ctprep.quarantine import Quarantine
    from ctprep.sources.base import CaseInput

def ctrate_volume_record(case: CaseInput, root: Path) -> dict[str, Any]:
    """Header-only facts of one CT-RATE case (I/O: two header reads at most).

    v1 files (blank header) take spacing and orientation from the metadata row, as the loader
    does (``ctprep.sources.ctrate.v1_affine``); v2 files from their header.
    """
    from ctprep.quarantine import QuarantineError
    from ctprep.sources.ctrate import v1_affine

    prov = case.provenance or {}
    image = case.files.get("image", "")
    rec: dict[str, Any] = {"case": case.case_id, "split": case.split,
                           "file": prov.get("image") or _rel(image, root)}
    try:
        hdr = read_nifti_header(image)
    except QuarantineError as e:
        rec["error"] = e.reason.removeprefix(f"{os.path.basename(image)}: ")  # the table names the file
        return rec
    rec["style"] = hdr.style
    rec["dtype"] = hdr.dtype
    affine = None
    if hdr.style == "v2":
        affine, rec["spacing_from"] = hdr.affine, "header"
    elif case.meta:
        try:
            affine, _ = v1_affine(case.meta)
            rec["spacing_from"] = "metadata"
        except QuarantineError as e:
            rec["spacing_from"], rec["spacing_problem"] = "missing", e.reason
    else:
        rec["spacing_from"] = "missing"
        rec["spacing_problem"] = "v1 (blank header) volume without a metadata row"
    if affine is not None:
        rec["spacing_zyx"], rec["shape_zyx"] = volume_geometry(affine, hdr.shape_ijk)
        problem = spacing_problem(rec["spacing_zyx"])
        if problem:
            rec["spacing_problem"] = problem
    else:
        rec["shape_zyx"] = volume_geometry([[1, 0, 0], [0, 1, 0], [0, 0, 1]], hdr.shape_ijk)[1]
    if affine is not None:
        rec["oblique_deg"] = obliquity_deg(affine)
    mask = case.files.get("mask")
    if mask:
        try:
            mh = read_nifti_header(mask)
        except QuarantineError as e:
            rec["mask_problem"] = f"mask unreadable: {e.reason.removeprefix(os.path.basename(mask) + ': ')}"
        else:
            rec["mask_problem"] = mask_grid_problem(mh, hdr, affine, rec.get("spacing_zyx"))
            if rec["mask_problem"] is None:
                del rec["mask_problem"]
    return rec


def mask_grid_problem(mask: NiftiHeaderInfo, image: NiftiHeaderInfo, image_affine: Any,
                      image_spacing_zyx: Optional[list[float]]) -> Optional[str]:
    """One line if a mask header cannot be on the volume's grid, else None.

    Compared in (z, y, x) patient order, so a mask stored with other axis flips / order (one made
    on the ``_fixed`` twin of a v1 volume) is not a problem, as for the loader. A blank (v1) mask
    header is read in the volume's own voxel order.
    """
    if image_affine is None:  # no geometry for the volume: only the raw shapes can be compared
        if mask.shape_ijk[:3] != image.shape_ijk[:3]:
            return f"mask shape {mask.shape_ijk[:3]} != volume shape {image.shape_ijk[:3]} (i, j, k)"
        return None
    spacing, shape = volume_geometry(mask.affine if mask.style == "v2" else image_affine, mask.shape_ijk)
    image_shape = volume_geometry(image_affine, image.shape_ijk)[1]
    if shape != image_shape:
        return f"mask shape {shape} != volume shape {image_shape} (z, y, x)"
    if mask.style == "v2" and image_spacing_zyx and any(
            abs(a - b) > 0.01 * max(b, 1e-6) for a, b in zip(spacing, image_spacing_zyx)):
        return f"mask spacing {spacing} mm != volume spacing {image_spacing_zyx} mm (z, y, x)"
    return None


def _ctrate_rows(case: CaseInput) -> dict[str, bool]:
    """Which side tables have a row for this case: the source's record, else what the case shows."""
    rows = (case.provenance or {}).get("rows")
    if isinstance(rows, dict):
        return {k: bool(rows.get(k)) for k in ("metadata", "report", "labels", "cot")}
    text = case.text or {}
    return {"metadata": bool(case.meta),
            "report": bool(text.get("findings") or text.get("impression")),
            "labels": any(int(v) != -1 for v in case.labels),
            "cot": bool(text.get("steps"))}


def _count_csv_rows(path: Path) -> tuple[Optional[str], int]:
    import csv

    from ctprep.sources.ctrate import classify_csv

    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        kind = classify_csv(header)
        return kind, (sum(1 for _ in reader) if kind else 0)


def derive_ctrate_layout(root: Path, cases: list[CaseInput]) -> dict[str, Any]:
    """The ``layout()`` record reconstructed from the scanned cases, for a source without
    ``CtRateSource.layout``: folders of the chosen images only, mask trees as the top folder
    of each case's mask (file counts are then cases with a mask, a lower bound)."""
    folders: Counter[str] = Counter()
    kinds: dict[str, str] = {}
    trees: Counter[str] = Counter()
    for c in cases:
        prov = c.provenance or {}
        rel = Path(prov.get("image") or _rel(c.files.get("image", ""), root))
        folder = prov.get("image_folder") or (rel.parts[0] if len(rel.parts) > 1 else ".")
        folders[folder] += 1
        if prov.get("kind"):
            kinds[folder] = prov["kind"]
        if c.files.get("mask"):
            mrel = Path(_rel(c.files["mask"], root))
            trees[prov.get("mask_tree") or (mrel.parts[0] if len(mrel.parts) > 1 else ".")] += 1
    names = set(folders)
    image_folders = []
    for folder in sorted(folders):
        kind = kinds.get(folder) or ("fixed" if folder.endswith("_fixed")
                                     else "original" if f"{folder}_fixed" in names else "plain")
        image_folders.append({"folder": folder, "kind": kind, "volumes": folders[folder]})
    tables = []
    for path in sorted(root.rglob("*.csv")):
        try:
            kind, n = _count_csv_rows(path)
        except (OSError, UnicodeDecodeError):
            continue
        if kind:
            tables.append({"file": str(path.relative_to(root)), "kind": kind, "rows": n})
    for path in sorted(root.rglob("*.jsonl")):
        with open(path, encoding="utf-8", errors="replace") as f:
            tables.append({"file": str(path.relative_to(root)), "kind": "cot", "rows": sum(1 for ln in f if ln.strip())})
    anatomy = next(iter(trees)) if len(trees) == 1 else None
    return {"image_folders": image_folders,
            "mask_trees": [{"name": t, "dir": t, "masks": n, "anatomy": t == anatomy} for t, n in sorted(trees.items())],
            "anatomy_tree": anatomy, "tables": tables, "derived": True}


def summarize_duplicates(cases: list[CaseInput]) -> dict[str, Any]:
    """Cases with more than one image copy: how many, which rule chose, examples."""
    dups = [c for c in cases if len((c.provenance or {}).get("copies") or []) > 1]
    examples = []
    for c in dups[:EXAMPLES]:
        prov = c.provenance
        copies = prov.get("copies") or []
        examples.append({"case": c.case_id, "chosen": prov.get("image") or copies[0].get("path"),
                         "kind": prov.get("kind") or copies[0].get("kind"), "rule": prov.get("rule", ""),
                         "others": [cp.get("path") for cp in copies[1:]]})
    return {"cases": len(dups),
            "by_rule": dict(sorted(Counter(str((c.provenance or {}).get("rule", "?")) for c in dups).items())),
            "chosen_kind": dict(sorted(Counter(str((c.provenance or {}).get("kind", "?")) for c in dups).items())),
            "examples": examples}


def summarize_volumes(records: list[dict[str, Any]], oblique_limit_deg: float = 1.0) -> dict[str, Any]:
    """Header style counts, spacing / size histograms and problem lists from per-volume records."""
    ok = [r for r in records if "error" not in r]
    geo = [r for r in ok if "spacing_zyx" in r and "spacing_problem" not in r]
    z = [r["spacing_zyx"][0] for r in geo]
    inplane = [r["spacing_zyx"][2] for r in geo]
    slices = [r["shape_zyx"][0] for r in ok if "shape_zyx" in r]
    matrix = Counter(f"{r['shape_zyx'][1]}x{r['shape_zyx'][2]}" for r in ok if "shape_zyx" in r)
    aniso = sum(1 for r in geo if abs(r["spacing_zyx"][1] - r["spacing_zyx"][2]) > 0.01 * r["spacing_zyx"][2])
    return {
        "read": len(records),
        "header_style": dict(sorted(Counter(r["style"] for r in ok).items())),
        "spacing_from": dict(sorted(Counter(r.get("spacing_from", "?") for r in ok).items())),
        "dtype": dict(sorted(Counter(r.get("dtype", "?") for r in ok).items())),
        "unreadable": [{"case": r["case"], "file": r["file"], "reason": r["error"]} for r in records if "error" in r],
        "spacing_problems": [{"case": r["case"], "file": r["file"], "reason": r["spacing_problem"]}
                             for r in ok if "spacing_problem" in r],
        "mask_problems": [{"case": r["case"], "file": r["file"], "reason": r["mask_problem"]}
                          for r in ok if "mask_problem" in r],
        "anisotropic_inplane": aniso,
        "oblique_deg": {"quantiles": quantiles([r["oblique_deg"] for r in ok if "oblique_deg" in r]),
                        "limit": oblique_limit_deg,
                        "over_limit": sum(1 for r in ok if r.get("oblique_deg", 0) > oblique_limit_deg)},
        "z_spacing_mm": {"quantiles": quantiles(z), "histogram": histogram(z)},
        "inplane_spacing_mm": {"quantiles": quantiles(inplane), "histogram": histogram(inplane)},
        "slices": {"quantiles": quantiles(slices), "histogram": histogram(slices)},
        "matrix_yx": dict(matrix.most_common()),
    }


def summarize_ctrate(root: Path, cases: list[CaseInput], quarantined: list[Quarantine],
                     layout: dict[str, Any], records: list[dict[str, Any]],
                     oblique_limit_deg: float = 1.0) -> dict[str, Any]:
    """The CT-RATE part of the inventory (pure: everything was read before)."""
    rows = [_ctrate_rows(c) for c in cases]
    folder_of = {f["folder"]: f["kind"] for f in layout.get("image_folders", [])}
    style_by_kind: dict[str, Counter[str]] = {}
    kind_of_case = {c.case_id: (c.provenance or {}).get("kind") for c in cases}
    for r in records:
        kind = kind_of_case.get(r["case"]) or folder_of.get(Path(r["file"]).parts[0], "plain")
        style_by_kind.setdefault(kind, Counter())[r.get("style", "unreadable")] += 1
    has_mask = [bool((c.provenance or {}).get("mask") or c.files.get("mask")) for c in cases]
    return {
        "layout": layout,
        "cases": len(cases),
        "coverage": {
            "mask": _with_without(has_mask),
            **{k: _with_without(r[k] for r in rows) for k in ("report", "metadata", "labels", "cot")},
        },
        "duplicates": summarize_duplicates(cases),
        "quarantine": summarize_quarantine(quarantined),
        "volumes": summarize_volumes(records, oblique_limit_deg),
        "style_by_folder_kind": {k: dict(sorted(v.items())) for k, v in sorted(style_by_kind.items())},
    }


def sample_ctrate_hu(cases: list[CaseInput], readable: set[str], n: int,
                     max_oblique_deg: Optional[float] = None) -> dict[str, Any]:
    """HU histogram of ``n`` evenly spread cases, read and rescaled exactly as the pipeline does."""
    from ctprep.quarantine import QuarantineError
    from ctprep.sources.ctrate import read_ctrate_volume

    pool = [c for c in cases if c.case_id in readable]
    acc = HuAccumulator()
    for i in sample_indices(len(pool), n):
        c = pool[i]
        try:
            extra = () if max_oblique_deg is None else (max_oblique_deg,)
            image, _, _, info = read_ctrate_volume(c.files["image"], c.meta, *extra)
        except QuarantineError as e:
            acc.fail(c.case_id, e.kind, e.reason)
            continue
        except Exception as e:  # noqa: BLE001 - the inventory reports, it never stops
            acc.fail(c.case_id, "error", f"{type(e).__name__}: {e}")
            continue
        acc.add(c.case_id, image, info)
        del image
    return acc.to_json()
