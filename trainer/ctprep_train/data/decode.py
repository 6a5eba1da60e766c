"""Decoding one sample: verified, pickle-free, volumes left unread until they reach the batch.

Large uncompressed ``.npy`` volume members become ``LazyNpy`` (header parsed, data read later
straight into the batch tensor); compressed ones become ``CompressedNpy`` (decompressed straight
into the batch); the small members and the volume headers are read with a few ``pread``s of
adjacent byte spans (never across a volume's data) and decoded by ``ctprep.shards.decode_member``. Never pickle: ``.npy`` headers are parsed with
``numpy.lib.format`` and object dtypes are refused.

Verified reads (docs/verified-reads.md): a sample's ``meta.json`` is checked against the CRC32 its
shard's index entry holds (``meta_crc32``), every other member against the CRC32 ``meta.json``
holds (``crc32``) - ``ctprep.shards.check_meta`` / ``check_member``, the checks
``ctprep.stages.pack.check_index`` runs too - each where its bytes are read: small members in
``decode_sample``, compressed volumes before they are decompressed into the batch, uncompressed
volumes piece by piece as ``preadv`` puts them there (each ``CRC_PIECE`` is checksummed while it
is still in the CPU cache; the pieces' CRCs are joined with ``crc32_combine``). A mismatch is a ``CorruptMemberError`` (the sample is
skipped and counted by the streams). A shard whose index entry has no ``meta_crc32`` was packed
before checksums: its samples are read unverified, with one warning per shard.
"""

from __future__ import annotations

import gzip
import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ctprep import schema, shards
from ctprep.shards import (
    CorruptMemberError,
    MetaChecksumError,
    ShardMismatchError,
    crc32,
    decode_member,
    member_field,
    split_member,
)
from ctprep.shards import npy_header as _npy_header
from ctprep_train import shard_io
from ctprep_train.data.index import ShardExpectation, check_identity
from ctprep_train.data.tar import SampleRef

REQUIRED_MEMBERS = (*schema.NPY_MEMBERS, member_field(shards.META_MEMBER))


LAZY_MIN_BYTES = 1 << 20  # uncompressed volume members above this are read straight into the batch
LAZY_FIELDS = ("image", "mask")  # the (Z, Y, X) volumes; everything else is small
NPY_HEAD_BYTES = 4096  # bytes read to parse a lazy volume's .npy header
SPAN_GAP = 64 << 10  # member reads closer than this many bytes are merged into one pread
# Bytes read and then checksummed at once, while they are still in the CPU cache (a second pass
# over a whole volume reads it back from memory); one collate.READ_CHUNK is 4 pieces, read through
# one open file. 1 MiB: on a 2-vCPU AMD EPYC (512 KiB L2) it costs what 4 MiB does, on a 2-vCPU
# Xeon (2 MiB L2) 5-7% less CPU in the read threads; 256 KiB costs more on both (more calls).
CRC_PIECE = 1 << 20


def _crc32_combine_py(crc1: int, crc2: int, len2: int) -> int:
    """zlib's ``crc32_combine``: the CRC32 of A + B from crc(A), crc(B) and len(B) (GF(2) matrices)."""

    def times(mat: list[int], vec: int) -> int:
        out, i = 0, 0
        while vec:
            if vec & 1:
                out ^= mat[i]
            vec >>= 1
            i += 1
        return out

    def square(mat: list[int]) -> list[int]:
        return [times(mat, mat[n]) for n in range(32)]

    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = square(odd)  # two zero bits
    odd = square(even)  # four zero bits
    while True:  # apply len2 zero bytes to crc1, one bit of len2 at a time
        even = square(odd)
        if len2 & 1:
            crc1 = times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = square(even)
        if len2 & 1:
            crc1 = times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


try:  # ISA-L's (C); the same function as the fallback
    from isal.isal_zlib import crc32_combine
