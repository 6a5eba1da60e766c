"""The shard format in one place: member names, ``index.json``, sample encode / decode.

``ctprep.schema`` says *what* a shard holds (the contract, as documentation and constants);
this module is the only code that turns arrays into tar members and back and the only code
that reads or writes ``index.json``. The writer (``ctprep.stages.pack``), the trainer
(``ctprep_train.data``, ``ctprep_train.eval.data``), the test shards (``ctprep_train.testing``) and the
benchmarks all go through it, so writer and readers cannot drift apart.

Dependency-free apart from numpy and zstandard (isal is used when installed; ``ctprep.atomic``
and ``ctprep.schema`` are standard library only), so the trainer imports it without Dask, zarr
or the tokenizer.

Verified reads (docs/verified-reads.md): :func:`encode_sample` records in ``meta.json`` the
CRC32 of every other member exactly as stored (``CHECKSUM_KEY``); ``meta.json`` cannot hold
its own, so the index's shard entry holds it (``INDEX_CHECKSUM_KEY``, from
:func:`meta_crc32`). :func:`check_meta` and :func:`check_member` are the readers' side.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ctprep.atomic import atomic_write_text
from ctprep.schema import (
    CHECKSUM_KEY,
    COMPRESSION_SUFFIXES,
    INDEX_CHECKSUM_KEY,
    INDEX_FILE,
    META_KEYS,
    NPY_MEMBERS,
    SCHEMA_VERSION,
    SUPERSEDED_KEY,
    strip_compression,
)

__all__ = [
    "CHECKSUM_KEY", "COMPRESSED_MEMBERS", "COMPRESSION_SUFFIXES", "INDEX_CHECKSUM_KEY", "INDEX_FILE", "META_KEYS",
    "META_MEMBER", "NPY_MEMBERS", "SCHEMA_VERSION", "CorruptMemberError", "MetaChecksumError", "SchemaVersionError",
    "ShardMismatchError", "check_member", "check_meta", "check_schema_version", "compress", "crc32",
    "decode_member", "decode_npy", "decode_sample", "decompress", "encode_sample", "index_meta_crcs",
    "json_bytes", "live_samples", "live_shard_urls", "member_field", "meta_crc32", "npy_bytes", "npy_header",
    "read_index", "parse_index", "read_index_if_present", "shard_entry", "SkipSuperseded", "split_member", "superseded_keys",
    "verify_sample", "with_superseded", "write_index",
]

META_MEMBER = "meta.json"
# Members whose compression follows PackConfig.compression. Everything else is small (token ids,
# regions: a few hundred kB at most) and stays plain .npy so plain webdataset decodes it.
# Measured (README "pack"): zstd-3 shrinks a 240x480x480 image ~2.3x and a mask ~230x.
COMPRESSED_MEMBERS = ("image", "mask")


class ShardMismatchError(RuntimeError):
    """Shards made with another schema, tokenizer or patch grid than the reader expects."""


class SchemaVersionError(ShardMismatchError):
    """An ``index.json`` or ``meta.json`` of another ``schema_version``."""


class CorruptMemberError(ValueError):
    """A tar member or decoded array that cannot be used; readers skip the sample and count it."""


class MetaChecksumError(CorruptMemberError):
    """``meta.json`` fails the index's CRC32; ``meta`` is what it parses to (None if it does not),
    so a reader can tell a flipped byte from a shard of another build put in its place."""

    def __init__(self, message: str, meta: dict[str, Any] | None):
        super().__init__(message)
        self.meta = meta


try:  # ISA-L computes the same CRC32 as zlib ~5x faster and releases the GIL
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a dependency
    _crc32 = zlib.crc32


def crc32(data: bytes | memoryview | np.ndarray, value: int = 0) -> int:
    """CRC32 (zlib/gzip polynomial) of ``data`` (any C-contiguous buffer), continuing from ``value``."""
    return _crc32(data, value)


# --------------------------------------------------------------------------- member names


@functools.lru_cache(maxsize=256)
def split_member(name: str) -> tuple[str, str, str]:
    """(field, name without compression suffix, suffix): ``'image.npy.zst'`` -> ``('image',
    'image.npy', '.zst')``. Cached: a reader asks for the same few member names for every sample."""
    base, suffix = strip_compression(name)
    return base.rsplit(".", 1)[0], base, suffix


def member_field(name: str) -> str:
    """The sample field a member holds: ``'image.npy.zst'`` -> ``'image'``, ``'meta.json'`` -> ``'meta'``."""
    return split_member(name)[0]


# --------------------------------------------------------------------------- encode


def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` bytes of ``array`` (C order, no pickle)."""
    buf = io.BytesIO()
    # np.asarray(order="C"), not np.ascontiguousarray: the latter turns 0-d arrays (report_len) into 1-d.
    np.lib.format.write_array(buf, np.asarray(array, order="C"), allow_pickle=False)
    return buf.getvalue()


