"""Stage ``regions``: per-patch soft assignment of the model's patch grid to coarse regions.

The vision encoder patchifies the (Z, Y, X) volume with a Conv3d of kernel =
stride = ``patch_size_zyx``; its flattened token order is z-major raster
(pz, py, px). For each of those patches we store the fraction of its voxels
that carry each coarse region id of the resampled mask (column 0 =
background), so ``RegionAwareAttention`` can weight patch -> region attention
without ever touching the mask again.

Pure function: :func:`patch_region_fraction` (array in, array out). The stage
wrapper (reader: the case's zarr ``mask``; writer: ``work/regions/<case>.npy``)
is registered with the runner at the bottom of this module.
"""

from __future__ import annotations

import os

import numpy as np

from ctprep.stages.base import CaseTask, atomic_path, case_stage

# float16 keeps the shard small (a 64x512x512 grid has 16,384 patches); its
# spacing near 1 is 2**-11, so each stored fraction is within 4.9e-4 of the
# float32 value and a row of R + 1 fractions sums to 1 within (R + 1) * 4.9e-4.
FLOAT16_ROW_SUM_TOL = 4.9e-4


def patch_grid(shape_zyx: tuple[int, int, int], patch_size_zyx: tuple[int, int, int]) -> tuple[int, int, int]:
    """Number of patches along (z, y, x); the shape must be a whole number of patches."""
    if len(shape_zyx) != 3 or len(patch_size_zyx) != 3:
        raise ValueError(f"expected 3D (z, y, x) shape and patch size, got {shape_zyx} and {patch_size_zyx}")
    if any(p <= 0 for p in patch_size_zyx):
        raise ValueError(f"patch size must be positive, got {patch_size_zyx}")
    bad = [(s, p) for s, p in zip(shape_zyx, patch_size_zyx) if s % p]
    if bad:
        raise ValueError(
            f"volume shape {tuple(shape_zyx)} (z, y, x) is not a multiple of patch size "
            f"{tuple(patch_size_zyx)}: the resample shape and the model patch size must agree"
        )
    return tuple(int(s // p) for s, p in zip(shape_zyx, patch_size_zyx))  # type: ignore[return-value]


def patch_region_fraction(
    mask_zyx: np.ndarray, num_regions: int, patch_size_zyx: tuple[int, int, int]
) -> np.ndarray:
    """Fraction of each patch's voxels in each region.

    Args:
        mask_zyx: uint8 (Z, Y, X) coarse region ids, 0 = background, k = region k (1..R).
        num_regions: R, the number of coarse regions (ids above R are an error).
        patch_size_zyx: (pz, py, px) voxels per patch; each of Z, Y, X must be divisible by it.

    Returns:
        float16 (P, R + 1), P = (Z/pz)(Y/py)(X/px) in z-major raster order of the
        patch grid (the Conv3d ``flatten(2)`` order); column 0 = background. Rows
        sum to 1 exactly in float32 before the cast (see ``FLOAT16_ROW_SUM_TOL``).
    """
    mask = np.asarray(mask_zyx)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D (z, y, x), got shape {mask.shape}")
    if mask.dtype.kind not in "ui":
        raise ValueError(f"mask must hold integer region ids, got dtype {mask.dtype}")
    gz, gy, gx = patch_grid(mask.shape, tuple(patch_size_zyx))
    pz, py, px = (int(p) for p in patch_size_zyx)
    nbins = num_regions + 1
    if mask.size and (int(mask.max()) > num_regions or int(mask.min()) < 0):
        raise ValueError(f"mask ids span [{int(mask.min())}, {int(mask.max())}], expected 0..{num_regions}")

    # One bincount per patch layer (pz slices) keeps the index array small on
    # 240x480x480 volumes: codes = patch_in_layer * (R + 1) + region id.
    layer_patch = np.arange(gy * gx, dtype=np.int64).reshape(gy, 1, gx, 1) * nbins
    layer_patch = np.broadcast_to(layer_patch, (gy, py, gx, px)).reshape(py * gy, px * gx)
    counts = np.empty((gz, gy * gx, nbins), dtype=np.int64)
    for z in range(gz):
        slab = mask[z * pz : (z + 1) * pz].astype(np.int64, copy=False)
        codes = layer_patch[None] + slab
        counts[z] = np.bincount(codes.ravel(), minlength=gy * gx * nbins).reshape(gy * gx, nbins)
    fractions = counts.reshape(gz * gy * gx, nbins).astype(np.float32) / np.float32(pz * py * px)
    return fractions.astype(np.float16)


# --------------------------------------------------------------------------- stage wrapper


def read_regions(path: str | os.PathLike[str]) -> np.ndarray:
    """Reader of :func:`run_regions`'s output: float16 (P, R + 1) patch-to-region fractions."""
    return np.load(path, allow_pickle=False)


def regions_config_slice(config) -> dict:
    """Only the patch grid and the region list decide this stage's output."""
    return {"patch_size_zyx": [int(p) for p in config.regions.patch_size_zyx], "regions": list(config.regions.names)}


@case_stage("regions", upstream=("resample",), version="1", config_slice=regions_config_slice,
            output=lambda case_id: f"regions/{case_id}.npy")
def run_regions(task: CaseTask) -> dict:
    """Reader: ``mask`` of the case's zarr group; writer: ``regions/<case>.npy`` (float16 (P, R+1))."""
    import zarr

    mask = np.asarray(zarr.open_group(task.upstream["resample"].path, mode="r")["mask"][...])
    fractions = patch_region_fraction(mask, len(task.config.regions.names),
                                      tuple(int(p) for p in task.config.regions.patch_size_zyx))
    with atomic_path(task.output_path) as tmp:
        np.save(tmp, fractions, allow_pickle=False)
    return {"patches": int(fractions.shape[0]), "grid": list(patch_grid(mask.shape, task.config.regions.patch_size_zyx))}
