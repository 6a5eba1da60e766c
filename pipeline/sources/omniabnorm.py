"""OmniAbnorm-CT layout: 2D CT slices (JPEG) with per-abnormality masks, read into thin slabs.

Two on-disk layouts are read (``docs/omniabnorm.md`` has the rules in full).

**Release** (OmniAbnorm-CT-14K as published; ``ctprep demo-data --source omniabnorm``
writes it)::

    ROOT/
      axial/axial_train.json, axial/axial_valid.json, axial/*_grouped.json,
      coronal/..., sagittal/..., merged_train.json, ...   JSON files (see release_files: ROOT
                                                          may also hold several such trees)
      <any>/<datum image folder>/0.jpg (or 0.jpeg), -1.jpg, 1.jpg, ...
      <any>/<datum mask folder>/<abnormality id>.jpeg
      *.jsonl                                             optional CoT records keyed by datum id

Each JSON file is a dict ``{datum id: datum}``; a datum is ``{"image": folder,
"mask": folder, "context": [offsets], "abnormality": [{"id", "group_id",
"label", "description", "rewritten_findings": [str], "category"}]}``
(``_grouped`` files hold ``"abnormality_group": {group_id: [abnormality]}``
instead; normal images have neither). Folder paths are relative to the JSON's
folder or absolute paths of another machine: an absolute path that does not
exist here is re-rooted (its longest tail that exists under ``omni.image_root``,
the JSON's folder or a folder above it up to ROOT). Nothing outside ROOT is read
unless ``omni.image_root`` names it.

Rules (why: see docs/omniabnorm.md):

* **Which file wins** when one datum id is listed in several JSON files: a
  plane file (``axial_train.json``) over its ``_grouped`` variant over a
  ``merged*`` file; among equals the path that sorts last (a re-delivery). The
  others are listed in ``provenance["also_in"]``; never quarantined for it.
* **Case ids**: a datum id that ``is_safe_case_id`` accepts is the case id;
  any other maps to ``<id with [^A-Za-z0-9_-] runs as '_'>-<sha1(id)[:10]>``
  (:func:`case_id_for`); ``provenance["datum_id"]`` keeps the original.
* **Plane**: a datum's own ``plane`` field, else the plane named by the JSON
  file or its folder, else a plane word in the image path, else axial
  (``provenance["plane_from"]`` says which). Split: ``train | valid | test``
  from the file name (``val``, ``validation`` -> valid), else train.
* **Missing files**: a missing key slice (``0.jpg`` / ``0.jpeg``) quarantines
  that datum (``unreadable``, naming the file). A missing or undecodable
  context slice or mask file is recorded (``provenance["missing"]``,
  ``LoadedCase.info["missing_context"]`` / ``["missing_masks"]``) and the case
  goes on: a slab position without its slice repeats the nearest slice that
  exists (``info["filled_offsets"]``).
* **Text**: ``findings`` = one sentence per abnormality group (its first
  non-empty ``description``, else its first rewritten finding), ``impression``
  = the groups' labels; a normal image gets no findings and the impression
  :data:`NORMAL_IMPRESSION` (``{plane}`` filled in), so it is trained as a
  normal image rather than quarantined for lack of text.

**Batches** (the older layout, still read)::

    ROOT/batch_01/records.json   list of records (any *.json holding a list of records works)
    ROOT/batch_01/cot.jsonl      {"id", "steps": [str | {"step", "text"}], "findings", "impression"}
    ROOT/batch_01/<id>/0.jpg, -2.jpg .. 2.jpg, mask_<n>.jpeg

with records ``{"id", "image", "context": [paths], "mask": [paths],
"abnormality": [...], "windows", "modality"}``, paths relative to the batch
folder; if two batches hold the same id the batch that sorts last wins.

What a case becomes (``load``), for both layouts:

* **image**: the key slice and the listed context offsets nearest to it
  (``OmniConfig.slab_depth`` in all), ordered by offset, as a thin slab. JPEG
  gray values are mapped back to approximate HU by inverting the datum's
  ``windows`` (release JSONs carry none: ``DEFAULT_WINDOW``), ``hu = v / 255 *
  width + center - width / 2``. Spacing is nominal (a JPEG carries none):
  ``omni.slice_spacing_mm`` per offset step, ``omni.pixel_spacing_mm`` in plane.
* **slab frame and planes**: every slab is stored as (slice, row, column) =
  (``slab_depth``, H, W), so that axial, coronal and sagittal slabs share one
  grid and one patch layer. The affine returned by ``load`` is the *slab
  frame*: the axial one of the radiological view (column -> patient left, row ->
  posterior, offset -> superior). For an axial image that is the patient; for a
  coronal image (rows superior -> inferior, columns patient right -> left,
  offsets along anterior) and a sagittal one (rows superior -> inferior,
  columns anterior -> posterior, offsets along patient right) the patient
  position of a slab-frame point is ``PATIENT_FROM_SLAB[plane] @ point``,
  recorded as ``info["patient_from_slab"]`` (zarr attrs ``input``) together
  with ``info["plane"]``. So the stored (z, y, x) axes point (S, A, R) for
  axial, (A, S, R) for coronal and (R, S, A) for sagittal slabs; the true
  affine of a stored slab is ``patient_from_slab @ attrs["affine"]``. (The
  resample stage always stores canonical (S, A, R) axes; a coronal slab stored
  truthfully would be (H, slab_depth, W), which no patch grid with pz < py fits.)
* **mask** (``label_space="coarse"``): on the key slice, each abnormality
  group's masks (one file per abnormality id) carry the coarse region id of the
  group (category, an alias of it, or region keywords in its description; see
  :func:`abnormality_region`); context slices are 0. A normal image has an
  all-zero mask; an abnormal one whose mask files are all missing has none
  (``has_mask`` false), so it is not taken for a case without findings.
* **labels**: 1 for each of the 18 CT-RATE labels that an abnormality's
  ``label`` names (exact name or a listed synonym), -1 for all others (a
  single slice cannot say a finding is absent).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctprep.quarantine import (
    DUPLICATE_CASE,
    MASK_GRID_MISMATCH,
    UNREADABLE,
    UNSAFE_NAME,
    Quarantine,
    QuarantineError,
)
from ctprep.schema import ABNORMALITY_LABELS, is_safe_case_id
from ctprep.sources.base import CaseInput, LoadedCase, Source, is_pipeline_output, register_source

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
    """Older layout: the batch folder's JSON files that hold a list of records."""
    return [p for p in sorted(batch.glob("*.json")) if p.name not in SKIP_JSON and p.is_file() and _peek(p) == "records"]


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