def compress(data: bytes, method: str, zstd_level: int = 3) -> tuple[bytes, str]:
    """(compressed bytes, member suffix). Deterministic for a given library version."""
    if method == "none":
        return data, ""
    if method == "zst":
        import zstandard

        # Single-threaded, content size in the frame header so readers allocate once; the
        # content checksum (XXH64, 4 bytes) makes a damaged frame fail on decompression.
        cctx = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True, write_checksum=True, threads=0)
        return cctx.compress(data), ".zst"
    if method == "gz":
        try:
            from isal import igzip as gz  # 2-3x faster deflate, same format
        except ImportError:  # pragma: no cover
            import gzip as gz
        return gz.compress(data, compresslevel=1, mtime=0), ".gz"
    raise ValueError(f"unknown compression {method!r}; valid: zst, gz, none")


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, no whitespace variation)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def encode_sample(
    arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], compression: str, zstd_level: int = 3,
    compressed: Iterable[str] = COMPRESSED_MEMBERS,
) -> dict[str, bytes]:
    """Member name (``image.npy.zst``, ``meta.json``, ...) -> bytes for one sample.

    ``meta.json`` gets ``CHECKSUM_KEY``: the CRC32 of every other member's bytes as returned
    here (= as stored in the tar). Its own checksum is :func:`meta_crc32` of the result, which
    the shard writer records in the index.

    Args:
        arrays: field (one of ``NPY_MEMBERS``) -> array; a subset is allowed (measurements).
        meta: the sample's ``meta.json`` payload without checksums (``META_KEYS``).
        compression: "zst" | "gz" | "none", applied to the fields in ``compressed``.
        compressed: fields compressed with ``compression``; the rest stay plain ``.npy``.
    """
    unknown = sorted(set(arrays) - set(NPY_MEMBERS))
    if unknown:
        raise ValueError(f"not shard members: {unknown}; members are {NPY_MEMBERS}")
    compressed = set(compressed)
    out: dict[str, bytes] = {}
    for name, arr in arrays.items():
        data = npy_bytes(arr)
        suffix = ""
        if name in compressed:
            data, suffix = compress(data, compression, zstd_level)
        out[f"{name}.npy{suffix}"] = data
    meta = dict(meta)
    meta[CHECKSUM_KEY] = {name: crc32(data) for name, data in sorted(out.items())}
    out[META_MEMBER] = json_bytes(meta)
    return out


def meta_crc32(members: Mapping[str, bytes]) -> int | None:
    """The index's checksum of a sample's ``meta.json`` (None for a sample without one)."""
    data = members.get(META_MEMBER)
    return None if data is None else crc32(data)


# --------------------------------------------------------------------------- decode

_ZSTD = None


def _zstd_decompress(data: bytes | memoryview) -> bytes:
    global _ZSTD
    import zstandard

    if _ZSTD is None:
        _ZSTD = zstandard.ZstdDecompressor()
    try:
        return _ZSTD.decompress(data)
    except zstandard.ZstdError:
        # Frames written in streaming mode carry no content size: decompress incrementally.
        return _ZSTD.stream_reader(io.BytesIO(bytes(data))).read()


def _gzip_decompress(data: bytes | memoryview) -> bytes:
    try:
        from isal import igzip

        return igzip.decompress(data)
    except ImportError:  # pragma: no cover
        return gzip.decompress(data)


def decompress(data: bytes | memoryview, suffix: str) -> bytes | memoryview:
    """Inverse of :func:`compress` given the member suffix."""
    if suffix == ".zst":
        return _zstd_decompress(data)
    if suffix == ".gz":
        return _gzip_decompress(data)
    if suffix == "":
        return data
    raise ValueError(f"unknown compression suffix {suffix!r}")


_NPY_MAGIC = b"\x93NUMPY"
_NPY_DIM = rb"(?:0|[1-9]\d*)"
# The header dict exactly as np.save writes it for a plain dtype; the shape as Python's tuple repr.
_NPY_HEADER_RE = re.compile(
    rb"^\{'descr': '([<>|=][a-zA-Z]\d*)', 'fortran_order': (True|False), 'shape': \((|" + _NPY_DIM + rb",|"
    + _NPY_DIM + rb"(?:, " + _NPY_DIM + rb")+)\), *\} *\n?$"
)


