"""Read synthetic CT-RATE files back independently of the pipeline (test oracle)."""

from __future__ import annotations

import ast
import csv
from pathlib import Path

import nibabel as nib
import numpy as np

from ctprep.synth.anatomy import Grid


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as fh:
        r = csv.DictReader(fh)
        return list(r.fieldnames or []), list(r)


def is_v1(img: nib.Nifti1Image) -> bool:
    return np.allclose(img.affine, np.eye(4))


def load_canonical_hu(path: Path, meta: dict) -> tuple[np.ndarray, Grid, nib.Nifti1Image]:
    """HU as canonical (Z, Y, X; S, A, R) float32 plus its grid.

    v1 (identity affine): stored in DICOM order (i -> L, j -> P, k -> S); HU = raw * slope + intercept
    from the metadata row; geometry from ImagePositionPatient (LPS) and the CSV spacings.
    v2: HU as stored, geometry from the header.
    """
    img = nib.load(str(path))
    raw = np.asarray(img.dataobj).astype(np.float32)
    if is_v1(img):
        hu = raw * float(meta["RescaleSlope"]) + float(meta["RescaleIntercept"])
        dy, dx = ast.literal_eval(meta["XYSpacing"])
        dz = float(meta["ZSpacing"])
        ipp = ast.literal_eval(meta["ImagePositionPatient"])
        nx, ny, nz = hu.shape
        hu = hu[::-1, ::-1, :]  # -> i: R, j: A
        x0 = -ipp[0] - (nx - 1) * dx
        y0 = -ipp[1] - (ny - 1) * dy
        grid = Grid((nz, ny, nx), (dz, dy, dx), (ipp[2], y0, x0))
        return np.ascontiguousarray(hu.transpose(2, 1, 0)), grid, img
    can = nib.as_closest_canonical(img)
    hu = np.asarray(can.dataobj).astype(np.float32)
    aff = can.affine
    zooms = np.abs(np.diag(aff)[:3])
    grid = Grid(hu.shape[::-1], (zooms[2], zooms[1], zooms[0]), (aff[2, 3], aff[1, 3], aff[0, 3]))
    return np.ascontiguousarray(hu.transpose(2, 1, 0)), grid, img


def load_canonical_mask(path: Path, like: nib.Nifti1Image) -> np.ndarray:
    m = nib.load(str(path))
    data = np.asarray(m.dataobj)
    if is_v1(like):
        data = data[::-1, ::-1, :]
    else:
        data = np.asarray(nib.as_closest_canonical(m).dataobj)
    return np.ascontiguousarray(data.transpose(2, 1, 0))