def _jsonl_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; a line that is not JSON (or not UTF-8) only loses itself."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _read_jpeg(path: str) -> np.ndarray:
    from PIL import Image

    if os.path.lexists(path) and not os.path.isfile(path):  # a FIFO or device would block or never end
        raise QuarantineError(UNREADABLE, f"{path} is not a regular file; only regular files (or links to them) are read")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except FileNotFoundError as e:
        raise QuarantineError(UNREADABLE, f"missing image {path}") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad JPEG
        raise QuarantineError(UNREADABLE, f"cannot decode {Path(path).name}: {type(e).__name__}: {e}") from e



# ------------------------------------------------------------------------------ release layout
PLANES = ("axial", "coronal", "sagittal")
# Slab frame (x', y', z') -> patient RAS+ (x, y, z), see the module docstring. Coronal: R = x',
# A = z' (offsets), S = y' (image up); sagittal: R = z' (offsets), A = x' (image left), S = y'.
PATIENT_FROM_SLAB = {
    "axial": np.eye(4),
    "coronal": np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]]),
    "sagittal": np.array([[0.0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]),
}
NORMAL_IMPRESSION = "No abnormality is marked on this {plane} CT image."
KEY_SLICE_NAMES = ("0.jpeg", "0.jpg")  # the released loader looks for 0.jpeg first
SLICE_SUFFIXES = (".jpeg", ".jpg")
MASK_SUFFIXES = (".jpeg", ".jpg")
SPLIT_WORDS = {"train": "train", "training": "train", "valid": "valid", "val": "valid", "validation": "valid",
               "test": "test"}
_PEEK_BYTES = 1 << 16


def case_id_for(datum_id: str) -> str:
    """Deterministic safe case id of a datum id: itself when safe, else a readable slug + hash."""
    if is_safe_case_id(datum_id):
        return datum_id
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", datum_id).strip("_-")[:80] or "datum"
    return f"{slug}-{hashlib.sha1(datum_id.encode('utf-8')).hexdigest()[:10]}"


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^a-z]+", text.lower()) if w]