@functools.lru_cache(maxsize=1024)
def _simple_npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran, dtype) of the header dict as ``np.save`` writes it for a plain dtype, or
    None for anything else. Cached by the header's exact bytes: a run sees a few dozen distinct
    headers (one per member kind and shape), and parsing one costs more than decoding its array."""
    match = _NPY_HEADER_RE.match(header)
    if not match:
        return None
    shape = tuple(int(d) for d in match.group(3).split(b",") if d)
    return shape, match.group(2) == b"True", np.dtype(match.group(1).decode())


def npy_header(buf: bytes | memoryview) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran, dtype, data offset) of an .npy buffer.

    The common header (simple dtype, as np.save writes it) is parsed with a regex, once per
    distinct header; numpy's own parser (ast.literal_eval, ~1 ms per header) is the fallback for
    anything else.
    """
    head = bytes(buf[:12])
    if head[:6] == _NPY_MAGIC and head[6] in (1, 2, 3):
        if head[6] == 1:
            size, start = int.from_bytes(head[8:10], "little"), 10
        else:
            size, start = int.from_bytes(head[8:12], "little"), 12
        parsed = _simple_npy_header(bytes(buf[start : start + size]))
        if parsed is not None:
            return (*parsed, start + size)
    stream = io.BytesIO(bytes(buf[: 65536 + 128]))
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    return shape, fortran, dtype, stream.tell()


def decode_npy(buf: bytes | memoryview) -> np.ndarray:
    """Parse an ``.npy`` buffer without copying the data and without pickle."""
    shape, fortran, dtype, offset = npy_header(buf)
    if dtype.hasobject:
        raise CorruptMemberError("object arrays are refused (would need pickle)")
    count = math.prod(shape)  # 1 for a 0-d array
    if len(buf) - offset < count * dtype.itemsize:
        raise CorruptMemberError(f"npy data truncated: {len(buf) - offset} < {count * dtype.itemsize} bytes")
    array = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


def decode_member(name: str, data: bytes | memoryview) -> Any:
    """Decode one member by its extension: ``.npy[.zst|.gz]`` -> ndarray, ``.json`` -> object."""
    _, base, suffix = split_member(name)
    try:
        data = decompress(data, suffix)
        if base.endswith(".npy"):
            return decode_npy(data)
        if base.endswith(".json"):
            return json.loads(bytes(data))
    except CorruptMemberError as exc:  # object dtype, truncated data: say which member
        raise CorruptMemberError(f"{name}: {exc}") from exc
    except Exception as exc:  # zstd/zlib/npy-header/json errors all mean "unusable member"
        raise CorruptMemberError(f"{name}: {type(exc).__name__}: {exc}") from exc
    return bytes(data)  # unknown extension: raw bytes (kept, not interpreted)


def check_meta(raw_meta: bytes | memoryview, member_names: Iterable[str], expected_meta_crc: int | None,
               recorded: bool) -> tuple[dict[str, Any], dict[str, int]]:
    """Verify a sample's ``meta.json``; returns (meta, {member: CRC32}) ({} = nothing to verify).

    Args:
        raw_meta: the stored ``meta.json`` bytes.
        member_names: every member name of the sample (``meta.json`` included or not).
        expected_meta_crc: the index's CRC32 of this ``meta.json`` (None: the index lists none
            for this sample although ``recorded``).
        recorded: the shard's index entry has ``INDEX_CHECKSUM_KEY`` (False: packed before
            checksums; such a sample is read unverified unless its meta lists checksums).

    Raises:
        MetaChecksumError: ``meta.json`` fails the index's CRC32.
        CorruptMemberError: ``meta.json`` is not an object, or its ``CHECKSUM_KEY`` does not
            cover the sample's schema members, or lists a member the tar lacks.
    """
    try:
        meta = json.loads(bytes(raw_meta))
    except ValueError:
        meta = None
    if recorded:
        if expected_meta_crc is None:
            raise CorruptMemberError("meta.json: the index lists no checksum for this sample")
        found = crc32(raw_meta)
        if found != expected_meta_crc:
            raise MetaChecksumError(f"meta.json: crc32 {found} != {expected_meta_crc} in the index",
                                    meta if isinstance(meta, dict) else None)
    if not isinstance(meta, dict):
        raise CorruptMemberError("meta.json: not a JSON object")
    sums = meta.get(CHECKSUM_KEY)
    if sums is None and not recorded:
        return meta, {}
    names = set(member_names) - {META_MEMBER}
    required = {name for name in names if member_field(name) in NPY_MEMBERS}
    if not isinstance(sums, dict) or not required <= set(sums) or not all(type(v) is int for v in sums.values()):
        raise CorruptMemberError(f"meta.json: {CHECKSUM_KEY} does not cover the sample's members with integers")
    absent = set(sums) - names
    if absent:
        raise CorruptMemberError(f"member(s) {sorted(absent)} listed in meta.json are not in the tar")
    return meta, sums


