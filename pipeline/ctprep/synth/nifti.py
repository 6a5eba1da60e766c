"""Byte-reproducible NIfTI writing, in CT-RATE's v1 and v2 header styles.

``nibabel.save`` gzips with the current time in the header; we gzip
``img.to_bytes()`` ourselves with mtime 0 (ISA-L when available: ~4x faster).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from ctprep.atomic import atomic_write_bytes

try:
    from isal import igzip as _gz
except ImportError:  # pragma: no cover - isal is a dependency, but keep a fallback
    _gz = None

RAW_INTERCEPT = -1024.0  # v1 stored value = HU - RAW_INTERCEPT (slope 1), CT-RATE's DICOM convention


def gzip_bytes(data: bytes) -> bytes:
    if _gz is not None:
        return _gz.compress(data, compresslevel=1, mtime=0)
    return gzip.compress(data, compresslevel=1, mtime=0)


def write_bytes(path: Path, data: bytes) -> None:
    """Write one generated file atomically (a killed generator never leaves half a volume)."""
    atomic_write_bytes(path, data)


def canonical_to_nifti(arr_zyx: np.ndarray, origin_zyx, spacing_zyx, style: str):
    """Canonical (Z, Y, X; S, A, R) array -> (nibabel data (i, j, k), RAS+ affine).

    ``style`` "ras": i -> R, j -> A, k -> S.  "lps": i -> L, j -> P, k -> S (DICOM order,
    as dcm2niix-less converters write it).
    """
    data = np.ascontiguousarray(arr_zyx.transpose(2, 1, 0))  # (X, Y, Z)
    dz, dy, dx = spacing_zyx
    z0, y0, x0 = origin_zyx
    nx, ny, _ = data.shape
    if style == "ras":
        aff = np.array([[dx, 0, 0, x0], [0, dy, 0, y0], [0, 0, dz, z0], [0, 0, 0, 1]], float)
    elif style == "lps":
        data = np.ascontiguousarray(data[::-1, ::-1, :])
        aff = np.array(
            [[-dx, 0, 0, x0 + (nx - 1) * dx], [0, -dy, 0, y0 + (ny - 1) * dy], [0, 0, dz, z0], [0, 0, 0, 1]], float
        )
    else:
        raise ValueError(f"unknown style {style!r}; choose ras or lps")
    return data, aff


def nifti_gz(data: np.ndarray, affine: np.ndarray | None) -> bytes:
    """Gzipped single-file NIfTI-1. ``affine=None`` writes a v1-style blank header
    (identity affine, zooms 1, no scl_slope)."""
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    hdr = img.header
    if affine is not None:
        hdr.set_xyzt_units("mm")
        img.set_sform(affine, code="scanner")
        img.set_qform(affine, code="scanner")
    return gzip_bytes(img.to_bytes())
