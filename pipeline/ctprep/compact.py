"""``ctprep compact``: rewrite shards that are mostly tombstones.

Pack never rewrites a shard for a changed case: the old sample is listed as superseded
(``ctprep.schema.SUPERSEDED_KEY``) and the new one goes into a new generation. Readers skip
the dead samples but still read past their bytes, and the files keep them. Compaction picks
every listed shard whose superseded fraction is at least ``threshold``, copies the live
samples of those shards (member bytes as stored, each sample's checksums verified first) into
new shards of a new generation, per (split, source) in case-id order, and commits them
through ``index.json`` like a pack run: the picked shards are retired (files kept for readers
of the previous index; ``python -m ctprep.stages.pack --check OUT --prune-retired`` deletes
them). The live samples are then the same, key for key and byte for byte, as a fresh build's.

Runs under the output folder's lock (``ctprep.lock``), so it never races a build. The
manifest keeps the old shard path of a moved case until the next build re-records it (it finds
the case live with its current key and writes nothing).
"""

from __future__ import annotations

import datetime as _dt
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ctprep.errors import UserError
from ctprep.lock import folder_lock
from ctprep.shard_writer import ShardInfo, ShardWriter
from ctprep.shards import (
    ShardMismatchError,
    index_meta_crcs,
    read_index,
    superseded_keys,
    verify_sample,
    write_index,
)
from ctprep.stages.base import remove_temp_debris

DEFAULT_THRESHOLD = 0.25


@dataclass
class CompactReport:
    """What a compaction did."""

    compacted: list[str] = field(default_factory=list)  # shard paths retired
    written: list[str] = field(default_factory=list)  # new shard paths
    samples: int = 0  # live samples copied
    dropped: int = 0  # superseded samples left behind
    generation: int | None = None

    def summary(self, out: Path) -> str:
        if not self.compacted:
            return f"ctprep compact: nothing to do in {out} (no shard at the threshold)"
        return (f"ctprep compact: {len(self.compacted)} shard(s) rewritten as {len(self.written)} "
                f"(generation {self.generation}): {self.samples} live samples copied, {self.dropped} superseded "
                f"samples dropped; the old files stay until --prune-retired")


def superseded_fraction(entry: Mapping[str, Any]) -> float:
    """Superseded samples / samples of a shard entry (0 for an empty one)."""
    return len(superseded_keys(entry)) / entry["samples"] if entry["samples"] else 0.0


