"""Resample stage: raw volume + label map -> canonical grid -> zarr v3 (int16 HU, uint8 regions).

Pure part: :func:`resample_case` (arrays + affine in, arrays + affine out).
I/O part: :func:`run_resample` reads through the case's source, calls it and
writes ``work/zarr/<case>.zarr`` with :func:`write_case_zarr`.

Orientation and grid convention
-------------------------------
1. **Canonical orientation**: nibabel's closest canonical (RAS+) voxel
   order, transposed to (z, y, x), so increasing z, y, x point Superior,
   Anterior, Right (``ctprep.schema.CANONICAL_ORIENTATION``). This is a
   flip/transpose only (no interpolation); an oblique scan keeps its
   obliquity in the stored affine.
2. **Output grid (edge-aligned)**, per canonical axis with input size ``n``,
   input spacing ``s_in`` and target spacing ``s_out``: the uncropped grid has
   ``floor(n * s_in / s_out)`` voxels and its voxel ``t`` has its centre at the
   input continuous index ``(t + 0.5) * s_out / s_in - 0.5``; i.e. the outer
   boundary of input voxel 0 and of output voxel 0 coincide (this is
   PyTorch's ``interpolate(..., align_corners=False)`` with a given
   ``scale_factor``). Then the grid is centre-cropped / padded by whole voxels to
   ``shape_zyx`` (crop start ``(full - shape) // 2``; padding with ``pad_hu``
   air and label 0). The image is interpolated linearly (trilinear as
   bilinear in-plane x linear in z), the label map by nearest neighbour at
   ``floor(index + 0.5)`` on *the same* output grid, so image and mask stay
   aligned. SimpleITK's ``ResampleImageFilter`` with origin shifted by
   ``(s_out - s_in) / 2`` along each axis produces the same grid (tested).
3. **Intensities**: interpolate in float32, clip to ``hu_clip``, round to int16.
   Labels are remapped to coarse region ids (``RegionsConfig``: region k in
   config order -> k, everything else 0) after the nearest lookup.

Memory: never float64; the volume is processed in slabs of ``slab_z`` output
slices: one float32 slab of ``slab_z`` input slices (+ one input slice for the z lerp, + the
interpolated slab) is alive at a time, next to the int16 input and output volumes. A 1024 x 1024
input with ``slab_z`` 32 needs 0.13 GB of slab; see docs/benchmarks.md for whole-case peaks.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctprep.config import PipelineConfig, to_jsonable
from ctprep.quarantine import CONSTANT_VOLUME, NONFINITE, NOT_CHEST, QuarantineError
from ctprep.stages.base import CaseTask, atomic_path, case_stage

ZARR_DIR = "zarr"


# --------------------------------------------------------------------- geometry
def canonical_zyx(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """View ``array`` (nibabel voxel order) in canonical (z, y, x) = (S, A, R) order.

    Returns (view, affine_zyx) where ``affine_zyx`` maps (z, y, x) indices of the
    view to RAS+ mm. No copy: flips and transposes only.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
    ras = nib.orientations.apply_orientation(array, transform)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0  # (z, y, x) -> (i, j, k) = (x, y, z)
    return ras.transpose(2, 1, 0), ras_affine @ perm


