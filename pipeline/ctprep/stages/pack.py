"""Stage ``pack``: WebDataset ``.tar`` shards + ``index.json`` (see ``ctprep.schema``).

Samples are encoded and the index is written by ``ctprep.shards``, the one home of the shard
format (the trainer decodes through it too); the case's arrays come from each upstream stage's
own reader (``read_case_zarr``, ``read_regions``, ``read_case_text``). This module decides what
goes into which shard, writes the tars and commits them in the index.

Shards are byte-identical when rebuilt from the same inputs and config:
fixed tar metadata (mtime 0, uid/gid 0, empty user/group names, mode 0644),
members sorted by name within a sample, cases in (split, source, case id)
order, npy headers and zstd frames that depend only on the array.

Verified reads
--------------
A flipped byte must not reach training silently (docs/verified-reads.md):

* every sample's ``meta.json`` holds ``crc32``: {member name: CRC32 of the member's bytes
  exactly as stored in the tar} for every other member of the sample;
* ``meta.json`` cannot hold its own checksum, and a flip inside one of its text strings
  still parses, so each shard entry of ``index.json`` holds ``meta_crc32``: {sample key:
  CRC32 of that sample's ``meta.json`` bytes};
* zstd frames carry their content checksum, so a bad frame also fails on decompression in
  readers that know nothing of the above (plain webdataset + zstandard).

CRC32 (not a cryptographic hash): the threat is storage and transfer damage, not an
adversary; ``isal`` computes it at ~4.7 GB/s here (zlib 0.9, blake2b 0.3; see the doc).

Generations (append-only)
-------------------------
``index.json`` is the single commit point. Each shard entry records, besides
the schema's ``path, samples, bytes, sha256, source, generation``, the pack
key of every sample in it (``cases: {case_id: key}``). On a rerun:

* a listed shard whose samples all still have their current key stays listed,
  untouched (same file, same sha256);
* a listed shard holding any sample that changed, disappeared or was
  quarantined upstream is *retired*: dropped from ``splits`` (recorded under
  ``retired``; the file stays on disk for readers of the previous index), and
  its still-current samples are packed again;
* new, changed and re-homed samples go into new shards of a new generation
  ``g`` (``<split>/<source>-g<g>-<n>.tar``).

So a new OmniAbnorm batch writes only its own cases into new shards, and no
case is ever listed twice. Shards are written to a temporary name, hashed
and renamed; the index is written last (temporary name, then rename), so a
crash leaves either the old index or the new one, never a listed half shard.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from ctprep import __version__ as PIPELINE_VERSION
from ctprep.config import PipelineConfig, to_jsonable
from ctprep.schema import SCHEMA_VERSION, is_safe_case_id, strip_compression
from ctprep.shards import (
    INDEX_FILE,
    compress,
    decompress,
    encode_sample,
    index_meta_crcs,
    meta_crc32,
    npy_bytes,
    read_index_if_present,
    shard_entry,
    verify_sample,
    write_index,
)
from ctprep.stages.base import AggregateCase, AggregateTask, CaseResult, aggregate_stage, remove_temp_debris
from ctprep.stages.regions import read_regions
from ctprep.stages.resample import read_case_zarr
from ctprep.stages.text import read_case_text
from ctprep.tokenizer import tokenizer_identity

TAR_BLOCK = 512


# --------------------------------------------------------------------------- tar writing


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


class ShardWriter:
    """Deterministic WebDataset tar writer with size/count rollover.

    Shards are named ``<prefix>-<n:05d>.tar`` under ``out_dir`` (``prefix`` may
    hold a folder, e.g. ``train/ctrate-g0001``), written to a temporary name
    and renamed when full or on :meth:`close`.

    Args:
        out_dir: output root (paths in :class:`ShardInfo` are relative to it).
        prefix: shard name prefix relative to ``out_dir``.
        max_bytes: start a new shard before a sample would push the tar past this.
        max_samples: at most this many samples per shard.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str, *, max_bytes: int, max_samples: int,
                 source: str = "", generation: int = 0):
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.max_bytes, self.max_samples = int(max_bytes), int(max_samples)
        self.source, self.generation = source, generation
        self.shards: list[ShardInfo] = []
        self._seq = 0
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._hash: _HashingFile | None = None
        self._tmp: Path | None = None
        self._cases: dict[str, str] = {}
        self._meta_crc: dict[str, int] = {}
        self._size = 0

    def write(self, key: str, members: Mapping[str, bytes], sample_key: str = "") -> None:
        if not is_safe_case_id(key):
            raise ValueError(f"unsafe sample key {key!r}")
        need = tar_footprint(members)
        if self._tar is not None and self._cases and (
            len(self._cases) >= self.max_samples or self._size + need > self.max_bytes
        ):
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
        self._size += need

    def _open(self) -> None:
        final = self.out_dir / f"{self.prefix}-{self._seq:05d}.tar"
        final.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = final.with_name(f"{final.stem}.tmp-{uuid.uuid4().hex[:8]}.tar")
        self._file = open(self._tmp, "wb")
        self._hash = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hash, mode="w", format=tarfile.PAX_FORMAT)  # type: ignore[arg-type]
        self._cases, self._meta_crc, self._size = {}, {}, 0

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


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- index


