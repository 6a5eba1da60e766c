"""Deterministic WebDataset tar writing: :class:`ShardWriter` and the :class:`ShardInfo` it returns.

Shards are byte-identical when written from the same samples in the same order: fixed tar
metadata (mtime 0, uid/gid 0, empty user/group names, mode 0644), members sorted by name within a
sample. A shard is written to a temporary name, fsynced and renamed, so a listed name never
holds half a tar. Used by the pack stage, ``ctprep compact`` and the benchmarks.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ctprep.schema import is_safe_case_id
from ctprep.shards import meta_crc32, shard_entry

TAR_BLOCK = 512


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def tar_footprint(members: Mapping[str, bytes]) -> int:
    """Bytes a sample takes in a tar (header block + data padded to 512 per member)."""
    return sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for v in members.values())


class _HashingFile:
    """Write-only file wrapper that hashes and counts what tarfile writes."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.n += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.n


@dataclass
class ShardInfo:
    """One written shard (``path`` relative to the output root)."""

    path: str
    samples: int
    bytes: int
    sha256: str
    source: str
    generation: int
    cases: dict[str, str] = field(default_factory=dict)  # case id -> pack key of its sample
    meta_crc32: dict[str, int] = field(default_factory=dict)  # case id -> CRC32 of its meta.json

    def to_json(self) -> dict[str, Any]:
        return shard_entry(self.path, self.samples, self.bytes, self.sha256, self.source, self.generation,
                           self.meta_crc32, self.cases)


class Rollover:
    """When a shard is full: a new one starts before a sample that would take it past
    ``max_samples`` samples or ``max_bytes`` (by :func:`tar_footprint`). Shared by
    :class:`ShardWriter` and the parallel pack's assignment of samples to shards, so both cut
    at the same samples."""

    def __init__(self, max_bytes: int, max_samples: int):
        self.max_bytes, self.max_samples = int(max_bytes), int(max_samples)
        self.count = self.size = 0

    def starts_new(self, need: int) -> bool:
        """Count a sample of ``need`` bytes; True if it opens a new shard (the previous one is full)."""
        new = self.count > 0 and (self.count >= self.max_samples or self.size + need > self.max_bytes)
        if new:
            self.count = self.size = 0
        self.count += 1
        self.size += need
        return new


class ShardWriter:
    """Deterministic WebDataset tar writer with size/count rollover (:class:`Rollover`).

    Shards are named ``<prefix>-<n:05d>.tar`` under ``out_dir`` (``prefix`` may
    hold a folder, e.g. ``train/ctrate-g0001``), written to a temporary name
    and renamed when full or on :meth:`close`.

    Args:
        out_dir: output root (paths in :class:`ShardInfo` are relative to it).
        prefix: shard name prefix relative to ``out_dir``.
        max_bytes: start a new shard before a sample would push the tar past this.
        max_samples: at most this many samples per shard.
        first_seq: number ``n`` of the first shard.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str, *, max_bytes: int, max_samples: int,
                 source: str = "", generation: int = 0, first_seq: int = 0):
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.rollover = Rollover(max_bytes, max_samples)
        self.source, self.generation = source, generation
        self.shards: list[ShardInfo] = []
        self._seq = int(first_seq)
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._hash: _HashingFile | None = None
        self._tmp: Path | None = None
        self._cases: dict[str, str] = {}
        self._meta_crc: dict[str, int] = {}

    def write(self, key: str, members: Mapping[str, bytes], sample_key: str = "") -> None:
        if not is_safe_case_id(key):
            raise ValueError(f"unsafe sample key {key!r}")
        if self.rollover.starts_new(tar_footprint(members)) and self._tar is not None:
            self._finish()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for name in sorted(members):
            data = members[name]
            self._tar.addfile(_tarinfo(f"{key}.{name}", len(data)), io.BytesIO(data))
        self._cases[key] = sample_key
        if (crc := meta_crc32(members)) is not None:
            self._meta_crc[key] = crc

    def _open(self) -> None:
        final = self.out_dir / f"{self.prefix}-{self._seq:05d}.tar"
        final.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = final.with_name(f"{final.stem}.tmp-{uuid.uuid4().hex[:8]}.tar")
        self._file = open(self._tmp, "wb")
        self._hash = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hash, mode="w", format=tarfile.PAX_FORMAT)  # type: ignore[arg-type]
        self._cases, self._meta_crc = {}, {}

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None and self._hash is not None and self._tmp
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.out_dir / f"{self.prefix}-{self._seq:05d}.tar"
        os.replace(self._tmp, final)
        self.shards.append(ShardInfo(final.relative_to(self.out_dir).as_posix(), len(self._cases), self._hash.n,
                                     self._hash.sha.hexdigest(), self.source, self.generation, dict(self._cases),
                                     dict(self._meta_crc)))
        self._tar = self._file = self._hash = self._tmp = None
        self._seq += 1

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (on error): never leave a half tar under the final name."""
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._hash = self._tmp = None


def write_shard(out_dir: str | os.PathLike, prefix: str, seq: int, keys: Sequence[str], sample_keys: Sequence[str],
                source: str, generation: int, *members: Mapping[str, bytes]) -> ShardInfo:
    """Write exactly these samples, in this order, as one shard ``<prefix>-<seq:05d>.tar``: the
    worker's task of a parallel pack (the driver decided which samples go together).

    Args:
        keys: sample keys; ``sample_keys`` their pack keys; ``members`` their members, in order.
    """
    writer = ShardWriter(out_dir, prefix, max_bytes=1 << 62, max_samples=1 << 62, source=source,
                         generation=generation, first_seq=seq)
    try:
        for key, sample_key, sample in zip(keys, sample_keys, members, strict=True):
            writer.write(key, sample, sample_key)
    except BaseException:
        writer.abort()
        raise
    (shard,) = writer.close()
    return shard


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