def plane_from_name(text: str) -> str | None:
    """The plane a file or folder name names ("axial_train" -> axial), None if none or several."""
    found = {w for w in _words(text) if w in PLANES}
    return found.pop() if len(found) == 1 else None


def split_from_name(stem: str) -> str | None:
    found = {SPLIT_WORDS[w] for w in _words(stem) if w in SPLIT_WORDS}
    return found.pop() if len(found) == 1 else None


def file_rank(path: Path) -> int:
    """Lower wins a duplicated datum: 0 plane file, 1 ``_grouped`` variant (or other), 2 ``merged``."""
    words = _words(path.stem)
    if "merged" in words:
        return 2
    if "grouped" in words or plane_from_name(path.stem) is None:
        return 1
    return 0


def _peek(path: Path) -> str:
    """"release" ({id: datum}), "records" ([record]) or "" from the first bytes (no full parse)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_PEEK_BYTES).lstrip()
    except OSError:
        return ""
    if head.startswith(b"{") and (b'"image"' in head or head.rstrip() == b"{}" or head[1:].lstrip() == b"}"):
        return "release"
    if head.startswith(b"[") and b'"image"' in head:
        return "records"
    return ""


MAX_JSON_DEPTH = 2  # folders below ROOT searched for JSON files: ROOT/<delivery>/<plane>/x.json
DATA_FOLDER_SUBDIRS = 256  # a folder with more subfolders holds image folders (or volumes): not searched


def release_files(root: Path) -> list[Path]:
    """Datum JSON files of the release layout, sorted by relative path.

    Searched: ROOT/*.json, ROOT/*/*.json (one release tree) and ROOT/*/*/*.json (deliveries
    side by side, a release tree each). A folder with more than ``DATA_FOLDER_SUBDIRS``
    subfolders (``images/`` with 14K datum folders, a CT-RATE ``train/``) is not descended
    into: detection runs on every source root and must stay a few directory listings.
    """
    root = Path(root)
    found: list[Path] = []

    def visit(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        subdirs = []
        for e in entries:
            if e.is_dir():
                if not is_pipeline_output(e.path):  # an --out inside the source is never input
                    subdirs.append(Path(e.path))
            elif (e.name.endswith(".json") and e.name not in SKIP_JSON and e.is_file()
                  and _peek(Path(e.path)) == "release"):
                found.append(Path(e.path))
        if depth < MAX_JSON_DEPTH and len(subdirs) <= DATA_FOLDER_SUBDIRS:
            for sub in subdirs:
                visit(sub, depth + 1)

    visit(root, 0)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _lexical(path: str | Path) -> Path:
    """``path`` with ``.``/``..`` folded away, symlinks kept: a link the user put inside the
    source root is followed, a ``..`` in a JSON path cannot leave it."""
    return Path(os.path.normpath(path))


def _within(path: Path, bases: list[Path]) -> bool:
    for b in bases:
        try:
            path.relative_to(b)
            return True
        except ValueError:
            pass
    return False


@dataclass
class FolderResolver:
    """Finds a datum's image / mask folder on this machine (see the module docstring).

    :meth:`bases` are tried in order for relative paths and re-rooted tails; a
    found folder must lie inside one of ``allowed`` (the source root and
    ``image_root``). A foreign prefix that once re-rooted onto a base is
    remembered per JSON folder, so 14K datums sharing one prefix cost one lookup each.
    """

    allowed: list[Path]  # [source root, image_root?]
    image_root: Path | None = None
    _reroot: dict[tuple[str, Path], Path] = field(default_factory=dict)

    def bases(self, json_dir: Path) -> list[Path]:
        """``image_root``, then the JSON's folder and each folder above it up to the source root."""
        out = [self.image_root] if self.image_root else []
        root = self.allowed[0]
        d = json_dir
        while True:
            out.append(d)
            if d == root or d.parent == d or not _within(d, [root]):
                break
            d = d.parent
        if root not in out:
            out.append(root)
        return list(dict.fromkeys(out))

    def resolve(self, value: Any, json_dir: Path) -> tuple[Path | None, str]:
        """(folder, how): how is "relative" | "absolute" | "rerooted" when found, else (None, one of
        ``"escapes"`` (a ``..`` path leaving the source root), ``"missing"``, ``"empty"``)."""
        if not isinstance(value, str) or not value.strip():
            return None, "empty"
        raw = value.strip()
        bases = self.bases(json_dir)
        if not os.path.isabs(raw):
            escaped = False
            for base in bases:
                cand = _lexical(base / raw)
                if not _within(cand, self.allowed):
                    escaped = True
                    continue
                if cand.is_dir():
                    return cand, "relative"
            return None, ("escapes" if escaped else "missing")
        cand = _lexical(raw)
        if cand.is_dir() and _within(cand, self.allowed):
            return cand, "absolute"
        parts = Path(raw).parts[1:]
        if ".." in parts:
            return None, "escapes"
        for (prefix, where), base in self._reroot.items():
            if where == json_dir and raw.startswith(prefix + "/"):
                cand = _lexical(base / raw[len(prefix) + 1:])
                if cand.is_dir() and _within(cand, self.allowed):
                    return cand, "rerooted"
        for i in range(len(parts)):
            for base in bases:
                cand = _lexical(base.joinpath(*parts[i:]))
                if cand.is_dir() and _within(cand, self.allowed):
                    self._reroot[("/" + "/".join(parts[:i]), json_dir)] = base
                    return cand, "rerooted"
        return None, "missing"


