"""NIfTI header reads for the inventory: a few hundred inflated bytes per file, never the voxels.

:func:`read_nifti_header` is the I/O (one file); :func:`volume_geometry`, :func:`spacing_problem` and
:func:`obliquity_deg` are pure readings of what a header says. Spacing / shape are (z, y, x) of the
file's voxel grid, z the voxel axis most aligned with patient superior-inferior.
"""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass
from typing import Any, Optional

# NIfTI-2 header (540) + the 4-byte extension flag: enough for either version.
HEADER_BYTES = 544
# Same plausibility range as the CT-RATE reader (ctprep.sources.ctrate.read_ctrate_volume).
SPACING_RANGE_MM = (0.05, 50.0)


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


def obliquity_deg(affine: Any) -> float:
    """Largest angle (degrees) between a voxel axis and its nearest patient axis (0 = axis-aligned)."""
    import numpy as np

    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.sqrt((a ** 2).sum(axis=0))
    if np.any(norms == 0):
        return 0.0
    cos = np.clip(np.abs(a / norms).max(axis=0), 0.0, 1.0)
    return round(float(np.degrees(np.arccos(cos.min()))), 3)