def check_member(name: str, data: bytes | memoryview, sums: Mapping[str, int]) -> None:
    """Raise ``CorruptMemberError`` if a member's stored bytes fail the CRC32 ``meta.json`` lists."""
    if name in sums and name != META_MEMBER:
        found = crc32(data)
        if found != sums[name]:
            raise CorruptMemberError(f"{name}: crc32 {found} != {sums[name]} in meta.json")


def verify_sample(members: Mapping[str, bytes], expected_meta_crc: int | None) -> list[str]:
    """Problems of one sample's stored bytes against its checksums ([] = intact); all of them,
    for reports (``ctprep.stages.pack.check_index``), where readers stop at the first.

    Args:
        members: member name (without the key) -> bytes as stored in the tar.
        expected_meta_crc: the index's ``meta_crc32`` of this sample (None: not recorded).
    """
    raw = members.get(META_MEMBER)
    if raw is None:
        return [f"no {META_MEMBER}"]
    try:
        _, sums = check_meta(raw, members, expected_meta_crc, expected_meta_crc is not None)
    except CorruptMemberError as e:
        return [str(e)]
    problems = []
    for name in sorted(set(members) - {META_MEMBER}):
        if name not in sums:
            if sums:
                problems.append(f"{name}: no checksum in meta.json")
            continue
        try:
            check_member(name, members[name], sums)
        except CorruptMemberError as e:
            problems.append(str(e))
    return problems


