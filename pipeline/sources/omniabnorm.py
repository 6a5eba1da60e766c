"""OmniAbnorm-CT layout: batches of 2D CT slices (JPEG) with per-abnormality masks.

Layout (``ctprep demo-data --source omniabnorm`` writes exactly this)::

    ROOT/                       the source folder; each subfolder is a batch
      batch_01/
        records.json            list of records (any *.json holding a list of records works)
        cot.jsonl               {"id", "steps": [str | {"step", "text"}], "findings", "impression"}
        <id>/0.jpg              key slice, 8-bit, windowed with the record's ``windows``
        <id>/-2.jpg .. 2.jpg    context slices; offset k lies k * slice spacing superior (+)
        <id>/mask_<n>.jpeg      binary mask (0 / 255) of abnormality n on the key slice
      batch_02/ ...

``ROOT`` may also be a single batch folder. A record is
``{"id", "image", "context", "mask", "abnormality": [{"id", "description",
"rewritten_findings", "label", "category", "mask"?}], "windows", "modality"}``
with paths relative to its batch folder.

What a case becomes (``load``):

* **image**: the key slice and the context slices nearest to it
  (``OmniConfig.slab_depth`` in all) stacked into a thin slab, ordered by
  offset. JPEG gray values are mapped back to approximate HU by inverting
  the record's window (``hu = v / 255 * width + center - width / 2``);
  clipped pixels come back as the window bounds. Images are read as axial
  slices in the radiological view (rows anterior -> posterior, columns
  patient right -> left); the affine says so, and the resample stage puts
  them on the canonical grid like any volume. Spacing is nominal:
  ``OmniConfig.slice_spacing_mm`` between slices, ``pixel_spacing_mm`` in
  plane (a JPEG carries none); the in-plane output spacing is chosen so the
  whole image fits ``OmniConfig.shape_yx`` (:meth:`target_grid`).
* **mask** (``label_space="coarse"``): on the key slice, each abnormality's
  pixels carry the coarse region id of that abnormality (category, an alias
  of it, or region keywords in its description; see :func:`abnormality_region`);
  the context slices are 0. Later abnormalities
  overwrite earlier ones where masks overlap.
* **text**: ``findings`` = the abnormalities' rewritten findings,
  ``impression`` = their descriptions, ``steps`` = the CoT record's steps.
* **labels**: 1 for each of the 18 CT-RATE labels that an abnormality's
  ``label`` names (exact name or a listed synonym), -1 for all others (a
  single slice cannot say a finding is absent).

Batches and case ids: a case id is the record's ``id`` (else the key
slice's folder name). If two batches hold the same id, the batch that sorts
last wins (a re-delivered case supersedes the earlier one) and the scan
records which batches it replaced.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ctprep.quarantine import MASK_GRID_MISMATCH, UNREADABLE, UNSAFE_NAME, Quarantine, QuarantineError
from ctprep.schema import ABNORMALITY_LABELS, is_safe_case_id
from ctprep.sources.base import CaseInput, LoadedCase, Source, register_source

SKIP_JSON = ("faults.json",)  # the generator's fault list, not records
# Standard CT windows for records that name their window instead of giving numbers.
NAMED_WINDOWS = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "mediastinal": (40.0, 400.0),
    "soft": (40.0, 400.0),
    "soft_tissue": (40.0, 400.0),
    "abdomen": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_WINDOW = (40.0, 400.0)

# Abnormality category -> coarse region name, for categories that are not region names
# themselves. Categories with no coarse region (e.g. mediastinum: lymph nodes) fall back
# to keyword matching of the description, then to no region (mask pixels stay 0).
CATEGORY_REGION = {
    "pleura": "lung",
    "pleural": "lung",
    "pulmonary": "lung",
    "airway": "trachea",
    "cardiac": "heart",
    "pericardium": "heart",
    "vessel": "aorta",
    "vascular": "aorta",
    "bone": "spine",
    "gastrointestinal": "esophagus",
}

# Extra spellings of the 18 CT-RATE labels seen in abnormality labels.
LABEL_SYNONYMS = {
    "pulmonary nodule": "Lung nodule",
    "nodule": "Lung nodule",
    "lung mass": "Lung nodule",
    "aortic calcification": "Arterial wall calcification",
    "coronary calcification": "Coronary artery wall calcification",
    "coronary artery calcification": "Coronary artery wall calcification",
    "ground glass opacity": "Lung opacity",
    "ground-glass opacity": "Lung opacity",
    "mediastinal lymphadenopathy": "Lymphadenopathy",
    "enlarged lymph node": "Lymphadenopathy",
    "pulmonary fibrosis": "Pulmonary fibrotic sequela",
    "hiatus hernia": "Hiatal hernia",
}
_LABEL_INDEX = {name.lower(): i for i, name in enumerate(ABNORMALITY_LABELS)}


def _norm(text: Any) -> str:
    return " ".join(str(text or "").lower().replace("_", " ").split())


def label_vector(abnormalities: list[dict[str, Any]]) -> list[int]:
    """18 CT-RATE labels: 1 where an abnormality's ``label`` names one, else -1 (unknown)."""
    out = [-1] * len(ABNORMALITY_LABELS)
    for abn in abnormalities:
        name = _norm(abn.get("label"))
        target = _LABEL_INDEX.get(name)
        if target is None and name in LABEL_SYNONYMS:
            target = _LABEL_INDEX[LABEL_SYNONYMS[name].lower()]
        if target is not None:
            out[target] = 1
    return out


