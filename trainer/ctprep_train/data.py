"""Streaming WebDataset shards into training batches (the ``Batch`` of notes/plan.md).

Design, in the order data flows:

1. ``load_shard_index`` reads ``index.json`` through ``ctprep.shards`` (the one home of the
   shard format, shared with the writer) and refuses shards whose schema
   version, tokenizer identity or patch grid differ from what the trainer expects, naming the
   mismatch and the file. Every sample's ``meta.json`` is checked against the index again.
2. ``scan_tar`` walks a tar file's 512-byte headers (seek + small read per member, the data is
   not touched) and returns ``SampleRef``s: the sample key plus (offset, size) of each member.
   Member data is later read with one ``pread`` of exactly its size. Stock WebDataset streams
   through ``tarfile`` with small reads and reached ~11% of ``cat`` speed on 100 MB members;
   reading by offset keeps the WebDataset tar format and runs at raw-read speed.
3. Shard order is shuffled with one seed shared by every rank *before* the list is split by
   (rank, worker) slot; each slot cycles over its shards forever, reshuffled per pass. The
   trainer takes a fixed number of batches per epoch on every rank, so ranks with fewer or
   smaller shards simply start their next pass: equal step counts, no hang.
4. A small shuffle buffer mixes ``SampleRef``s (a few bytes each); a sample is decoded only
   when it leaves the buffer, so the buffer costs no volume memory.
5. Several sources are mixed by weight at the *batch* level: a batch holds one source only
   (CT-RATE volumes and OmniAbnorm slabs have different shapes). The source of global batch k
   is drawn from a generator seeded by (seed, k), so all ranks and workers agree on it and a
   resumed run replays the same sequence.
6. A member that cannot be read or decoded makes its sample be skipped and counted (reported
   per batch under ``BATCH_STATS_KEY``, which the trainer pops before the model sees the
   batch); a shard whose tar headers are corrupt is read up to the corruption. Never pickle:
   ``.npy`` headers are parsed with ``numpy.lib.format`` and object dtypes are refused.
7. Verified reads (docs/verified-reads.md): a sample's ``meta.json`` is checked against the
   CRC32 its shard's index entry holds (``meta_crc32``), every other member against the CRC32
   ``meta.json`` holds (``crc32``) - ``ctprep.shards.check_meta`` / ``check_member``, the checks
   ``ctprep.stages.pack.check_index`` runs too - each where its bytes are read: small members in
   ``decode_sample``, compressed volumes before they are decompressed into the batch,
   uncompressed volumes after ``preadv`` put them there. A mismatch is a corrupt member (6.).
   A shard whose index entry has no ``meta_crc32`` was packed before checksums: its samples
   are read unverified, with one warning per shard.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import random
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ctprep import schema, shards
from ctprep.shards import (
    CHECKSUM_KEY,
    INDEX_CHECKSUM_KEY,
    CorruptMemberError,
    MetaChecksumError,
    ShardMismatchError,
    crc32,
    decode_member,
    decode_npy,
    member_field,
)
from ctprep.shards import npy_header as _npy_header

log = logging.getLogger(__name__)

BATCH_STATS_KEY = "_stream"  # per-batch loader statistics; popped by the trainer
TAR_BLOCK = 512


# --------------------------------------------------------------------------- index


@dataclass(frozen=True)
class ShardInfo:
    path: str  # absolute path of the tar
    samples: int
    source: str
    bytes: int = 0
    # sample key -> CRC32 of its meta.json, from the index; None: packed before checksums
    meta_crc32: Mapping[str, int] | None = field(default=None, compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class ShardExpectation:
    """What the trainer requires of the shards it reads."""

    schema_version: int = schema.SCHEMA_VERSION
    tokenizer: dict[str, str] | None = None  # None: accept the index's tokenizer
    patch_size: tuple[int, int, int] = (4, 16, 16)
    verify_checksums: bool = True  # False only to measure what verification costs (bench/loader.py)


@dataclass
class ShardIndex:
    root: Path
    raw: dict[str, Any]

    @property
    def tokenizer(self) -> dict[str, str]:
        return dict(self.raw["tokenizer"])

    @property
    def region_names(self) -> list[str]:
        return list(self.raw.get("region_names", []))

    def shards(self, split: str, sources: Sequence[str] | None = None) -> dict[str, list[ShardInfo]]:
        """Shards of ``split`` grouped by source (only ``sources`` if given, in that order)."""
        entries = self.raw.get("splits", {}).get(split)
        if entries is None:
            raise ShardMismatchError(
                f"{self.root / schema.INDEX_FILE}: no split '{split}' (has {sorted(self.raw.get('splits', {}))})"
            )
        grouped: dict[str, list[ShardInfo]] = {}
        for entry in entries:
            info = ShardInfo(
                path=str((self.root / entry["path"]).resolve()),
                samples=int(entry["samples"]),
                source=str(entry.get("source", "ctrate")),
                bytes=int(entry.get("bytes", 0)),
                meta_crc32=shards.index_meta_crcs(entry),
            )
            grouped.setdefault(info.source, []).append(info)
        if sources is None:
            return grouped
        missing = [s for s in sources if s not in grouped]
        if missing:
            raise ShardMismatchError(
                f"{self.root / schema.INDEX_FILE}: split '{split}' has no shards of source(s) {missing} "
                f"(has {sorted(grouped)}); set its weight to 0 in data.sources to train without it"
            )
        return {s: grouped[s] for s in sources}


def warn_unverified(shard: ShardInfo) -> None:
    """One warning for a shard whose samples cannot be verified (packed before checksums)."""
    log.warning("%s: its index entry has no %s (packed before per-sample checksums): its samples are read "
                "unverified; rebuild the shards with this ctprep version to verify them", shard.path,
                INDEX_CHECKSUM_KEY)


def _check_identity(where: str, found: dict[str, Any], exp: ShardExpectation, tokenizer: dict | None) -> None:
    shards.check_schema_version(where, found.get("schema_version"), exp.schema_version)
    tok = found.get("tokenizer")
    want = tokenizer if tokenizer is not None else exp.tokenizer
    if want is not None and (
        not isinstance(tok, dict) or tok.get("name") != want.get("name") or tok.get("hash") != want.get("hash")
    ):
        raise ShardMismatchError(
            f"{where}: tokenizer {tok} != expected {want}; the token ids would not match the text "
            "encoder's vocabulary. Rebuild the shards with the model's tokenizer or pick a matching config"
        )
    patch = found.get("patch_size")
    if patch is None or [int(p) for p in patch] != [int(p) for p in exp.patch_size]:
        raise ShardMismatchError(
            f"{where}: patch_size {patch} != data.patch_size {list(exp.patch_size)}; regions.npy rows "
            "would not line up with the model's patch grid"
        )


def load_shard_index(root: str | Path, expect: ShardExpectation) -> ShardIndex:
    """Read ``root/index.json`` and refuse it if it does not match ``expect``."""
    root = Path(root)
    raw = shards.read_index(root, expect.schema_version)
    _check_identity(str(root / schema.INDEX_FILE), raw, expect, None)
    return ShardIndex(root=root, raw=raw)


# --------------------------------------------------------------------------- tar by offset


@dataclass(frozen=True)
class SampleRef:
    shard: str
    key: str
    members: tuple[tuple[str, int, int], ...]  # (member name without key, data offset, size)


def _tar_int(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        value = int.from_bytes(field_bytes[1:], "big")
        return value
    text = field_bytes.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _tar_checksum_ok(header: bytes) -> bool:
    stored = _tar_int(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored == unsigned


def _pax_path(data: bytes) -> str | None:
    # records: "<len> key=value\n"
    pos = 0
    path = None
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def scan_tar(path: str) -> tuple[list[SampleRef], str | None]:
    """List the samples of a WebDataset tar by reading headers only.

    Returns the samples found and, if the tar is damaged (bad header checksum, truncated
    member), a reason string; the samples before the damage are still returned.
    """
    refs: list[SampleRef] = []
    current_key: str | None = None
    members: list[tuple[str, int, int]] = []
    error: str | None = None
    long_name: str | None = None

    def flush() -> None:
        if current_key is not None and members:
            refs.append(SampleRef(path, current_key, tuple(members)))

    fd = os.open(path, os.O_RDONLY)
    try:
        file_size = os.fstat(fd).st_size
        pos = 0
        while pos + TAR_BLOCK <= file_size:
            header = os.pread(fd, TAR_BLOCK, pos)
            if header.count(0) == TAR_BLOCK:
                break  # end-of-archive marker
            if not _tar_checksum_ok(header):
                error = f"bad tar header checksum at byte {pos}"
                break
            size = _tar_int(header[124:136])
            kind = header[156:157]
            data_at = pos + TAR_BLOCK
            if data_at + size > file_size:
                error = f"truncated member at byte {pos} ({size} bytes declared, {file_size - data_at} left)"
                break
            pos = data_at + -(-size // TAR_BLOCK) * TAR_BLOCK
            if kind in (b"L", b"x"):  # GNU long name / pax extended header for the next member
                data = os.pread(fd, size, data_at)
                long_name = data.rstrip(b"\0").decode("utf-8") if kind == b"L" else _pax_path(data)
                continue
            if kind not in (b"0", b"\0", b"7"):
                long_name = None
                continue  # directories, global pax headers, links: not sample members
            name = long_name
            long_name = None
            if name is None:
                name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[257:262] == b"ustar" else ""
                if prefix:
                    name = f"{prefix}/{name}"
            directory, _, base = name.rpartition("/")
            if "." not in base:
                continue
            stem, member = base.split(".", 1)
            key = f"{directory}/{stem}" if directory else stem
            if key != current_key:
                flush()
                current_key, members = key, []
            members.append((member, data_at, size))
        flush()
    finally:
        os.close(fd)
    return refs, error


def read_member(path: str, offset: int, size: int) -> bytes:
    """One read of exactly ``size`` bytes at ``offset`` (the large-read path)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
        while len(data) < size:  # pread may return short on some filesystems
            more = os.pread(fd, size - len(data), offset + len(data))
            if not more:
                raise CorruptMemberError(f"{path}: short read at {offset}")
            data += more
        return data
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- decoding

