"""Sample streams: endless shuffled training batches and one-pass validation batches per rank.

* Shard order is shuffled with one seed shared by every rank *before* the list is split by
  (rank, worker) slot; each slot cycles over its shards forever, reshuffled per pass. The
  trainer takes a fixed number of batches per epoch on every rank, so ranks with fewer or
  smaller shards simply start their next pass: equal step counts, no hang.
* A small shuffle buffer mixes ``SampleRef``s (a few bytes each); a sample is decoded only
  when it leaves the buffer, so the buffer costs no volume memory.
* Several sources are mixed by weight at the *batch* level: a batch holds one source only
  (CT-RATE volumes and OmniAbnorm slabs have different shapes). The source of global batch k
  is drawn from a generator seeded by (seed, k), so all ranks and workers agree on it and a
  resumed run replays the same sequence.
* A member that cannot be read or decoded makes its sample be skipped and counted (reported
  per batch under ``BATCH_STATS_KEY``, which the trainer pops before the model sees the
  batch); a shard whose tar headers are corrupt is read up to the corruption.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ctprep.shards import CorruptMemberError
from ctprep_train.data.collate import collate_samples
from ctprep_train.data.decode import CorruptVolumeError, decode_sample
from ctprep_train.data.index import ShardExpectation, ShardInfo, warn_unverified
from ctprep_train.data.mask_dropout import drop_mask, mask_dropout_rows
from ctprep_train.data.tar import SampleRef, scan_tar

log = logging.getLogger(__name__)

BATCH_STATS_KEY = "_stream"  # per-batch loader statistics; popped by the trainer


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
                    except OSError as exc:  # unreadable now (a server down): not remembered, tried next pass
                        refs, error = [], f"{type(exc).__name__}: {exc}"
                    else:
                        refs = self._scanned[shard.path] = shard.live(refs)
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
        mask_dropout: probability that a sample's anatomy mask is replaced by background
            (``ctprep_train.data.mask_dropout``).
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
        mask_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.shards, self.schedule = shards, SourceSchedule(weights, seed)
        self.batch_size, self.buffer_size, self.seed = batch_size, buffer_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.expect, self.tokenizer, self.mask_dropout = expect, tokenizer, mask_dropout

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
            dropped = mask_dropout_rows(self.mask_dropout, self.seed, k, len(samples))
            for i in np.flatnonzero(dropped):
                drop_mask(samples[i])
            while True:
                try:
                    batch = collate_samples(samples, small_as_numpy=True)
                    break
                except CorruptVolumeError as exc:  # found only while decompressing into the batch
                    counter.corrupt += 1
                    bad = samples[exc.index]
                    log.warning("skipping corrupt sample %s in %s: %s", bad["__key__"], bad.get("__shard__"), exc)
                    samples[exc.index] = streams[source].next_sample()
                    if dropped[exc.index]:
                        drop_mask(samples[exc.index])
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
                found = shard.live(found)
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
