"""Grid presets of the generator: how big and how finely sampled the synthetic volumes are."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GridPreset:
    inplane: tuple[int, int]  # in-plane matrix (Y = X) range, voxels
    fov_mm: tuple[float, float]  # reconstruction field of view range, mm
    dz: tuple[float, float]  # slice spacing range, mm
    coverage_mm: tuple[float, float]  # scan length (z) range, mm
    omni_size: int  # OmniAbnorm 2D image size, pixels


GRIDS = {
    # CPU demo: ~45-70 slices x 128-192 px, 2.2-3.2 mm in-plane, 4.5-6 mm slices.
    "demo": GridPreset((128, 192), (390.0, 430.0), (4.5, 6.0), (285.0, 330.0), 160),
    "small": GridPreset((256, 256), (360.0, 440.0), (2.5, 3.0), (285.0, 330.0), 256),
    # Real-size (benchmarks): ~200-330 slices x 512 x 512, 0.7-0.86 mm in-plane, 1-1.5 mm slices.
    "full": GridPreset((512, 512), (360.0, 440.0), (1.0, 1.5), (285.0, 330.0), 512),
}


def get_grid(name: str) -> GridPreset:
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose one of: {', '.join(GRIDS)}")
    return GRIDS[name]


def sample_recon_geometry(preset: GridPreset, rng: np.random.Generator, coverage: float, fov: float, recon: int):
    """(shape (Z, Y, X), spacing (dz, dy, dx)) for reconstruction ``recon`` (0-based) of one scan.

    Later reconstructions of a scan use thicker slices and a coarser matrix, like a
    thin lung-kernel series next to a thicker soft-tissue series.
    """
    lo, hi = preset.inplane
    n = int(rng.integers(lo // 16, hi // 16 + 1)) * 16 if hi > lo else lo
    if recon > 0 and hi > lo:
        n = max(lo, n - 16 * recon)
    dxy = round(fov / n, 3)
    dz = float(rng.uniform(*preset.dz)) * (1.0 + 0.2 * recon)
    dz = round(min(dz, preset.dz[1] * 1.5), 2)
    nz = int(round(coverage / dz))
    return (nz, n, n), (dz, dxy, dxy)