REQUIRED_MEMBERS = (*schema.NPY_MEMBERS, member_field(shards.META_MEMBER))


LAZY_MIN_BYTES = 1 << 20  # uncompressed volume members above this are read straight into the batch
LAZY_FIELDS = ("image", "mask")  # the (Z, Y, X) volumes; everything else is small


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
        """Fill the C-contiguous ``out`` (same shape) from the file, then verify it."""
        _pread_into(self.path, self.offset, memoryview(out.reshape(-1).view(np.uint8)))
        self.verify(out)
        if self.fortran:  # rare: stored column-major; reorder in place via a copy
            out[...] = out.reshape(-1).reshape(self.shape[::-1]).T

    def verify(self, out: np.ndarray) -> None:
        """Raise ``CorruptMemberError`` if the bytes read into ``out`` (stored order) fail the CRC32."""
        if self.crc is None:
            return
        found = crc32(out.reshape(-1).view(np.uint8), self.head_crc)
        if found != self.crc:
            raise CorruptMemberError(f"{self.where}: crc32 {found} != {self.crc} in meta.json")

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        self.read_into(out)
        return out if dtype is None else out.astype(dtype)


def _lazy_member(path: str, name: str, offset: int, size: int) -> LazyNpy | None:
    if not name.endswith(".npy") or size < LAZY_MIN_BYTES:
        return None
    head = read_member(path, offset, min(size, 4096))
    shape, fortran, dtype, data_at = _npy_header(head)
    if dtype.hasobject:
        raise CorruptMemberError(f"{name}: object arrays are refused (would need pickle)")
    lazy = LazyNpy(path, offset + data_at, tuple(shape), dtype, fortran, head_crc=crc32(head[:data_at]))
    if data_at + lazy.nbytes > size:
        raise CorruptMemberError(f"{name}: npy data truncated ({size - data_at} < {lazy.nbytes} bytes)")
    return lazy



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
            raise CorruptMemberError("object arrays are refused (would need pickle)")
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
    straight into the batch). The other members are contiguous in the tar and are fetched with
    one ``pread``; each is then a zero-copy slice of it.

    Args:
        meta_crcs: the shard's ``meta_crc32`` from the index (``ShardInfo.meta_crc32``); None
            for a shard packed before checksums (then ``meta.json`` is not verified; its
            members still are if it lists their checksums).
    """
    where = f"{ref.shard} sample {ref.key}"
    sample: dict[str, Any] = {"__key__": ref.key, "__shard__": ref.shard}
    lazy: dict[str, LazyNpy] = {}  # member name -> volume read later
    small = []
    for name, offset, size in ref.members:
        field_name = member_field(name)
        try:
            member = _lazy_member(ref.shard, name, offset, size) if field_name in LAZY_FIELDS else None
        except CorruptMemberError:
            raise
        except Exception as exc:
            raise CorruptMemberError(f"{name}: {type(exc).__name__}: {exc}") from exc
        if member is not None:
            lazy[name], sample[field_name] = member, member
        else:
            small.append((field_name, name, offset, size))
    blobs: dict[str, memoryview] = {}
    if small:
        start = min(offset for _, _, offset, _ in small)
        end = max(offset + size for _, _, offset, size in small)
        blob = memoryview(read_member(ref.shard, start, end - start))
        blobs = {name: blob[offset - start : offset - start + size] for _, name, offset, size in small}
    sums = _member_checksums(where, blobs.get(shards.META_MEMBER), ref, expect, tokenizer, meta_crcs)
    for name, member in lazy.items():
        member.crc, member.where = sums.get(name), f"{where} {name}"
    for field_name, name, offset, size in small:
        data = blobs[name]
        base, suffix = schema.strip_compression(name)
        if field_name in LAZY_FIELDS and suffix and base.endswith(".npy"):
            try:  # verified when it is decompressed into the batch
                sample[field_name] = CompressedNpy(bytes(data), suffix, sums.get(name), name)
            except CorruptMemberError:
                raise
            except Exception as exc:
                raise CorruptMemberError(f"{name}: {type(exc).__name__}: {exc}") from exc
            continue
        shards.check_member(name, data, sums)
        sample[field_name] = decode_member(name, data)
    missing = [m for m in REQUIRED_MEMBERS if m not in sample]
    if missing:
        raise CorruptMemberError(f"missing member(s) {missing}")
    meta = sample["meta"]
    if not isinstance(meta, dict):
        raise CorruptMemberError("meta.json is not an object")
    _check_identity(f"{ref.shard} sample {ref.key}", meta, expect, tokenizer)
    return sample


def _member_checksums(
    where: str, raw_meta: memoryview | bytes | None, ref: SampleRef, expect: ShardExpectation,
    tokenizer: dict[str, str], meta_crcs: Mapping[str, int] | None,
) -> dict[str, int]:
    """Verify ``meta.json`` against the index and return its {member: CRC32} ({}: nothing to verify).

    Raises CorruptMemberError when the sample cannot be trusted: ``meta.json`` fails the
    index's CRC32, or a schema member has no checksum although the shard was packed with them.
    A ``meta.json`` that fails its CRC32 but parses into another schema / tokenizer / patch
    grid raises ShardMismatchError instead: that is a shard from another build put in place of
    the listed one (a single flipped byte landing in exactly those fields reads the same; the
    run then stops with the file named rather than silently skipping a whole foreign shard).
    """
    if not expect.verify_checksums or raw_meta is None:
        return {}  # no meta.json: decode_sample reports the missing member
    names = [name for name, _, _ in ref.members]
    want = None if meta_crcs is None else meta_crcs.get(ref.key)
    try:
        _, sums = shards.check_meta(raw_meta, names, want, recorded=meta_crcs is not None)
    except MetaChecksumError as exc:
        if exc.meta is not None:
            try:
                _check_identity(where, exc.meta, expect, tokenizer)
            except ShardMismatchError as mismatch:
                raise ShardMismatchError(f"{mismatch} (its meta.json does not match the index's checksum either: "
                                         "was the shard replaced after index.json was written?)") from None
        raise
    return sums


# --------------------------------------------------------------------------- collate


def _pad_stack(arrays: list[np.ndarray], shape: tuple[int, ...], fill: int, dtype) -> np.ndarray:
    out = np.full((len(arrays), *shape), fill, dtype=dtype)
    for i, a in enumerate(arrays):
        out[(i, *tuple(slice(0, n) for n in a.shape))] = a
    return out


def _lengths_to_mask(lengths: np.ndarray, width: int) -> np.ndarray:
    return np.arange(width) < lengths[..., None]


@dataclass
class LazyVolumes:
    """A batch's volumes still in the tar: (path, offset) per sample, read by ``BatchLoader``.

    DataLoader workers hand batches to the trainer process through shared memory, which costs
    a fresh shared mapping, its page faults and one more copy per volume; a worker therefore
    sends only where the bytes are, and the trainer process reads them with one ``preadv``
    per volume straight into the (pinned) batch tensor, in a background thread (preadv releases
    the GIL).
    """

    parts: list[LazyNpy]
    dtype: torch.dtype

    def materialize(
        self, pin: bool = False, pool: BufferPool | None = None, executor: Executor | None = None,
        failed: dict[int, str] | None = None,
    ) -> torch.Tensor:
        """The stacked batch tensor; with ``executor``, read in ``READ_CHUNK`` pieces in parallel.

        A volume that cannot be read (the shard was truncated or changed after it was scanned)
        raises ``CorruptMemberError``, or, with ``failed``, is recorded there as
        ``{batch index: message}`` and its slot left unspecified (``BatchLoader`` replaces the row).
        """
        shape = (len(self.parts), *self.parts[0].shape)
        if pool is not None and not pin:
            out = pool.take(shape, self.dtype)
        else:
            out = torch.empty(shape, dtype=self.dtype, pin_memory=pin)
        view = out.numpy()
        jobs: list[tuple[int, Any]] = []
        if executor is None:
            for i, part in enumerate(self.parts):
                jobs.append((i, lambda part=part, i=i: part.read_into(view[i])))  # reads, then verifies
        else:
            for i, part in enumerate(self.parts):
                target = memoryview(view[i].reshape(-1).view(np.uint8))
                jobs += [(i, executor.submit(_read_chunk, part, target, start))
                         for start in range(0, part.nbytes, READ_CHUNK)]
        bad = self._run(jobs, failed)
        if executor is not None:  # whole volumes read: verify them (CRC32 releases the GIL)
            checks = [(i, executor.submit(part.verify, view[i])) for i, part in enumerate(self.parts)
                      if part.crc is not None and i not in bad]
            self._run(checks, failed)
        return out

    @staticmethod
    def _run(jobs: list[tuple[int, Any]], failed: dict[int, str] | None) -> set[int]:
        """Run / await the jobs; batch indices that failed (recorded in ``failed``, or raised)."""
        bad: set[int] = set()
        for i, job in jobs:
            try:
                job() if callable(job) else job.result()
            except (CorruptMemberError, OSError) as exc:
                if failed is None:
                    raise
                failed.setdefault(i, f"{type(exc).__name__}: {exc}")
                bad.add(i)
        return bad


READ_CHUNK = 4 << 20  # bytes per parallel read: small enough to balance threads, large enough to stream


def _read_chunk(part: LazyNpy, target: memoryview, start: int) -> None:
    """Copy bytes [start, start + READ_CHUNK) of ``part``'s data into the same range of ``target``."""
    end = min(start + READ_CHUNK, part.nbytes)
    _pread_into(part.path, part.offset + start, target[start:end])


