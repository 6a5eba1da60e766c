"""CT-RATE layout: nested ``.nii.gz`` volumes + metadata / report / label CSVs + CoT JSONL.

Layout (tolerant: CSVs are recognised by their *columns*, not only their names)::

    ROOT/
      train/train_1/train_1_a/train_1_a_1.nii.gz        volumes (any nesting; also valid/, *_fixed/)
      masks/train/train_1/train_1_a/train_1_a_1.nii.gz  label maps mirroring the volume tree
      metadata/{train,validation}_metadata.csv          VolumeName, XYSpacing, ZSpacing, RescaleSlope, ...
      radiology_text_reports/{train,validation}_reports.csv   VolumeName, Findings_EN, Impressions_EN, ...
      multi_abnormality_labels/{train,valid}_predicted_labels.csv  VolumeName + 18 label columns
      cot/*.jsonl                                       {"case_id"|"VolumeName": ..., "steps": [...]}

Scan-time quarantine (the case never reaches a worker): unsafe name, two files
claiming one case id, missing report (no report row for the volume: without
text a case cannot be trained contrastively, and quarantining here saves the
resample work; a report added later changes the scan key and the case runs).
Missing metadata is decided at load time, because only a v1 volume (blank
header) needs its metadata row.

v1 vs v2 (decided per file from the header, recorded as ``header_style``):

* **v2**: the header has a real geometry (``sform_code > 0`` or
  ``qform_code > 0``, and not the identity): the header affine is used, and the header's own
  ``scl_slope/scl_inter`` (if any) are applied once (int16 when exact, else float32). The CSV
  slope/intercept are *not* applied (the values are already HU): applying
  them again is the known double-rescale bug.
* **v1**: blank header (no qform/sform, or an identity affine): values are raw; ``RescaleSlope`` /
  ``RescaleIntercept`` and spacing (``XYSpacing``, ``ZSpacing``) come from the
  metadata row, orientation from ``ImageOrientationPatient`` (default axial).
  Voxel axes (i, j, k) follow DICOM (column, row, slice): i along the IOP row
  cosine, j along the column cosine, k along their cross product; DICOM LPS
  is converted to RAS+ by negating x and y. The origin is arbitrary (0); only
  relative geometry matters for the stored grid. A header slope/intercept is
  ignored for v1 (a blank header has none; applying both would rescale twice).
"""

from __future__ import annotations

import ast
import csv
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ctprep.quarantine import (
    DUPLICATE_CASE,
    IMPLAUSIBLE_SPACING,
    MISSING_METADATA,
    MISSING_REPORT,
    NONFINITE,
    UNREADABLE,
    UNSAFE_NAME,
    Quarantine,
    QuarantineError,
)
from ctprep.schema import ABNORMALITY_LABELS, is_safe_case_id
from ctprep.sources.base import CaseInput, LoadedCase, Source, register_source
from ctprep.sources.nifti import apply_rescale, header_has_orientation, inflate, read_nifti  # noqa: F401 (re-exported)

NII_SUFFIXES = (".nii.gz", ".nii")
MASK_DIR_NAMES = {"masks", "mask", "segmentations", "seg", "labels_masks"}
NOT_GIVEN = "Not given."
SPLIT_ALIASES = {"validation": "valid", "val": "valid", "valid": "valid", "train": "train", "test": "test"}


def strip_nii(name: str) -> str | None:
    """``train_1_a_1.nii.gz`` -> ``train_1_a_1``; None if not a NIfTI name."""
    for suf in NII_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return None


def split_of(case_id: str, path: Path) -> str:
    """Split from the case name prefix (``valid_3_a_1`` -> ``valid``), else from folder names."""
    head = case_id.split("_", 1)[0].lower()
    if head in SPLIT_ALIASES:
        return SPLIT_ALIASES[head]
    for part in path.parts:
        p = part.lower().removesuffix("_fixed")
        if p in SPLIT_ALIASES:
            return SPLIT_ALIASES[p]
    return "train"


def _is_mask_path(rel: Path) -> bool:
    return any(part.lower() in MASK_DIR_NAMES for part in rel.parts[:-1])