except ImportError:  # pragma: no cover - isal is a dependency; older releases lack crc32_combine
    crc32_combine = _crc32_combine_py


class LazyNpy:
    """An uncompressed ``.npy`` tar member whose header is parsed but whose data is not read yet.

    ``collate_samples`` reads the data with one ``preadv`` directly into the batch tensor, so a
    volume is copied once (page cache -> batch), like a plain ``read``; ``np.asarray`` also works.
    """

    __slots__ = ("path", "offset", "shape", "dtype", "fortran", "crc", "head_crc", "where")

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype, fortran: bool,
                 crc: int | None = None, head_crc: int = 0, where: str = ""):
        self.path, self.offset, self.shape, self.dtype, self.fortran = path, offset, shape, dtype, fortran
        # expected CRC32 of the whole member (None: not verified) and the CRC32 of its npy header
        self.crc, self.head_crc, self.where = crc, head_crc, where or path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read_into(self, out: np.ndarray) -> None:
        """Fill the C-contiguous ``out`` (same shape) from the file, verifying it as it is read."""
        target = memoryview(out.reshape(-1).view(np.uint8))
        self.check(self.read_range_into(target, 0, len(target)))
        if self.fortran:  # rare: stored column-major; reorder in place via a copy
            out[...] = out.reshape(-1).reshape(self.shape[::-1]).T

    def read_range_into(self, target: memoryview, start: int, end: int) -> int:
        """Copy bytes [start, end) of the data into the same range of ``target``; returns their
        CRC32 (0 when not verified), computed piece by piece while each piece is in the cache.
        The caller joins the ranges' CRCs and calls ``check``. The shard is opened once per call
        (a local file: one ``preadv`` per ``CRC_PIECE``; a URL: one range request for it all)."""
        with shard_io.open_shard(self.path) as shard:
            if self.crc is None:
                shard.readinto(self.offset + start, target[start:end])
                return 0
            step = CRC_PIECE if isinstance(shard, shard_io.LocalFile) else end - start
            crc = 0
            for at in range(start, end, step):
                piece = target[at : min(at + step, end)]
                shard.readinto(self.offset + at, piece)
                crc = crc32(piece, crc)
            return crc

    def check(self, data_crc: int) -> None:
        """Raise ``CorruptMemberError`` unless header + data, the data's CRC32 being ``data_crc``,
        match the member's CRC32 (no-op when not verified)."""
        if self.crc is None:
            return
        found = crc32_combine(self.head_crc, data_crc, self.nbytes)
        if found != self.crc:
            raise CorruptMemberError(f"{self.where}: crc32 {found} != {self.crc} in meta.json")

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        self.read_into(out)
        return out if dtype is None else out.astype(dtype)


def _is_lazy(name: str, size: int) -> bool:
    """An uncompressed volume member big enough to be read straight into the batch later."""
    return member_field(name) in LAZY_FIELDS and name.endswith(".npy") and size >= LAZY_MIN_BYTES


def _lazy_member(path: str, name: str, offset: int, size: int, head: memoryview) -> LazyNpy:
    """The ``LazyNpy`` of a member whose first bytes (``NPY_HEAD_BYTES`` at most) are ``head``."""
    shape, fortran, dtype, data_at = _npy_header(head)
    if dtype.hasobject:
        raise CorruptMemberError(f"{name}: object arrays are refused (would need pickle)")
    lazy = LazyNpy(path, offset + data_at, tuple(shape), dtype, fortran, head_crc=crc32(head[:data_at]))
    if data_at + lazy.nbytes > size:
        raise CorruptMemberError(f"{name}: npy data truncated ({size - data_at} < {lazy.nbytes} bytes)")
    return lazy