def pick_shards(index: Mapping[str, Any], threshold: float) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(split, source) -> listed entries whose superseded fraction is at least ``threshold`` (and
    that hold a superseded sample at all), in listed order."""
    picked: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for split, entries in index.get("splits", {}).items():
        for e in entries:
            if superseded_keys(e) and superseded_fraction(e) >= threshold:
                picked.setdefault((split, e["source"]), []).append(e)
    return picked


def live_samples_of(out: Path, entries: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, bytes], str]]:
    """(key, members as stored, pack key) of every live sample of ``entries``, in key order.

    The tars are listed once, then each sample is read by offset (no tar stays open, however
    many shards are compacted).

    Raises:
        UserError: a sample fails its checksums (compaction must not copy damage into a new shard).
    """
    where: dict[str, tuple[dict[str, Any], dict[str, tuple[int, int]]]] = {}  # key -> (entry, member -> (offset, size))
    for e in entries:
        dead = superseded_keys(e)
        with tarfile.open(out / e["path"], "r") as tar:
            for m in tar:
                key, _, member = m.name.partition(".")
                if m.isfile() and key not in dead:
                    where.setdefault(key, (e, {}))[1][member] = (m.offset_data, m.size)
    for key in sorted(where):
        e, spans = where[key]
        with open(out / e["path"], "rb") as f:
            members = {}
            for name, (offset, size) in spans.items():
                f.seek(offset)
                members[name] = f.read(size)
        crcs = index_meta_crcs(e)
        problems = verify_sample(members, None if crcs is None else crcs.get(key, -1))
        if problems:
            raise UserError(f"{out / e['path']}: sample {key}: {problems[0]}; not compacted "
                            f"(python -m ctprep.stages.pack --check {out} names every damaged sample)")
        yield key, members, e.get("cases", {}).get(key, "")


def compact(out: str | Path, threshold: float = DEFAULT_THRESHOLD, *, max_bytes: int | None = None,
            max_samples: int | None = None, log: Callable[[str], None] | None = None) -> CompactReport:
    """Rewrite the shards of ``out`` whose superseded fraction is at least ``threshold``.

    Args:
        threshold: 0 < threshold <= 1; the fraction of a shard's samples that must be superseded.
        max_bytes, max_samples: shard limits of the new shards (default: the largest picked
            shard's size and sample count, so a compacted shard is never bigger than the old ones).
    """
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold {threshold}: must be in (0, 1]")
    out = Path(out).resolve()
    with folder_lock(out):
        report = _compact_locked(out, threshold, max_bytes, max_samples)
    if log is not None:
        log(report.summary(out))
    return report


def _compact_locked(out: Path, threshold: float, max_bytes: int | None, max_samples: int | None) -> CompactReport:
    try:
        index = read_index(out)
    except ShardMismatchError as e:  # another schema: rebuild, do not compact
        raise UserError(str(e)) from e
    picked = pick_shards(index, threshold)
    report = CompactReport()
    if not picked:
        return report
    generation = report.generation = 1 + max((g["generation"] for g in index.get("generations", [])), default=0)
    all_picked = [e for entries in picked.values() for e in entries]
    max_bytes = max_bytes or max(e["bytes"] for e in all_picked)
    max_samples = max_samples or max(e["samples"] for e in all_picked)
    new_entries: dict[str, list[dict[str, Any]]] = {}
    for split in {split for split, _ in picked}:
        remove_temp_debris(out / split)
        for stray in (out / split).glob(f"*-g{generation:04d}-*.tar"):
            stray.unlink()  # a killed compaction or pack of this (never committed) generation
    for (split, source), entries in sorted(picked.items()):
        shards = _rewrite(out, entries, f"{split}/{source}-g{generation:04d}", source, generation, max_bytes,
                          max_samples, report)
        new_entries.setdefault(split, []).extend(s.to_json() for s in shards)
        report.written += [s.path for s in shards]
    report.compacted = [e["path"] for e in all_picked]
    write_index(out, _compacted_index(index, new_entries, set(report.compacted), generation))
    return report


def _rewrite(out: Path, entries: list[dict[str, Any]], prefix: str, source: str, generation: int, max_bytes: int,
             max_samples: int, report: CompactReport) -> list[ShardInfo]:
    writer = ShardWriter(out, prefix, max_bytes=max_bytes, max_samples=max_samples, source=source,
                         generation=generation)
    try:
        for key, members, pack_key in live_samples_of(out, entries):
            writer.write(key, members, pack_key)
            report.samples += 1
    except BaseException:
        writer.abort()
        raise
    report.dropped += sum(len(superseded_keys(e)) for e in entries)
    return writer.close()


def _compacted_index(index: Mapping[str, Any], new_entries: Mapping[str, list[dict[str, Any]]], compacted: set[str],
                     generation: int) -> dict[str, Any]:
    out = dict(index)
    out["splits"] = {split: [e for e in index["splits"].get(split, []) if e["path"] not in compacted]
                     + list(new_entries.get(split, []))
                     for split in sorted(set(index.get("splits", {})) | set(new_entries))}
    out["splits"] = {split: entries for split, entries in out["splits"].items() if entries}
    out["generations"] = list(index.get("generations", [])) + [{
        "generation": generation,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "shards": [e["path"] for entries in new_entries.values() for e in entries],
        "retired": sorted(compacted),
        "compacted": True,
    }]
    out["retired"] = list(index.get("retired", [])) + [{"path": p, "generation": generation} for p in sorted(compacted)]
    return out