# --------------------------------------------------------------------- CSV/JSONL joins
def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _volume_key(value: str) -> str:
    """CSV ``VolumeName`` -> case id (file stem)."""
    value = os.path.basename(str(value).strip())
    return strip_nii(value) or value


def classify_csv(columns: list[str]) -> str | None:
    """'metadata' | 'reports' | 'labels' | None, from a CSV's columns."""
    cols = set(columns)
    if "VolumeName" not in cols:
        return None
    if {"Findings_EN", "Impressions_EN"} & cols:
        return "reports"
    if sum(label in cols for label in ABNORMALITY_LABELS) >= len(ABNORMALITY_LABELS) // 2:
        return "labels"
    if {"XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept"} & cols:
        return "metadata"
    return None


def _clean_text(value: Any) -> str:
    text = "" if value is None else str(value).strip()
    return "" if text in (NOT_GIVEN, "nan", "None") else text


def _steps_from(record: dict[str, Any]) -> list[str]:
    """CoT steps as strings, in order; accepts strings or {step, text} objects."""
    raw = record.get("steps") or record.get("cot") or record.get("reasoning") or []
    if isinstance(raw, str):
        raw = [raw]
    items: list[tuple[float, int, str]] = []
    for pos, s in enumerate(raw):
        if isinstance(s, dict):
            text = s.get("text") or s.get("content") or s.get("description") or ""
            order = s.get("step", pos)
            try:
                order = float(order)
            except (TypeError, ValueError):
                order = float(pos)
            items.append((order, pos, str(text).strip()))
        else:
            items.append((float(pos), pos, str(s).strip()))
    return [t for _, _, t in sorted(items) if t]


def _cot_case_id(record: dict[str, Any]) -> str | None:
    for k in ("case_id", "case", "id", "VolumeName", "volume", "volume_name", "name"):
        if record.get(k):
            return _volume_key(record[k])
    return None


class CtRateTables:
    """The CSV and JSONL side tables of a CT-RATE root, keyed by case id."""

    def __init__(self) -> None:
        self.metadata: dict[str, dict[str, str]] = {}
        self.reports: dict[str, dict[str, str]] = {}
        self.labels: dict[str, list[int]] = {}
        self.cot: dict[str, dict[str, Any]] = {}
        self.files: list[str] = []  # which side files were read (for the manifest)
        # VolumeName values that are not plain safe file names (e.g. "../../x.nii.gz"): name -> CSV file
        self.unsafe_names: dict[str, str] = {}

    @classmethod
    def read(cls, root: Path, skip: set[Path] | None = None) -> CtRateTables:
        t = cls()
        for path in sorted(root.rglob("*.csv")):
            columns, rows = _read_csv(path)
            kind = classify_csv(columns)
            if kind is None:
                continue
            t.files.append(str(path.relative_to(root)))
            for row in rows:
                raw_name = str(row.get("VolumeName", "")).strip()
                key = _volume_key(raw_name)
                if not key:
                    continue
                if raw_name != os.path.basename(raw_name) or not is_safe_case_id(key):
                    # Never join a row by a name with path parts: it could alias another case.
                    t.unsafe_names.setdefault(raw_name, str(path.relative_to(root)))
                    continue
                if kind == "metadata":
                    t.metadata[key] = dict(row)
                elif kind == "reports":
                    t.reports[key] = dict(row)
                else:
                    t.labels[key] = [_label_value(row.get(name)) for name in ABNORMALITY_LABELS]
        for path in sorted(root.rglob("*.jsonl")):
            t.files.append(str(path.relative_to(root)))
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a broken CoT line only loses that case's steps
                    key = _cot_case_id(rec) if isinstance(rec, dict) else None
                    if key:
                        t.cot[key] = rec
        return t


def _label_value(v: Any) -> int:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return -1
    return -1 if math.isnan(x) else int(x > 0.5)