def read_index(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The current ``index.json`` of any schema version (None before the first run): pack replaces
    an index of another version rather than refusing it (``ctprep.shards.read_index_if_present``)."""
    return read_index_if_present(out_dir)


def check_index(out_dir: str | os.PathLike, index: Mapping[str, Any] | None = None, hashes: bool = True) -> list[str]:
    """Problems between ``index.json`` and the files on disk ([] = consistent).

    Checks every listed shard exists with the recorded size (and sha256 when
    ``hashes``), that ``samples`` matches the tar's sample count, and that no
    case is listed twice.
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
            for k in keys:
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


# --------------------------------------------------------------------------- reading stage outputs


def read_sample_arrays(zarr_path: str, regions_path: str, text_dir: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays + per-case metadata of one case from the work dir, through each stage's own reader
    (resample's zarr, the regions array, the text folder)."""
    image, mask, attrs = read_case_zarr(zarr_path)
    arrays: dict[str, np.ndarray] = {"image": np.asarray(image).astype(np.int16, copy=False),
                                     "mask": np.asarray(mask).astype(np.uint8, copy=False)}
    arrays["regions"] = read_regions(regions_path)
    text_arrays, text_meta = read_case_text(text_dir)
    arrays.update(text_arrays)
    return arrays, {"attrs": attrs, "text": text_meta}


def build_sample(job: dict[str, Any]) -> dict[str, bytes]:
    """Encode one sample (runs on a Dask worker or inline). ``job`` is JSON-able.

    Keys: ``case_id``, ``source``, ``split``, ``labels``, ``zarr``, ``regions``, ``text``
    (absolute paths), ``patch_size``, ``region_names``, ``compression``, ``zstd_level``.
    """
    arrays, extra = read_sample_arrays(job["zarr"], job["regions"], job["text"])
    attrs, text = extra["attrs"], extra["text"]
    image, mask, regions = arrays["image"], arrays["mask"], arrays["regions"]
    if image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ")
    pz, py, px = job["patch_size"]
    n_patches = (image.shape[0] // pz) * (image.shape[1] // py) * (image.shape[2] // px)
    if regions.shape != (n_patches, len(job["region_names"]) + 1):
        raise ValueError(f"regions {regions.shape} do not fit image {image.shape} / patch {job['patch_size']}")
    arrays["regions"] = regions.astype(np.float16, copy=False)
    arrays["labels"] = np.asarray(job["labels"], dtype=np.int8)
    meta = {
        "id": job["case_id"],
        "source": job["source"],
        "split": job["split"],
        "spacing": [float(s) for s in attrs["spacing"]],
        "affine": [[float(v) for v in row] for row in attrs["affine"]],
        "shape": [int(n) for n in image.shape],
        "header_style": attrs.get("header_style", ""),
        "tokenizer": text["tokenizer"],
        "schema_version": SCHEMA_VERSION,
        "pipeline_version": PIPELINE_VERSION,
        "patch_size": [int(p) for p in job["patch_size"]],
        "region_names": list(job["region_names"]),
        "report_text": text["report_text"],
        "steps_text": text["steps_text"],
        "step_regions": text["step_regions"],
        "region_texts": text["region_texts"],
        "has_mask": bool(attrs.get("has_mask", True)),
        "plane": str(attrs.get("plane", "axial")),
    }
    return encode_sample(arrays, meta, job["compression"], job["zstd_level"])


# --------------------------------------------------------------------------- the stage


def pack_config_slice(config: PipelineConfig) -> dict[str, Any]:
    """What keys a sample: member compression, shard limits, schema and pipeline version."""
    return {"pack": to_jsonable(config.pack), "schema_version": SCHEMA_VERSION, "pipeline_version": PIPELINE_VERSION}


def _sample_job(c: AggregateCase, config: PipelineConfig) -> dict[str, Any]:
    return {
        "case_id": c.case.case_id,
        "source": c.case.source,
        "split": c.case.split,
        "labels": [int(v) for v in c.case.labels],
        "zarr": c.upstream["resample"].path,
        "regions": c.upstream["regions"].path,
        "text": c.upstream["text"].path,
        "patch_size": [int(p) for p in config.regions.patch_size_zyx],
        "region_names": list(config.regions.names),
        "compression": config.pack.compression,
        "zstd_level": int(config.pack.zstd_level),
    }


def _encoded(jobs: list[dict[str, Any]], client: Any, window: int) -> Iterator[tuple[dict[str, Any], Any]]:
    """(job, members or exception) in job order; with a Dask client, ``window`` encodes in flight."""
    if client is None:
        for job in jobs:
            try:
                yield job, build_sample(job)
            except Exception as e:  # noqa: BLE001 - a bad case is quarantined, not fatal
                yield job, e
        return
    pending: list[tuple[dict[str, Any], Any]] = []
    it = iter(jobs)
    for job in it:
        pending.append((job, client.submit(build_sample, job, pure=False)))
        if len(pending) >= window:
            break
    while pending:
        job, fut = pending.pop(0)
        try:
            result = fut.result()
        except Exception as e:  # noqa: BLE001
            result = e
        fut.release()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, client.submit(build_sample, nxt, pure=False)))
        yield job, result


def index_header(config: PipelineConfig) -> dict[str, Any]:
    """The fields of ``index.json`` that every listed sample must agree with."""
    return {
        "schema_version": SCHEMA_VERSION,
        "pipeline_version": PIPELINE_VERSION,
        "tokenizer": tokenizer_identity(config.text.tokenizer),
        "patch_size": [int(p) for p in config.regions.patch_size_zyx],
        "region_names": list(config.regions.names),
    }


@dataclass
class PackPlan:
    """What a pack run keeps, retires and writes (see the module docstring)."""

    keep: dict[str, list[dict[str, Any]]]  # split -> listed shard entries kept as they are
    retire: list[str]  # shard paths dropped from the index now
    todo: list[AggregateCase]  # cases to write into the new generation
    placed: dict[str, str]  # case id -> kept shard path (already packed with the current key)


def plan_pack(index: Mapping[str, Any] | None, cases: list[AggregateCase], header: Mapping[str, Any],
              out_dir: Path, absent: set[str] | frozenset[str] = frozenset()) -> PackPlan:
    """Decide which listed shards stay valid and which cases must be (re)written.

    Args:
        index: the current ``index.json`` (None before the first run).
        cases: every case eligible for pack now, with its current pack key.
        header: :func:`index_header` of the current config; an index that differs is retired whole.
        out_dir: the shard root.
        absent: ids of cases that are gone (removed from their source, or quarantined upstream).
            A listed case that is neither eligible nor absent (its source root was not part of
            this run, or its upstream stages were not run) keeps its shard.
    """
    current = {c.case.case_id: c for c in cases}
    keep: dict[str, list[dict[str, Any]]] = {}
    retire: list[str] = []
    placed: dict[str, str] = {}
    compatible = index is not None and all(index.get(k) == v for k, v in header.items() if k != "pipeline_version")

    def still_valid(cid: str, key: str, split: str) -> bool:
        if cid in placed:
            return False
        if cid in current:
            return current[cid].key == key and current[cid].case.split == split
        return cid not in absent

    for split, entries in (index or {}).get("splits", {}).items():
        for e in entries:
            members = e.get("cases")
            path = out_dir / e["path"]
            valid = (
                compatible
                and isinstance(members, dict)
                and path.is_file()
                and path.stat().st_size == e["bytes"]
                and all(still_valid(cid, key, split) for cid, key in members.items())
            )
            if valid:
                keep.setdefault(split, []).append(e)
                placed.update({cid: e["path"] for cid in members})
            else:
                retire.append(e["path"])
    todo = [c for c in cases if c.case.case_id not in placed]
    return PackPlan(keep, retire, todo, placed)


# version 2: 0-d members (report_len) stay 0-d; shards packed by version 1 must be rebuilt.
# version 3: per-member checksums (meta.json crc32, index meta_crc32, zstd frame checksums);
#            samples packed before are repacked so that every listed sample can be verified.
@aggregate_stage("pack", upstream=("resample", "regions", "text"), version="3",
                 config_slice=pack_config_slice, case_fields=("labels", "split"))
def run_pack(task: AggregateTask) -> list[CaseResult]:
    """Write new shards for new/changed cases and commit them in ``index.json``."""
    config, out_dir = task.config, Path(task.out_dir)
    header = index_header(config)
    index = read_index(out_dir)
    # A killed run leaves *.tmp-* shards / indexes: never listed, safe to drop.
    remove_temp_debris(out_dir)
    for split in {c.case.split for c in task.cases} | set((index or {}).get("splits", {})):
        remove_temp_debris(out_dir / split)
    absent = set(task.dropped) if task.gone is None else set(task.gone)
    plan = plan_pack(index, task.cases, header, out_dir, absent)
    results: list[CaseResult] = []
    # Cases already in a kept shard with their current key: only the manifest may lag (crash after
    # the index was written); re-record them, nothing to write.
    for c in task.cases:
        if c.case.case_id in plan.placed and c.changed:
            results.append(CaseResult.done(c, "pack", plan.placed[c.case.case_id], {"reused": True}))
    if not plan.todo and not plan.retire and index is not None:
        return results

    prev_generations = list((index or {}).get("generations", []))
    generation = 1 + max((g["generation"] for g in prev_generations), default=0)
    # Shards of this generation number on disk can only be leftovers of a run killed before its
    # index was written (never listed): remove them so a shorter rerun leaves no stray files.
    for split_dir in {out_dir / c.case.split for c in plan.todo}:
        for stray in split_dir.glob(f"*-g{generation:04d}-*.tar"):
            stray.unlink()
    groups: dict[tuple[str, str], list[AggregateCase]] = {}
    for c in plan.todo:
        groups.setdefault((c.case.split, c.case.source), []).append(c)

    new_entries: dict[str, list[dict[str, Any]]] = {}
    written: list[str] = []
    window = 2 * max(1, len(task.client.scheduler_info().get("workers", {}))) if task.client is not None else 1
    for (split, source) in sorted(groups):
        group = sorted(groups[(split, source)], key=lambda c: c.case.case_id)
        by_id = {c.case.case_id: c for c in group}
        writer = ShardWriter(out_dir, f"{split}/{source}-g{generation:04d}", max_bytes=config.pack.shard_max_bytes,
                             max_samples=config.pack.shard_max_samples, source=source, generation=generation)
        jobs = [_sample_job(c, config) for c in group]
        try:
            for job, members in _encoded(jobs, task.client, window):
                c = by_id[job["case_id"]]
                if isinstance(members, Exception):
                    results.append(CaseResult.quarantined(c, "pack", "stage_error",
                                                          f"pack: {type(members).__name__}: {members}"))
                    continue
                writer.write(c.case.case_id, members, c.key)
        except BaseException:
            writer.abort()
            raise
        for shard in writer.close():
            new_entries.setdefault(split, []).append(shard.to_json())
            written.append(shard.path)
            for cid in shard.cases:
                results.append(CaseResult.done(by_id[cid], "pack", shard.path,
                                               {"generation": generation, "sha256": shard.sha256}))

    splits: dict[str, list[dict[str, Any]]] = {}
    for split in sorted(set(plan.keep) | set(new_entries)):
        splits[split] = plan.keep.get(split, []) + new_entries.get(split, [])
    retired = list((index or {}).get("retired", []))
    retired += [{"path": p, "generation": generation} for p in plan.retire]
    new_index = dict(header)
    new_index["generations"] = prev_generations + [{
        "generation": generation,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "shards": written,
        "retired": list(plan.retire),
    }]
    new_index["splits"] = splits
    new_index["retired"] = retired
    write_index(out_dir, new_index)
    return results


# --------------------------------------------------------------------------- measurement


def phantom_case(shape_zyx: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy chest-like phantom (body, two lungs, N(0, 15) HU noise) and its lung mask.

    Noise sets the entropy of real CT too, so this is the honest case for the image.
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[-1 : 1 : shape_zyx[0] * 1j, -1 : 1 : shape_zyx[1] * 1j, -1 : 1 : shape_zyx[2] * 1j]
    body = np.broadcast_to((y / 0.7) ** 2 + (x / 0.9) ** 2 < 1, shape_zyx)
    lung = np.broadcast_to(((((x - 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 < 1)
                            | (((x + 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 < 1)) & (abs(z) < 0.9), shape_zyx)
    image = np.full(shape_zyx, -1024, np.float32)
    image[body] = 40
    image[lung] = -850
    image += rng.normal(0, 15, shape_zyx).astype(np.float32)
    image = np.clip(image, -1024, 3071).astype(np.int16)
    mask = lung.astype(np.uint8)
    return image, mask


def measure_compression(shape_zyx: tuple[int, int, int], seed: int = 0, zstd_level: int = 3) -> list[dict[str, Any]]:
    """Bytes and encode / decode seconds of image and mask members, per compression.

    Uses :func:`phantom_case`.
    """
    image, mask = phantom_case(shape_zyx, seed)
    rows = []
    for name, arr in (("image", image), ("mask", mask)):
        raw = npy_bytes(arr)
        for method in ("none", "zst", "gz"):
            t0 = time.perf_counter()
            data, suffix = compress(raw, method, zstd_level)
            t1 = time.perf_counter()
            back = decompress(data, suffix)
            np.lib.format.read_array(io.BytesIO(back), allow_pickle=False)
            t2 = time.perf_counter()
            rows.append({"member": name, "shape": list(shape_zyx), "compression": method or "none",
                         "bytes": len(data), "ratio": round(len(raw) / len(data), 2),
                         "encode_s": round(t1 - t0, 3), "decode_load_s": round(t2 - t1, 3)})
    return rows


def measure_shard_read(shape_zyx: tuple[int, int, int], samples: int, work_dir: str | os.PathLike,
                       zstd_level: int = 3) -> list[dict[str, Any]]:
    """Write ``samples`` phantom samples per compression into a shard and time a full read.

    The read is tar streaming (``tarfile``, as webdataset does) + decompression + ``np.load``
    of image and mask, from the page cache, so it is the CPU cost; add bytes / storage
    bandwidth for the I/O. The break-even bandwidth is where both choices cost the same.
    """
    image, mask = phantom_case(shape_zyx, 1)
    rows = []
    for method in ("none", "zst", "gz"):
        out = Path(work_dir) / f"measure-{method}"
        writer = ShardWriter(out, "m", max_bytes=1 << 40, max_samples=samples)
        for i in range(samples):
            writer.write(f"case{i:04d}", encode_sample({"image": image, "mask": mask}, {"id": i}, method, zstd_level))
        shard = writer.close()[0]
        t0 = time.perf_counter()
        with tarfile.open(out / shard.path, "r|") as tar:
            for m in tar:
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                member, suffix = strip_compression(m.name.split(".", 1)[1])
                if member.endswith(".npy"):
                    np.lib.format.read_array(io.BytesIO(decompress(data, suffix)), allow_pickle=False)
        seconds = time.perf_counter() - t0
        rows.append({"compression": method, "shape": list(shape_zyx), "samples": samples,
                     "shard_bytes": shard.bytes, "bytes_per_sample": shard.bytes // samples,
                     "read_decode_s_per_sample": round(seconds / samples, 3)})
    base = rows[0]
    for r in rows[1:]:
        saved = base["bytes_per_sample"] - r["bytes_per_sample"]
        extra = r["read_decode_s_per_sample"] - base["read_decode_s_per_sample"]
        r["break_even_MBps"] = round(saved / extra / 1e6, 1) if extra > 0 else None
    return rows


def _main(argv: Iterable[str] | None = None) -> None:
    import argparse
    import sys
    import tempfile

    ap = argparse.ArgumentParser(
        prog="python -m ctprep.stages.pack",
        description="Check a shard folder against its index.json, or measure member compression (README 'pack').")
    ap.add_argument("--check", metavar="OUT", help="verify OUT/index.json against the files (sizes, sha256, samples)")
    ap.add_argument("--prune-retired", action="store_true", help="with --check: delete retired shard files")
    ap.add_argument("--shape", type=int, nargs=3, default=(240, 480, 480), metavar=("Z", "Y", "X"))
    ap.add_argument("--zstd-level", type=int, default=3)
    ap.add_argument("--read-samples", type=int, default=0, help="also time reading a shard of this many samples")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.check:
        problems = check_index(args.check)
        index = read_index(args.check) or {}
        n = sum(e["samples"] for entries in index.get("splits", {}).values() for e in entries)
        for p in problems:
            print(p)
        print(f"{args.check}: {n} samples in {sum(len(v) for v in index.get('splits', {}).values())} listed shards, "
              f"{len(index.get('generations', []))} generations, {len(problems)} problems")
        if args.prune_retired and not problems:
            print("removed:", prune_retired(args.check))
        sys.exit(1 if problems else 0)
    for row in measure_compression(tuple(args.shape), zstd_level=args.zstd_level):
        print(json.dumps(row))
    if args.read_samples:
        with tempfile.TemporaryDirectory() as tmp:
            for row in measure_shard_read(tuple(args.shape), args.read_samples, tmp, args.zstd_level):
                print(json.dumps(row))


if __name__ == "__main__":
    _main()
