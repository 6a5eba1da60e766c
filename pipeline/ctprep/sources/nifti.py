"""Reading NIfTI volumes fast and within a bounded memory: streamed ISA-L inflate into one writable array.

Used by the CT-RATE source (and anything else that reads ``.nii``/``.nii.gz``); the
writer of the synthetic data is ``ctprep.synth.nifti``.

Memory (a 1024 x 1024 x 450 int16 CT-RATE volume is 0.94 GB): :func:`read_nifti` inflates the
stream *into* the voxel array (no whole-file ``bytes`` of the compressed or the inflated data), so
reading peaks at the array itself plus a few MB. The array is writable and owned by the caller,
so ``apply_rescale(..., inplace=True)`` turns v1 raw values into HU without a second copy.
"""

from __future__ import annotations

import io
import os

import numpy as np

from ctprep.quarantine import UNREADABLE, QuarantineError

GZIP_MAGIC = b"\x1f\x8b"
MAX_DEFLATE_RATIO = 1032  # deflate never inflates more than ~1032:1: a bound on what a file can hold
READ_CHUNK = 16 << 20  # bytes inflated per readinto call: big enough to amortise calls, small next to a volume
# Bytes allowed after the voxels the header declares (writers leave none; a little padding is
# harmless). More is refused: a valid volume followed by a GB of zeros is not what it claims to be.
MAX_TRAILING_BYTES = 1 << 20