def abnormality_region(abn: dict[str, Any], region_names: list[str],
                       keywords: dict[str, list[str]] | None = None) -> int:
    """Coarse region id (1-based index into ``region_names``, 0 = none) of one abnormality.

    Order: the category is a region name; the category has an alias in
    ``CATEGORY_REGION``; the description / label names a region by ``keywords``
    (default: the *code default* of ``TextConfig.region_keywords``, not the run's
    config: the mask is a resample output, and the resample key does not cover the
    text config; first region in ``region_names`` order that matches).
    """
    if keywords is None:
        from ctprep.config import TextConfig

        keywords = TextConfig().region_keywords
    category = _norm(abn.get("category"))
    names = [n.lower() for n in region_names]
    if category in names:
        return names.index(category) + 1
    alias = CATEGORY_REGION.get(category)
    if alias in names:
        return names.index(alias) + 1
    text = f"{abn.get('description', '')} {abn.get('label', '')}"
    for i, name in enumerate(region_names):
        for word in keywords.get(name, ()):
            if re.search(r"\b" + re.escape(word.lower()), text, re.IGNORECASE):
                return i + 1
    return 0


def parse_window(windows: Any) -> tuple[float, float]:
    """(center, width) from a record's ``windows``: a dict ({center|level|wl, width|ww}),
    a [center, width] pair, a window name, or a list of those (the first one is used)."""
    w = windows
    if isinstance(w, list) and w and not isinstance(w[0], (int, float)):
        w = w[0]
    if isinstance(w, dict):
        center = next((w[k] for k in ("center", "level", "wl", "window_center", "c") if k in w), None)
        width = next((w[k] for k in ("width", "ww", "window_width", "w") if k in w), None)
        if center is not None and width is not None and float(width) > 0:
            return float(center), float(width)
        if "name" in w:
            w = w["name"]
    if isinstance(w, (list, tuple)) and len(w) == 2 and all(isinstance(v, (int, float)) for v in w) and w[1] > 0:
        return float(w[0]), float(w[1])
    if isinstance(w, str) and _norm(w).replace(" ", "_") in NAMED_WINDOWS:
        return NAMED_WINDOWS[_norm(w).replace(" ", "_")]
    raise ValueError(f"cannot read a window from {windows!r}")


def window_to_hu(u8: np.ndarray, center: float, width: float) -> np.ndarray:
    """Invert 8-bit windowing: gray value -> approximate HU (float32)."""
    return (u8.astype(np.float32) * np.float32(width / 255.0) + np.float32(center - width / 2.0)).astype(np.float32)


def slice_offset(path: str) -> int | None:
    """Offset of a slice from its file name (``-2.jpg`` -> -2), None if not a number."""
    stem = Path(path).name.split(".")[0]
    try:
        return int(stem)
    except ValueError:
        return None


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
    out = []
    for p in sorted(batch.glob("*.json")):
        if p.name in SKIP_JSON:
            continue
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, list) and data and isinstance(data[0], dict) and "image" in data[0]:
            out.append(p)
    return out


def _is_batch(folder: Path) -> bool:
    return folder.is_dir() and (folder / "records.json").is_file() or bool(folder.is_dir() and _record_files(folder))