@dataclass
class AxisGrid:
    """1D edge-aligned grid along one canonical axis (see module docstring).

    ``n_full = floor(n_in * s_in / s_out)`` fixes where the centre crop/pad
    starts. An output voxel has data when its centre lies inside the input's
    field of view, i.e. its continuous input index is in [-0.5, n_in - 0.5)
    (SimpleITK's rule); that is ``n_valid`` voxels from full index 0, which can
    be one more than ``n_full``. Everything else is padding.
    """

    n_in: int
    n_full: int  # uncropped output size floor(n_in * s_in / s_out)
    n_valid: int  # full-grid voxels whose centre lies inside the input extent
    start: int  # full-grid index of output voxel 0 (negative = padding before)
    size: int  # output size
    ratio: float  # s_out / s_in

    @classmethod
    def make(cls, n_in: int, s_in: float, s_out: float, size: int) -> AxisGrid:
        scale = s_in / s_out
        n_full = max(1, math.floor(float(n_in) * scale))  # same expression as torch's output size
        ratio = s_out / s_in
        f = np.arange(n_full + math.ceil(1 / ratio) + 2)
        n_valid = int(np.count_nonzero((f + 0.5) * ratio - 0.5 < n_in - 0.5))
        return cls(n_in, n_full, n_valid, (n_full - size) // 2, size, ratio)

    def src(self) -> tuple[np.ndarray, np.ndarray]:
        """(continuous input index, valid) for each output voxel."""
        f = np.arange(self.size, dtype=np.float64) + self.start
        valid = (f >= 0) & (f < self.n_valid)
        return (f + 0.5) * self.ratio - 0.5, valid

    def nearest(self) -> tuple[np.ndarray, np.ndarray]:
        """(nearest input index, valid) for each output voxel (``floor(index + 0.5)``, as ITK)."""
        src, valid = self.src()
        idx = np.clip(np.floor(src + 0.5), 0, self.n_in - 1).astype(np.intp)
        return idx, valid

    def kept(self) -> slice:
        """Slice of the full grid that lands in the output with data."""
        return slice(max(self.start, 0), max(max(self.start, 0), min(self.start + self.size, self.n_valid)))

    def placed(self) -> slice:
        """Where :meth:`kept` lands in the output."""
        k = self.kept()
        return slice(k.start - self.start, k.stop - self.start)

    def edge_pad(self) -> int:
        """Input voxels to replicate at the end so that interpolating with this
        scale yields all ``n_valid`` voxels (values there equal the clamped edge)."""
        return 0 if math.floor(float(self.n_in) / self.ratio) >= self.n_valid else math.ceil(self.ratio) + 1


def output_affine(affine_zyx: np.ndarray, grids: tuple[AxisGrid, AxisGrid, AxisGrid]) -> np.ndarray:
    """Affine of the output (z, y, x) grid given the canonical input affine."""
    out = np.array(affine_zyx, dtype=np.float64)
    for a, g in enumerate(grids):
        col = affine_zyx[:3, a]
        out[:3, a] = col * g.ratio
        out[:3, 3] += col * ((g.start + 0.5) * g.ratio - 0.5)
    return out


@dataclass
class ResampledCase:
    """Output of :func:`resample_case`."""

    image: np.ndarray  # int16 (Z, Y, X) HU
    mask: np.ndarray  # uint8 (Z, Y, X) coarse region ids
    affine: np.ndarray  # (z, y, x) -> RAS+ mm
    spacing_zyx: tuple[float, float, float]
    fov_fraction: float  # fraction of output voxels inside the input field of view
    info: dict[str, Any] = field(default_factory=dict)


def resample_case(
    image: np.ndarray,
    labels: np.ndarray | None,
    affine: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    shape_zyx: tuple[int, int, int],
    hu_clip: tuple[int, int] = (-1024, 3071),
    pad_hu: int = -1024,
    label_lut: np.ndarray | None = None,
    slab_z: int = 32,
) -> ResampledCase:
    """Resample one case onto the canonical output grid (pure: arrays in, arrays out).

    Args:
        image: HU, int16 or float32, nibabel voxel order (i, j, k).
        labels: label ids on the same voxel grid, or None (-> all-zero mask).
        affine: voxel (i, j, k) -> RAS+ mm.
        spacing_zyx: output spacing in mm along (z, y, x) = (S, A, R).
        shape_zyx: output shape (voxels).
        hu_clip: (low, high) HU after interpolation.
        pad_hu: HU of voxels outside the input field of view.
        label_lut: source label id -> output id (uint8 array); None keeps ids (must fit uint8).
        slab_z: output slices per interpolation call (bounds memory).
    """
    vol, aff_zyx = canonical_zyx(image, affine)
    in_spacing = np.sqrt((aff_zyx[:3, :3] ** 2).sum(axis=0))
    grids = tuple(AxisGrid.make(vol.shape[a], float(in_spacing[a]), float(spacing_zyx[a]), int(shape_zyx[a]))
                  for a in range(3))
    gz, gy, gx = grids
    out = np.full(tuple(shape_zyx), np.int16(np.clip(pad_hu, hu_clip[0], hu_clip[1])), dtype=np.int16)
    zs = _resample_image_into(out, vol, grids, hu_clip, slab_z)
    mask = _resample_labels(labels, affine, grids, zs, shape_zyx, label_lut)
    py, px = gy.placed(), gx.placed()
    fov = (len(zs) * (py.stop - py.start) * (px.stop - px.start)) / float(np.prod(shape_zyx))
    return ResampledCase(out, mask, output_affine(aff_zyx, grids), tuple(float(s) for s in spacing_zyx), fov,
                         {"input_spacing_zyx": [float(s) for s in in_spacing],
                          "input_shape_zyx": [int(s) for s in vol.shape]})


def _resample_image_into(out: np.ndarray, vol: np.ndarray, grids: tuple[AxisGrid, AxisGrid, AxisGrid],
                         hu_clip: tuple[int, int], slab_z: int) -> np.ndarray:
    """Interpolate the canonical (z, y, x) volume ``vol`` into ``out`` (int16, pre-filled with the
    padding HU), ``slab_z`` output slices at a time; returns the output z indices that have data."""
    import torch
    import torch.nn.functional as F

    gz, gy, gx = grids
    src_z, valid_z = gz.src()
    src_z = np.clip(src_z, 0, gz.n_in - 1)
    z0 = np.floor(src_z).astype(np.intp)
    z1 = np.minimum(z0 + 1, gz.n_in - 1)
    wz = (src_z - z0).astype(np.float32)
    ky, kx = gy.kept(), gx.kept()
    py, px = gy.placed(), gx.placed()
    same_plane = gy.ratio == 1 and gx.ratio == 1
    lo, hi = float(hu_clip[0]), float(hu_clip[1])

    zs = np.flatnonzero(valid_z)
    ny, nx = vol.shape[1:]
    # Replicated edge rows/columns so that interpolation reaches all n_valid voxels (see AxisGrid).
    pad_y, pad_x = (0, 0) if same_plane else (gy.edge_pad(), gx.edge_pad())
    padded = bool(pad_y or pad_x)
    plane_buf = None  # the interpolated slab, reused from slab to slab (one allocation per case)
    for s in range(0, len(zs), slab_z):
        tz = zs[s : s + slab_z]
        w = wz[tz]
        lerp = bool(np.any(w > 0))
        # The float32 slab of input slices (already padded) is the only large temporary: 128 MB
        # for 32 slices of 1024 x 1024, where a whole-slab gather + lerp + F.pad held four of them.
        # Each slice is converted, z-lerped (in place, contiguous, with the same tensor-weight kernel as
        # one lerp over the slab) and edge-replicated (copies, as F.pad "replicate") on its own, so the
        # values are bit-identical to the whole-slab version.
        slab = np.empty((len(tz), ny + pad_y, nx + pad_x), dtype=np.float32)
        cur = np.empty((ny, nx), dtype=np.float32) if padded else None
        nxt = np.empty((ny, nx), dtype=np.float32) if lerp else None
        for i, t in enumerate(tz):
            a_i = cur if padded else slab[i]
            a_i[...] = vol[z0[t]]
            if lerp:
                nxt[...] = vol[z1[t]]
                torch.from_numpy(a_i).lerp_(torch.from_numpy(nxt), torch.from_numpy(w[i : i + 1]))
            if padded:
                slab[i, :ny, :nx] = a_i
                slab[i, ny:, :nx] = a_i[ny - 1]
                slab[i, :, nx:] = slab[i, :, nx - 1 : nx]
        a = torch.from_numpy(slab)
        cur = nxt = None
        if not same_plane:
            a, plane_buf = _bilinear(a, (1.0 / gy.ratio, 1.0 / gx.ratio), plane_buf, slab_z)
            slab = None  # a is the (smaller) interpolated slab now
        a = a[:, ky, kx].clamp_(lo, hi).round_()
        # Straight into the output (integral after round_, so the int16 cast is exact): no int16 temporary.
        torch.from_numpy(out[tz[0] : tz[-1] + 1, py, px]).copy_(a)
        a = slab = None  # before the next slab is allocated: two slabs are never alive at once
    return zs


def _bilinear(slab, scale_yx: tuple[float, float], buf, slab_z: int):
    """In-plane bilinear interpolation of a float32 (n, H, W) slab by ``scale_yx``, as
    ``F.interpolate(slab[None], scale_factor=scale_yx, mode="bilinear", align_corners=False,
    recompute_scale_factor=False)[0]`` (bit-identical, tested), into ``buf`` (reused between slabs,
    created on first use for ``slab_z`` slices). Returns (result view, buf).

    The scale (not a size) is what makes torch map output t to input (t + 0.5) * ratio - 0.5. Writing
    into one buffer spares a fresh 30 MB allocation (and its page faults) per ctclip slab.
    """
    import torch
    import torch.nn.functional as F

    n, h, w = slab.shape
    size = [math.floor(float(h) * scale_yx[0]), math.floor(float(w) * scale_yx[1])]  # as F.interpolate
    if buf is None or tuple(buf.shape[2:]) != tuple(size) or buf.shape[1] < n:
        buf = torch.empty((1, max(n, slab_z), *size), dtype=slab.dtype)
    out = buf[:, :n]
    try:
        torch._C._nn.upsample_bilinear2d(slab[None], size, False, scale_yx[0], scale_yx[1], out=out)
    except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - a torch without this overload
        return F.interpolate(slab[None], scale_factor=scale_yx, mode="bilinear", align_corners=False,
                             recompute_scale_factor=False)[0], buf
    return out[0], buf


def _resample_labels(labels: np.ndarray | None, affine: np.ndarray, grids: tuple[AxisGrid, AxisGrid, AxisGrid],
                     zs: np.ndarray, shape_zyx: tuple[int, int, int], label_lut: np.ndarray | None) -> np.ndarray:
    """Nearest-neighbour label map on the same output grid as the image, remapped by ``label_lut``
    (uint8 (Z, Y, X); all zero without ``labels``); only the output slices ``zs`` have data."""
    gz, gy, gx = grids
    py, px = gy.placed(), gx.placed()
    mask = np.zeros(tuple(shape_zyx), dtype=np.uint8)
    if labels is not None:
        lab, _ = canonical_zyx(labels, affine)
        iz, _ = gz.nearest()
        iy, _ = gy.nearest()
        ix, _ = gx.nearest()
        if label_lut is None:
            label_lut = np.arange(256, dtype=np.uint8)
        if lab.dtype.itemsize > 2 or lab.dtype.kind == "f":
            lab = np.clip(lab, -1, 1 << 15).astype(np.int16)  # rare: wide label files
        if lab.dtype.itemsize == 1:
            lut = np.zeros(256, dtype=np.uint8)  # uint8 / int8 ids index it by their bit pattern
            n = min(len(label_lut), 128 if lab.dtype.kind == "i" else 256)
        else:
            # A 64k-entry table indexed by the ids' 16-bit pattern: negative or out-of-table ids -> 0,
            # no per-voxel bounds checks.
            lut = np.zeros(1 << 16, dtype=np.uint8)
            n = min(len(label_lut), 1 << 15)
        lut[:n] = np.asarray(label_lut, dtype=np.uint8)[:n]
        bits = np.uint8 if lab.dtype.itemsize == 1 else np.uint16
        # Nearest neighbour is index arithmetic: one flat index per output (y, x) into an input
        # slice, so each output slice is one gather and one table lookup (no float interpolation,
        # no per-axis temporaries).
        flat = (iy[py, None] * lab.shape[2] + ix[None, px]).astype(np.intp)
        picked = np.empty(flat.shape, dtype=bits)
        for t in zs:
            np.take(np.ascontiguousarray(lab[iz[t]]).view(bits), flat, out=picked, mode="clip")
            np.take(lut, picked, out=mask[t, py, px], mode="clip")
    return mask


# --------------------------------------------------------------------- checks
def check_not_constant(image: np.ndarray) -> None:
    """Quarantine all-constant volumes (e.g. all zeros) and NaN/inf."""
    lo, hi = image.min(), image.max()
    if image.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        raise QuarantineError(NONFINITE, "volume has NaN/inf voxels")
    if lo == hi:
        raise QuarantineError(CONSTANT_VOLUME, f"all voxels are {float(lo):g}")


LUNG_HU = (-1024, -500)  # enclosed low density: lung parenchyma, emphysema (-950) and bullae included
DENSE_HU = -500  # body tissue (and the lungs' boundary) is denser than this


def lung_fraction(image_zyx: np.ndarray) -> float:
    """Fraction of the body that is enclosed low-density (lung-like, < -500 HU), on a subsample.

    The body is every voxel lying between tissue (> -500 HU) both along its row and along its
    column of the axial slice, so outside air is never counted while lungs are, however dark:
    severe emphysema (-950..-1000 HU) is still a chest. The synthetic chest scores ~0.22 (tested);
    a head or limb scan only gets sinuses / partial-volume voxels, a few percent at most.
    """
    sub = image_zyx[::2, ::4, ::4]
    dense = sub > DENSE_HU

    def between(axis: int) -> np.ndarray:
        fwd = np.maximum.accumulate(dense, axis=axis)
        bwd = np.flip(np.maximum.accumulate(np.flip(dense, axis), axis=axis), axis)
        return fwd & bwd

    body = between(-1) & between(-2)
    n = int(body.sum())
    if n == 0:
        return 0.0
    return float((body & ~dense).sum()) / n


# --------------------------------------------------------------------- zarr
def blosc_codec(cname: str = "zstd", clevel: int = 1, shuffle: str = "shuffle"):
    from zarr.codecs import BloscCodec

    return BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle)