def inflate(path: str | os.PathLike[str]) -> bytes:
    """Whole-file gzip inflate with ISA-L (about 2x zlib); plain bytes for ``.nii``.

    Holds the compressed file and the inflated bytes at once: for whole volumes prefer
    :func:`read_nifti`, which streams into the array. Raises QuarantineError(unreadable) on a
    truncated or corrupt stream.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise QuarantineError(UNREADABLE, f"cannot read {os.path.basename(path)}: {e}") from e
    if data[:2] != GZIP_MAGIC:
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


def _open_stream(f):
    """(reader, most bytes it can yield): a raw reader with ``readinto`` that yields the file's decompressed bytes.

    ISA-L's C ``_GzipReader`` (what ``IGzipFile`` wraps) inflates straight into the caller's buffer;
    ``IGzipFile.readinto`` itself goes through a temporary ``bytes`` of the requested size.
    Multi-member streams, CRC and length checks behave as in ``igzip.decompress``.
    """
    size = os.fstat(f.fileno()).st_size
    if f.read(2) != GZIP_MAGIC:
        f.seek(0)
        return f, size
    f.seek(0)
    limit = size * MAX_DEFLATE_RATIO
    try:
        from isal import igzip

        reader_cls = getattr(igzip, "_GzipReader", None)
        if reader_cls is not None:
            return reader_cls(f, 1 << 20), limit
        return igzip.IGzipFile(fileobj=f, mode="rb"), limit  # pragma: no cover - older isal: one copy per chunk
    except ImportError:  # pragma: no cover - isal is a dependency; keep working without it
        import gzip

        return gzip.GzipFile(fileobj=f, mode="rb"), limit


def _read_exactly(stream, view: memoryview) -> int:
    """Fill ``view`` from ``stream`` in READ_CHUNK pieces; returns the bytes read (short at EOF)."""
    got, n = 0, len(view)
    while got < n:
        k = stream.readinto(view[got : got + READ_CHUNK])
        if not k:
            break
        got += k
    return got


def read_nifti(path: str | os.PathLike[str], max_bytes: int | None = None):
    """Read a NIfTI-1/2 file into its *stored* dtype without scaling.

    Args:
        path: ``.nii`` or ``.nii.gz``.
        max_bytes: refuse (QuarantineError(unreadable), with the figures) a header that declares
            more voxel bytes than this, before allocating anything: a 1 MB file of zeros can
            declare many GB. None: only the deflate bound applies.

    Inflation is bounded by the size the header declares: more than ``MAX_TRAILING_BYTES``
    after the voxels is refused too.

    Returns (array in nibabel voxel order (i, j, k), header). The array is a fresh, writable,
    Fortran-ordered buffer in native byte order (big-endian files are swapped in place), holding
    the same values as ``np.asarray(nib.load(path).dataobj)`` would before scaling. The whole
    stream is read, so a truncated file or a bad CRC raises QuarantineError(unreadable).
    """
    name = os.path.basename(str(path))
    try:
        fobj = open(str(path), "rb", buffering=0)
    except OSError as e:
        raise QuarantineError(UNREADABLE, f"cannot read {name}: {e}") from e
    try:
        with fobj:
            stream, limit = _open_stream(fobj)
            arr, hdr = _read_stream(stream, name, limit, max_bytes)
            _drain(stream, name)
    except QuarantineError:
        raise
    except Exception as e:  # isal raises EOFError / IsalError / OSError / BadGzipFile depending on damage
        raise QuarantineError(UNREADABLE, f"corrupt or truncated gzip in {name}: {type(e).__name__}: {e}") from e
    return arr, hdr


def _read_stream(stream, name: str, limit: int, max_bytes: int | None = None):
    """Header, then the voxels inflated straight into a fresh array (see :func:`read_nifti`).

    ``limit``: the most bytes the file can yield. A header claiming more is corrupt: quarantined
    before allocating, so that it never reads as a MemoryError (which the runner retries).
    """
    import nibabel as nib

    head = bytearray(540)
    got = _read_exactly(stream, memoryview(head)[:348])
    if got < 348:
        raise QuarantineError(UNREADABLE, f"{name}: {got} bytes is shorter than a NIfTI header")
    sizeof_hdr_le = int.from_bytes(head[:4], "little")
    sizeof_hdr_be = int.from_bytes(head[:4], "big")
    header_cls = nib.Nifti2Header if 540 in (sizeof_hdr_le, sizeof_hdr_be) else nib.Nifti1Header
    if header_cls.sizeof_hdr > 348:
        got += _read_exactly(stream, memoryview(head)[348:540])
    try:
        hdr = header_cls.from_fileobj(io.BytesIO(bytes(head[: header_cls.sizeof_hdr])))
    except Exception as e:
        raise QuarantineError(UNREADABLE, f"{name}: bad NIfTI header: {e}") from e
    shape = tuple(int(s) for s in hdr.get_data_shape())
    dtype = hdr.get_data_dtype()
    offset = int(hdr["vox_offset"])
    count = int(np.prod(shape)) if shape else 0
    need = offset + count * dtype.itemsize
    if count == 0:
        raise QuarantineError(UNREADABLE, f"{name}: data truncated ({got} of {need} bytes)")
    if need > limit:
        raise QuarantineError(UNREADABLE, f"{name}: header claims {need} bytes of data; the file can hold at "
                              f"most {limit} (shape {shape}, {dtype})")
    if max_bytes is not None and need > max_bytes:
        raise QuarantineError(UNREADABLE, f"{name}: header declares {need / 2**20:.0f} MiB of voxels (shape {shape}, "
                              f"{dtype}), over the {max_bytes / 2**20:.0f} MiB limit (ctrate.max_volume_mb)")
    if offset < got:
        raise QuarantineError(UNREADABLE, f"{name}: vox_offset {offset} lies inside the {got}-byte header")
    skip = offset - got  # extensions between the header and the voxels: not used
    while skip > 0:
        k = _read_exactly(stream, memoryview(bytearray(min(skip, 1 << 20))))
        if not k:
            raise QuarantineError(UNREADABLE, f"{name}: data truncated ({offset - skip} of {need} bytes)")
        skip -= k
        got += k
    flat = np.empty(count, dtype=dtype)
    n = _read_exactly(stream, memoryview(flat.view(np.uint8)))
    if n < flat.nbytes:
        raise QuarantineError(UNREADABLE, f"{name}: data truncated ({offset + n} of {need} bytes)")
    if not dtype.isnative:
        flat.byteswap(inplace=True)  # in place: torch and the rescale want native order, and no copy
        flat = flat.view(dtype.newbyteorder("="))
    return flat.reshape(shape, order="F"), hdr


def _drain(stream, name: str = "") -> None:
    """Read to the end of the stream so gzip's length/CRC trailer is checked (as a whole-file inflate
    does), refusing more than ``MAX_TRAILING_BYTES`` after the voxels without inflating them all."""
    sink = memoryview(bytearray(1 << 16))
    extra = 0
    while k := stream.readinto(sink):
        extra += k
        if extra > MAX_TRAILING_BYTES:
            raise QuarantineError(UNREADABLE, f"{name}: more than {MAX_TRAILING_BYTES} bytes follow the voxels the "
                                  "header declares (a volume with trailing data is not what its header says)")


def header_has_orientation(hdr) -> bool:
    """True if the header carries a real geometry (v2), False for a blank (v1) header.

    Blank = no qform/sform code, or an identity affine (what writers store when
    they have no geometry: nibabel sets sform_code 2 with ``np.eye(4)``).
    A real CT never has 1 mm isotropic voxels at the origin with identity axes.
    """
    if int(hdr["sform_code"]) <= 0 and int(hdr["qform_code"]) <= 0:
        return False
    return not np.allclose(hdr.get_best_affine(), np.eye(4), atol=1e-6)


def _as_wrapped_int16(v: float) -> np.int16:
    """An integer as the int16 with the same value modulo 2**16."""
    return np.int16(((int(v) + 32768) % 65536) - 32768)


def apply_rescale(raw: np.ndarray, slope: float, inter: float, *, inplace: bool = False) -> np.ndarray:
    """raw * slope + inter without float64: int16 when the result is exactly integral and fits.

    Args:
        raw: stored values (any NIfTI dtype).
        slope, inter: the rescale to apply (1, 0 returns int16 ``raw`` itself).
        inplace: the caller hands ``raw`` over (e.g. fresh from :func:`read_nifti`): a 16-bit
            integer or float32 ``raw`` is rescaled in its own buffer and returned as an int16 /
            float32 view of it, so a 1 GB v1 volume does not need a second GB. The values are
            identical to ``inplace=False``: when the true result fits int16, int16 arithmetic
            modulo 2**16 (what numpy does) gives exactly it. Other dtypes are copied as before.
    """
    if slope == 1.0 and inter == 0.0 and raw.dtype == np.int16:
        return raw
    own = inplace and raw.flags.writeable and raw.dtype.isnative
    if raw.dtype.kind in "iu" and float(slope).is_integer() and float(inter).is_integer():
        lo, hi = int(raw.min()), int(raw.max())
        a, b = lo * slope + inter, hi * slope + inter
        if -32768 <= min(a, b) and max(a, b) <= 32767:
            if own and raw.dtype.itemsize == 2:
                out16 = raw.view(np.int16)  # uint16 bits read as int16: equal modulo 2**16
                if slope != 1.0:
                    out16 *= _as_wrapped_int16(slope)
                if inter != 0.0:
                    out16 += _as_wrapped_int16(inter)
                return out16
            if slope == 1.0:  # the common case: one int16 pass, no widening
                out16 = raw.astype(np.int16, copy=True)
                out16 += _as_wrapped_int16(inter)  # np.int16(inter) overflows for e.g. -40000
                return out16
            out = raw.astype(np.int32)
            out *= int(slope)
            out += int(inter)
            return out.astype(np.int16)
    out = raw if own and raw.dtype == np.float32 else raw.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if inter != 0.0:
        out += np.float32(inter)
    return out