def _read_spans(path: str, wanted: list[tuple[int, int, str]]) -> dict[str, memoryview]:
    """{name: its bytes} for ``(offset, size, name)`` ranges of one shard, sorted by offset; ranges
    less than ``SPAN_GAP`` apart share one ``pread`` (one Range request remotely); each name's bytes
    are a zero-copy slice of its read."""
    out: dict[str, memoryview] = {}
    with shard_io.open_shard(path) as shard:
        i = 0
        while i < len(wanted):
            start, j = wanted[i][0], i
            end = start + wanted[i][1]
            while j + 1 < len(wanted) and wanted[j + 1][0] - end <= SPAN_GAP:
                j += 1
                end = max(end, wanted[j][0] + wanted[j][1])
            blob = memoryview(shard.pread(start, end - start))
            for offset, size, name in wanted[i : j + 1]:
                out[name] = blob[offset - start : offset - start + size]
            i = j + 1
    return out


class CompressedNpy:
    """A ``.npy.zst`` / ``.npy.gz`` volume member held compressed, header already parsed.

    ``collate_samples`` decompresses it straight into the batch tensor (shared memory inside a
    DataLoader worker), instead of into a fresh buffer that is then copied: one pass over the
    decompressed bytes instead of three. Data errors past the header, and a CRC32 mismatch of
    the compressed bytes (checked there, before decompressing), surface as
    ``CorruptVolumeError`` and the sample is replaced (see ``TrainBatches``).
    """

    __slots__ = ("data", "suffix", "shape", "dtype", "fortran", "data_at", "crc", "where")

    def __init__(self, data: bytes, suffix: str, crc: int | None = None, where: str = ""):
        self.data, self.suffix = data, suffix
        self.crc, self.where = crc, where  # expected CRC32 of ``data`` (None: not verified)
        with self._reader() as reader:
            head = _read_up_to(reader, 4096)
        shape, fortran, dtype, data_at = _npy_header(head)
        if dtype.hasobject:
            raise CorruptMemberError(f"{where}: object arrays are refused (would need pickle)")
        self.shape, self.dtype, self.fortran, self.data_at = tuple(shape), dtype, fortran, data_at

    def _reader(self):
        if self.suffix == ".zst":
            import zstandard

            return zstandard.ZstdDecompressor().stream_reader(self.data)
        try:
            from isal import igzip

            return igzip.IGzipFile(fileobj=io.BytesIO(self.data))
        except ImportError:
            return gzip.GzipFile(fileobj=io.BytesIO(self.data))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def verify(self) -> None:
        """Raise ``CorruptMemberError`` if the compressed bytes fail their CRC32 (checked once)."""
        if self.crc is None:
            return
        found = crc32(self.data)
        if found != self.crc:
            raise CorruptMemberError(f"{self.where}: crc32 {found} != {self.crc} in meta.json")
        self.crc = None

    def read_into(self, out: np.ndarray) -> None:
        self.verify()
        target = memoryview(out.reshape(-1).view(np.uint8))
        with self._reader() as reader:
            _read_up_to(reader, self.data_at)  # skip the header
            done = 0
            while done < self.nbytes:
                n = reader.readinto(target[done:])
                if not n:
                    raise CorruptMemberError(f"compressed npy ends after {done} of {self.nbytes} bytes")
                done += n
        if self.fortran:
            out[...] = out.reshape(-1).reshape(self.shape[::-1]).T

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        self.read_into(out)
        return out if dtype is None else out.astype(dtype)


