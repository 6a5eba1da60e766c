"""Loaders: the DataLoader around the streams, and the background reader that fills its batches.

``BatchLoader`` turns ``LazyVolumes`` into tensors in a thread of the trainer process (``preadv``
releases the GIL; the next batch's reads are submitted before the current one is handed over) and hands the small arrays over as tensors; ``build_train_loader`` /
``build_valid_loader`` build it from the ``data`` section of the training config.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from ctprep_train.data.collate import BufferPool, LazyVolumes, PendingVolumes
from ctprep_train.data.index import ShardExpectation, ShardIndex
from ctprep_train.data.streams import TrainBatches, ValidBatches, replace_failed_rows


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class BatchLoader:
    """Iterate a DataLoader, turning ``LazyVolumes`` into tensors in a background thread.

    Keeps up to ``prefetch`` materialized batches ahead of the consumer, plus one whose reads are
    in flight. Errors raised by the DataLoader or while reading are re-raised in the consumer.
    """

    def __init__(self, loader: DataLoader, pin_memory: bool, prefetch: int = 2, read_threads: int = 1) -> None:
        self.loader, self.pin_memory, self.prefetch = loader, pin_memory, max(1, prefetch)
        self.read_threads = max(1, read_threads)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import queue
        import threading

        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        pool = BufferPool(max_per_shape=2 * self.prefetch + 4)
        # The reader thread is one of the copiers: with read_threads=1 it reads alone.
        readers = ThreadPoolExecutor(self.read_threads, "volume-read") if self.read_threads > 1 else None

        def start(batch: dict[str, Any]) -> dict[str, Any]:
            """Submit the batch's volume reads; turn its small arrays into tensors."""
            for key, value in batch.items():
                if isinstance(value, LazyVolumes):
                    batch[key] = value.start(self.pin_memory, pool, readers)
                elif isinstance(value, np.ndarray):
                    tensor = torch.from_numpy(value)
                    batch[key] = tensor.pin_memory() if self.pin_memory else tensor
            return batch

        def finish(batch: dict[str, Any]) -> dict[str, Any]:
            failed: dict[int, str] = {}
            for key, value in batch.items():
                if isinstance(value, PendingVolumes):
                    batch[key] = value.finish(failed)
            if failed:
                replace_failed_rows(batch, failed)
            return batch

        def fill() -> None:
            # Two batches in flight: batch k's reads run in the read threads while this thread
            # takes batch k + 1 from the DataLoader workers and submits its reads.
            pending = None
            try:
                for batch in self.loader:
                    batch = start(batch)
                    if pending is not None and not put(finish(pending)):
                        return
                    pending = batch
                if pending is not None and not put(finish(pending)):
                    return
                put(done)
            except BaseException as exc:  # hand every failure to the consumer
                put(exc)

        thread = threading.Thread(target=fill, name="batch-reader", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Let the reader leave its DataLoader loop (it shuts the workers down) before the
            # interpreter exits; a thread killed inside torch aborts the process.
            stop.set()
            while True:
                try:
                    out.get_nowait()
                except queue.Empty:
                    break
            thread.join(timeout=30)
            if readers is not None:
                readers.shutdown(wait=False, cancel_futures=True)


def _loader(
    dataset: IterableDataset, num_workers: int, pin_memory: bool, prefetch_factor: int, seed: int, read_threads: int = 1
) -> BatchLoader:
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=False)
    pin = pin_memory and torch.cuda.is_available()
    loader = DataLoader(
        dataset,
        batch_size=None,  # batches are formed per source inside the dataset
        collate_fn=_as_is,  # default_convert would walk every meta dict of every batch
        num_workers=num_workers,
        pin_memory=pin,
        # Its own generator: the loader is started in the reader thread, and drawing worker
        # seeds from the global RNG there would race with dropout in the training step.
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return BatchLoader(loader, pin, prefetch=prefetch_factor, read_threads=read_threads)


def expectation_from_config(data_cfg, tokenizer: dict[str, str] | None = None) -> ShardExpectation:
    """What to require of the shards; ``tokenizer`` is the resolved identity (None = the index's)."""
    if tokenizer is None and isinstance(data_cfg.tokenizer, dict):
        tokenizer = data_cfg.tokenizer
    return ShardExpectation(
        schema_version=int(data_cfg.schema_version),
        tokenizer=dict(tokenizer) if tokenizer else None,
        patch_size=tuple(int(p) for p in data_cfg.patch_size),
    )


def build_train_loader(
    data_cfg, index: ShardIndex, expect: ShardExpectation, *, rank: int, world_size: int, start_batch: int = 0
) -> BatchLoader:
    """Endless training batches for this rank (see ``TrainBatches``)."""
    weights = {k: float(v) for k, v in data_cfg.sources.items() if float(v) > 0}
    dataset = TrainBatches(
        index.shards(data_cfg.train_split, list(weights)),
        weights,
        batch_size=data_cfg.batch_size,
        buffer_size=data_cfg.buffer_size,
        seed=data_cfg.seed,
        rank=rank,
        world_size=world_size,
        expect=expect,
        tokenizer=index.tokenizer,
        start_batch=start_batch,
        mask_dropout=data_cfg.mask_dropout,
    )
    return _loader(
        dataset, data_cfg.num_workers, data_cfg.pin_memory, data_cfg.prefetch_factor, data_cfg.seed, data_cfg.read_threads
    )


def build_valid_loader(
    data_cfg, index: ShardIndex, expect: ShardExpectation, *, rank: int, world_size: int
) -> BatchLoader | None:
    """Validation batches for this rank, or None if the index has no validation split."""
    if data_cfg.valid_split not in index.raw.get("splits", {}):
        return None
    sources = [k for k, v in data_cfg.sources.items() if float(v) > 0]
    available = index.shards(data_cfg.valid_split)
    shards = {s: available[s] for s in sources if s in available}
    if not shards:
        return None
    dataset = ValidBatches(
        shards,
        batch_size=data_cfg.batch_size,
        rank=rank,
        world_size=world_size,
        expect=expect,
        tokenizer=index.tokenizer,
        max_samples=data_cfg.valid_max_samples,
    )
    return _loader(dataset, 0, data_cfg.pin_memory, data_cfg.prefetch_factor, data_cfg.seed, data_cfg.read_threads)


def samples_per_epoch(index: ShardIndex, data_cfg) -> int:
    """Training samples of the weighted sources (index sample counts, superseded samples excluded)."""
    weights = [k for k, v in data_cfg.sources.items() if float(v) > 0]
    return sum(s.live_samples for shards in index.shards(data_cfg.train_split, weights).values() for s in shards)

