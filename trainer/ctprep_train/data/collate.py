"""Stacking decoded samples into the ``Batch`` (the trainer <-> model contract, docs/training.md).

Volumes are written once, straight into the batch tensor: compressed members are decompressed
into it (shared memory inside a DataLoader worker), and uncompressed ones travel as
``LazyVolumes`` (where the bytes are) and are read by ``BatchLoader`` in the trainer process with
``preadv`` into a pooled or pinned buffer, in parallel ``READ_CHUNK`` pieces.
"""

from __future__ import annotations

import functools
import math
import sys
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from ctprep.shards import CorruptMemberError
from ctprep_train.data.decode import CompressedNpy, CorruptVolumeError, LazyNpy, crc32_combine


def _pad_stack(arrays: list[np.ndarray], shape: tuple[int, ...], fill: int, dtype) -> np.ndarray:
    out = np.full((len(arrays), *shape), fill, dtype=dtype)
    for i, a in enumerate(arrays):
        out[(i, *tuple(slice(0, n) for n in a.shape))] = a
    return out


def _lengths_to_mask(lengths: np.ndarray, width: int) -> np.ndarray:
    return np.arange(width) < lengths[..., None]


@dataclass
class LazyVolumes:
    """A batch's volumes still in the tar: (path, offset) per sample, read by ``BatchLoader``.

    DataLoader workers hand batches to the trainer process through shared memory, which costs
    a fresh shared mapping, its page faults and one more copy per volume; a worker therefore
    sends only where the bytes are, and the trainer process reads them with ``preadv`` straight
    into the (pinned) batch tensor, in background threads (``preadv`` and ISA-L's CRC32 release
    the GIL). Each ``decode.CRC_PIECE`` read is checksummed right away, while it is in the CPU
    cache, so verification adds no second pass over the volume in memory.
    """

    parts: list[LazyNpy]
    dtype: torch.dtype

    def materialize(
        self, pin: bool = False, pool: BufferPool | None = None, executor: Executor | None = None,
        failed: dict[int, str] | None = None,
    ) -> torch.Tensor:
        """The stacked batch tensor, verified; with ``executor``, read in ``READ_CHUNK`` pieces in
        parallel (the pieces' CRC32s are joined with ``crc32_combine``).

        A volume that cannot be read (the shard was truncated or changed after it was scanned)
        or fails its CRC32 raises ``CorruptMemberError``, or, with ``failed``, is recorded there as
        ``{batch index: message}`` and its slot left unspecified (``BatchLoader`` replaces the row).
        """
        return self.start(pin, pool, executor).finish(failed)

    def start(self, pin: bool = False, pool: BufferPool | None = None,
              executor: Executor | None = None) -> PendingVolumes:
        """Allocate the batch tensor and submit its reads to ``executor`` (None: ``finish`` reads);
        ``BatchLoader`` fetches the next batch from its workers while these reads run."""
        shape = (len(self.parts), *self.parts[0].shape)
        if pool is not None and not pin:
            out = pool.take(shape, self.dtype)
        else:
            out = torch.empty(shape, dtype=self.dtype, pin_memory=pin)
        view = out.numpy()
        chunks = []  # (batch index, part, [(future -> the chunk's CRC32, chunk bytes)])
        if executor is not None:
            for i, part in enumerate(self.parts):
                target = memoryview(view[i].reshape(-1).view(np.uint8))
                chunks.append((i, part, [(executor.submit(_read_chunk, part, target, start),
                                          min(READ_CHUNK, part.nbytes - start))
                                         for start in range(0, part.nbytes, READ_CHUNK)]))
        return PendingVolumes(self.parts, out, chunks if executor is not None else None)