# --------------------------------------------------------------------- source
@register_source
class CtRateSource(Source):
    """CT-RATE (see module docstring)."""

    name = "ctrate"

    @classmethod
    def detect(cls, root: Path) -> bool:
        root = Path(root)
        if not root.is_dir():
            return False
        # A NIfTI volume somewhere in the first few levels, or the CT-RATE CSV folders.
        for sub in ("metadata", "radiology_text_reports", "multi_abnormality_labels"):
            if (root / sub).is_dir():
                return True
        for depth_glob in ("*.nii.gz", "*/*.nii.gz", "*/*/*.nii.gz", "*/*/*/*.nii.gz"):
            if next(root.glob(depth_glob), None) is not None:
                return True
        return False

    def scan(self, root: Path) -> tuple[list[CaseInput], list[Quarantine]]:
        root = Path(root).resolve()
        tables = CtRateTables.read(root)
        volumes: dict[str, list[Path]] = defaultdict(list)
        masks: dict[str, Path] = {}
        quarantined: list[Quarantine] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fname in sorted(filenames):
                stem = strip_nii(fname)
                if stem is None:
                    continue
                path = Path(dirpath) / fname
                rel = path.relative_to(root)
                if _is_mask_path(rel):
                    masks.setdefault(stem, path)
                else:
                    volumes[stem].append(path)

        for raw_name, csv_file in sorted(tables.unsafe_names.items()):
            stem = strip_nii(raw_name) or raw_name
            if stem in volumes:  # the file itself exists with this odd name: reported below
                continue
            quarantined.append(Quarantine(stem, "scan", UNSAFE_NAME,
                                          f"{csv_file} names volume {raw_name!r}, which is not a plain safe "
                                          "file name; row ignored", self.name, {}))

        cases: list[CaseInput] = []
        for case_id in sorted(volumes):
            paths = volumes[case_id]
            files = {"image": str(paths[0])}
            if not is_safe_case_id(case_id):
                quarantined.append(Quarantine(case_id, "scan", UNSAFE_NAME,
                                              f"file name {paths[0].name!r} is not a safe case id "
                                              "(letters, digits, '_' and '-' only)", self.name, files))
                continue
            if len(paths) > 1:
                quarantined.append(Quarantine(case_id, "scan", DUPLICATE_CASE,
                                              f"{len(paths)} volumes share this case id: "
                                              + ", ".join(str(p.relative_to(root)) for p in paths), self.name, files))
                continue
            if case_id in masks:
                files["mask"] = str(masks[case_id])
            report = tables.reports.get(case_id)
            cot = tables.cot.get(case_id, {})
            if report is None and not (cot.get("findings") or cot.get("impression")):
                quarantined.append(Quarantine(case_id, "scan", MISSING_REPORT,
                                              "no report row for this volume in the reports CSV", self.name, files))
                continue
            findings = _clean_text((report or {}).get("Findings_EN")) or _clean_text(cot.get("findings"))
            impression = _clean_text((report or {}).get("Impressions_EN")) or _clean_text(cot.get("impression"))
            text: dict[str, Any] = {
                "findings": findings,
                "impression": impression,
                "report": " ".join(t for t in (findings, impression) if t),
                "steps": _steps_from(cot),
                "clinical_information": _clean_text((report or {}).get("ClinicalInformation_EN")),
                "technique": _clean_text((report or {}).get("Technique_EN")),
            }
            cases.append(CaseInput(
                case_id=case_id,
                source=self.name,
                split=split_of(case_id, paths[0].relative_to(root)),
                files=files,
                meta=dict(tables.metadata.get(case_id, {})),
                text=text,
                labels=list(tables.labels.get(case_id, [-1] * len(ABNORMALITY_LABELS))),
            ))
        return cases, quarantined

    def load(self, case: CaseInput) -> LoadedCase:
        image, affine, style, info = read_ctrate_volume(case.files["image"], case.meta)
        labels = None
        if "mask" in case.files:
            raw, hdr = read_nifti(case.files["mask"])
            labels = np.asarray(raw)
            if labels.ndim == 4 and labels.shape[3] == 1:
                labels = labels[..., 0]
            if labels.shape != image.shape:
                raise QuarantineError("mask_grid_mismatch",
                                      f"mask shape {labels.shape} != volume shape {image.shape}")
            if style == "v2" and header_has_orientation(hdr):
                mask_affine = hdr.get_best_affine()
                if not np.allclose(mask_affine, affine, atol=1e-3, rtol=1e-4):
                    raise QuarantineError("mask_grid_mismatch",
                                          "mask affine differs from the volume affine "
                                          f"(max diff {np.abs(mask_affine - affine).max():.3g} mm)")
            if labels.dtype.kind == "f":
                labels = np.rint(np.nan_to_num(labels)).astype(np.int16)
        return LoadedCase(image=image, labels=labels, affine=affine, header_style=style,
                          label_space="totalseg", info=info)