def _pread_into(path: str, offset: int, target: memoryview) -> None:
    """Fill ``target`` with the file's bytes from ``offset`` (preadv: no Python buffer, GIL released)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(target):
            n = os.preadv(fd, [target[done:]], offset + done)
            if n <= 0:
                raise CorruptMemberError(f"{path}: short read at {offset + done}")
            done += n
    finally:
        os.close(fd)


class BufferPool:
    """Reuse CPU batch buffers once nothing references them any more.

    Fresh anonymous memory has to be zeroed and faulted in by the kernel, which costs about as
    much as the read itself for tens of MB per batch. A pooled tensor is handed out again only
    when its Python object and its storage are referenced by the pool alone (no batch, view or
    copy-in-flight holds it). Pinned (CUDA) buffers are not pooled here: torch's caching host
    allocator already reuses them and tracks pending device copies.
    """

    def __init__(self, max_per_shape: int = 8) -> None:
        self.max_per_shape = max_per_shape
        self._free: dict[tuple, list[torch.Tensor]] = {}

    @staticmethod
    def _unused(t: torch.Tensor) -> bool:
        # refs: the pool's list, take()'s loop variable, this argument, getrefcount's argument;
        # storage use count: t itself + the temporary storage wrapper
        return sys.getrefcount(t) <= 4 and torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensors = self._free.setdefault((shape, dtype), [])
        for t in tensors:
            if self._unused(t):
                return t
        t = torch.empty(shape, dtype=dtype)
        if len(tensors) < self.max_per_shape:
            tensors.append(t)
        return t


def _stack_volumes(arrays: list[np.ndarray | LazyNpy], dtype: torch.dtype) -> torch.Tensor | LazyVolumes:
    """Stack same-shape volumes (one copy), or defer uncompressed ones as ``LazyVolumes``."""
    shape = tuple(arrays[0].shape)
    for array in arrays:
        if tuple(array.shape) != shape:
            raise ValueError(f"volume shapes differ within a batch: {tuple(array.shape)} vs {shape}")
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    if all(isinstance(a, LazyNpy) and a.dtype == np_dtype and not a.fortran for a in arrays):
        return LazyVolumes(list(arrays), dtype)
    full = (len(arrays), *shape)
    if get_worker_info() is not None:  # allocate in shared memory: the hand-over then copies nothing
        nbytes = int(np.prod(full)) * torch.empty((), dtype=dtype).element_size()
        out = torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, full)
    else:
        out = torch.empty(full, dtype=dtype)
    view = out.numpy()
    for i, array in enumerate(arrays):
        try:
            if isinstance(array, (LazyNpy, CompressedNpy)) and array.dtype == view.dtype:
                array.read_into(view[i])
            else:
                view[i] = np.asarray(array)
        except Exception as exc:
            raise CorruptVolumeError(i, f"volume {i} of the batch: {type(exc).__name__}: {exc}") from exc
    return out


def collate_samples(samples: list[dict[str, Any]], *, small_as_numpy: bool = False) -> dict[str, Any]:
    """Stack decoded samples into the ``Batch`` of notes/plan.md (Trainer <-> model contract).

    Token ids are int32 in shards and int64 in the batch; lengths become bool attention
    masks. ``small_as_numpy`` keeps the small arrays as numpy (the streaming datasets use it:
    a DataLoader worker pickles numpy inline, while each torch tensor would cost a shared-memory
    segment and a file descriptor; ``BatchLoader`` turns them into tensors). ``S`` (steps) is the largest step count in the batch, at least 1, so that a batch of
    step-less cases still has a valid (all-False) ``steps_valid``.
    """
    n = len(samples)
    image = _stack_volumes([s["image"] for s in samples], torch.int16)
    mask = _stack_volumes([s["mask"] for s in samples], torch.uint8)
    regions = np.stack([s["regions"] for s in samples])

    report_l = max(s["report_ids"].shape[0] for s in samples)
    report_ids = _pad_stack([s["report_ids"] for s in samples], (report_l,), 0, np.int64)
    report_len = np.array([int(s["report_len"]) for s in samples])

    steps_s = max(1, max(s["steps_ids"].shape[0] for s in samples))
    steps_l = max(max(s["steps_ids"].shape[1] for s in samples), 1)
    steps_ids = _pad_stack([s["steps_ids"] for s in samples], (steps_s, steps_l), 0, np.int64)
    steps_len = _pad_stack([s["steps_len"].reshape(-1) for s in samples], (steps_s,), 0, np.int64)
    steps_valid = np.zeros((n, steps_s), dtype=bool)
    step_regions = np.full((n, steps_s), -1, dtype=np.int64)
    for i, s in enumerate(samples):
        k = s["steps_ids"].shape[0]
        steps_valid[i, :k] = True
        regs = list(s["meta"].get("step_regions", []))[:k]
        step_regions[i, : len(regs)] = regs

    region_r = max(s["region_text_ids"].shape[0] for s in samples)
    region_l = max(s["region_text_ids"].shape[1] for s in samples)
    region_ids = _pad_stack([s["region_text_ids"] for s in samples], (region_r, region_l), 0, np.int64)
    region_len = _pad_stack([s["region_text_len"].reshape(-1) for s in samples], (region_r,), 0, np.int64)
    region_has = _pad_stack([s["region_has_text"].reshape(-1) for s in samples], (region_r,), 0, np.uint8)
    # A case packed without an anatomy mask has no region evidence: its region sentences
    # must not become anchors of the region <-> text loss.
    region_has[[not s["meta"].get("has_mask", True) for s in samples]] = 0

    labels = np.stack([s["labels"].astype(np.int64) for s in samples])
    small = {
        "regions": regions,
        "report_ids": report_ids,
        "report_attn": _lengths_to_mask(report_len, report_l),
        "steps_ids": steps_ids,
        "steps_attn": _lengths_to_mask(steps_len, steps_l) & steps_valid[..., None],
        "steps_valid": steps_valid,
        "region_text_ids": region_ids,
        "region_text_attn": _lengths_to_mask(region_len, region_l),
        "region_has_text": region_has.astype(bool),
        "labels": labels,
        "step_regions": step_regions,
    }
    if not small_as_numpy:
        small = {k: torch.from_numpy(v) for k, v in small.items()}
    return {
        "image": image,
        "mask": mask,
        **small,
        "ids": [s["__key__"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


# --------------------------------------------------------------------------- sample streams


def shuffled_shards(shards: Sequence[ShardInfo], seed: int, source: str, epoch: int) -> list[ShardInfo]:
    """The shard order of one pass; identical on every rank and worker (shared seed)."""
    order = sorted(shards, key=lambda s: s.path)
    random.Random(f"{seed}/{source}/{epoch}").shuffle(order)
    return order


def slot_shards(order: Sequence[ShardInfo], slot: int, num_slots: int) -> list[ShardInfo]:
    """Split a (shuffled) shard list by (rank, worker) slot.

    With fewer shards than slots, a slot reuses shard ``slot % len`` rather than idling, so
    every rank can always produce batches; a warning says the shards should be smaller.
    """
    mine = list(order[slot::num_slots])
    return mine or [order[slot % len(order)]]


class _Counter:
    def __init__(self) -> None:
        self.corrupt = 0

    def take(self) -> int:
        n, self.corrupt = self.corrupt, 0
        return n


class SourceStream:
    """Endless, deterministic stream of decoded samples of one source for one (rank, worker) slot."""

    def __init__(
        self,
        source: str,
        shards: Sequence[ShardInfo],
        *,
        seed: int,
        slot: int,
        num_slots: int,
        buffer_size: int,
        expect: ShardExpectation,
        tokenizer: dict[str, str],
        counter: _Counter,
    ) -> None:
        if not shards:
            raise ValueError(f"source '{source}' has no shards")
        if len(shards) < num_slots and slot == 0:
            log.warning(
                "source '%s': %d shard(s) for %d rank x worker slots; some slots re-read the same "
                "shard in a pass (write smaller shards for better mixing)", source, len(shards), num_slots,
            )
        self.source, self.shards, self.seed = source, list(shards), seed
        self.slot, self.num_slots = slot, num_slots
        self.expect, self.tokenizer, self.counter = expect, tokenizer, counter
        self.rng = random.Random(f"{seed}/{source}/buffer/{slot}")
        self.buffer_size = max(1, buffer_size)
        self._scanned: dict[str, list[SampleRef]] = {}  # shard -> its samples (offsets only)
        self._by_path = {s.path: s for s in self.shards}
        self._refs = self._buffered(self._refs_forever())

    def _refs_forever(self) -> Iterator[SampleRef]:
        epoch = 0
        while True:
            produced = 0
            for shard in slot_shards(shuffled_shards(self.shards, self.seed, self.source, epoch), self.slot, self.num_slots):
                if shard.path in self._scanned:  # later passes: headers already known
                    refs, error = self._scanned[shard.path], None
                else:
                    try:
                        refs, error = scan_tar(shard.path)
                    except OSError as exc:
                        refs, error = [], f"{type(exc).__name__}: {exc}"
                    self._scanned[shard.path] = refs
                    if shard.meta_crc32 is None and self.expect.verify_checksums:
                        warn_unverified(shard)
                if error:
                    self.counter.corrupt += 1
                    log.warning("%s: %s; reading the %d sample(s) before it", shard.path, error, len(refs))
                produced += len(refs)
                yield from refs
            if produced == 0:
                raise RuntimeError(f"source '{self.source}': no readable sample in shards of slot {self.slot}")
            epoch += 1
            yield None  # end of this slot's pass: the buffer must not carry it into the next one

    def _buffered(self, refs: Iterator[SampleRef | None]) -> Iterator[SampleRef]:
        # The buffer is drained at every pass boundary (the None marker); otherwise the
        # tail of pass e would mix with pass e+1 and one epoch would repeat some samples
        # and miss others.
        buf: list[SampleRef] = []
        for ref in refs:
            if ref is not None:
                buf.append(ref)
                if len(buf) < self.buffer_size:
                    continue
            while buf:
                i = self.rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
                if ref is not None:
                    break

    def skip(self, n_samples: int) -> None:
        """Advance without decoding (resume): only tar headers of the skipped shards are read."""
        for _ in range(n_samples):
            next(self._refs)

    def next_sample(self) -> dict[str, Any]:
        failures = 0
        while True:
            ref = next(self._refs)
            try:
                return decode_sample(ref, self.expect, self.tokenizer, self._by_path[ref.shard].meta_crc32)
            except (CorruptMemberError, OSError) as exc:
                self.counter.corrupt += 1
                log.warning("skipping corrupt sample %s in %s: %s", ref.key, ref.shard, exc)
                failures += 1
                # More failures in a row than samples in this slot's shards: a whole pass is damaged.
                if failures > sum(len(refs) for refs in self._scanned.values()):
                    raise RuntimeError(f"source '{self.source}': no readable sample in the shards of slot "
                                       f"{self.slot} ({failures} damaged in a row; last: {exc})") from exc

    def next_batch(self, batch_size: int) -> list[dict[str, Any]]:
        return [self.next_sample() for _ in range(batch_size)]


class SourceSchedule:
    """Which source global batch ``k`` comes from; the same on every rank and worker."""

    BLOCK = 4096

    def __init__(self, weights: dict[str, float], seed: int) -> None:
        self.names = [n for n, w in weights.items() if w > 0]
        total = sum(weights[n] for n in self.names)
        self.p = np.array([weights[n] / total for n in self.names])
        self.seed = seed
        self._cache: tuple[int, np.ndarray] | None = None

    def _block(self, b: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != b:
            rng = np.random.default_rng([self.seed, b])
            self._cache = (b, rng.choice(len(self.names), size=self.BLOCK, p=self.p))
        return self._cache[1]

    def __call__(self, k: int) -> str:
        if len(self.names) == 1:
            return self.names[0]
        return self.names[int(self._block(k // self.BLOCK)[k % self.BLOCK])]


class TrainBatches(IterableDataset):
    """Endless batches for one rank; DataLoader workers take global batches k = w, w+W, ...

    Args:
        shards: source -> shard list (the whole split, not pre-split by rank).
        weights: source -> sampling weight.
        start_batch: micro-batches this rank already consumed (resume position).
    """

    def __init__(
        self,
        shards: dict[str, list[ShardInfo]],
        weights: dict[str, float],
        *,
        batch_size: int,
        buffer_size: int,
        seed: int,
        rank: int,
        world_size: int,
        expect: ShardExpectation,
        tokenizer: dict[str, str],
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        self.shards, self.schedule = shards, SourceSchedule(weights, seed)
        self.batch_size, self.buffer_size, self.seed = batch_size, buffer_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.expect, self.tokenizer = expect, tokenizer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slot, num_slots = self.rank * workers + worker, self.world_size * workers
        counter = _Counter()
        streams = {
            name: SourceStream(
                name, self.shards[name], seed=self.seed, slot=slot, num_slots=num_slots,
                buffer_size=self.buffer_size, expect=self.expect, tokenizer=self.tokenizer, counter=counter,
            )
            for name in self.schedule.names
        }
        # Resume: replay the source schedule of the batches this worker already produced.
        for k in range(worker, self.start_batch, workers):
            streams[self.schedule(k)].skip(self.batch_size)
        k = self.start_batch + (worker - self.start_batch) % workers
        while True:
            source = self.schedule(k)
            samples = streams[source].next_batch(self.batch_size)
            while True:
                try:
                    batch = collate_samples(samples, small_as_numpy=True)
                    break
                except CorruptVolumeError as exc:  # found only while decompressing into the batch
                    counter.corrupt += 1
                    bad = samples[exc.index]
                    log.warning("skipping corrupt sample %s in %s: %s", bad["__key__"], bad.get("__shard__"), exc)
                    samples[exc.index] = streams[source].next_sample()
            batch[BATCH_STATS_KEY] = {"corrupt": counter.take(), "source": source, "batch": k}
            yield batch
            k += workers


class ValidBatches(IterableDataset):
    """Every validation sample once over all ranks, equal batch counts per rank.

    Samples are grouped by source and each source's list is padded (wrapping) to a multiple of
    ``world_size`` before being split by rank, so all ranks run the same number of forward
    passes (ZeRO-3 needs every rank in every forward). Batches carry the sample's position in
    the validation list so gathered embeddings can be de-duplicated.
    """

    def __init__(
        self,
        shards: dict[str, list[ShardInfo]],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        expect: ShardExpectation,
        tokenizer: dict[str, str],
        max_samples: int = 0,
    ) -> None:
        super().__init__()
        self.shards, self.batch_size = shards, batch_size
        self.rank, self.world_size = rank, world_size
        self.expect, self.tokenizer, self.max_samples = expect, tokenizer, max_samples
        self._warned: set[str] = set()  # shards already reported unverified (validation runs repeat)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        position = 0
        counter = _Counter()
        for name, shard_list in self.shards.items():
            refs: list[SampleRef] = []
            crcs = {shard.path: shard.meta_crc32 for shard in shard_list}
            for shard in sorted(shard_list, key=lambda s: s.path):
                found, error = scan_tar(shard.path)
                if error:
                    counter.corrupt += 1
                    log.warning("%s: %s", shard.path, error)
                if shard.meta_crc32 is None and self.expect.verify_checksums and shard.path not in self._warned:
                    self._warned.add(shard.path)
                    warn_unverified(shard)
                refs.extend(found)
            if self.max_samples:
                refs = refs[: max(0, self.max_samples - position)]
            if not refs:
                continue
            positions = list(range(position, position + len(refs)))
            position += len(refs)
            pad = (-len(refs)) % self.world_size
            refs, positions = refs + refs[:pad], positions + positions[:pad]
            mine = list(zip(refs[self.rank :: self.world_size], positions[self.rank :: self.world_size]))
            for start in range(0, len(mine), self.batch_size):
                chunk = mine[start : start + self.batch_size]
                samples, kept = [], []
                for ref, pos in chunk:
                    try:
                        samples.append(decode_sample(ref, self.expect, self.tokenizer, crcs[ref.shard]))
                        kept.append(pos)
                    except (CorruptMemberError, OSError) as exc:
                        counter.corrupt += 1
                        log.warning("skipping corrupt sample %s in %s: %s", ref.key, ref.shard, exc)
                if not samples:  # an empty batch would desynchronise ranks: stop loudly
                    raise RuntimeError(f"validation batch of source '{name}' has no readable sample")
                while True:
                    try:
                        batch = collate_samples(samples, small_as_numpy=True)
                        break
                    except CorruptVolumeError as exc:
                        counter.corrupt += 1
                        bad = samples[exc.index]
                        log.warning("skipping corrupt sample %s in %s: %s", bad["__key__"], bad.get("__shard__"), exc)
                        del samples[exc.index], kept[exc.index]
                        if not samples:
                            raise RuntimeError(f"validation batch of source '{name}' has no readable sample") from exc
                batch[BATCH_STATS_KEY] = {"corrupt": counter.take(), "source": name, "positions": kept}
                yield batch


def replace_failed_rows(batch: dict[str, Any], failed: dict[int, str]) -> None:
    """Fill each failed row with a readable row of the same batch, in place, and count it corrupt.

    Used when a volume fails while being read into the batch (``BatchLoader``'s reader thread:
    the worker that chose the sample has moved on, so no replacement can be drawn). Every field
    with the batch as its first axis is copied, so the row stays one consistent sample; in
    training the duplicate's identical report is masked out of the InfoNCE negatives
    (``loss.dedup_reports``), in validation its position is the source row's, so it is counted
    once. A batch with no readable row raises.
    """
    n = len(batch["ids"])
    good = [i for i in range(n) if i not in failed]
    if not good:
        raise CorruptMemberError("no volume of the batch could be read: "
                                 + "; ".join(f"{batch['ids'][i]}: {m}" for i, m in sorted(failed.items())))
    stats = batch.get(BATCH_STATS_KEY)
    for k, bad in enumerate(sorted(failed)):
        src = good[k % len(good)]
        log.warning("skipping corrupt sample %s (read into the batch failed: %s); its slot repeats %s",
                    batch["ids"][bad], failed[bad], batch["ids"][src])
        for key, value in batch.items():
            if key == BATCH_STATS_KEY:
                continue
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
                value[bad].copy_(value[src])
            elif isinstance(value, np.ndarray) and value.ndim and value.shape[0] == n:
                value[bad] = value[src]
            elif isinstance(value, list) and len(value) == n:
                value[bad] = value[src]
        if isinstance(stats, dict) and isinstance(stats.get("positions"), list):
            stats["positions"][bad] = stats["positions"][src]
    if isinstance(stats, dict):
        stats["corrupt"] = stats.get("corrupt", 0) + len(failed)


# --------------------------------------------------------------------------- loaders


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class BatchLoader:
    """Iterate a DataLoader, turning ``LazyVolumes`` into tensors in a background thread.

    Keeps up to ``prefetch`` materialized batches ahead of the consumer. Errors raised by the
    DataLoader or while reading are re-raised in the consumer.
    """

    def __init__(self, loader: DataLoader, pin_memory: bool, prefetch: int = 2, read_threads: int = 1) -> None:
        self.loader, self.pin_memory, self.prefetch = loader, pin_memory, max(1, prefetch)
        self.read_threads = max(1, read_threads)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import queue
        import threading

        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        pool = BufferPool(max_per_shape=2 * self.prefetch + 4)
        # The reader thread is one of the copiers: with read_threads=1 it reads alone.
        readers = ThreadPoolExecutor(self.read_threads, "volume-read") if self.read_threads > 1 else None

        def fill() -> None:
            try:
                for batch in self.loader:
                    failed: dict[int, str] = {}
                    for key, value in batch.items():
                        if isinstance(value, LazyVolumes):
                            batch[key] = value.materialize(self.pin_memory, pool, readers, failed)
                        elif isinstance(value, np.ndarray):
                            tensor = torch.from_numpy(value)
                            batch[key] = tensor.pin_memory() if self.pin_memory else tensor
                    if failed:
                        replace_failed_rows(batch, failed)
                    if not put(batch):
                        return
                put(done)
            except BaseException as exc:  # hand every failure to the consumer
                put(exc)

        thread = threading.Thread(target=fill, name="batch-reader", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Let the reader leave its DataLoader loop (it shuts the workers down) before the
            # interpreter exits; a thread killed inside torch aborts the process.
            stop.set()
            while True:
                try:
                    out.get_nowait()
                except queue.Empty:
                    break
            thread.join(timeout=30)
            if readers is not None:
                readers.shutdown(wait=False, cancel_futures=True)


def _loader(
    dataset: IterableDataset, num_workers: int, pin_memory: bool, prefetch_factor: int, seed: int, read_threads: int = 1
) -> BatchLoader:
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=False)
    pin = pin_memory and torch.cuda.is_available()
    loader = DataLoader(
        dataset,
        batch_size=None,  # batches are formed per source inside the dataset
        collate_fn=_as_is,  # default_convert would walk every meta dict of every batch
        num_workers=num_workers,
        pin_memory=pin,
        # Its own generator: the loader is started in the reader thread, and drawing worker
        # seeds from the global RNG there would race with dropout in the training step.
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return BatchLoader(loader, pin, prefetch=prefetch_factor, read_threads=read_threads)


def expectation_from_config(data_cfg, tokenizer: dict[str, str] | None = None) -> ShardExpectation:
    """What to require of the shards; ``tokenizer`` is the resolved identity (None = the index's)."""
    if tokenizer is None and isinstance(data_cfg.tokenizer, dict):
        tokenizer = data_cfg.tokenizer
    return ShardExpectation(
        schema_version=int(data_cfg.schema_version),
        tokenizer=dict(tokenizer) if tokenizer else None,
        patch_size=tuple(int(p) for p in data_cfg.patch_size),
    )


def build_train_loader(
    data_cfg, index: ShardIndex, expect: ShardExpectation, *, rank: int, world_size: int, start_batch: int = 0
) -> BatchLoader:
    """Endless training batches for this rank (see ``TrainBatches``)."""
    weights = {k: float(v) for k, v in data_cfg.sources.items() if float(v) > 0}
    dataset = TrainBatches(
        index.shards(data_cfg.train_split, list(weights)),
        weights,
        batch_size=data_cfg.batch_size,
        buffer_size=data_cfg.buffer_size,
        seed=data_cfg.seed,
        rank=rank,
        world_size=world_size,
        expect=expect,
        tokenizer=index.tokenizer,
        start_batch=start_batch,
    )
    return _loader(
        dataset, data_cfg.num_workers, data_cfg.pin_memory, data_cfg.prefetch_factor, data_cfg.seed, data_cfg.read_threads
    )


def build_valid_loader(
    data_cfg, index: ShardIndex, expect: ShardExpectation, *, rank: int, world_size: int
) -> BatchLoader | None:
    """Validation batches for this rank, or None if the index has no validation split."""
    if data_cfg.valid_split not in index.raw.get("splits", {}):
        return None
    sources = [k for k, v in data_cfg.sources.items() if float(v) > 0]
    available = index.shards(data_cfg.valid_split)
    shards = {s: available[s] for s in sources if s in available}
    if not shards:
        return None
    dataset = ValidBatches(
        shards,
        batch_size=data_cfg.batch_size,
        rank=rank,
        world_size=world_size,
        expect=expect,
        tokenizer=index.tokenizer,
        max_samples=data_cfg.valid_max_samples,
    )
    return _loader(dataset, 0, data_cfg.pin_memory, data_cfg.prefetch_factor, data_cfg.seed, data_cfg.read_threads)


def samples_per_epoch(index: ShardIndex, data_cfg) -> int:
    """Training samples of the weighted sources (from index sample counts)."""
    weights = [k for k, v in data_cfg.sources.items() if float(v) > 0]
    return sum(s.samples for shards in index.shards(data_cfg.train_split, weights).values() for s in shards)


__all__ = [
    "BATCH_STATS_KEY",
    "CHECKSUM_KEY",
    "CorruptMemberError",
    "INDEX_CHECKSUM_KEY",
    "SampleRef",
    "ShardExpectation",
    "ShardIndex",
    "ShardInfo",
    "ShardMismatchError",
    "SourceSchedule",
    "TrainBatches",
    "ValidBatches",
    "build_train_loader",
    "build_valid_loader",
    "collate_samples",
    "crc32",
    "decode_member",
    "decode_npy",
    "load_shard_index",
    "samples_per_epoch",
    "scan_tar",
]
