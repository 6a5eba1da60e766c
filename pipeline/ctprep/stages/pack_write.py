"""Writing one generation's shards for the pack stage: in process, or by the Dask workers.

The shards of a (split, source) group hold its samples in case-id order, cut into shards by
:class:`~ctprep.shard_writer.Rollover` on each sample's tar footprint. Which samples share a
shard therefore depends only on the samples themselves, and both ways write the same bytes:

* **in process** (no Dask client): encode a sample, append it to the open shard
  (:class:`~ctprep.shard_writer.ShardWriter`), one at a time.
* **on the workers**: a worker encodes each sample and keeps it; the driver fetches only its
  footprint (an int), applies the same rule in the same order and, when a shard is complete,
  submits :func:`~ctprep.shard_writer.write_shard` with that shard's samples, which Dask moves
  from worker to worker. The driver never holds sample bytes; it commits ``index.json``.

Memory on the workers: the open shard's samples plus ``window`` encoded samples ahead of it
plus the shards being written (at most one per worker), each up to ``pack.shard_max_bytes``.
Every worker must see ``OUT`` at the same path, as every worker sees the work folder.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ctprep.shard_writer import Rollover, ShardInfo, ShardWriter, tar_footprint, write_shard

Encode = Callable[[dict[str, Any]], Mapping[str, bytes]]


@dataclass
class GroupOutput:
    """The shards written for one (split, source) group, and the jobs whose sample failed to encode."""

    shards: list[ShardInfo] = field(default_factory=list)
    failed: list[tuple[dict[str, Any], BaseException]] = field(default_factory=list)


@dataclass(frozen=True)
class ShardTarget:
    """Where and how one group's shards are written."""

    out_dir: Path
    prefix: str  # e.g. "train/ctrate-g0003" (shards <prefix>-<n:05d>.tar)
    source: str
    generation: int
    max_bytes: int
    max_samples: int


def write_group(jobs: list[dict[str, Any]], encode: Encode, target: ShardTarget, client: Any = None) -> GroupOutput:
    """Encode ``jobs`` (in order; each has ``case_id`` and ``pack_key``) and write their shards.

    Args:
        encode: job -> sample members (runs on a worker when ``client`` is given).
        client: a Dask client, or None to work in process. Either way, the same bytes.
    """
    if client is None:
        return _write_in_process(jobs, encode, target)
    return _write_on_workers(jobs, encode, target, client)


def _write_in_process(jobs: list[dict[str, Any]], encode: Encode, target: ShardTarget) -> GroupOutput:
    out = GroupOutput()
    writer = ShardWriter(target.out_dir, target.prefix, max_bytes=target.max_bytes, max_samples=target.max_samples,
                         source=target.source, generation=target.generation)
    try:
        for job in jobs:
            try:
                members = encode(job)
            except Exception as e:  # noqa: BLE001 - a bad case is quarantined, not fatal
                out.failed.append((job, e))
                continue
            writer.write(job["case_id"], members, job["pack_key"])
    except BaseException:
        writer.abort()
        raise
    out.shards = writer.close()
    return out


def _encoded_on_workers(jobs: list[dict[str, Any]], encode: Encode, client: Any, window: int
                        ) -> Iterator[tuple[dict[str, Any], Any, Any]]:
    """(job, members future, footprint or exception) in job order, ``window`` encodes in flight."""
    pending: deque = deque()
    it = iter(jobs)

    def submit(job: dict[str, Any]) -> None:
        members = client.submit(encode, job, pure=False)
        pending.append((job, members, client.submit(tar_footprint, members, pure=False)))

    for job in it:
        submit(job)
        if len(pending) >= window:
            break
    while pending:
        job, members, size_future = pending.popleft()
        try:
            size: Any = size_future.result()
        except Exception as e:  # noqa: BLE001 - the encode failed (the footprint task inherits it)
            size = e
        size_future.release()
        if (nxt := next(it, None)) is not None:
            submit(nxt)
        yield job, members, size


def _write_on_workers(jobs: list[dict[str, Any]], encode: Encode, target: ShardTarget, client: Any) -> GroupOutput:
    out = GroupOutput()
    workers = max(1, len(client.scheduler_info().get("workers", {})))
    rollover = Rollover(target.max_bytes, target.max_samples)
    shard: list[tuple[dict[str, Any], Any]] = []  # (job, members future) of the open shard
    writes: list[Any] = []  # one future per shard, in shard order
    in_flight: deque = deque()

    def flush() -> None:
        keys = [job["case_id"] for job, _ in shard]
        pack_keys = [job["pack_key"] for job, _ in shard]
        writes.append(client.submit(write_shard, str(target.out_dir), target.prefix, len(writes), keys, pack_keys,
                                    target.source, target.generation, *[m for _, m in shard], pure=False))
        in_flight.append(writes[-1])
        shard.clear()
        while in_flight and in_flight[0].done():
            in_flight.popleft()
        if len(in_flight) > workers:  # bound the shards held in memory while being written
            in_flight.popleft().result()

    try:
        for job, members, size in _encoded_on_workers(jobs, encode, client, 2 * workers):
            if isinstance(size, BaseException):
                out.failed.append((job, size))
                members.release()
                continue
            if rollover.starts_new(size) and shard:
                flush()
            shard.append((job, members))
        if shard:
            flush()
        out.shards = [w.result() for w in writes]
    except BaseException:
        client.cancel(writes)
        raise
    return out