def write_case_zarr(path: str | os.PathLike[str], case: ResampledCase, attrs: dict[str, Any],
                    chunk_zyx: tuple[int, int, int], compressor: str = "zstd", clevel: int = 1,
                    shuffle: str = "shuffle") -> int:
    """Write ``image`` / ``mask`` as a zarr v3 group at ``path`` (atomically). Returns bytes on disk."""
    import zarr

    chunks = tuple(min(c, s) for c, s in zip(chunk_zyx, case.image.shape))
    with atomic_path(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for name, arr in (("image", case.image), ("mask", case.mask)):
            # write_empty_chunks=True skips zarr's per-chunk "all fill value?" scan, which costs more
            # CPU than compressing an empty mask chunk (measured: 0.29 -> 0.12 s per 240x480x480 mask).
            z = group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                                   compressors=[blosc_codec(compressor, clevel, shuffle)], fill_value=0,
                                   config={"write_empty_chunks": True})
            if not write_chunks_direct(z, arr, os.path.join(str(tmp), name)):
                z[...] = arr
        group.attrs.update(to_jsonable(attrs))
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def write_chunks_direct(z, arr: np.ndarray, array_dir: str) -> bool:
    """Encode and write every chunk of the fresh zarr v3 array ``z`` (metadata already written, on a
    local folder ``array_dir``) from ``arr``, byte for byte what ``z[...] = arr`` writes (tested).

    ``z[...] = arr`` goes through zarr's asyncio codec pipeline, a copy of each chunk and a thread
    hop per chunk: measured 0.17 s more CPU than the Blosc encoding itself for a 240 x 480 x 480
    case. Here each chunk is one Blosc call on a view of ``arr`` (copied only when it is not
    contiguous) and one file write, named by the array's own chunk key encoding. Returns False
    (the caller falls back to ``z[...] = arr``) unless the array is 3D, native little-endian, fill
    value 0, with exactly the codecs [little-endian bytes, Blosc].
    """
    import sys

    from numcodecs import Blosc
    from zarr.codecs import BloscCodec, BytesCodec

    md = z.metadata
    codecs = tuple(md.codecs)
    if (len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec)
            or getattr(codecs[0].endian, "value", "little") != "little" or sys.byteorder != "little"
            or arr.ndim != 3 or not arr.dtype.isnative or md.fill_value != 0):
        return False
    bc = codecs[1]
    shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}[bc.shuffle.value]
    codec = Blosc(cname=bc.cname.value, clevel=bc.clevel, shuffle=shuffle, blocksize=bc.blocksize,
                  typesize=bc.typesize)
    chunk = tuple(md.chunk_grid.chunk_shape)
    edge = None  # reused buffer for chunks that overhang the array (zarr stores them padded with 0)
    ranges = [range(0, n, c) for n, c in zip(arr.shape, chunk)]
    for z0 in ranges[0]:
        for y0 in ranges[1]:
            for x0 in ranges[2]:
                part = arr[z0 : z0 + chunk[0], y0 : y0 + chunk[1], x0 : x0 + chunk[2]]
                if part.shape != chunk:
                    if edge is None:
                        edge = np.empty(chunk, dtype=arr.dtype)
                    edge.fill(0)
                    edge[: part.shape[0], : part.shape[1], : part.shape[2]] = part
                    part = edge
                key = md.encode_chunk_key((z0 // chunk[0], y0 // chunk[1], x0 // chunk[2]))
                dest = os.path.join(array_dir, *key.split("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(dest, "wb") as f:
                    f.write(codec.encode(np.ascontiguousarray(part)))
    return True


def read_case_zarr(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(image int16 (Z,Y,X), mask uint8 (Z,Y,X), attrs) of a resampled case."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    return group["image"][...], group["mask"][...], dict(group.attrs)


# --------------------------------------------------------------------- worker memory
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
CASE_MMAP_THRESHOLD = 16 << 20  # during a case, blocks below this come from the reusable heap
CASE_TRIM_THRESHOLD = 256 << 20  # ... and freed heap is kept (up to this much at the top) for the next block
GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # M_MMAP_THRESHOLD / M_TRIM_THRESHOLD before any tuning
# Setting any of these turns glibc's adaptive mmap threshold off for the process (mallopt(3)).
MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # pragma: no cover - not glibc (musl, macOS): nothing to tune
        return None


@contextlib.contextmanager
def reuse_freed_memory():
    """Within one case, let glibc reuse freed blocks below 16 MB instead of unmapping them;
    give everything free back to the OS (``malloc_trim``) when the case ends.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins glibc's
    mmap threshold at 128 kB: every slab, chunk and codec buffer of a case is then a fresh
    mapping, and its pages fault in again each time. Measured on a 300 x 512 x 512 case
    (``ctclip``): 307k page faults and 1.3 s of system time per case, against 5-25k faults and
    0.15 s with this policy, for ~0.1 GB more peak RSS. The thresholds are restored afterwards
    (to the ``MALLOC_*_`` environment values, else glibc's 128 kB start values), so the rest of
    the process keeps the behaviour it asked for. A no-op without glibc, and in a process with no
    ``MALLOC_*_`` variable: there glibc's adaptive threshold already keeps such blocks.
    """
    env = {name: os.environ.get(name, "") for name in MALLOC_ENV}
    libc = _glibc() if any(env.values()) else None
    if libc is None:  # no MALLOC_*_ variable: glibc's own adaptive mmap threshold is on and does this
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, CASE_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, CASE_TRIM_THRESHOLD)
    try:
        yield
    finally:
        for param, name in ((M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"), (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_")):
            value = env[name]
            libc.mallopt(param, int(value) if value.isdigit() else GLIBC_DEFAULT_THRESHOLD)
        libc.malloc_trim(0)


# --------------------------------------------------------------------- stage
def _config_slice(c: PipelineConfig) -> dict[str, Any]:
    # slab_z stays in: float rounding of the in-plane interpolation depends (by 1 HU, rarely) on the
    # batch size, and reruns must reproduce outputs bit for bit. omni.image_root is left out: it says
    # where the JPEGs are found, and their content hashes already key the cases.
    omni = {k: v for k, v in to_jsonable(c.omni).items() if k != "image_root"}
    return {"resample": to_jsonable(c.resample), "regions": c.regions.regions, "omni": omni}


def resample_loaded(case, loaded, source, cfg: PipelineConfig, check: bool = True) -> tuple[ResampledCase, np.ndarray]:
    """A loaded case on the configured grid: the one home of the resample stage's per-case work,
    used by ``run_resample`` and by ``ctprep_train.inference`` (so inference preprocesses exactly as
    ``build-shards`` does).

    Args:
        case: the ``CaseInput`` (the source's ``target_grid`` may read it).
        loaded: what ``source.load(case)`` returned (or an equivalent ``LoadedCase``).
        source: the case's source.
        cfg: the pipeline config.
        check: apply the quarantine checks (constant volume; not a chest, except for 2D sources).

    Returns:
        (resampled case, the stored grid's affine: (z, y, x) voxel -> patient RAS+ mm). A source
        that stacks slices in a frame of its own (OmniAbnorm's coronal and sagittal slabs) gives
        ``info["patient_from_slab"]``; the affine then maps to the patient, not to that frame.
    """
    if check:
        check_not_constant(loaded.image)
    spacing, shape = source.target_grid(case, cfg)
    lut = np.asarray(cfg.regions.lookup_table(), dtype=np.uint8) if loaded.label_space == "totalseg" else None
    res = resample_case(loaded.image, loaded.labels, loaded.affine, spacing, shape, cfg.resample.hu_clip,
                        cfg.resample.pad_hu, lut, cfg.resample.slab_z)
    if check and loaded.header_style != "jpg" and cfg.resample.min_lung_fraction > 0:
        frac = lung_fraction(res.image)
        if frac < cfg.resample.min_lung_fraction:
            raise QuarantineError(NOT_CHEST, f"only {frac:.1%} of the body is enclosed low density (lung-like, < {DENSE_HU} HU); "
                                  "not a chest CT?")
    affine = np.asarray(loaded.info.get("patient_from_slab", np.eye(4)), dtype=np.float64) @ res.affine
    return res, affine


# Version 3: v1 volumes placed by ImagePositionPatient (a v1 file and its _fixed twin share an
# affine); coronal/sagittal OmniAbnorm slabs' affine maps to the patient; oblique series quarantined.
@case_stage("resample", upstream=(), version="3", config_slice=_config_slice,
            case_fields=("files", "meta"), output=lambda case_id: f"{ZARR_DIR}/{case_id}.zarr")
def run_resample(task: CaseTask) -> dict[str, Any]:
    """Read (via the case's source), resample, check, write zarr. Returns the manifest info."""
    from ctprep.cluster import pin_threads

    pin_threads()  # one native thread per worker process (execute_case has pinned already; direct callers too)
    with reuse_freed_memory():
        return _run_resample(task)


def _run_resample(task: CaseTask) -> dict[str, Any]:
    from ctprep.sources import get_source

    t0 = time.perf_counter()
    cfg = task.config
    source = get_source(task.case.source, cfg)
    loaded = source.load(task.case)
    t_read = time.perf_counter() - t0
    res, affine = resample_loaded(task.case, loaded, source, cfg)
    t_resample = time.perf_counter() - t0 - t_read
    attrs = {
        "case_id": task.case.case_id,
        "source": task.case.source,
        "split": task.case.split,
        "spacing": list(res.spacing_zyx),
        "shape": list(res.image.shape),
        "affine": affine.tolist(),
        "header_style": loaded.header_style,
        "axes": "zyx",
        "orientation": "SAR",
        "region_names": cfg.regions.names if loaded.label_space == "totalseg" else loaded.info.get("region_names", []),
        "has_mask": loaded.labels is not None,
        "plane": str(loaded.info.get("plane", "axial")),
        "hu_clip": list(cfg.resample.hu_clip),
        "stage_key": task.key,
        "input": {**loaded.info, **res.info},
    }
    r = cfg.resample
    nbytes = write_case_zarr(task.output_path, res, attrs, r.chunk_zyx, r.compressor, r.clevel, r.shuffle)
    return {
        "header_style": loaded.header_style,
        "bytes": nbytes,
        "fov_fraction": round(res.fov_fraction, 4),
        "seconds_read": round(t_read, 3),
        "seconds_resample": round(t_resample, 3),
        "seconds_write": round(time.perf_counter() - t0 - t_read - t_resample, 3),
        "rescale": {k: loaded.info[k] for k in ("slope", "intercept", "rescale_source") if k in loaded.info},
    }
