"""CT-RATE: ``.nii.gz`` volumes + label maps + metadata / report / label CSVs + CoT JSONL.

Which files are images, which are masks, which copy of a case is used and which mask
tree is the anatomy map: ``ctprep.sources.ctrate_layout`` (the release layout with
``train/`` + ``train_fixed/`` and ``ts_seg/<task>/``, the generator's flat layout, explicit
mask trees). The side tables (read by ``ctprep.sources.ctrate_tables``) are recognised by their
*columns*, anywhere under the root::

    metadata/{train,validation}_metadata.csv          VolumeName, XYSpacing, ZSpacing, RescaleSlope, ...
                                                      (any number of other columns: ignored)
    radiology_text_reports/{train,validation}_reports.csv   VolumeName, Findings_EN, Impressions_EN, ...
    multi_abnormality_labels/{train,valid}_predicted_labels.csv  VolumeName + 18 label columns
    cot/*.jsonl (any *.jsonl, e.g. a delivery folder)  {"case_id"|"VolumeName": ..., "steps": [...]}
                                                      (CoT deliveries, merged per case: ctprep.sources.cot)

Scan-time quarantine (the case never reaches a worker): unsafe name, two files of the same
release claiming one case id (a case in both the v1 and the ``_fixed`` folder is *not* a
duplicate: ``ctrate.prefer`` picks one and ``provenance`` records which and why), no label
map in the anatomy mask tree (``ctrate.missing_mask: quarantine``, the default; ``allow``
packs it with an all-background mask and ``meta.json`` ``has_mask: false``), missing report
(no report row for the volume: without text a case cannot be trained contrastively, and
quarantining here saves the resample work; a report added later changes the scan key and
the case runs). Missing metadata is decided at load time, because only a v1 volume (blank
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
  is converted to RAS+ by negating x and y. The origin is ``ImagePositionPatient``
  (taken as voxel (0, 0, 0)). A header slope/intercept is ignored for v1 (a blank
  header has none; applying both would rescale twice). An empty ``RescaleType`` is
  fine (the values are CT numbers); an empty ``RescaleIntercept`` is not (quarantined).

Either style: voxel axes tilted past ``ctrate.max_oblique_deg`` are quarantined as ``oblique``
(the stored grid is axis-aligned; a tilted series would be sheared silently).
"""

from __future__ import annotations

import ast
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ctprep.quarantine import (
    DUPLICATE_CASE,
    IMPLAUSIBLE_SPACING,
    BAD_ROW,
    MASK_GRID_MISMATCH,
    MISSING_MASK,
    MISSING_METADATA,
    OBLIQUE,
    MISSING_REPORT,
    NONFINITE,
    UNREADABLE,
    UNSAFE_NAME,
    Quarantine,
    QuarantineError,
)
from ctprep.schema import ABNORMALITY_LABELS, is_safe_case_id
from ctprep.sources.base import CaseInput, LoadedCase, Source, register_source
from ctprep.sources.cot import configured_cot_files, unknown_ids_note
from ctprep.sources.ctrate_layout import Layout, choose_copy, strip_nii, walk_layout
from ctprep.sources.ctrate_tables import (  # noqa: F401 (re-exported: one import path for the CT-RATE reader)
    MAX_CELL_CHARS,
    NOT_GIVEN,
    CtRateTables,
    _clean_text,
    _cot_case_id,
    classify_csv,
    read_csv_rows,
)
from ctprep.sources.nifti import apply_rescale, header_has_orientation, inflate, read_nifti  # noqa: F401 (re-exported)

SPLIT_ALIASES = {"validation": "valid", "val": "valid", "valid": "valid", "train": "train", "test": "test"}


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