def decode_sample(members: Mapping[str, bytes | memoryview], expected_meta_crc: int | None,
                  recorded: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Verify and decode one sample held in memory: (field -> array, meta).

    The trainer reads volumes by offset straight into its batches (``ctprep_train.data``) and uses
    :func:`check_meta` / :func:`check_member` on the way; this is the whole-sample form for
    tools and tests. Raises ``CorruptMemberError`` (see :func:`check_meta`).
    """
    raw = members.get(META_MEMBER)
    if raw is None:
        raise CorruptMemberError(f"missing member(s) ['{member_field(META_MEMBER)}']")
    meta, sums = check_meta(raw, members, expected_meta_crc, recorded)
    arrays: dict[str, np.ndarray] = {}
    for name, data in members.items():
        if name == META_MEMBER:
            continue
        check_member(name, data, sums)
        arrays[member_field(name)] = decode_member(name, data)
    missing = [m for m in NPY_MEMBERS if m not in arrays]
    if missing:
        raise CorruptMemberError(f"missing member(s) {missing}")
    return arrays, meta


# --------------------------------------------------------------------------- index.json


def check_schema_version(where: str, found: Any, expected: int = SCHEMA_VERSION) -> None:
    """Raise ``SchemaVersionError`` naming both versions and ``where`` unless they agree."""
    if found != expected:
        raise SchemaVersionError(
            f"{where}: schema_version {found}, but this reader expects schema_version {expected}; "
            "rebuild the shards with this ctprep version (ctprep build-shards)"
        )


def read_index(root: str | os.PathLike[str], schema_version: int = SCHEMA_VERSION) -> dict[str, Any]:
    """``root/index.json`` for a reader; refused unless it is of ``schema_version``.

    Raises:
        FileNotFoundError: no index (not a ``ctprep build-shards`` output folder).
        SchemaVersionError: another schema version (the message names both and the file).
    """
    path = Path(root) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard index; is {root} a `ctprep build-shards` output folder?")
    return parse_index(path.read_bytes(), str(path), schema_version)


def parse_index(raw: bytes | str, where: str, schema_version: int = SCHEMA_VERSION) -> dict[str, Any]:
    """The bytes of an ``index.json`` (read from a folder or fetched from a URL, named ``where``)
    as a reader's index; refused unless a JSON object of ``schema_version``."""
    try:
        index = json.loads(raw)
    except ValueError as exc:
        raise ShardMismatchError(f"{where}: not JSON ({exc})") from None
    if not isinstance(index, dict):
        raise ShardMismatchError(f"{where}: not a JSON object")
    check_schema_version(where, index.get("schema_version"), schema_version)
    return index


def read_index_if_present(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``root/index.json`` of any schema version, or None: the writer's view (pack replaces an
    index of another version instead of refusing it)."""
    path = Path(root) / INDEX_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_index(root: str | os.PathLike[str], index: Mapping[str, Any]) -> Path:
    """Write ``root/index.json`` atomically and durably (``ctprep.atomic``): the commit point."""
    text = json.dumps(index, indent=1, ensure_ascii=False) + "\n"
    return atomic_write_text(Path(root) / INDEX_FILE, text)


def shard_entry(path: str, samples: int, nbytes: int, sha256: str, source: str, generation: int,
                meta_crcs: Mapping[str, int], cases: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One shard's entry under ``index.json["splits"][split]`` (``cases``: pack's additive key)."""
    entry: dict[str, Any] = {"path": path, "samples": int(samples), "bytes": int(nbytes), "sha256": sha256,
                             "source": source, "generation": int(generation)}
    if cases is not None:
        entry["cases"] = dict(sorted(cases.items()))
    entry[INDEX_CHECKSUM_KEY] = dict(sorted(meta_crcs.items()))
    return entry


def index_meta_crcs(entry: Mapping[str, Any]) -> dict[str, int] | None:
    """The ``meta_crc32`` map of a shard entry (None when the entry predates checksums)."""
    crcs = entry.get(INDEX_CHECKSUM_KEY)
    if crcs is None:
        return None
    if not isinstance(crcs, dict):
        raise ShardMismatchError(f"{entry.get('path')}: index {INDEX_CHECKSUM_KEY} is not a mapping")
    return {str(k): int(v) for k, v in crcs.items()}


# --------------------------------------------------------------------------- tombstones


def superseded_keys(entry: Mapping[str, Any]) -> frozenset[str]:
    """The sample keys of a shard entry that are not to be read (``SUPERSEDED_KEY``; empty if none).

    Raises:
        ShardMismatchError: the field is not a list of strings.
    """
    keys = entry.get(SUPERSEDED_KEY, [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ShardMismatchError(f"{entry.get('path')}: index {SUPERSEDED_KEY} is not a list of sample keys")
    return frozenset(keys)


def live_samples(entry: Mapping[str, Any]) -> int:
    """Samples of a shard entry that are to be read: ``samples`` minus the superseded ones."""
    return int(entry["samples"]) - len(superseded_keys(entry))


def with_superseded(entry: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """A copy of a shard entry whose ``SUPERSEDED_KEY`` also lists ``keys`` (sorted, no repeats)."""
    out = dict(entry)
    dead = sorted(superseded_keys(entry) | set(keys))
    if dead:
        out[SUPERSEDED_KEY] = dead
    return out


class SkipSuperseded:
    """``webdataset`` ``select`` predicate: False for a sample superseded in the shard it was read
    from (matched by the sample's ``__url__`` and ``__key__``). A picklable class, not a closure,
    so DataLoader workers can take it.

    Args:
        dead: shard URL -> its superseded keys, URLs spelled exactly as given to the reader.
    """

    def __init__(self, dead: Mapping[str, Iterable[str]]):
        self.dead = {url: frozenset(keys) for url, keys in dead.items() if keys}

    def __call__(self, sample: Mapping[str, Any]) -> bool:
        return sample.get("__key__") not in self.dead.get(sample.get("__url__"), ())


def live_shard_urls(root: str | os.PathLike[str], split: str, base_url: str | None = None
                    ) -> tuple[list[str], SkipSuperseded]:
    """The listed shards of ``split`` and the predicate that drops their superseded samples, for a
    plain ``webdataset`` reader: ``wds.WebDataset(urls).select(live)``.

    Args:
        root: the local shard folder (holds ``index.json``).
        split: e.g. ``"train"``.
        base_url: where the same folder is served (``http://host/shards``); default: local paths.
    """
    index = read_index(root)
    entries = index.get("splits", {}).get(split, [])
    if base_url is None:
        urls = [str(Path(root) / e["path"]) for e in entries]
    else:
        urls = [f"{base_url.rstrip('/')}/{e['path']}" for e in entries]
    return urls, SkipSuperseded({url: superseded_keys(e) for url, e in zip(urls, entries)})