# --------------------------------------------------------------------- metadata geometry
def _parse_list(value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    text = str(value).strip()
    if not text or text.lower() == "nan":
        return None
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        parsed = [p for p in text.replace("\\", " ").replace(",", " ").split() if p]
    if isinstance(parsed, (int, float)):
        return [float(parsed)]
    return [float(v) for v in parsed]


def _meta_float(meta: dict[str, Any], key: str) -> float | None:
    vals = _parse_list(meta.get(key))
    return vals[0] if vals else None


def v1_affine(meta: dict[str, Any]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Affine (voxel i,j,k -> RAS+ mm) of a v1 volume from its metadata row.

    Returns (affine, spacing_ijk). Raises QuarantineError(missing_metadata) when
    the spacing is absent.
    """
    xy = _parse_list(meta.get("XYSpacing"))
    z = _meta_float(meta, "ZSpacing")
    if not xy or z is None:
        raise QuarantineError(MISSING_METADATA, "v1 volume (blank header) without XYSpacing/ZSpacing in the metadata CSV")
    # DICOM PixelSpacing order: [row spacing (between rows, along j), column spacing (along i)].
    sy, sx = (xy[0], xy[1] if len(xy) > 1 else xy[0])
    iop = _parse_list(meta.get("ImageOrientationPatient")) or [1, 0, 0, 0, 1, 0]
    if len(iop) != 6:
        iop = [1, 0, 0, 0, 1, 0]
    row = np.asarray(iop[:3], dtype=np.float64)  # direction of increasing column index (i)
    col = np.asarray(iop[3:], dtype=np.float64)  # direction of increasing row index (j)
    normal = np.cross(row, col)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    aff = np.eye(4)
    aff[:3, 0] = lps_to_ras @ row * sx
    aff[:3, 1] = lps_to_ras @ col * sy
    aff[:3, 2] = lps_to_ras @ normal * z
    return aff, (float(sx), float(sy), float(z))


def read_ctrate_volume(path: str, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, str, dict[str, Any]]:
    """Read a CT-RATE volume as HU (int16 when exact, else float32), with v1/v2 detection.

    Returns (image (i, j, k), affine, header_style, info).
    """
    raw, hdr = read_nifti(path)
    if raw.ndim == 4 and raw.shape[3] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise QuarantineError(UNREADABLE, f"expected a 3D volume, got shape {raw.shape}")
    info: dict[str, Any] = {}
    if header_has_orientation(hdr):
        style = "v2"
        affine = hdr.get_best_affine()
        slope, inter = hdr.get_slope_inter()
        slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
        inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
        info["rescale_source"] = "header"
    else:
        style = "v1"
        if not meta:
            raise QuarantineError(MISSING_METADATA, "v1 volume (blank header) has no row in the metadata CSV")
        affine, _ = v1_affine(meta)
        slope = _meta_float(meta, "RescaleSlope")
        inter = _meta_float(meta, "RescaleIntercept")
        slope = 1.0 if slope is None else slope
        inter = 0.0 if inter is None else inter
        info["rescale_source"] = "metadata_csv"
    info.update(slope=slope, intercept=inter)

    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if not np.all(np.isfinite(spacing)) or np.any(spacing < 0.05) or np.any(spacing > 50):
        raise QuarantineError(IMPLAUSIBLE_SPACING, f"voxel spacing {np.round(spacing, 4).tolist()} mm is not a CT spacing")
    info["input_spacing_ijk"] = [float(s) for s in spacing]
    info["input_shape_ijk"] = [int(s) for s in raw.shape]

    if raw.dtype.kind == "f":
        finite = np.isfinite(raw)
        if not finite.all():
            raise QuarantineError(NONFINITE, f"{int(raw.size - finite.sum())} NaN/inf voxels")
    image = apply_rescale(raw, slope, inter)
    return image, affine, style, info