FOLDER_PROBLEMS = {
    "escapes": "leaves the source root",
    "missing": "is not found here, nor its tail under omni.image_root or the JSON's folder and those above it",
    "empty": "is not given",
}


def _first_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        p = folder / n
        if p.is_file():
            return p
    return None


def _plain_name(value: Any) -> str | None:
    """``value`` as a file-name stem that cannot leave its folder, else None."""
    s = str(value).strip()
    if not s or s in (".", "..") or "/" in s or "\\" in s or "\x00" in s:
        return None
    return s


def _offset(value: Any) -> int | None:
    """A context entry (an int offset, "-1", or a file name "-1.jpg") -> int, None if none."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return slice_offset(str(value))


def datum_abnormalities(datum: dict[str, Any]) -> list[dict[str, Any]]:
    """The datum's abnormalities, each with a ``group_id`` (``abnormality`` or ``abnormality_group``)."""
    if isinstance(datum.get("abnormality"), list):
        out = [dict(a) for a in datum["abnormality"] if isinstance(a, dict)]
    elif isinstance(datum.get("abnormality_group"), dict):
        out = []
        for gid, members in datum["abnormality_group"].items():
            for a in members if isinstance(members, list) else []:
                if isinstance(a, dict):
                    out.append({**a, "group_id": a.get("group_id", gid)})
    else:
        return []
    for j, a in enumerate(out):
        if a.get("group_id") in (None, ""):
            a["group_id"] = f"_{a.get('id', j)}"  # no group: a group of its own
    return out