def _read_up_to(reader, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = reader.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class CorruptVolumeError(CorruptMemberError):
    """A volume failed while being written into its batch slot ``index``."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def decode_sample(
    ref: SampleRef, expect: ShardExpectation, tokenizer: dict[str, str], meta_crcs: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Read, verify and decode one sample; raises CorruptMemberError or ShardMismatchError.

    Large uncompressed ``.npy`` members become ``LazyNpy`` (header parsed, data read later
    straight into the batch). The other members and those headers are fetched with one ``pread``
    per run of adjacent members (``_read_spans``: a volume's data between two members splits the
    run, so it is not read twice); each member is then a zero-copy slice of its read.

    Args:
        meta_crcs: the shard's ``meta_crc32`` from the index (``ShardInfo.meta_crc32``); None
            for a shard packed before checksums (then ``meta.json`` is not verified; its
            members still are if it lists their checksums).
    """
    where = f"{ref.shard} sample {ref.key}"
    sample: dict[str, Any] = {"__key__": ref.key, "__shard__": ref.shard}
    # Every member's bytes but the lazy volumes' data (only their npy header), in as few reads as
    # the tar order allows: a volume's data is never read here (it goes straight into the batch).
    lazy_names = {name for name, _, size in ref.members if _is_lazy(name, size)}
    blobs = _read_spans(ref.shard, sorted(
        (offset, min(size, NPY_HEAD_BYTES) if name in lazy_names else size, name) for name, offset, size in ref.members))
    meta, sums = _member_checksums(where, blobs.get(shards.META_MEMBER), ref, expect, tokenizer, meta_crcs)
    for name, offset, size in ref.members:
        field_name, base, suffix = split_member(name)
        data = blobs[name]
        try:
            if name in lazy_names:
                member = _lazy_member(ref.shard, name, offset, size, data)
                member.crc, member.where = sums.get(name), f"{where} {name}"
                sample[field_name] = member
                continue
            if field_name in LAZY_FIELDS and suffix and base.endswith(".npy"):
                # verified when it is decompressed into the batch
                sample[field_name] = CompressedNpy(data, suffix, sums.get(name), name)
                continue
        except CorruptMemberError:
            raise
        except Exception as exc:
            raise CorruptMemberError(f"{name}: {type(exc).__name__}: {exc}") from exc
        if name == shards.META_MEMBER and meta is not None:
            sample[field_name] = meta  # already parsed (and verified) by check_meta
            continue
        shards.check_member(name, data, sums)
        sample[field_name] = decode_member(name, data)
    missing = [m for m in REQUIRED_MEMBERS if m not in sample]
    if missing:
        raise CorruptMemberError(f"missing member(s) {missing}")
    meta = sample["meta"]
    if not isinstance(meta, dict):
        raise CorruptMemberError("meta.json is not an object")
    check_identity(f"{ref.shard} sample {ref.key}", meta, expect, tokenizer)
    return sample


def _member_checksums(
    where: str, raw_meta: memoryview | bytes | None, ref: SampleRef, expect: ShardExpectation,
    tokenizer: dict[str, str], meta_crcs: Mapping[str, int] | None,
) -> tuple[dict[str, Any] | None, dict[str, int]]:
    """Verify ``meta.json`` against the index; (the parsed meta, its {member: CRC32}), or
    (None, {}) when verification is off or there is no ``meta.json``.

    Raises CorruptMemberError when the sample cannot be trusted: ``meta.json`` fails the
    index's CRC32, or a schema member has no checksum although the shard was packed with them.
    A ``meta.json`` that fails its CRC32 but parses into another schema / tokenizer / patch
    grid raises ShardMismatchError instead: that is a shard from another build put in place of
    the listed one (a single flipped byte landing in exactly those fields reads the same; the
    run then stops with the file named rather than silently skipping a whole foreign shard).
    """
    if not expect.verify_checksums or raw_meta is None:
        return None, {}  # no meta.json: decode_sample reports the missing member
    names = [name for name, _, _ in ref.members]
    want = None if meta_crcs is None else meta_crcs.get(ref.key)
    try:
        meta, sums = shards.check_meta(raw_meta, names, want, recorded=meta_crcs is not None)
    except MetaChecksumError as exc:
        if exc.meta is not None:
            try:
                check_identity(where, exc.meta, expect, tokenizer)
            except ShardMismatchError as mismatch:
                raise ShardMismatchError(f"{mismatch} (its meta.json does not match the index's checksum either: "
                                         "was the shard replaced after index.json was written?)") from None
        raise
    return meta, sums
