"""Checks of a shard folder against its ``index.json`` (``python -m ctprep.stages.pack --check OUT``).

Sizes, sha256, sample counts and keys of every listed shard; the damaged samples of a shard
whose sha256 fails, named by the checksums of ``ctprep.shards`` (docs/verified-reads.md).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any, Mapping

from ctprep.shard_writer import file_sha256
from ctprep.shards import INDEX_FILE, index_meta_crcs, read_index_if_present, superseded_keys, verify_sample


def read_index(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The current ``index.json`` of any schema version (None before the first run): pack replaces
    an index of another version rather than refusing it (``ctprep.shards.read_index_if_present``)."""
    return read_index_if_present(out_dir)


def check_index(out_dir: str | os.PathLike, index: Mapping[str, Any] | None = None, hashes: bool = True) -> list[str]:
    """Problems between ``index.json`` and the files on disk ([] = consistent).

    Checks every listed shard exists with the recorded size (and sha256 when
    ``hashes``), that ``samples`` matches the tar's sample count, and that no
    case is live in two shards (superseded samples do not count; they must be samples of the tar).
    """
    out_dir = Path(out_dir)
    index = index if index is not None else read_index(out_dir)
    if index is None:
        return [f"no {INDEX_FILE} in {out_dir}"]
    problems, seen = [], {}
    for split, entries in index.get("splits", {}).items():
        for e in entries:
            p = out_dir / e["path"]
            if not p.is_file():
                problems.append(f"{e['path']}: missing")
                continue
            if p.stat().st_size != e["bytes"]:
                problems.append(f"{e['path']}: {p.stat().st_size} bytes on disk, index says {e['bytes']}")
            if hashes and file_sha256(p) != e["sha256"]:
                problems.append(f"{e['path']}: sha256 differs from the index")
                # Name the damaged samples: the trainer skips exactly these.
                damaged = shard_sample_problems(p, index_meta_crcs(e))
                problems += [f"{e['path']}: {problem}" for problem in damaged]
            keys = tar_sample_keys(p)
            if len(keys) != e["samples"]:
                problems.append(f"{e['path']}: {len(keys)} samples in the tar, index says {e['samples']}")
            if "cases" in e and sorted(keys) != sorted(e["cases"]):
                problems.append(f"{e['path']}: sample keys differ from the index's case list")
            dead = superseded_keys(e)
            if not dead <= set(keys):
                problems.append(f"{e['path']}: superseded keys not in the tar: {sorted(dead - set(keys))}")
            for k in keys:
                if k in dead:
                    continue
                if k in seen:
                    problems.append(f"case {k} listed twice: {seen[k]} and {e['path']}")
                seen[k] = e["path"]
    return problems


def shard_sample_problems(path: str | os.PathLike, meta_crcs: Mapping[str, int] | None) -> list[str]:
    """``sample <key>: <problem>`` for every sample of a shard whose bytes fail their checksums.

    Args:
        meta_crcs: the shard entry's ``meta_crc32`` (None: an index written before checksums;
            then only the member checksums inside each ``meta.json`` are checked).
    """
    problems: list[str] = []

    def check(key: str | None, members: dict[str, bytes]) -> None:
        if key is None:
            return
        expected = None if meta_crcs is None else meta_crcs.get(key, -1)  # -1: never a CRC32
        problems.extend(f"sample {key}: {p}" for p in verify_sample(members, expected))

    key, members = None, {}
    try:
        with tarfile.open(path, "r") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k, _, member = m.name.partition(".")
                if k != key:
                    check(key, members)
                    key, members = k, {}
                members[member] = tar.extractfile(m).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError) as e:
        problems.append(f"tar unreadable after sample {key}: {e}")
    check(key, members)
    return problems


def tar_sample_keys(path: str | os.PathLike) -> list[str]:
    """Sample keys in a shard, in order (WebDataset rule: name up to the first '.')."""
    keys: list[str] = []
    with tarfile.open(path, "r") as tar:
        for m in tar:
            key = m.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def prune_retired(out_dir: str | os.PathLike) -> list[str]:
    """Delete the files of retired shards (not listed in ``splits``); returns their paths.

    Retired shards are kept by ``pack`` so that a reader of the previous index can
    finish; call this once no reader uses an older ``index.json``.
    """
    out_dir = Path(out_dir)
    index = read_index(out_dir) or {}
    listed = {e["path"] for entries in index.get("splits", {}).values() for e in entries}
    removed = []
    for r in index.get("retired", []):
        p = out_dir / r["path"]
        if r["path"] not in listed and p.is_file():
            p.unlink()
            removed.append(r["path"])
    return removed
