"""An OmniAbnorm-CT case as a thin slab (``OmniAbnormSource.load``): the key slice and its nearest
context slices in the slab frame, HU from the datum's window, the coarse-region mask of the key
slice, and the slab affine (rules and the frame: :mod:`ctprep.sources.omniabnorm`).

Arrays here are in nibabel order (i = column, j = row, k = slab slice) until the caller stores them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ctprep.quarantine import MASK_GRID_MISMATCH, UNREADABLE, QuarantineError
from ctprep.sources.base import CaseInput, LoadedCase
from ctprep.sources.omniabnorm_files import _read_jpeg
from ctprep.sources.omniabnorm_labels import abnormality_groups, abnormality_region, window_to_hu

PLANES = ("axial", "coronal", "sagittal")
# Slab frame (x', y', z') -> patient RAS+ (x, y, z), see the module docstring. Coronal: R = x',
# A = z' (offsets), S = y' (image up); sagittal: R = z' (offsets), A = x' (image left), S = y'.
PATIENT_FROM_SLAB = {
    "axial": np.eye(4),
    "coronal": np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]]),
    "sagittal": np.array([[0.0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]),
}


def slab_depth(config: Any) -> int:
    """Slices per slab: ``omni.slab_depth``, 4 without a config."""
    return config.omni.slab_depth if config is not None else 4


def choose_slab_offsets(meta: dict[str, Any], depth: int) -> list[int]:
    """Offsets in the slab: the key slice and the ``depth - 1`` listed offsets nearest to it, ascending.

    Listed offsets whose file is missing still take their place (so the slab keeps its
    spacing); :func:`load_slab` fills them from the nearest slice that exists.
    """
    listed = set(meta.get("context_listed") or meta["offsets"].values()) | {0}
    chosen = sorted(listed, key=lambda o: (abs(o), o))[:depth]
    return sorted(chosen)


def _read_slices(case: CaseInput, offs: list[int], role_of: dict[int, str]
                 ) -> tuple[dict[int, np.ndarray], list[int], list[int]]:
    """(offset -> 8-bit slice, unreadable offsets, resized offsets); the key slice must read."""
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
    return slices, unreadable, resized


def _slab_mask(case: CaseInput, image_shape: tuple[int, ...], key_shape: tuple[int, ...], k_key: int,
               names: list[str]) -> tuple[np.ndarray | None, list[int], list[Any]]:
    """(mask in nibabel order or None, region id per abnormality group, ids of unread masks).

    The key slice carries each group's coarse region id; context slices stay 0.
    """
    abnormalities = case.meta.get("abnormality", [])
    labels: np.ndarray | None = np.zeros(image_shape, dtype=np.uint8)
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
            if m.shape != key_shape:
                raise QuarantineError(MASK_GRID_MISMATCH,
                                      f"mask {Path(case.files[role]).name} is {m.shape}, key slice is {key_shape}")
            read_any = True
            if region:
                labels[:, :, k_key][m.T >= 128] = region  # type: ignore[index]
    if abnormalities and not read_any:
        labels = None  # no mask at all: not the same as "no finding here"
    return labels, regions_used, missing_masks


def slab_affine(offs: list[int], shape_hw: tuple[int, ...], gap: float, pixel: float) -> tuple[np.ndarray, bool]:
    """(slab-frame affine, offsets irregular?) of a slab of ``offs`` (mm: ``gap`` per offset step)."""
    h, w = shape_hw
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
    return affine, len(steps) > 1


def load_slab(case: CaseInput, config: Any) -> LoadedCase:
    """The case's slab (:func:`choose_slab_offsets`) as a LoadedCase; ``config`` may be None (defaults)."""
    omni = config.omni if config is not None else None
    gap = float(omni.slice_spacing_mm) if omni else 5.0
    pixel = float(omni.pixel_spacing_mm) if omni else 0.75
    plane = str(case.meta.get("plane", "axial"))
    if plane not in PATIENT_FROM_SLAB:
        raise QuarantineError(UNREADABLE, f"unknown plane {plane!r}; expected one of {', '.join(PLANES)}")
    center, width = case.meta["window"]
    role_of = {o: r for r, o in case.meta["offsets"].items()}
    offs = choose_slab_offsets(case.meta, slab_depth(config))
    slices, unreadable, resized = _read_slices(case, offs, role_of)
    shape = slices[0].shape
    filled = {}
    for o in offs:
        if o not in slices:
            src = min(slices, key=lambda p: (abs(p - o), abs(p)))
            filled[o] = src
    stack = [slices[filled.get(o, o)] for o in offs]
    k_key = offs.index(0)
    # (rows, cols, slices) -> nibabel order (i = column, j = row, k = slice)
    image = window_to_hu(np.stack(stack, axis=-1), center, width).transpose(1, 0, 2)

    names = list(config.regions.names) if config is not None else []
    labels, regions_used, missing_masks = _slab_mask(case, image.shape, shape, k_key, names)
    affine, irregular = slab_affine(offs, shape, gap, pixel)
    listed = set(case.meta.get("context_listed") or []) - {0}
    info = {
        "plane": plane,
        "patient_from_slab": PATIENT_FROM_SLAB[plane].tolist(),
        "window": [center, width],
        "slab_offsets": offs,
        "irregular_offsets": irregular,
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