# --------------------------------------------------------------------- source
@register_source
class CtRateSource(Source):
    """CT-RATE (see module docstring; which files are read: ``ctprep.sources.ctrate_layout``)."""

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
        # The folder above a release's dataset/ (e.g. a clone of the dataset repository).
        return root.name != "dataset" and cls.detect(root / "dataset")

    def _settings(self):
        from ctprep.config import CtRateConfig

        return self.config.ctrate if self.config is not None else CtRateConfig()

    def layout(self, root: Path) -> dict[str, Any]:
        """What is where under ``root``: image folders and their release, mask trees (and which
        is the anatomy map), side tables with row counts. JSON-able; read by ``ctprep inventory``."""
        root = Path(root).resolve()
        lay = walk_layout(root, self._settings().mask_dirs)
        anatomy = lay.anatomy_tree(self._settings().anatomy_masks)
        tables = CtRateTables.read(root, lay.side_files)
        counts: dict[str, int] = defaultdict(int)
        for copies in lay.images.values():
            for c in copies:
                counts[c.folder] += 1
        return {
            "image_folders": [{"folder": f, "kind": k, "volumes": counts[f]} for f, k in sorted(lay.folders.items())],
            "mask_trees": [{"name": n, "dir": lay.rel(t.dir), "masks": sum(len(v) for v in t.files.values()),
                            "anatomy": n == anatomy} for n, t in sorted(lay.trees.items())],
            "anatomy_tree": anatomy,
            "tables": tables.tables,
        }

    def scan(self, root: Path) -> tuple[list[CaseInput], list[Quarantine]]:
        root = Path(root).resolve()
        settings = self._settings()
        lay = walk_layout(root, settings.mask_dirs)
        # one walk of the tree for both; the CoT files given by name (cot.files) come after the tree's
        tables = CtRateTables.read(root, lay.side_files, configured_cot_files(self.config))
        anatomy = lay.anatomy_tree(settings.anatomy_masks)
        quarantined: list[Quarantine] = []
        for raw_name, csv_file in sorted(tables.unsafe_names.items()):
            stem = strip_nii(raw_name) or raw_name
            if stem in lay.images:  # the file itself exists with this odd name: reported below
                continue
            quarantined.append(Quarantine(stem, "scan", UNSAFE_NAME,
                                          f"{csv_file} names volume {raw_name!r}, which is not a plain safe "
                                          "file name; row ignored", self.name, {}))
        cases: list[CaseInput] = []
        for case_id in sorted(lay.images):
            case, bad = self._case(case_id, lay, anatomy, tables, settings)
            if case is not None:
                cases.append(case)
            else:
                quarantined.append(bad)  # type: ignore[arg-type]
        for case_id, entries in sorted(lay.irregular.items()):
            if case_id not in lay.images:  # a regular copy exists: that one is used
                path, what = entries[0]
                quarantined.append(Quarantine(case_id, "scan", UNREADABLE, f"{lay.rel(path)} is {what}; only regular "
                                              "files (or links to them) are read", self.name, {"image": str(path)}))
        note = unknown_ids_note(tables.cot.ids_of(tables.tree_cot) - set(lay.images) - {q.case for q in quarantined},
                                "the CoT files under this root")
        self.problems = tables.problems + ([note] if note else [])
        return cases, quarantined

    @classmethod
    def cot_case_id(cls, record: dict[str, Any]) -> str | None:
        """``VolumeName`` (or ``case_id``, ``id``, ...) as a file stem: ``train_1_a_1.nii.gz`` -> ``train_1_a_1``."""
        return _cot_case_id(record)

    def _case(self, case_id: str, lay: Layout, anatomy: str | None, tables: CtRateTables, settings
              ) -> tuple[CaseInput | None, Quarantine | None]:
        copies = lay.images[case_id]
        chosen, rule = choose_copy(copies, settings.prefer)
        files = {"image": str((chosen or copies[0]).path)}
        if not is_safe_case_id(case_id):
            return None, Quarantine(case_id, "scan", UNSAFE_NAME, f"file name {copies[0].path.name!r} is not a safe "
                                    "case id (letters, digits, '_' and '-' only)", self.name, files)
        if chosen is None:
            return None, Quarantine(case_id, "scan", DUPLICATE_CASE, rule, self.name, files)
        masks = {t: lay.mask_for(t, case_id, chosen.kind) for t in lay.trees}
        mask = masks.pop(anatomy) if anatomy is not None else None
        if mask is not None:
            files["mask"] = str(mask)
        report = tables.reports.get(case_id)
        cot = tables.cot.get(case_id)
        cot_text = cot.fields if cot is not None else {}
        provenance = {
            "image": chosen.rel,
            "image_folder": chosen.folder,
            "kind": chosen.kind,
            "copies": [{"path": c.rel, "kind": c.kind} for c in [chosen] + [c for c in copies if c is not chosen]],
            "rule": rule,
            "mask": lay.rel(mask) if mask is not None else None,
            "mask_tree": anatomy if mask is not None else None,
            "other_masks": {t: lay.rel(p) for t, p in sorted(masks.items()) if p is not None},
            "rows": {"metadata": case_id in tables.metadata, "report": report is not None,
                     "labels": case_id in tables.labels, "cot": cot is not None},
        }
        if cot is not None:
            provenance["cot"] = cot.provenance()  # which file and line gave each step
        if mask is None and settings.missing_mask == "quarantine":
            where = f"mask tree {anatomy!r}" if anatomy else "any mask tree (none found under the source root)"
            return None, Quarantine(case_id, "scan", MISSING_MASK,
                                    f"no label map for this volume in {where}; give the anatomy masks with "
                                    "--masks NAME=DIR, or set ctrate.missing_mask: allow to pack it without one",
                                    self.name, files)
        if case_id in tables.bad_rows:
            return None, Quarantine(case_id, "scan", BAD_ROW, tables.bad_rows[case_id], self.name, files)
        if report is None and not (cot_text.get("findings") or cot_text.get("impression")):
            return None, Quarantine(case_id, "scan", MISSING_REPORT,
                                    "no report row for this volume in the reports CSV", self.name, files)
        findings = _clean_text((report or {}).get("Findings_EN")) or _clean_text(cot_text.get("findings"))
        impression = _clean_text((report or {}).get("Impressions_EN")) or _clean_text(cot_text.get("impression"))
        text: dict[str, Any] = {
            "findings": findings,
            "impression": impression,
            "report": " ".join(t for t in (findings, impression) if t),
            "steps": cot.step_texts() if cot is not None else [],
            "clinical_information": _clean_text((report or {}).get("ClinicalInformation_EN")),
            "technique": _clean_text((report or {}).get("Technique_EN")),
        }
        return CaseInput(
            case_id=case_id,
            source=self.name,
            split=split_of(case_id, Path(chosen.rel)),
            files=files,
            meta=dict(tables.metadata.get(case_id, {})),
            text=text,
            labels=list(tables.labels.get(case_id, [-1] * len(ABNORMALITY_LABELS))),
            provenance=provenance,
        ), None

    def load(self, case: CaseInput) -> LoadedCase:
        settings = self._settings()
        image, affine, style, info = read_ctrate_volume(case.files["image"], case.meta, settings.max_oblique_deg,
                                                        settings.max_volume_mb)
        labels = None
        if "mask" in case.files:
            raw, hdr = read_nifti(case.files["mask"], int(settings.max_volume_mb) << 20)
            labels = np.asarray(raw)
            if labels.ndim == 4 and labels.shape[3] == 1:
                labels = labels[..., 0]
            if header_has_orientation(hdr):
                labels = conform_mask(labels, hdr.get_best_affine(), image.shape, affine)
            elif labels.shape != image.shape:
                raise QuarantineError(MASK_GRID_MISMATCH,
                                      f"mask shape {labels.shape} != volume shape {image.shape}")
            if labels.dtype.kind == "f":
                labels = np.rint(np.nan_to_num(labels)).astype(np.int16)
        return LoadedCase(image=image, labels=labels, affine=affine, header_style=style,
                          label_space="totalseg", info=info)