@dataclass
class PendingVolumes:
    """A batch tensor whose reads are submitted (``LazyVolumes.start``); ``finish`` awaits them."""

    parts: list[LazyNpy]
    out: torch.Tensor
    chunks: list | None  # None: not submitted, ``finish`` reads in this thread

    def finish(self, failed: dict[int, str] | None = None) -> torch.Tensor:
        """Await (or do) the reads and check the CRC32s; failures as in ``LazyVolumes.materialize``."""
        view = self.out.numpy()
        bad: dict[int, Exception] = {}  # batch index -> its first read or checksum failure
        if self.chunks is None:
            for i, part in enumerate(self.parts):
                _record(bad, i, lambda part=part, i=i: part.read_into(view[i]))  # reads, verifying as it goes
        else:
            # Every future is awaited, failed or not: none may still write into the batch after this.
            for i, part, futures in self.chunks:
                crcs = [_record(bad, i, future.result) for future, _ in futures]
                if i not in bad:  # the chunks' CRC32s, joined in order = the data's
                    data_crc = 0
                    for crc, (_, n) in zip(crcs, futures):
                        data_crc = crc32_combine(data_crc, crc, n)
                    _record(bad, i, lambda part=part, c=data_crc: part.check(c))
        if bad and failed is None:
            raise next(iter(bad.values()))
        for i, exc in bad.items():
            failed.setdefault(i, f"{type(exc).__name__}: {exc}")
        return self.out


def _record(bad: dict[int, Exception], i: int, job) -> Any:
    """``job()``; a read or checksum failure is kept as ``bad[i]`` (the first one per index)."""
    try:
        return job()
    except (CorruptMemberError, OSError) as exc:
        bad.setdefault(i, exc)
        return None


READ_CHUNK = 4 << 20  # bytes per parallel read: small enough to balance threads, large enough to stream


def _read_chunk(part: LazyNpy, target: memoryview, start: int) -> int:
    """Copy bytes [start, start + READ_CHUNK) of ``part``'s data into the same range of ``target``;
    their CRC32 (0 when the part is not verified)."""
    return part.read_range_into(target, start, min(start + READ_CHUNK, part.nbytes))


class BufferPool:
    """Reuse CPU batch buffers once nothing references them any more.

    Fresh anonymous memory has to be zeroed and faulted in by the kernel, which costs about as
    much as the read itself for tens of MB per batch. A pooled tensor is handed out again only
    when its Python object and its storage are referenced by the pool alone (no batch, view or
    copy-in-flight holds it). Pinned (CUDA) buffers are not pooled here: torch's caching host
    allocator already reuses them and tracks pending device copies.
    """

    def __init__(self, max_per_shape: int = 8) -> None:
        self.max_per_shape = max_per_shape
        self._free: dict[tuple, list[torch.Tensor]] = {}

    @staticmethod
    def _unused(t: torch.Tensor) -> bool:
        # refs: the pool's list, take()'s loop variable, this argument, getrefcount's argument;
        # storage use count: t itself + the temporary storage wrapper
        return sys.getrefcount(t) <= 4 and torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensors = self._free.setdefault((shape, dtype), [])
        for t in tensors:
            if self._unused(t):
                return t
        t = torch.empty(shape, dtype=dtype)
        if len(tensors) < self.max_per_shape:
            tensors.append(t)
        return t


