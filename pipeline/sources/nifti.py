"""Reading NIfTI volumes fast and safely: ISA-L inflate, a zero-copy view in the stored dtype, v1/v2 header test.

Used by the CT-RATE source (and anything else that reads ``.nii``/``.nii.gz``); the
writer of the synthetic data is ``ctprep.synth.nifti``.
"""

from __future__ import annotations

import io
import os

import numpy as np

from ctprep.quarantine import UNREADABLE, QuarantineError


def inflate(path: str | os.PathLike[str]) -> bytes:
    """Whole-file gzip inflate with ISA-L (about 2x zlib); plain bytes for ``.nii``.

    Raises QuarantineError(unreadable) on a truncated or corrupt stream.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise QuarantineError(UNREADABLE, f"cannot read {os.path.basename(path)}: {e}") from e
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        from isal import igzip
        return igzip.decompress(data)
    except ImportError:  # pragma: no cover - isal is a dependency; keep working without it
        import gzip
        try:
            return gzip.decompress(data)
        except (EOFError, OSError, gzip.BadGzipFile) as e:
            raise QuarantineError(UNREADABLE, f"corrupt gzip in {os.path.basename(path)}: {e}") from e
    except Exception as e:  # isal raises EOFError / IsalError / OSError depending on damage
        raise QuarantineError(UNREADABLE, f"corrupt or truncated gzip in {os.path.basename(path)}: "
                              f"{type(e).__name__}: {e}") from e


def read_nifti(path: str | os.PathLike[str]):
    """Read a NIfTI-1/2 file into its *stored* dtype without scaling (zero-copy view of the inflated bytes).

    Returns (array in nibabel voxel order (i, j, k), header).
    """
    import nibabel as nib

    raw = inflate(path)
    if len(raw) < 348:
        raise QuarantineError(UNREADABLE, f"{os.path.basename(str(path))}: {len(raw)} bytes is shorter than a NIfTI header")
    sizeof_hdr_le = int.from_bytes(raw[:4], "little")
    sizeof_hdr_be = int.from_bytes(raw[:4], "big")
    header_cls = nib.Nifti2Header if 540 in (sizeof_hdr_le, sizeof_hdr_be) else nib.Nifti1Header
    try:
        hdr = header_cls.from_fileobj(io.BytesIO(raw[: header_cls.sizeof_hdr]))
    except Exception as e:
        raise QuarantineError(UNREADABLE, f"{os.path.basename(str(path))}: bad NIfTI header: {e}") from e
    shape = tuple(int(s) for s in hdr.get_data_shape())
    dtype = hdr.get_data_dtype()
    offset = int(hdr["vox_offset"])
    count = int(np.prod(shape)) if shape else 0
    need = offset + count * dtype.itemsize
    if count == 0 or len(raw) < need:
        raise QuarantineError(UNREADABLE, f"{os.path.basename(str(path))}: data truncated "
                              f"({len(raw)} of {need} bytes)")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    return arr, hdr


def header_has_orientation(hdr) -> bool:
    """True if the header carries a real geometry (v2), False for a blank (v1) header.

    Blank = no qform/sform code, or an identity affine (what writers store when
    they have no geometry: nibabel sets sform_code 2 with ``np.eye(4)``).
    A real CT never has 1 mm isotropic voxels at the origin with identity axes.
    """
    if int(hdr["sform_code"]) <= 0 and int(hdr["qform_code"]) <= 0:
        return False
    return not np.allclose(hdr.get_best_affine(), np.eye(4), atol=1e-6)


def apply_rescale(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """raw * slope + inter without float64: int16 when the result is exactly integral and fits."""
    if slope == 1.0 and inter == 0.0 and raw.dtype == np.int16:
        return raw
    if raw.dtype.kind in "iu" and float(slope).is_integer() and float(inter).is_integer():
        lo, hi = int(raw.min()), int(raw.max())
        a, b = lo * slope + inter, hi * slope + inter
        if -32768 <= min(a, b) and max(a, b) <= 32767:
            if slope == 1.0:  # the common case: one int16 pass, no widening
                out16 = raw.astype(np.int16, copy=True)
                out16 += np.int16(inter)
                return out16
            out = raw.astype(np.int32)
            out *= int(slope)
            out += int(inter)
            return out.astype(np.int16)
    out = raw.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if inter != 0.0:
        out += np.float32(inter)
    return out
