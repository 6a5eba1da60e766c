"""Scan stage: find the cases of each source root and fingerprint their inputs (driver side).

``scan_root`` lists a root's cases with its source's ``scan`` and fingerprints
every input file (:func:`fingerprint_file`). A file whose (size, mtime) matches
the manifest's cache reuses its fingerprint; new or changed files are
fingerprinted (on Dask workers when a client is given).

Fingerprints
------------
The fingerprint stands for the file's content in every stage key, so it must
change whenever the content does, and it should not change otherwise (a
``touch``, a copy of the tree elsewhere: nothing reruns).

* A single-member gzip file (every ``.nii.gz`` writer we know: nibabel, dcm2niix,
  ITK, pigz) larger than 2 MiB: ``gz1:`` + blake2b-128 of its size, its first MiB
  and its last MiB. The last 8 bytes are gzip's CRC-32 and length of the *whole*
  inflated content, which the resample stage checks when it reads the file, so
  any change of the voxels changes the fingerprint (but for a 2**-32 CRC
  collision at an identical compressed size, head and tail). Scanning reads
  2 MiB of each volume instead of all of it: the resample stage is then the
  only full read of an input (one read of ~80 MB per CT-RATE volume, not two;
  see docs/benchmarks.md for what that is worth per volume).
* Anything else (``.nii``, CSV, JSON, JPEG, small or multi-member/BGZF gzip,
  which sets the FEXTRA flag): blake2b-128 of all its bytes (plain hex).

A damaged gzip body with an intact head and tail keeps the fingerprint of the
content it had; the resample stage quarantines such a file whenever it reads it.

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
GZIP_EDGE_BYTES = 1 << 20  # head and tail read for a gzip fingerprint

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


def is_single_member_gzip_head(head: bytes) -> bool:
    """A gzip header (deflate) without FEXTRA: BGZF and other blocked multi-member writers set
    FEXTRA, and their last member's trailer does not cover the whole content."""
    return len(head) >= 10 and head[:3] == b"\x1f\x8b\x08" and not head[3] & 0x04


def fingerprint_file(path: str) -> str:
    """The content fingerprint of one input file (see the module docstring): ``gz1:<hex>`` from the
    size, head and tail of a single-member gzip file over 2 MiB, else :func:`hash_file`."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(GZIP_EDGE_BYTES)
        if size <= 2 * GZIP_EDGE_BYTES or not is_single_member_gzip_head(head):
            h = hashlib.blake2b(head, digest_size=16)
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
            return h.hexdigest()
        f.seek(size - GZIP_EDGE_BYTES)
        tail = f.read(GZIP_EDGE_BYTES)
    if len(tail) != GZIP_EDGE_BYTES:  # shrank while we read it: the next scan sees a new size anyway
        raise OSError(f"{path} changed size while being fingerprinted")
    h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16, person=b"ctprep-gz1")
    h.update(head)
    h.update(tail)
    return "gz1:" + h.hexdigest()


def hash_files(paths: list[str]) -> list[tuple[str, str | None]]:
    """(path, fingerprint or None if unreadable) for each path; one Dask task fingerprints a batch."""
    out = []
    for p in paths:
        try:
            out.append((p, fingerprint_file(p)))
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