def abnormality_groups(abnormalities: list[dict[str, Any]]) -> list[list[int]]:
    """Indices into ``abnormalities`` per group, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for j, a in enumerate(abnormalities):
        groups.setdefault(str(a.get("group_id", f"_{j}")), []).append(j)
    return list(groups.values())


def _first_text(value: Any) -> str:
    if isinstance(value, list):
        return next((" ".join(str(v).split()) for v in value if str(v or "").strip()), "")
    return " ".join(str(value or "").split())


def release_text(abnormalities: list[dict[str, Any]], plane: str) -> dict[str, Any]:
    """findings / impression / report of one datum (rules in the module docstring)."""
    findings, labels, variants = [], [], []
    for members in abnormality_groups(abnormalities):
        group = [abnormalities[j] for j in members]
        sentence = next((_first_text(a.get("description")) for a in group if _first_text(a.get("description"))), "")
        sentence = sentence or next((_first_text(a.get("rewritten_findings")) for a in group
                                     if _first_text(a.get("rewritten_findings"))), "")
        if sentence:
            findings.append(sentence if sentence.endswith(".") else sentence + ".")
        label = next((_first_text(a.get("label")) for a in group if _first_text(a.get("label"))), "")
        if label and label not in labels:
            labels.append(label)
        rw = next((a.get("rewritten_findings") for a in group if a.get("rewritten_findings")), [])
        variants.append([str(v) for v in rw] if isinstance(rw, list) else [str(rw)])
    if not abnormalities:
        impression = NORMAL_IMPRESSION.format(plane=plane)
    else:
        impression = "; ".join(labels) + "." if labels else ""
    text_findings = " ".join(findings)
    return {"findings": text_findings, "impression": impression,
            "report": " ".join(t for t in (text_findings, impression) if t), "finding_variants": variants}


# ------------------------------------------------------------------------------ the source
@register_source
class OmniAbnormSource(Source):
    """OmniAbnorm-CT, release JSON files or older batch folders (see module docstring)."""

    name = "omniabnorm"

    @classmethod
    def detect(cls, root: Path) -> bool:
        root = Path(root)
        if not root.is_dir():
            return False
        return (bool(release_files(root)) or _is_batch(root)
                or any(_is_batch(sub) for sub in sorted(root.iterdir()) if sub.is_dir()))

    @staticmethod
    def batches(root: Path) -> list[Path]:
        """Batch folders (older layout) under ``root`` in name order (``root`` itself if it is one batch)."""
        root = Path(root)
        if _is_batch(root):
            return [root]
        return [sub for sub in sorted(root.iterdir()) if sub.is_dir() and _is_batch(sub)]

    def _image_root(self, root: Path) -> Path | None:
        configured = getattr(self.config.omni, "image_root", None) if self.config is not None else None
        if not configured:
            return None
        path = Path(configured).expanduser()
        return (path if path.is_absolute() else root / path).resolve()

    def scan(self, root: Path) -> tuple[list[CaseInput], list[Quarantine]]:
        root = Path(root).resolve()
        found, quarantined = self._scan_batches(root)
        rel_cases, rel_q = self._scan_release(root)
        for q in rel_q:
            quarantined[q.case] = q
        for case in rel_cases:
            if case.case_id in found:  # the same id in a batch folder: the release file wins, say so
                case.provenance["replaces_batch"] = found[case.case_id].provenance.get("batch", "")
            found[case.case_id] = case
            quarantined.pop(case.case_id, None)
        for cid in list(quarantined):
            if cid in found:  # a quarantined batch record superseded by a release datum
                quarantined.pop(cid)
        return [found[c] for c in sorted(found)], [quarantined[c] for c in sorted(quarantined)]

    # -------------------------------------------------------------- release layout, driver side
    def _scan_release(self, root: Path) -> tuple[list[CaseInput], list[Quarantine]]:
        files = release_files(root)
        if not files:
            return [], []
        quarantined: list[Quarantine] = []
        # datum id -> [(rank, relative path, json path, datum)]
        listings: dict[str, list[tuple[int, str, Path, dict[str, Any]]]] = {}
        for jf in files:
            rel = jf.relative_to(root).as_posix()
            try:
                data = json.loads(jf.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                quarantined.append(Quarantine(f"json:{rel}", "scan", UNREADABLE, f"cannot parse {rel}: {e}",
                                              self.name, {"json": str(jf)}))
                continue
            if not isinstance(data, dict):
                continue
            for datum_id, datum in data.items():
                listings.setdefault(str(datum_id), []).append((file_rank(jf), rel, jf, datum))
        cot = self._release_cot(root, files)
        image_root = self._image_root(root)
        resolver = FolderResolver([root] + ([image_root] if image_root else []), image_root)
        cases: dict[str, CaseInput] = {}
        ids_of_case: dict[str, str] = {}
        for datum_id in sorted(listings):
            # lowest rank wins; among equal ranks the path that sorts last (a re-delivery)
            entries = sorted(listings[datum_id], key=lambda e: (-e[0], e[1]))
            rank, rel, jf, datum = entries[-1]
            case_id = case_id_for(datum_id)
            prov: dict[str, Any] = {"json": rel, "datum_id": datum_id}
            others = [e[1] for e in entries[:-1]]
            if others:
                prov["also_in"] = others
            plane, plane_from = self._plane(datum, entries)
            prov["plane_from"] = plane_from
            if case_id in ids_of_case:  # two ids map to one case id: keep the first, name both
                quarantined.append(Quarantine(datum_id, "scan", DUPLICATE_CASE,
                                              f"datum ids {ids_of_case[case_id]!r} and {datum_id!r} map to one case id",
                                              self.name, {"json": str(jf)}))
                continue
            ids_of_case[case_id] = datum_id
            if not isinstance(datum, dict):
                quarantined.append(Quarantine(case_id, "scan", UNREADABLE, f"datum {datum_id!r} in {rel} is not an "
                                              "object", self.name, {"json": str(jf)}))
                continue
            split = split_from_name(jf.stem) or "train"
            case, bad = self._datum(datum_id, case_id, datum, jf, plane, split, prov, resolver,
                                    cot.get(datum_id) or cot.get(case_id) or {})
            if bad is not None:
                quarantined.append(bad)
            else:
                cases[case_id] = case  # type: ignore[assignment]
        return list(cases.values()), quarantined

    @staticmethod
    def _plane(datum: Any, entries: list[tuple[int, str, Path, Any]]) -> tuple[str, str]:
        """(plane, where it came from): datum field, the winning (then any) file, the image path, default."""
        if isinstance(datum, dict):
            own = str(datum.get("plane") or "").lower()
            if own in PLANES:
                return own, "datum"
        for _, rel, _, _ in reversed(entries):  # the winner first
            plane = plane_from_name(Path(rel).stem) or plane_from_name(Path(rel).parent.name)
            if plane:
                return plane, "file"
        if isinstance(datum, dict):
            plane = plane_from_name(str(datum.get("image") or ""))
            if plane:
                return plane, "image path"
        return "axial", "default"

    @staticmethod
    def _release_cot(root: Path, files: list[Path]) -> dict[str, dict[str, Any]]:
        """CoT records (``*.jsonl`` at ROOT and beside the JSON files) by id."""
        cot: dict[str, dict[str, Any]] = {}
        folders = sorted({root, *(f.parent for f in files)})
        for folder in folders:
            for jl in sorted(folder.glob("*.jsonl")):
                for rec in _jsonl_records(jl):
                    if isinstance(rec, dict) and _cot_id(rec):
                        cot[_cot_id(rec)] = rec  # type: ignore[index]
        return cot

    def _datum(self, datum_id: str, case_id: str, datum: dict[str, Any], jf: Path, plane: str, split: str,
               prov: dict[str, Any], resolver: FolderResolver, cot: dict[str, Any]
               ) -> tuple[CaseInput | None, Quarantine | None]:
        where = {"json": str(jf), "image": str(datum.get("image", ""))}

        def bad(kind: str, reason: str) -> tuple[None, Quarantine]:
            return None, Quarantine(case_id, "scan", kind, f"datum {datum_id!r} ({prov['json']}): {reason}",
                                    self.name, where)

        image_dir, how = resolver.resolve(datum.get("image"), jf.parent)
        if image_dir is None:
            return bad(UNSAFE_NAME if how == "escapes" else UNREADABLE,
                       f"image folder {datum.get('image')!r} {FOLDER_PROBLEMS[how]}")
        if how == "rerooted":
            prov["image_from"] = str(datum.get("image"))
        prov["image_dir"] = str(image_dir)
        key = _first_file(image_dir, KEY_SLICE_NAMES)
        if key is None:
            return bad(UNREADABLE, f"key slice {image_dir / '0.jpg'} (or 0.jpeg) is missing")
        files = {"image": str(key)}
        offsets = {"image": 0}
        listed: list[int] = []
        missing: list[str] = []
        for entry in datum.get("context") or []:
            off = _offset(entry)
            if off is None:
                missing.append(f"context entry {entry!r} is not an offset")
                continue
            if off in listed:
                continue
            listed.append(off)
            if off == 0:
                continue
            path = _first_file(image_dir, tuple(f"{off}{s}" for s in (key.suffix, *SLICE_SUFFIXES)))
            if path is None:
                missing.append(f"{off}{key.suffix}")
                continue
            files[f"context_{off}"] = str(path)
            offsets[f"context_{off}"] = off
        abnormalities = datum_abnormalities(datum)
        if abnormalities:
            mask_dir, mhow = resolver.resolve(datum.get("mask"), jf.parent)
            if mask_dir is None:
                if mhow == "escapes":
                    return bad(UNSAFE_NAME, f"mask folder {datum.get('mask')!r} {FOLDER_PROBLEMS[mhow]}")
                missing.append(f"mask folder {datum.get('mask')!r} ({FOLDER_PROBLEMS[mhow]})")
            for j, abn in enumerate(abnormalities):
                stem = _plain_name(abn.get("id", j))
                if stem is None:
                    return bad(UNSAFE_NAME, f"abnormality id {abn.get('id')!r} is not a plain file name")
                if mask_dir is None:
                    continue
                path = _first_file(mask_dir, tuple(f"{stem}{s}" for s in MASK_SUFFIXES))
                if path is None:
                    missing.append(f"mask {stem}.jpeg")
                    continue
                files[f"mask_{j}"] = str(path)
        if missing:
            prov["missing"] = missing
        try:
            window = list(parse_window(datum.get("windows")))
            window_source = "datum"
        except ValueError:
            window, window_source = list(DEFAULT_WINDOW), "default"
        text = release_text(abnormalities, plane)
        text.update({"steps": list(cot.get("steps") or []), "cot_findings": str(cot.get("findings") or ""),
                     "cot_impression": str(cot.get("impression") or "")})
        meta = {
            "layout": "release",
            "plane": plane,
            "window": window,
            "window_source": window_source,
            "offsets": offsets,
            "context_listed": sorted(listed),
            "image_size_hw": _image_size(key),
            "abnormality": [{k: a.get(k) for k in ("id", "group_id", "label", "category", "description")}
                            for a in abnormalities],
        }
        case = CaseInput(case_id=case_id, source=self.name, split=split, files=files, meta=meta, text=text,
                         labels=label_vector(abnormalities), provenance=prov)
        return case, None

    # -------------------------------------------------------------- batches layout, driver side
    def _scan_batches(self, root: Path) -> tuple[dict[str, CaseInput], dict[str, Quarantine]]:
        found: dict[str, CaseInput] = {}
        quarantined: dict[str, Quarantine] = {}
        replaced: dict[str, list[str]] = {}
        for batch in self.batches(root):
            cot: dict[str, dict[str, Any]] = {}
            for jl in sorted(batch.glob("*.jsonl")):
                for rec in _jsonl_records(jl):
                    if _cot_id(rec):
                        cot[_cot_id(rec)] = rec  # type: ignore[index]
            for rf in _record_files(batch):
                for record in json.loads(rf.read_text(encoding="utf-8")):
                    case, bad = self._case(batch, record, cot)
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
        for cid, batches in replaced.items():
            if cid in found:
                found[cid].provenance["replaces_batches"] = batches
        return found, quarantined

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
            "modality": record.get("modality", ""),
            "window": window,
            "window_source": window_source,
            "offsets": offsets,
            "image_size_hw": _image_size(Path(files["image"])),
            "abnormality": [{k: a.get(k) for k in ("id", "label", "category", "description")} for a in abnormalities],
        }
        case = CaseInput(case_id=case_id, source=self.name, split=str(record.get("split") or "train"),
                         files=files, meta=meta, text=text, labels=label_vector(abnormalities),
                         provenance={"batch": batch.name})
        return case, None

    # -------------------------------------------------------------- worker side
    def slab_offsets(self, case: CaseInput) -> list[int]:
        """Offsets in the slab: the key slice and the listed offsets nearest to it, ascending.

        Listed offsets whose file is missing still take their place (so the slab keeps its
        spacing); :meth:`load` fills them from the nearest slice that exists.
        """
        depth = self.config.omni.slab_depth if self.config is not None else 4
        listed = set(case.meta.get("context_listed") or case.meta["offsets"].values()) | {0}
        chosen = sorted(listed, key=lambda o: (abs(o), o))[:depth]
        return sorted(chosen)

    def slab_roles(self, case: CaseInput) -> list[str]:
        """Roles of the slices in the slab that have a file, by offset."""
        by_offset = {o: r for r, o in case.meta["offsets"].items()}
        return [by_offset[o] for o in self.slab_offsets(case) if o in by_offset]

    def load(self, case: CaseInput) -> LoadedCase:
        omni = self.config.omni if self.config is not None else None
        gap = float(omni.slice_spacing_mm) if omni else 5.0
        pixel = float(omni.pixel_spacing_mm) if omni else 0.75
        plane = str(case.meta.get("plane", "axial"))
        if plane not in PATIENT_FROM_SLAB:
            raise QuarantineError(UNREADABLE, f"unknown plane {plane!r}; expected one of {', '.join(PLANES)}")
        center, width = case.meta["window"]
        role_of = {o: r for r, o in case.meta["offsets"].items()}
        offs = self.slab_offsets(case)
        key = _read_jpeg(case.files["image"])
        shape = key.shape
        slices: dict[int, np.ndarray] = {0: key}
        unreadable, resized = [], []
        for o in offs:
            if o == 0 or o not in role_of:
                continue
            path = case.files[role_of[o]]
            try:
                s = _read_jpeg(path)
            except QuarantineError:  # a bad context slice is not fatal: recorded, filled like a missing one
                unreadable.append(o)
                continue
            if s.shape != shape:  # as the released loader does: bring it to the key slice's size
                from PIL import Image

                s = np.asarray(Image.fromarray(s).resize((shape[1], shape[0]), Image.BILINEAR), dtype=np.uint8)
                resized.append(o)
            slices[o] = s
        filled = {}
        for o in offs:
            if o not in slices:
                src = min(slices, key=lambda p: (abs(p - o), abs(p)))
                filled[o] = src
        stack = [slices[filled.get(o, o)] for o in offs]
        k_key = offs.index(0)
        # (rows, cols, slices) -> nibabel order (i = column, j = row, k = slice)
        image = window_to_hu(np.stack(stack, axis=-1), center, width).transpose(1, 0, 2)

        names = list(self.config.regions.names) if self.config is not None else []
        abnormalities = case.meta.get("abnormality", [])
        labels: np.ndarray | None = np.zeros(image.shape, dtype=np.uint8)
        regions_used, missing_masks, read_any = [], [], False
        for members in abnormality_groups(abnormalities):
            region = abnormality_region(abnormalities[members[0]], names)
            regions_used.append(region)
            for j in members:
                role = f"mask_{j}"
                if role not in case.files:
                    missing_masks.append(abnormalities[j].get("id", j))
                    continue
                try:
                    m = _read_jpeg(case.files[role])
                except QuarantineError:
                    missing_masks.append(abnormalities[j].get("id", j))
                    continue
                if m.shape != shape:
                    raise QuarantineError(MASK_GRID_MISMATCH,
                                          f"mask {Path(case.files[role]).name} is {m.shape}, key slice is {shape}")
                read_any = True
                if region:
                    labels[:, :, k_key][m.T >= 128] = region  # type: ignore[index]
        if abnormalities and not read_any:
            labels = None  # no mask at all: not the same as "no finding here"
        h, w = shape
        steps = {b - a for a, b in zip(offs, offs[1:])}
        # Equally spaced offsets keep their true distance (e.g. -2, 0, 2 -> 2 gaps); irregular
        # ones cannot be one affine and are stacked as if contiguous (recorded in info).
        z_step = gap * (steps.pop() if len(steps) == 1 else 1)
        # Slab frame = the axial radiological view: column -> patient left (R decreases), row ->
        # posterior (A decreases), offset -> superior; centred on the origin in plane.
        affine = np.array([
            [-pixel, 0.0, 0.0, (w - 1) / 2 * pixel],
            [0.0, -pixel, 0.0, (h - 1) / 2 * pixel],
            [0.0, 0.0, z_step, offs[0] * gap],
            [0.0, 0.0, 0.0, 1.0],
        ])
        listed = set(case.meta.get("context_listed") or []) - {0}
        info = {
            "plane": plane,
            "patient_from_slab": PATIENT_FROM_SLAB[plane].tolist(),
            "window": [center, width],
            "slab_offsets": offs,
            "irregular_offsets": len(steps) > 1,
            "key_slice_index": k_key,
            "missing_context": sorted(o for o in listed if o not in role_of),
            "unreadable_context": unreadable,
            "resized_context": resized,
            "filled_offsets": {str(o): s for o, s in filled.items()},
            "missing_masks": missing_masks,
            "abnormality_regions": regions_used,
            "region_names": names,
        }
        return LoadedCase(image=image, labels=labels, affine=affine, header_style="jpg", label_space="coarse",
                          info=info)

    def target_grid(self, case: CaseInput, config) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
        """Thin slab, every plane alike (slab frame): ``slab_depth`` slices at the nominal slice
        spacing; in plane, the spacing that fits the whole image (nominal pixel spacing x size)
        into ``shape_yx`` (rows -> y, columns -> x)."""
        o = config.omni
        size = case.meta.get("image_size_hw") or list(o.shape_yx)
        sy = float(o.pixel_spacing_mm) * size[0] / o.shape_yx[0]
        sx = float(o.pixel_spacing_mm) * size[1] / o.shape_yx[1]
        s = max(sy, sx)  # one in-plane spacing: square pixels stay square
        return (float(o.slice_spacing_mm), s, s), (int(o.slab_depth), int(o.shape_yx[0]), int(o.shape_yx[1]))
