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

* a listed sample whose case still has that key stays live, untouched (same file, same sha256);
* a listed sample whose case changed, disappeared or was quarantined upstream is *superseded*:
  its key is added to the entry's ``superseded`` list (``ctprep.schema.SUPERSEDED_KEY``) and
  readers skip it; the tar is not rewritten and its shard-mates are not repacked. A shard
  whose samples are all superseded is *retired*: dropped from ``splits`` (recorded under
  ``retired``; the file stays on disk for readers of the previous index);
* a whole shard is retired, and its live samples packed again, only when its file is missing
  or has another size, or when the index was written for another schema, tokenizer, patch
  grid or region list;
* new and changed samples go into new shards of a new generation ``g``
  (``<split>/<source>-g<g>-<n>.tar``), written in process or by the Dask workers
  (``ctprep.stages.pack_write``, same bytes either way).

So editing the CoT of k cases writes k samples' bytes, a new OmniAbnorm batch writes only its
own cases, and no case is ever live twice. ``ctprep compact`` (``ctprep.compact``) rewrites
shards that are mostly tombstones. Shards are written to a temporary name, hashed and
renamed; the index is written last (temporary name, then rename), so a crash leaves either
the old index or the new one, never a listed half shard.
"""

from __future__ import annotations

import datetime as _dt
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ctprep import __version__ as PIPELINE_VERSION
from ctprep.config import PipelineConfig, to_jsonable
from ctprep.schema import SCHEMA_VERSION, TRUNCATION_KEYS
from ctprep.shard_check import (  # noqa: F401 (re-exported: the tools of a shard folder)
    check_index,
    prune_retired,
    read_index,
    shard_sample_problems,
    tar_sample_keys,
)
from ctprep.shard_writer import ShardInfo, ShardWriter, file_sha256, tar_footprint  # noqa: F401 (re-exported)
from ctprep.shards import encode_sample, live_samples, superseded_keys, with_superseded, write_index
from ctprep.stages.base import AggregateCase, AggregateTask, CaseResult, aggregate_stage, remove_temp_debris
from ctprep.stages.pack_write import ShardTarget, write_group
from ctprep.stages.regions import read_regions
from ctprep.stages.resample import read_case_zarr
from ctprep.stages.text import read_case_text
from ctprep.tokenizer import tokenizer_identity

__all__ = ["PackPlan", "ShardInfo", "ShardWriter", "build_sample", "check_index", "file_sha256", "index_header",
           "pack_config_slice", "plan_pack", "prune_retired", "read_index", "read_sample_arrays", "run_pack",
           "shard_sample_problems", "tar_footprint", "tar_sample_keys"]


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
        "truncated": {k: int(text["truncated"][k]) for k in TRUNCATION_KEYS},
    }
    return encode_sample(arrays, meta, job["compression"], job["zstd_level"])


# --------------------------------------------------------------------------- the stage


def pack_config_slice(config: PipelineConfig) -> dict[str, Any]:
    """What keys a sample: member compression, shard limits, schema and pipeline version."""
    return {"pack": to_jsonable(config.pack), "schema_version": SCHEMA_VERSION, "pipeline_version": PIPELINE_VERSION}


def _sample_job(c: AggregateCase, config: PipelineConfig) -> dict[str, Any]:
    return {
        "case_id": c.case.case_id,
        "pack_key": c.key,
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
    """What a pack run keeps, supersedes, retires and writes (see the module docstring)."""

    keep: dict[str, list[dict[str, Any]]]  # split -> listed shard entries kept (tombstones added)
    retire: list[str]  # shard paths dropped from the index now
    superseded: dict[str, list[str]]  # shard path -> sample keys tombstoned now
    todo: list[AggregateCase]  # cases to write into the new generation
    placed: dict[str, str]  # case id -> kept shard path holding its live sample with the current key


def plan_pack(index: Mapping[str, Any] | None, cases: list[AggregateCase], header: Mapping[str, Any],
              out_dir: Path, absent: set[str] | frozenset[str] = frozenset()) -> PackPlan:
    """Decide which listed samples stay live and which cases must be (re)written.

    Args:
        index: the current ``index.json`` (None before the first run).
        cases: every case eligible for pack now, with its current pack key.
        header: :func:`index_header` of the current config; an index that differs is retired whole.
        out_dir: the shard root.
        absent: ids of cases that are gone (removed from their source, or quarantined upstream).
            A listed case that is neither eligible nor absent (its source root was not part of
            this run, or its upstream stages were not run) keeps its sample.
    """
    current = {c.case.case_id: c for c in cases}
    plan = PackPlan({}, [], {}, [], {})
    compatible = index is not None and all(index.get(k) == v for k, v in header.items() if k != "pipeline_version")

    def still_valid(cid: str, key: str, split: str) -> bool:
        if cid in plan.placed:
            return False
        if cid in current:
            return current[cid].key == key and current[cid].case.split == split
        return cid not in absent

    for split, entries in (index or {}).get("splits", {}).items():
        for e in entries:
            members = e.get("cases")
            path = out_dir / e["path"]
            if not (compatible and isinstance(members, dict) and path.is_file() and path.stat().st_size == e["bytes"]):
                plan.retire.append(e["path"])  # its live samples are written again (todo)
                continue
            dead = superseded_keys(e)
            live = {cid: key for cid, key in members.items() if cid not in dead}
            now_dead = sorted(cid for cid, key in live.items() if not still_valid(cid, key, split))
            if len(now_dead) == len(live):
                plan.retire.append(e["path"])  # nothing left to read in it
                continue
            plan.placed.update({cid: e["path"] for cid in live if cid not in now_dead})
            if now_dead:
                plan.superseded[e["path"]] = now_dead
            plan.keep.setdefault(split, []).append(with_superseded(e, now_dead))
    plan.todo = [c for c in cases if c.case.case_id not in plan.placed]
    return plan


def _remove_debris(out_dir: Path, splits: set[str], generation: int) -> None:
    """Drop what a killed run left: ``*.tmp-*`` files, and shards of the generation about to be
    written (never listed: that number is only used once its index is written)."""
    remove_temp_debris(out_dir)
    for split in splits:
        remove_temp_debris(out_dir / split)
        for stray in (out_dir / split).glob(f"*-g{generation:04d}-*.tar"):
            stray.unlink()


def write_generation(cases: list[AggregateCase], config: PipelineConfig, out_dir: Path, generation: int,
                     client: Any = None) -> tuple[dict[str, list[dict[str, Any]]], list[CaseResult]]:
    """Write ``cases`` into new shards ``<split>/<source>-g<generation>-<n>.tar``.

    Returns the new index entries per split and one result per case (done, or quarantined when
    its sample cannot be encoded). In process or on the workers of ``client``: the same bytes.
    """
    groups: dict[tuple[str, str], list[AggregateCase]] = {}
    for c in cases:
        groups.setdefault((c.case.split, c.case.source), []).append(c)
    entries: dict[str, list[dict[str, Any]]] = {}
    results: list[CaseResult] = []
    for (split, source) in sorted(groups):
        group = sorted(groups[(split, source)], key=lambda c: c.case.case_id)
        by_id = {c.case.case_id: c for c in group}
        target = ShardTarget(out_dir, f"{split}/{source}-g{generation:04d}", source, generation,
                             config.pack.shard_max_bytes, config.pack.shard_max_samples)
        # build_sample looked up here (not bound at import) so a test can stand in for it
        written = write_group([_sample_job(c, config) for c in group], build_sample, target, client)
        for job, e in written.failed:
            results.append(CaseResult.quarantined(by_id[job["case_id"]], "pack", "stage_error",
                                                  f"pack: {type(e).__name__}: {e}"))
        for shard in written.shards:
            entries.setdefault(split, []).append(shard.to_json())
            for cid in shard.cases:
                results.append(CaseResult.done(by_id[cid], "pack", shard.path,
                                               {"generation": generation, "sha256": shard.sha256}))
    return entries, results


def next_index(index: Mapping[str, Any] | None, header: Mapping[str, Any], plan: PackPlan,
               new_entries: Mapping[str, list[dict[str, Any]]], generation: int) -> dict[str, Any]:
    """The index that commits a pack run: kept entries (with their new tombstones), then the new
    generation's shards; the retired shards and this generation's record appended."""
    splits = {split: plan.keep.get(split, []) + list(new_entries.get(split, []))
              for split in sorted(set(plan.keep) | set(new_entries))}
    record = {"generation": generation, "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "shards": [e["path"] for entries in new_entries.values() for e in entries],
              "retired": list(plan.retire)}
    if plan.superseded:
        record["superseded"] = dict(sorted(plan.superseded.items()))
    out = dict(header)
    out["generations"] = list((index or {}).get("generations", [])) + [record]
    out["splits"] = splits
    out["retired"] = list((index or {}).get("retired", [])) + [{"path": p, "generation": generation}
                                                               for p in plan.retire]
    return out


def next_generation(index: Mapping[str, Any] | None) -> int:
    """The number of the next generation (1 for the first)."""
    return 1 + max((g["generation"] for g in (index or {}).get("generations", [])), default=0)


# version 2: 0-d members (report_len) stay 0-d; shards packed by version 1 must be rebuilt.
# version 3: per-member checksums (meta.json crc32, index meta_crc32, zstd frame checksums);
#            samples packed before are repacked so that every listed sample can be verified.
# version 4: schema 3: meta.json "truncated"; a changed case supersedes its old sample instead
#            of retiring its shard.
@aggregate_stage("pack", upstream=("resample", "regions", "text"), version="4",
                 config_slice=pack_config_slice, case_fields=("labels", "split"))
def run_pack(task: AggregateTask) -> list[CaseResult]:
    """Write new shards for new/changed cases, tombstone their old samples, commit ``index.json``."""
    config, out_dir = task.config, Path(task.out_dir)
    header = index_header(config)
    index = read_index(out_dir)
    generation = next_generation(index)
    _remove_debris(out_dir, {c.case.split for c in task.cases} | set((index or {}).get("splits", {})), generation)
    absent = set(task.dropped) if task.gone is None else set(task.gone)
    plan = plan_pack(index, task.cases, header, out_dir, absent)
    # Cases already live in a kept shard with their current key: only the manifest may lag (crash
    # after the index was written, or a compaction moved them); re-record them, nothing to write.
    results = [CaseResult.done(c, "pack", plan.placed[c.case.case_id], {"reused": True})
               for c in task.cases if c.case.case_id in plan.placed and c.changed]
    if not plan.todo and not plan.retire and not plan.superseded and index is not None:
        return results
    new_entries, written = write_generation(plan.todo, config, out_dir, generation, task.client)
    write_index(out_dir, next_index(index, header, plan, new_entries, generation))
    return results + written


# --------------------------------------------------------------------------- check


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m ctprep.stages.pack --check OUT [--prune-retired]``: verify a shard folder."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ctprep.stages.pack",
                                 description="Check a shard folder against its index.json (sizes, sha256, samples).")
    ap.add_argument("--check", metavar="OUT", required=True, help="the shard folder (holds index.json)")
    ap.add_argument("--prune-retired", action="store_true", help="then delete retired shard files if all is well")
    args = ap.parse_args(list(argv) if argv is not None else None)
    problems = check_index(args.check)
    index = read_index(args.check) or {}
    entries = [e for listed in index.get("splits", {}).values() for e in listed]
    n, dead = sum(live_samples(e) for e in entries), sum(len(superseded_keys(e)) for e in entries)
    for p in problems:
        print(p)
    print(f"{args.check}: {n} samples ({dead} superseded) in {len(entries)} listed shards, "
          f"{len(index.get('generations', []))} generations, {len(problems)} problems")
    if args.prune_retired and not problems:
        print("removed:", prune_retired(args.check))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