def _image_size(path: Path) -> list[int] | None:
    """(height, width) from the JPEG header without decoding; None if unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return [int(im.size[1]), int(im.size[0])]
    except Exception:  # noqa: BLE001 - load() quarantines it with the real error
        return None


def _cot_id(record: dict[str, Any]) -> str | None:
    for k in ("id", "case_id", "case", "VolumeName", "name"):
        if record.get(k):
            return str(record[k])
    return None


def _read_jpeg(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except FileNotFoundError as e:
        raise QuarantineError(UNREADABLE, f"missing image {path}") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad JPEG
        raise QuarantineError(UNREADABLE, f"cannot decode {Path(path).name}: {type(e).__name__}: {e}") from e


@register_source
class OmniAbnormSource(Source):
    """OmniAbnorm-CT batches (see module docstring)."""

    name = "omniabnorm"

    @classmethod
    def detect(cls, root: Path) -> bool:
        root = Path(root)
        if not root.is_dir():
            return False
        return _is_batch(root) or any(_is_batch(sub) for sub in sorted(root.iterdir()) if sub.is_dir())

    @staticmethod
    def batches(root: Path) -> list[Path]:
        """Batch folders under ``root`` in name order (``root`` itself if it is one batch)."""
        root = Path(root)
        if _is_batch(root):
            return [root]
        return [sub for sub in sorted(root.iterdir()) if sub.is_dir() and _is_batch(sub)]

    def scan(self, root: Path) -> tuple[list[CaseInput], list[Quarantine]]:
        root = Path(root).resolve()
        found: dict[str, CaseInput] = {}
        quarantined: dict[str, Quarantine] = {}
        replaced: dict[str, list[str]] = {}
        for batch in self.batches(root):
            cot: dict[str, dict[str, Any]] = {}
            for jl in sorted(batch.glob("*.jsonl")):
                for line in jl.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        rec = json.loads(line)
                        if _cot_id(rec):
                            cot[_cot_id(rec)] = rec  # type: ignore[index]
            for rf in _record_files(batch):
                for record in json.loads(rf.read_text(encoding="utf-8")):
                    case, bad = self._case(batch, record, cot)
                    cid = case.case_id if case else bad.case  # type: ignore[union-attr]
                    if cid in found or cid in quarantined:
                        prev = found.get(cid) or quarantined.get(cid)
                        replaced.setdefault(cid, []).append(prev.meta["batch"] if isinstance(prev, CaseInput)
                                                            else prev.paths.get("batch", ""))  # type: ignore[union-attr]
                        found.pop(cid, None)
                        quarantined.pop(cid, None)
                    if case is not None:
                        found[cid] = case
                    else:
                        quarantined[cid] = bad  # type: ignore[assignment]
        for cid, batches in replaced.items():
            if cid in found:
                found[cid].meta["replaces_batches"] = batches
        return [found[c] for c in sorted(found)], [quarantined[c] for c in sorted(quarantined)]

    def _case(self, batch: Path, record: dict[str, Any], cot: dict[str, dict[str, Any]]
              ) -> tuple[CaseInput | None, Quarantine | None]:
        image_rel = str(record.get("image", ""))
        case_id = str(record.get("id") or Path(image_rel).parent.name)
        where = {"batch": batch.name, "image": str(batch / image_rel)}
        if not is_safe_case_id(case_id):
            return None, Quarantine(case_id, "scan", UNSAFE_NAME, f"record id {case_id!r} is not a safe case id "
                                    "(letters, digits, '_' and '-' only)", self.name, where)
        files: dict[str, str] = {}
        offsets: dict[str, int] = {}
        slices = [("image", image_rel)] + [(f"context_{i}", str(c)) for i, c in enumerate(record.get("context") or [])]
        for role, rel in slices:
            path = _inside(batch, rel)
            if path is None:
                return None, Quarantine(case_id, "scan", UNSAFE_NAME,
                                        f"{role} path {rel!r} leaves the batch folder {batch.name}", self.name, where)
            off = 0 if role == "image" else slice_offset(rel)
            if off is None:
                return None, Quarantine(case_id, "scan", UNREADABLE,
                                        f"context slice {rel!r} is not named by its offset (e.g. -1.jpg)",
                                        self.name, where)
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
                                        f"mask path {rel!r} leaves the batch folder {batch.name}", self.name, where)
            files[f"mask_{j}"] = str(path)
        try:
            window = list(parse_window(record.get("windows")))
            window_source = "record"
        except ValueError:
            window, window_source = list(DEFAULT_WINDOW), "default"
        c = cot.get(case_id, {})
        findings = " ".join(str(a.get("rewritten_findings") or "").strip() for a in abnormalities).strip()
        impression = " ".join(str(a.get("description") or "").strip() for a in abnormalities).strip()
        text = {
            "findings": findings,
            "impression": impression,
            "report": " ".join(t for t in (findings, impression) if t),
            "steps": list(c.get("steps") or []),
            "cot_findings": str(c.get("findings") or ""),
            "cot_impression": str(c.get("impression") or ""),
        }
        meta = {
            "batch": batch.name,
            "modality": record.get("modality", ""),
            "window": window,
            "window_source": window_source,
            "offsets": offsets,
            "image_size_hw": _image_size(Path(files["image"])),
            "abnormality": [{k: a.get(k) for k in ("id", "label", "category", "description")} for a in abnormalities],
        }
        case = CaseInput(case_id=case_id, source=self.name, split=str(record.get("split") or "train"),
                         files=files, meta=meta, text=text, labels=label_vector(abnormalities))
        return case, None

    # ------------------------------------------------------------------ worker side
    def slab_roles(self, case: CaseInput) -> list[str]:
        """Slice roles in the slab, by offset: the key slice and its nearest context slices."""
        depth = self.config.omni.slab_depth if self.config is not None else 4
        offsets = case.meta["offsets"]
        chosen = sorted(offsets, key=lambda r: (abs(offsets[r]), offsets[r]))[:depth]
        return sorted(chosen, key=lambda r: offsets[r])

    def load(self, case: CaseInput) -> LoadedCase:
        omni = self.config.omni if self.config is not None else None
        gap = float(omni.slice_spacing_mm) if omni else 5.0
        pixel = float(omni.pixel_spacing_mm) if omni else 0.75
        roles = self.slab_roles(case)
        center, width = case.meta["window"]
        slices = [_read_jpeg(case.files[r]) for r in roles]
        shape = slices[roles.index("image")].shape
        for r, s in zip(roles, slices):
            if s.shape != shape:
                raise QuarantineError(UNREADABLE, f"slice {Path(case.files[r]).name} is {s.shape}, key slice {shape}")
        # (rows, cols, slices) -> nibabel order (i = column, j = row, k = slice)
        image = window_to_hu(np.stack(slices, axis=-1), center, width).transpose(1, 0, 2)
        labels = np.zeros(image.shape, dtype=np.uint8)
        k_key = roles.index("image")
        names = list(self.config.regions.names) if self.config is not None else []
        regions_used = []
        for j, abn in enumerate(case.meta.get("abnormality", [])):
            role = f"mask_{j}"
            if role not in case.files:
                continue
            m = _read_jpeg(case.files[role])
            if m.shape != shape:
                raise QuarantineError(MASK_GRID_MISMATCH,
                                      f"mask {Path(case.files[role]).name} is {m.shape}, key slice is {shape}")
            region = abnormality_region(abn, names)
            regions_used.append(region)
            if region:
                labels[:, :, k_key][m.T >= 128] = region
        h, w = shape
        offs = [case.meta["offsets"][r] for r in roles]
        steps = {b - a for a, b in zip(offs, offs[1:])}
        # Equally spaced offsets keep their true distance (e.g. -2, 0, 2 -> 2 gaps); irregular
        # ones cannot be one affine and are stacked as if contiguous (recorded in info).
        z_step = gap * (steps.pop() if len(steps) == 1 else 1)
        # Radiological view: column -> patient left (R decreases), row -> posterior (A decreases),
        # slice offset -> superior. Centre the image on the origin in plane.
        affine = np.array([
            [-pixel, 0.0, 0.0, (w - 1) / 2 * pixel],
            [0.0, -pixel, 0.0, (h - 1) / 2 * pixel],
            [0.0, 0.0, z_step, offs[0] * gap],
            [0.0, 0.0, 0.0, 1.0],
        ])
        info = {"window": [center, width], "slab_offsets": offs, "irregular_offsets": len(steps) > 1, "key_slice_index": k_key,
                "abnormality_regions": regions_used, "region_names": names}
        return LoadedCase(image=image, labels=labels, affine=affine, header_style="jpg", label_space="coarse",
                          info=info)

    def target_grid(self, case: CaseInput, config) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
        """Thin slab: ``slab_depth`` slices at the nominal slice spacing; in plane, the spacing
        that fits the whole image (nominal pixel spacing x size) into ``shape_yx``."""
        o = config.omni
        size = case.meta.get("image_size_hw") or list(o.shape_yx)
        sy = float(o.pixel_spacing_mm) * size[0] / o.shape_yx[0]
        sx = float(o.pixel_spacing_mm) * size[1] / o.shape_yx[1]
        s = max(sy, sx)  # one in-plane spacing: square pixels stay square
        return (float(o.slice_spacing_mm), s, s), (int(o.slab_depth), int(o.shape_yx[0]), int(o.shape_yx[1]))