def conform_mask(labels: np.ndarray, mask_affine: np.ndarray, image_shape: tuple[int, ...],
                 image_affine: np.ndarray, atol_mm: float = 0.05) -> np.ndarray:
    """``labels`` in the image's voxel order, when the mask is on the same grid stored with other
    axis flips / order (e.g. a mask made on the ``_fixed`` file, used with its v1 twin).

    Only exact reorderings are accepted (no interpolation of labels); anything else raises
    QuarantineError(mask_grid_mismatch) with the size of the disagreement.
    """
    import nibabel as nib

    def same(aff: np.ndarray, shape: tuple[int, ...]) -> bool:
        return tuple(shape) == tuple(image_shape) and bool(np.allclose(aff, image_affine, atol=atol_mm, rtol=0))

    if same(mask_affine, labels.shape):
        return labels
    ornt = nib.orientations
    transform = ornt.ornt_transform(ornt.io_orientation(mask_affine), ornt.io_orientation(image_affine))
    moved = ornt.apply_orientation(labels, transform)
    moved_affine = mask_affine @ ornt.inv_ornt_aff(transform, labels.shape)
    if same(moved_affine, moved.shape):
        return np.ascontiguousarray(moved)
    if tuple(moved.shape) != tuple(image_shape):
        raise QuarantineError(MASK_GRID_MISMATCH, f"mask shape {labels.shape} does not fit volume shape {image_shape}")
    diff = float(np.abs(moved_affine - image_affine).max())
    raise QuarantineError(MASK_GRID_MISMATCH, f"mask affine differs from the volume affine (max diff {diff:.3g} mm)")


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

    The origin is ``ImagePositionPatient`` (DICOM LPS, converted to RAS+), taken as the
    position of voxel (0, 0, 0); a row without it gets origin 0 (relative geometry, and so
    the stored image, is unchanged; only ``meta.json``'s affine moves). With it, a v1 file
    and its ``_fixed`` twin get the same affine.

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
    ipp = _parse_list(meta.get("ImagePositionPatient"))
    if ipp and len(ipp) == 3 and all(math.isfinite(v) for v in ipp):
        aff[:3, 3] = lps_to_ras @ np.asarray(ipp, dtype=np.float64)
    return aff, (float(sx), float(sy), float(z))


def obliquity_deg(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis of ``affine`` and its nearest patient axis."""
    axes = affine[:3, :3] / np.maximum(np.linalg.norm(affine[:3, :3], axis=0), 1e-12)
    cos = np.clip(np.abs(axes).max(axis=0), -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).max())


def read_ctrate_volume(path: str, meta: dict[str, Any], max_oblique_deg: float = 1.0, max_volume_mb: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray, str, dict[str, Any]]:
    """Read a CT-RATE volume as HU (int16 when exact, else float32), with v1/v2 detection.

    Args:
        path: the ``.nii(.gz)`` file.
        meta: its metadata CSV row (needed for a v1 file: spacing, orientation, position,
            slope/intercept; ignored for v2 apart from the record).
        max_oblique_deg: voxel axes tilted more than this from the patient axes are quarantined
            as ``oblique`` (the resample stage stores axis-aligned grids); smaller tilts are
            recorded in ``info["obliquity_deg"]``.
        max_volume_mb: refuse a header declaring more stored voxel MiB than this, unread.

    Returns (image (i, j, k), affine, header_style, info).
    """
    raw, hdr = read_nifti(path, None if max_volume_mb is None else int(max_volume_mb) << 20)
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
        if inter is None:  # raw v1 values are not HU: guessing 0 would store every voxel shifted
            raise QuarantineError(MISSING_METADATA, "v1 volume (blank header) whose metadata row has no RescaleIntercept")
        info["rescale_source"] = "metadata_csv"
    info.update(slope=slope, intercept=inter)

    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if not np.all(np.isfinite(spacing)) or np.any(spacing < 0.05) or np.any(spacing > 50):
        raise QuarantineError(IMPLAUSIBLE_SPACING, f"voxel spacing {np.round(spacing, 4).tolist()} mm is not a CT spacing")
    tilt = obliquity_deg(affine)
    if tilt > max_oblique_deg:
        raise QuarantineError(OBLIQUE, f"voxel axes are tilted {tilt:.2f} degrees from the patient axes "
                              f"(limit ctrate.max_oblique_deg = {max_oblique_deg:g}); the stored grid is axis-aligned")
    info["obliquity_deg"] = round(tilt, 4)
    info["input_spacing_ijk"] = [float(s) for s in spacing]
    info["input_shape_ijk"] = [int(s) for s in raw.shape]

    if raw.dtype.kind == "f" and not (np.isfinite(raw.min()) and np.isfinite(raw.max())):
        # min/max first: no volume-sized boolean array for the common, finite case
        raise QuarantineError(NONFINITE, f"{int(raw.size - np.isfinite(raw).sum())} NaN/inf voxels")
    # raw is fresh from read_nifti and not used again: rescale in its own buffer (a 1 GB v1
    # volume needs no second GB; same values as a copying rescale).
    image = apply_rescale(raw, slope, inter, inplace=True)
    return image, affine, style, info