@functools.lru_cache(maxsize=None)
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype (a tensor made to ask costs ~20 us per batch and volume)."""
    return torch.empty((), dtype=dtype).numpy().dtype


def _stack_volumes(arrays: list[np.ndarray | LazyNpy], dtype: torch.dtype) -> torch.Tensor | LazyVolumes:
    """Stack same-shape volumes (one copy), or defer uncompressed ones as ``LazyVolumes``."""
    shape = tuple(arrays[0].shape)
    for array in arrays:
        if tuple(array.shape) != shape:
            raise ValueError(f"volume shapes differ within a batch: {tuple(array.shape)} vs {shape}")
    np_dtype = _numpy_dtype(dtype)
    if all(isinstance(a, LazyNpy) and a.dtype == np_dtype and not a.fortran for a in arrays):
        return LazyVolumes(list(arrays), dtype)
    full = (len(arrays), *shape)
    if get_worker_info() is not None:  # allocate in shared memory: the hand-over then copies nothing
        nbytes = math.prod(full) * np_dtype.itemsize
        out = torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, full)
    else:
        out = torch.empty(full, dtype=dtype)
    view = out.numpy()
    for i, array in enumerate(arrays):
        try:
            if isinstance(array, (LazyNpy, CompressedNpy)) and array.dtype == view.dtype:
                array.read_into(view[i])
            else:
                view[i] = np.asarray(array)
        except Exception as exc:
            raise CorruptVolumeError(i, f"volume {i} of the batch: {type(exc).__name__}: {exc}") from exc
    return out


def collate_samples(samples: list[dict[str, Any]], *, small_as_numpy: bool = False) -> dict[str, Any]:
    """Stack decoded samples into the ``Batch`` of notes/plan.md (Trainer <-> model contract).

    Token ids are int32 in shards and int64 in the batch; lengths become bool attention
    masks. ``small_as_numpy`` keeps the small arrays as numpy (the streaming datasets use it:
    a DataLoader worker pickles numpy inline, while each torch tensor would cost a shared-memory
    segment and a file descriptor; ``BatchLoader`` turns them into tensors). ``S`` (steps) is the largest step count in the batch, at least 1, so that a batch of
    step-less cases still has a valid (all-False) ``steps_valid``.
    """
    n = len(samples)
    image = _stack_volumes([s["image"] for s in samples], torch.int16)
    mask = _stack_volumes([s["mask"] for s in samples], torch.uint8)
    regions = np.stack([s["regions"] for s in samples])

    report_l = max(s["report_ids"].shape[0] for s in samples)
    report_ids = _pad_stack([s["report_ids"] for s in samples], (report_l,), 0, np.int64)
    report_len = np.array([int(s["report_len"]) for s in samples])

    steps_s = max(1, max(s["steps_ids"].shape[0] for s in samples))
    steps_l = max(max(s["steps_ids"].shape[1] for s in samples), 1)
    steps_ids = _pad_stack([s["steps_ids"] for s in samples], (steps_s, steps_l), 0, np.int64)
    steps_len = _pad_stack([s["steps_len"].reshape(-1) for s in samples], (steps_s,), 0, np.int64)
    steps_valid = np.zeros((n, steps_s), dtype=bool)
    step_regions = np.full((n, steps_s), -1, dtype=np.int64)
    for i, s in enumerate(samples):
        k = s["steps_ids"].shape[0]
        steps_valid[i, :k] = True
        regs = list(s["meta"].get("step_regions", []))[:k]
        step_regions[i, : len(regs)] = regs

    region_r = max(s["region_text_ids"].shape[0] for s in samples)
    region_l = max(s["region_text_ids"].shape[1] for s in samples)
    region_ids = _pad_stack([s["region_text_ids"] for s in samples], (region_r, region_l), 0, np.int64)
    region_len = _pad_stack([s["region_text_len"].reshape(-1) for s in samples], (region_r,), 0, np.int64)
    region_has = _pad_stack([s["region_has_text"].reshape(-1) for s in samples], (region_r,), 0, np.uint8)
    # A case packed without an anatomy mask has no region evidence: its region sentences
    # must not become anchors of the region <-> text loss.
    region_has[[not s["meta"].get("has_mask", True) for s in samples]] = 0

    labels = np.stack([s["labels"].astype(np.int64) for s in samples])
    small = {
        "regions": regions,
        "report_ids": report_ids,
        "report_attn": _lengths_to_mask(report_len, report_l),
        "steps_ids": steps_ids,
        "steps_attn": _lengths_to_mask(steps_len, steps_l) & steps_valid[..., None],
        "steps_valid": steps_valid,
        "region_text_ids": region_ids,
        "region_text_attn": _lengths_to_mask(region_len, region_l),
        "region_has_text": region_has.astype(bool),
        "labels": labels,
        "step_regions": step_regions,
    }
    if not small_as_numpy:
        small = {k: torch.from_numpy(v) for k, v in small.items()}
    return {
        "image": image,
        "mask": mask,
        **small,
        "ids": [s["__key__"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }
