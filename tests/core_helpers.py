"""Small NIfTI builders for the core tests (no project code in the writers, so they are independent)."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np


def smooth_volume(shape: tuple[int, int, int], seed: int = 0, amplitude: float = 800.0) -> np.ndarray:
    """A smooth random int16 HU volume (so linear interpolation differences stay small)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2.0)
    x = x / (np.abs(x).max() + 1e-6) * amplitude
    return np.rint(x).astype(np.int16)


def oblique_free_affine(axes: str, spacing: tuple[float, float, float], origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    """Affine whose voxel axes i, j, k point along ``axes`` (e.g. "PLS": i->P, j->L, k->S)."""
    unit = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
    aff = np.eye(4)
    for c, (code, s) in enumerate(zip(axes, spacing)):
        aff[:3, c] = np.asarray(unit[code], float) * s
    aff[:3, 3] = origin
    return aff


def write_v2(path: Path, data: np.ndarray, affine: np.ndarray, slope: float | None = None,
             inter: float | None = None) -> Path:
    """A v2-style file: real qform/sform (optionally with header scl_slope/scl_inter)."""
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code="scanner")
    img.set_qform(affine, code="scanner")
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
    return path


def write_v1(path: Path, raw: np.ndarray) -> Path:
    """A v1-style file: blank header (identity affine, 1 mm voxels), raw values."""
    img = nib.Nifti1Image(raw, np.eye(4))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
    return path


def sitk_resample(path: Path, out_affine_zyx: np.ndarray, shape_zyx, linear: bool, default: float) -> np.ndarray:
    """SimpleITK resampling of ``path`` onto the (z, y, x) grid described by ``out_affine_zyx`` (RAS)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path), sitk.sitkFloat32 if linear else sitk.sitkInt16)
    lps = np.diag([-1.0, -1.0, 1.0])
    m = lps @ out_affine_zyx[:3, :3]
    cols = [m[:, 2], m[:, 1], m[:, 0]]  # ITK index order x, y, z = our (x, y, z)
    spacing = [float(np.linalg.norm(c)) for c in cols]
    direction = np.stack([c / s for c, s in zip(cols, spacing)], axis=1)
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing(spacing)
    f.SetOutputOrigin((lps @ out_affine_zyx[:3, 3]).tolist())
    f.SetOutputDirection(direction.flatten().tolist())
    f.SetSize([int(shape_zyx[2]), int(shape_zyx[1]), int(shape_zyx[0])])
    f.SetInterpolator(sitk.sitkLinear if linear else sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(default)
    return sitk.GetArrayFromImage(f.Execute(image))  # (z, y, x)
