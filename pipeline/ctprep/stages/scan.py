"""Scan stage: find the cases of each source root and fingerprint their inputs (driver side).

``scan_root`` lists a root's cases with its source's ``scan`` and computes a
content hash of every input file. Hashing is the only costly part: a file
whose (size, mtime) matches the manifest's cache reuses its hash; new or
changed files are hashed (on Dask workers when a client is given).

The scan key of a case hashes *all* its CaseInput fields, so ``status`` can
tell a new case from a changed one; the later stages are keyed only by the
fields they read (``StageSpec.case_fields``), so e.g. an edited report does
not resample the volume again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ctprep.quarantine import UNSAFE_NAME, Quarantine
from ctprep.schema import is_safe_case_id
from ctprep.sources.base import CaseInput, get_source
from ctprep.stages.base import StageSpec, register_stage

if TYPE_CHECKING:
    from ctprep.config import PipelineConfig
    from ctprep.manifest import Manifest

HASH_CHUNK = 1 << 22  # 4 MiB reads

SCAN = register_stage(StageSpec(
    name="scan",
    kind="scan",
    upstream=(),
    version="1",
    config_slice=lambda c: {},
    case_fields=("files", "meta", "text", "labels", "split"),
))


def hash_file(path: str) -> str:
    """blake2b-128 of the file's bytes (hex)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_files(paths: list[str]) -> list[tuple[str, str | None]]:
    """(path, hash or None if unreadable) for each path; one Dask task hashes a batch."""
    out = []
    for p in paths:
        try:
            out.append((p, hash_file(p)))
        except OSError:
            out.append((p, None))
    return out


@dataclass
class ScanResult:
    """Cases found under one root, with file content hashes."""

    root: str
    source: str
    cases: list[CaseInput] = field(default_factory=list)
    file_hashes: dict[str, dict[str, str]] = field(default_factory=dict)  # case -> role -> hash
    quarantined: list[Quarantine] = field(default_factory=list)
    hashed: int = 0  # files hashed now (not from the cache)
    problems: list[str] = field(default_factory=list)  # input problems that name no case (e.g. a broken CSV row)


def scan_root(root: str | Path, source_name: str, config: PipelineConfig, manifest: Manifest,
              hash_map: Callable[[list[list[str]]], list[list[tuple[str, str | None]]]] | None = None) -> ScanResult:
    """Scan one source root and fingerprint its files.

    Args:
        root: source folder.
        source_name: registered source name.
        config: pipeline config (given to the source).
        manifest: for the (size, mtime) -> hash cache; new hashes are stored in it.
        hash_map: optional parallel map over batches of paths (e.g. Dask); default: in process.
    """
    root = Path(root).resolve()
    source = get_source(source_name, config)
    cases, quarantined = source.scan(root)
    res = ScanResult(str(root), source_name, quarantined=list(quarantined),
                     problems=list(getattr(source, "problems", [])))

    stats: dict[str, tuple[int, int]] = {}
    todo: list[str] = []
    for case in cases:
        if not is_safe_case_id(case.case_id):  # sources should catch this; never trust it as a path
            res.quarantined.append(Quarantine(case.case_id, "scan", UNSAFE_NAME, "case id is not a safe name",
                                              source_name, dict(case.files)))
            continue
        for path in case.files.values():
            try:
                st = os.stat(path)
            except OSError:
                continue
            stats[path] = (st.st_size, st.st_mtime_ns)
            if manifest.cached_hash(path, *stats[path]) is None:
                todo.append(path)

    hashes: dict[str, str | None] = {}
    todo = sorted(set(todo))
    if todo:
        batches = _batches(todo, stats)
        results = hash_map(batches) if hash_map else [hash_files(b) for b in batches]
        new_rows = []
        for batch in results:
            for path, digest in batch:
                hashes[path] = digest
                if digest is not None:
                    new_rows.append((path, *stats[path], digest))
        manifest.put_hashes(new_rows)
        res.hashed = len(new_rows)

    for case in cases:
        if not is_safe_case_id(case.case_id):
            continue
        fh = {}
        for role, path in case.files.items():
            digest = hashes.get(path) if path in hashes else (manifest.cached_hash(path, *stats[path]) if path in stats else None)
            # An unreadable file gets a stat-based stand-in: the resample stage quarantines it
            # with the real error, and a later fix changes size/mtime and so the key.
            fh[role] = digest or "unreadable:%d:%d" % stats.get(path, (0, 0))
        res.file_hashes[case.case_id] = fh
        res.cases.append(case)
    return res


def _batches(paths: list[str], stats: dict[str, tuple[int, int]], target_bytes: int = 256 << 20) -> list[list[str]]:
    """Group paths into batches of about ``target_bytes`` (one hashing task each)."""
    out: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for p in paths:
        cur.append(p)
        size += stats[p][0]
        if size >= target_bytes:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out

