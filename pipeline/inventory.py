"""``ctprep inventory``: what a source folder holds, before any work is done.

The pipeline's counterpart of nnU-Net's dataset fingerprint: per ``--src`` root
it runs the source's own ``scan`` (so it sees exactly what ``build-shards``
would), reads only NIfTI *headers* (a few hundred inflated bytes per file), a
small sample of whole volumes for the HU distribution, and writes
``OUT/inventory.json`` + ``OUT/inventory.png``. It never writes under a source
folder and creates no zarr, shard or manifest.

Layers (as in the stages): :func:`read_nifti_header` (cheap I/O, one file),
the pure summaries (:func:`volume_geometry`, :func:`summarize_ctrate`,
:func:`summarize_omni`), :func:`build_inventory` (scan + thread pool),
:func:`render_table` / :func:`plot_inventory` (presentation), and the
Typer command :func:`inventory`.

Axis names: every spacing / shape here is given as (z, y, x) = (slice axis,
row axis, column axis) of the *file's* voxel grid, where the slice axis is
the voxel axis most aligned with patient superior-inferior (so a coronal
acquisition reports its true slice spacing as z).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import typer

if TYPE_CHECKING:  # the command stays cheap to import: numpy/nibabel/matplotlib load on use
    import numpy as np

    from ctprep.config import PipelineConfig
    from ctprep.quarantine import Quarantine
    from ctprep.sources.base import CaseInput

INVENTORY_VERSION = 1
INVENTORY_JSON = "inventory.json"
INVENTORY_PNG = "inventory.png"
# NIfTI-2 header (540) + the 4-byte extension flag: enough for either version.
HEADER_BYTES = 544
# Same plausibility range as the CT-RATE reader (ctprep.sources.ctrate.read_ctrate_volume).
SPACING_RANGE_MM = (0.05, 50.0)
# HU histogram: fixed bins so sources and runs compare; values outside go to under/overflow.
HU_RANGE = (-2048.0, 4096.0)
HU_BIN = 16.0
HU_VOXELS_PER_VOLUME = 1 << 18  # ~262k voxels per sampled volume (a 64^3 lattice)
EXAMPLES = 5  # examples kept per reason / rule in the JSON and the table


# --------------------------------------------------------------------- header reads (I/O)
@dataclass
class NiftiHeaderInfo:
    """What the header of one NIfTI file says, read without inflating the data.

    Attributes:
        shape_ijk: data shape in the file's voxel order (i, j, k[, t]).
        dtype: stored dtype name (e.g. "int16").
        style: "v2" (real geometry: qform/sform set and not identity) or "v1" (blank).
        affine: 4x4 nested list (voxel ijk -> RAS+ mm) from the header; meaningful for v2 only.
        data_bytes: vox_offset + voxel bytes, i.e. the uncompressed size the file must have.
        stored_bytes: uncompressed size the file claims (gzip ISIZE trailer, mod 2**32; file
            size for ``.nii``); None when unknown.
    """

    shape_ijk: list[int]
    dtype: str
    style: str
    affine: list[list[float]]
    data_bytes: int
    stored_bytes: Optional[int] = None
    gzip: bool = True

    def size_problem(self) -> Optional[str]:
        """One line if the stored size cannot hold the data (a truncated or damaged file), else None.

        The gzip trailer holds the inflated size mod 2**32; a truncated file's last 4 bytes are
        compressed data, so they disagree with the header's size except by chance (~2**-32).
        """
        if self.stored_bytes is None:
            return None
        if not self.gzip:  # plain .nii: trailing bytes are harmless, missing ones are not
            if self.stored_bytes < self.data_bytes:
                return f"file has {self.stored_bytes} bytes, the header needs {self.data_bytes} (truncated)"
            return None
        need = self.data_bytes % (1 << 32)
        if self.stored_bytes != need:
            return (f"gzip trailer says {self.stored_bytes} bytes, the header needs {self.data_bytes} "
                    "(truncated or damaged)")
        return None


def _head_bytes(path: str, n: int) -> tuple[bytes, Optional[int], bool]:
    """First ``n`` uncompressed bytes of a ``.nii``/``.nii.gz``, its claimed uncompressed size, gzipped?

    Streaming inflate of only as much input as needed (a few KB); the size comes from the gzip
    ISIZE trailer (one seek). zlib, not ISA-L: at a few KB per file the inflate is microseconds and
    the open/seek dominate.
    """
    with open(path, "rb") as f:
        magic = f.read(2)
        f.seek(0)
        if magic != b"\x1f\x8b":
            return f.read(n), os.fstat(f.fileno()).st_size, False
        d = zlib.decompressobj(wbits=31)  # 31: gzip wrapper
        out = b""
        pending = b""
        while len(out) < n and not d.eof:
            data = pending or f.read(16384)
            if not data:
                break
            out += d.decompress(data, n - len(out))
            pending = d.unconsumed_tail
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:  # smaller than an empty gzip member
            return out, None, True
        f.seek(-4, os.SEEK_END)
        return out, int.from_bytes(f.read(4), "little"), True


def read_nifti_header(path: str | os.PathLike[str]) -> NiftiHeaderInfo:
    """Header of one NIfTI-1/2 file (``.nii`` or ``.nii.gz``), cheaply.

    Raises QuarantineError(unreadable) with a one-line reason for a missing, non-NIfTI or damaged
    file (including a gzip trailer that contradicts the header's data size).
    """
    import nibabel as nib
    import numpy as np

    from ctprep.quarantine import UNREADABLE, QuarantineError
    from ctprep.sources.nifti import header_has_orientation

    name = os.path.basename(str(path))
    try:
        raw, stored, gzipped = _head_bytes(str(path), HEADER_BYTES)
    except (OSError, zlib.error) as e:
        raise QuarantineError(UNREADABLE, f"{name}: {type(e).__name__}: {e}") from e
    if len(raw) < 348:
        raise QuarantineError(UNREADABLE, f"{name}: {len(raw)} bytes is shorter than a NIfTI header")
    two = 540 in (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big"))
    header_cls = nib.Nifti2Header if two else nib.Nifti1Header
    try:
        hdr = header_cls.from_fileobj(io.BytesIO(raw[: header_cls.sizeof_hdr]))
        shape = [int(s) for s in hdr.get_data_shape()]
        dtype = hdr.get_data_dtype()
        style = "v2" if header_has_orientation(hdr) else "v1"
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - nibabel raises several kinds for a bad header
        raise QuarantineError(UNREADABLE, f"{name}: bad NIfTI header: {type(e).__name__}: {e}") from e
    count = int(np.prod(shape)) if shape else 0
    if count == 0:
        raise QuarantineError(UNREADABLE, f"{name}: header declares no voxels (shape {shape})")
    info = NiftiHeaderInfo(shape_ijk=shape, dtype=str(dtype), style=style, affine=affine.tolist(),
                           data_bytes=int(hdr["vox_offset"]) + count * dtype.itemsize, stored_bytes=stored,
                           gzip=gzipped)
    problem = info.size_problem()
    if problem:
        raise QuarantineError(UNREADABLE, f"{name}: {problem}")
    return info


# --------------------------------------------------------------------- pure summaries
def volume_geometry(affine: Any, shape_ijk: list[int]) -> tuple[list[float], list[int]]:
    """(spacing_zyx mm, shape_zyx) of a voxel grid from its affine.

    z is the voxel axis most aligned with patient S/I, y the remaining one most aligned with A/P,
    x the last; spacing is the length of each affine column (works for oblique grids).
    """
    import numpy as np

    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.sqrt((a ** 2).sum(axis=0))
    unit = a / np.where(norms > 0, norms, 1.0)
    zero = np.flatnonzero(norms == 0)
    if len(zero) == 1:  # a 0 mm spacing (bad metadata): its direction is the normal of the other two
        i, j = [k for k in range(3) if k != zero[0]]
        unit[:, zero[0]] = np.cross(unit[:, i], unit[:, j])
    unit = np.abs(unit)
    z = int(np.argmax(unit[2]))
    rest = [i for i in range(3) if i != z]
    y = rest[int(np.argmax([unit[1, i] for i in rest]))]
    x = [i for i in rest if i != y][0]
    shape = list(shape_ijk[:3]) + [1] * (3 - len(shape_ijk[:3]))
    return [round(float(norms[i]), 4) for i in (z, y, x)], [int(shape[i]) for i in (z, y, x)]


def spacing_problem(spacing_zyx: list[float]) -> Optional[str]:
    """One line if a spacing is not a CT spacing (same range as the CT-RATE reader), else None."""
    import math

    lo, hi = SPACING_RANGE_MM
    if any(not math.isfinite(s) or s < lo or s > hi for s in spacing_zyx):
        return f"spacing {[round(s, 4) for s in spacing_zyx]} mm outside [{lo}, {hi}]"
    return None


def histogram(values: list[float], max_bins: int = 40) -> dict[str, list]:
    """{"edges", "counts"} of ``values`` with data-driven bins (numpy 'auto', at most ``max_bins``)."""
    import numpy as np

    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"edges": [], "counts": []}
    if v.min() == v.max():
        edges = np.array([v.min() - 0.5, v.max() + 0.5])
    else:
        edges = np.histogram_bin_edges(v, bins="auto")
        if len(edges) - 1 > max_bins:
            edges = np.linspace(v.min(), v.max(), max_bins + 1)
    counts, edges = np.histogram(v, bins=edges)
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}


def quantiles(values: list[float]) -> dict[str, float]:
    """min / p5 / median / p95 / max (empty dict for no values)."""
    import numpy as np

    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {}
    q = np.percentile(v, [0, 5, 50, 95, 100])
    return {k: round(float(x), 4) for k, x in zip(("min", "p5", "median", "p95", "max"), q)}


def _with_without(flags: Iterable[bool]) -> dict[str, int]:
    flags = list(flags)
    return {"with": sum(flags), "without": len(flags) - sum(flags)}


def _rel(path: Any, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root))
    except (ValueError, OSError):
        return str(path)


def summarize_quarantine(quarantined: list[Quarantine]) -> dict[str, Any]:
    """Scan-time quarantines by kind, with a few example cases and reasons each."""
    by_kind: dict[str, list[dict[str, str]]] = {}
    for q in quarantined:
        by_kind.setdefault(q.kind, []).append({"case": q.case, "reason": q.reason})
    return {"total": len(quarantined),
            "by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
            "examples": {k: v[:EXAMPLES] for k, v in sorted(by_kind.items())}}


# --------------------------------------------------------------------- CT-RATE
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


def obliquity_deg(affine: Any) -> float:
    """Largest angle (degrees) between a voxel axis and its nearest patient axis (0 = axis-aligned)."""
    import numpy as np

    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.sqrt((a ** 2).sum(axis=0))
    if np.any(norms == 0):
        return 0.0
    cos = np.clip(np.abs(a / norms).max(axis=0), 0.0, 1.0)
    return round(float(np.degrees(np.arccos(cos.min()))), 3)


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


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (deterministic: same inputs, same sample)."""
    if n <= 0 or k <= 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n // 2]


def subsample_voxels(image: np.ndarray, target: int = HU_VOXELS_PER_VOLUME) -> np.ndarray:
    """A regular lattice of about ``target`` voxels (same stride on every axis), flattened float32."""
    import numpy as np

    step = max(1, int(round((image.size / max(1, target)) ** (1.0 / image.ndim))))
    return np.asarray(image[(slice(None, None, step),) * image.ndim], dtype=np.float32).ravel()


class HuAccumulator:
    """Fixed-bin HU histogram over sampled volumes, plus per-volume percentiles."""

    def __init__(self) -> None:
        import numpy as np

        self.edges = np.arange(HU_RANGE[0], HU_RANGE[1] + HU_BIN, HU_BIN)
        self.counts = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.under = self.over = self.nonfinite = 0
        self.per_volume: list[dict[str, Any]] = []
        self.failed: list[dict[str, str]] = []

    def add(self, case_id: str, hu: np.ndarray, info: Optional[dict[str, Any]] = None) -> None:
        import numpy as np

        v = subsample_voxels(hu)
        fin = np.isfinite(v)
        self.nonfinite += int(v.size - fin.sum())
        v = v[fin]
        self.under += int((v < self.edges[0]).sum())
        self.over += int((v >= self.edges[-1]).sum())
        self.counts += np.histogram(v, bins=self.edges)[0]
        rec: dict[str, Any] = {"case": case_id, "voxels": int(v.size)}
        if v.size:
            p = np.percentile(v, [0, 1, 50, 99, 100])
            rec.update({k: round(float(x), 1) for k, x in zip(("min", "p1", "median", "p99", "max"), p)})
        for k in ("rescale_source", "slope", "intercept"):
            if info and k in info:
                rec[k] = info[k]
        self.per_volume.append(rec)

    def fail(self, case_id: str, kind: str, reason: str) -> None:
        self.failed.append({"case": case_id, "kind": kind, "reason": reason})

    def to_json(self) -> dict[str, Any]:
        import numpy as np

        total = int(self.counts.sum())
        pct: dict[str, float] = {}
        if total:  # percentiles from the histogram (bin centres): exact enough at 16 HU bins
            cdf = np.cumsum(self.counts) / total
            centres = (self.edges[:-1] + self.edges[1:]) / 2
            for name, q in (("p1", 0.01), ("p5", 0.05), ("median", 0.5), ("p95", 0.95), ("p99", 0.99)):
                pct[name] = float(centres[min(int(np.searchsorted(cdf, q)), len(centres) - 1)])
        return {"volumes": len(self.per_volume), "voxels": total, "bin_hu": HU_BIN,
                "edges": [float(self.edges[0]), float(self.edges[-1])], "counts": self.counts.tolist(),
                "underflow": self.under, "overflow": self.over, "nonfinite": self.nonfinite,
                "percentiles": pct, "per_volume": self.per_volume, "failed": self.failed}


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


# --------------------------------------------------------------------- OmniAbnorm-CT
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


def sample_loaded_hu(source: Any, cases: list[CaseInput], n: int) -> dict[str, Any]:
    """HU (for JPEG sources: the window inverted) of ``n`` evenly spread cases via ``source.load``."""
    from ctprep.quarantine import QuarantineError

    acc = HuAccumulator()
    for i in sample_indices(len(cases), n):
        c = cases[i]
        try:
            loaded = source.load(c)
        except QuarantineError as e:
            acc.fail(c.case_id, e.kind, e.reason)
            continue
        except Exception as e:  # noqa: BLE001 - the inventory reports, it never stops
            acc.fail(c.case_id, "error", f"{type(e).__name__}: {e}")
            continue
        acc.add(c.case_id, loaded.image, loaded.info)
    return acc.to_json()


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


# --------------------------------------------------------------------- text table
def _fmt_counts(d: dict[str, int], limit: int = 8) -> str:
    if not d:
        return "-"
    items = list(d.items())
    text = ", ".join(f"{k} {v}" for k, v in items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _fmt_quant(q: dict[str, float], unit: str = "") -> str:
    if not q:
        return "-"
    return f"min {q['min']:.4g}  p5 {q['p5']:.4g}  median {q['median']:.4g}  p95 {q['p95']:.4g}  max {q['max']:.4g}{unit}"


def _fmt_hist(h: dict[str, list], bins: int = 6) -> str:
    """A coarse text histogram: the stored bins merged into at most ``bins`` groups."""
    edges, counts = h.get("edges") or [], h.get("counts") or []
    if not counts:
        return ""
    per = -(-len(counts) // bins)
    parts = []
    for i in range(0, len(counts), per):
        n = sum(counts[i:i + per])
        if n:
            parts.append(f"{edges[i]:.4g}-{edges[min(i + per, len(counts))]:.4g}: {n}")
    return " | ".join(parts)


class _Table:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def head(self, text: str) -> None:
        self.lines.append(text)

    def row(self, label: str, value: Any, indent: int = 2) -> None:
        self.lines.append(f"{' ' * indent}{label:<28} {value}")

    def text(self, s: str, indent: int = 4) -> None:
        if s:
            self.lines.append(" " * indent + s)

    def cont(self, s: str) -> None:
        """A continuation line under the value column of the row above."""
        self.text(s, indent=31)


def _render_problems(t: _Table, title: str, items: list[dict[str, str]], limit: int) -> None:
    if not items:
        return
    t.row(title, len(items))
    for it in items[:limit]:
        t.text(f"{it.get('file') or it.get('case')}: {it['reason']}")
    if len(items) > limit:
        t.text(f"... {len(items) - limit} more in inventory.json")


def _render_quarantine(t: _Table, q: dict[str, Any]) -> None:
    t.row("quarantined at scan", q["total"] or "none")
    for kind, n in q["by_kind"].items():
        ex = q["examples"][kind][0]
        t.text(f"{kind:<20} {n:>6}   e.g. {ex['case']}: {ex['reason']}")


def _render_ctrate(t: _Table, e: dict[str, Any], limit: int) -> None:
    c = e["ctrate"]
    lay = c["layout"]
    t.row("image folders", " " * 6 + "kind      volumes" + ("   (derived from the scan)" if lay.get("derived") else ""))
    for f in lay.get("image_folders", []):
        t.text(f"{f['folder']:<32} {f['kind']:<9} {f['volumes']:>7}")
    trees = lay.get("mask_trees", [])
    t.row("mask trees", " " * 8 + "files    anatomy" if trees else "none")
    for m in trees:
        t.text(f"{m['name']:<32} {m['masks']:>9}    {'yes' if m.get('anatomy') else '-'}")
    if lay.get("tables"):
        t.row("side tables", " " * 25 + "kind         rows")
        for tb in lay["tables"]:
            t.text(f"{tb['file']:<52} {tb['kind']:<9} {tb['rows']:>7}")
    t.row("cases", f"{e['scanned']} found, {e['cases']} kept, {e['quarantined_at_scan']} quarantined at scan")
    anatomy = lay.get("anatomy_tree")
    t.row("kept cases with / without", "")
    for key, label in (("mask", f"mask ({anatomy or 'anatomy tree'})"), ("report", "report row"),
                       ("metadata", "metadata row"), ("labels", "labels row"), ("cot", "CoT record")):
        cov = c["coverage"][key]
        note = ""
        if key == "mask" and cov["without"] and c.get("missing_mask_policy") == "quarantine":
            note = "   (build-shards quarantines these: ctrate.missing_mask is quarantine)"
        t.text(f"{label:<32} {cov['with']:>9} / {cov['without']}{note}")
    d = c["duplicates"]
    dup = f"{d['cases']} cases"
    if d["cases"]:
        dup += f"; rule: {_fmt_counts(d['by_rule'])}; chosen: {_fmt_counts(d['chosen_kind'])}"
    t.row("duplicates (>1 copy)", dup)
    for ex in d["examples"][:limit]:
        t.text(f"{ex['case']}: took {ex['chosen']} ({ex['rule']}) over {', '.join(map(str, ex['others']))}")
    _render_quarantine(t, c["quarantine"])
    v = c["volumes"]
    t.row("headers read", f"{v['read']}: {_fmt_counts(v['header_style'])}, unreadable {len(v['unreadable'])}")
    by_kind = c["style_by_folder_kind"]
    t.row("header style by folder kind", "; ".join(f"{k}: {_fmt_counts(s)}" for k, s in by_kind.items()) or "-")
    t.row("spacing from", _fmt_counts(v["spacing_from"]))
    _render_problems(t, "unreadable files", v["unreadable"], limit)
    _render_problems(t, "implausible/missing spacing", v["spacing_problems"], limit)
    _render_problems(t, "mask header problems", v["mask_problems"], limit)
    t.row("z spacing (mm)", _fmt_quant(v["z_spacing_mm"]["quantiles"]))
    t.cont(_fmt_hist(v["z_spacing_mm"]["histogram"]))
    t.row("in-plane spacing (mm)", _fmt_quant(v["inplane_spacing_mm"]["quantiles"])
          + (f"  ({v['anisotropic_inplane']} anisotropic)" if v["anisotropic_inplane"] else ""))
    t.cont(_fmt_hist(v["inplane_spacing_mm"]["histogram"]))
    t.row("slices", _fmt_quant(v["slices"]["quantiles"]))
    t.cont(_fmt_hist(v["slices"]["histogram"]))
    t.row("matrix (rows x cols)", _fmt_counts(v["matrix_yx"]))
    ob = v["oblique_deg"]
    if ob["over_limit"]:
        t.row(f"oblique > {ob['limit']:g} degree", f"{ob['over_limit']} volumes (max {ob['quantiles']['max']:g} deg; "
              "ctrate.max_oblique_deg: build-shards quarantines them)")


def _render_omni(t: _Table, e: dict[str, Any], limit: int) -> None:
    o = e["omniabnorm"]
    if o["batches"]:
        t.row("batches", ", ".join(o["batches"][:limit]) + (" ..." if len(o["batches"]) > limit else ""))
    t.row("cases", f"{e['scanned']} found, {e['cases']} kept, {e['quarantined_at_scan']} quarantined at scan")
    t.row("by plane", _fmt_counts(o["by_plane"]) + (f"   (plane from: {_fmt_counts(o['plane_from'])})"
                                                       if set(o["plane_from"]) - {"?"} else ""))
    t.row("by split", _fmt_counts(o["by_split"]))
    t.row("by JSON file", _fmt_counts(o["by_json"]))
    t.row("normal / abnormal", f"{o['normal']} / {o['abnormal']}")
    t.row("masks per case", ", ".join(f"{k} masks: {v}" for k, v in o["masks_per_case"].items()) or "-")
    t.row("context slices per case", _fmt_quant(o["context_slices"]["quantiles"]))
    t.row("missing context / mask files", " / ".join(
        f"{o['files_missing'].get(k, 0)} files in {o['cases_missing'].get(k, 0)} cases" for k in ("context", "mask")))
    for ex in o["missing_examples"][:limit]:
        t.text(f"{ex['case']}: {_fmt_counts(ex['missing'])}")
    if o["listed_in_several_json"]:
        t.row("in several JSON files", f"{o['listed_in_several_json']} cases (plane file preferred; see the source)")
    t.row("listed files absent", f"{o['absent_files']['cases']} cases; by role: {_fmt_counts(o['absent_files']['by_role'])}")
    for ex in o["absent_files"]["examples"][:limit]:
        t.text(f"{ex['case']}: {', '.join(ex['roles'])}")
    t.row("image size (h x w)", _fmt_counts(o["image_size_hw"]))
    if o["unreadable_images"]:
        t.row("unreadable key slices", f"{len(o['unreadable_images'])}: {', '.join(o['unreadable_images'][:limit])}")
    _render_quarantine(t, o["quarantine"])


def _render_hu(t: _Table, hu: dict[str, Any], limit: int) -> None:
    if not hu or not (hu.get("volumes") or hu.get("failed")):
        return
    p = hu.get("percentiles") or {}
    what = "HU sample" + (" (approx.)" if hu.get("approximate") else "")
    t.row(what, f"{hu['volumes']} volumes, {hu['voxels']} voxels: "
          + ("  ".join(f"{k} {v:g}" for k, v in p.items()) or "-")
          + (f"; {hu['underflow']} below {hu['edges'][0]:g}, {hu['overflow']} above {hu['edges'][1]:g}"
             if hu.get("underflow") or hu.get("overflow") else "")
          + (f"; {hu['nonfinite']} non-finite" if hu.get("nonfinite") else ""))
    for f in hu.get("failed", [])[:limit]:
        t.text(f"not read: {f['case']}: {f['kind']}: {f['reason']}")


def render_table(report: dict[str, Any], limit: int = 5) -> str:
    """The inventory as the plain-text table ``ctprep inventory`` prints."""
    t = _Table()
    for e in report["sources"]:
        t.head(f"== {e['root']} ({e['source']}; config {report['config']})")
        if "ctrate" in e:
            _render_ctrate(t, e, limit)
        elif "omniabnorm" in e:
            _render_omni(t, e, limit)
        else:
            t.row("cases", f"{e['scanned']} found, {e['cases']} kept, {e['quarantined_at_scan']} quarantined at scan")
            t.row("by split", _fmt_counts(e["generic"]["by_split"]))
            _render_quarantine(t, e["generic"]["quarantine"])
        _render_hu(t, e.get("hu", {}), limit)
        t.head("")
    return "\n".join(t.lines)


# --------------------------------------------------------------------- picture
def _bar_hist(ax: Any, h: dict[str, list], color: str, label: str) -> None:
    edges, counts = h.get("edges") or [], h.get("counts") or []
    if counts:
        widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
        ax.bar(edges[:-1], counts, width=widths, align="edge", color=color, alpha=0.6, label=label,
               edgecolor="black", linewidth=0.3)


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_inventory(report: dict[str, Any], path: Path) -> None:
    """One row of panels per source root: spacing, slice count, matrix size, HU (log y). Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = max(1, len(report["sources"]))
    fig, axes = plt.subplots(rows, 4, figsize=(18, 3.6 * rows), squeeze=False)
    for r, e in enumerate(report["sources"]):
        ax_sp, ax_sl, ax_mx, ax_hu = axes[r]
        name = f"{Path(e['root']).name} ({e['source']}, {e['cases']} cases)"
        if "ctrate" in e:
            v = e["ctrate"]["volumes"]
            _bar_hist(ax_sp, v["z_spacing_mm"]["histogram"], "tab:blue", "z (slice)")
            _bar_hist(ax_sp, v["inplane_spacing_mm"]["histogram"], "tab:orange", "in-plane")
            ax_sp.set_xlabel("spacing (mm)")
            if v["z_spacing_mm"]["histogram"]["counts"]:
                ax_sp.legend(fontsize=8)
            else:
                _empty(ax_sp, "no readable spacing")
            _bar_hist(ax_sl, v["slices"]["histogram"], "tab:green", "slices")
            ax_sl.set_xlabel("slices per volume")
            sizes = v["matrix_yx"]
        elif "omniabnorm" in e:
            o = e["omniabnorm"]
            _empty(ax_sp, "no spacing: 8-bit JPEG slices")
            _bar_hist(ax_sl, o["context_slices"]["histogram"], "tab:green", "context")
            ax_sl.set_xlabel("context slices per case")
            sizes = o["image_size_hw"]
        else:
            _empty(ax_sp, "no spacing summary for this source")
            _empty(ax_sl, "")
            sizes = {}
        ax_sp.set_title(f"{name}: spacing", fontsize=10)
        ax_sl.set_title("context slices" if "omniabnorm" in e else "slice count", fontsize=10)
        if sizes:
            top = list(sizes.items())[:12]
            ax_mx.bar(range(len(top)), [n for _, n in top], color="tab:purple")
            ax_mx.set_xticks(range(len(top)))
            ax_mx.set_xticklabels([k for k, _ in top], rotation=45, ha="right", fontsize=8)
        else:
            _empty(ax_mx, "no sizes")
        ax_mx.set_title("image size (h x w)" if "omniabnorm" in e else "matrix size (rows x cols)", fontsize=10)
        hu = e.get("hu") or {}
        if hu.get("voxels"):
            lo, hi = hu["edges"]
            edges = np.arange(lo, hi + hu["bin_hu"], hu["bin_hu"])
            counts = np.asarray(hu["counts"], dtype=float)
            nz = np.nonzero(counts)[0]
            ax_hu.stairs(counts, edges, fill=True, color="tab:red", alpha=0.7)
            ax_hu.set_yscale("log")
            ax_hu.set_xlim(edges[max(0, nz[0] - 2)], edges[min(len(edges) - 1, nz[-1] + 3)])
            ax_hu.set_xlabel("HU" + (" (approx., from JPEG window)" if hu.get("approximate") else ""))
            ax_hu.set_title(f"HU, {hu['volumes']} sampled volumes (log y)", fontsize=10)
        else:
            _empty(ax_hu, "no HU sample")
            ax_hu.set_title("HU", fontsize=10)
        for ax in (ax_sp, ax_sl, ax_mx):
            ax.set_ylabel("count", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def write_inventory(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``OUT/inventory.json`` and ``OUT/inventory.png`` (each via a temporary name)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js = out / INVENTORY_JSON
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    tmp.replace(js)
    png = out / INVENTORY_PNG
    plot_inventory(report, png)
    return js, png


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
