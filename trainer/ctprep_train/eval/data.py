"""Deterministic, sequential reading of one split of the shards for evaluation.

Training streams shuffled samples (``ctprep_train.data``); evaluation needs the
opposite: every case of a split exactly once, in index order, with its
``meta.json`` (report text for dedup, step regions for CoT alignment). Samples
are read and verified by the training reader (``ctprep_train.data.decode_sample``:
the same checksums, no pickle) and collated by ``ctprep_train.data``, so evaluation
sees exactly the bytes training would. A damaged sample is skipped and
reported with its shard and key, never evaluated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ctprep.schema import INDEX_FILE, SCHEMA_VERSION
from ctprep_train import shard_io
from ctprep_train.data import (
    LAZY_FIELDS,
    CorruptMemberError,
    ShardExpectation,
    ShardInfo,
    collate_samples,
    decode_sample,
    scan_tar,
    warn_unverified,
)

log = logging.getLogger(__name__)


def read_index(shards_root: str | Path) -> dict[str, Any]:
    """``index.json`` of a shard folder (or its http(s):// / s3:// URL); refused unless it is of this
    trainer's schema version."""
    return shard_io.read_index(shards_root, SCHEMA_VERSION)


def split_shards(shards_root: str | Path, split: str) -> list[ShardInfo]:
    """The shards ``index.json`` lists for ``split``, in index order, with their checksums and
    superseded keys (a shard with no live sample left is left out)."""
    index = read_index(shards_root)
    splits = index.get("splits", {})
    if split not in splits:
        raise KeyError(f"split {split!r} not in {shard_io.join(shards_root, INDEX_FILE)}; "
                       f"available: {sorted(splits)}")
    listed = [ShardInfo.from_entry(shard_io.join(shards_root, entry["path"]), entry) for entry in splits[split]]
    return [shard for shard in listed if shard.live_samples > 0]


def _expectation(index: dict[str, Any]) -> ShardExpectation:
    # Evaluation takes the tokenizer and patch grid the index declares (the encoder's tokenizer is
    # checked by ctprep_train.eval.run.check_tokenizer); every sample must agree with them.
    return ShardExpectation(schema_version=SCHEMA_VERSION, tokenizer=dict(index["tokenizer"]),
                            patch_size=tuple(int(p) for p in index.get("patch_size", (4, 16, 16))))


def iter_shard_samples(shard: ShardInfo, expect: ShardExpectation, skipped: list[dict[str, str]] | None = None
                       ) -> Iterator[dict[str, Any]]:
    """Every intact sample of one shard, volumes decoded (and verified) to numpy.

    A sample that fails its checksums or cannot be decoded is not yielded: it is appended to
    ``skipped`` as ``{"shard", "key", "error"}`` or, without ``skipped``, logged with both.
    A damaged tar header ends the shard there (reported with key ``""``).
    """

    def report(key: str, error: str) -> None:
        if skipped is not None:
            skipped.append({"shard": shard.path, "key": key, "error": error})
        else:
            log.warning("skipping damaged sample %s in %s: %s", key, shard.path, error)

    refs, error = scan_tar(shard.path)
    refs = shard.live(refs)  # superseded samples are not the case's current sample: never evaluated
    if shard.meta_crc32 is None:
        warn_unverified(shard)
    tokenizer = dict(expect.tokenizer or {})
    for ref in refs:
        try:
            sample = decode_sample(ref, expect, tokenizer, shard.meta_crc32)
            for name in LAZY_FIELDS:  # read now: verified before it can reach a batch
                sample[name] = np.asarray(sample[name])
        except (CorruptMemberError, OSError) as exc:
            report(ref.key, f"{type(exc).__name__}: {exc}")
            continue
        yield sample
    if error:
        report("", f"tar damaged ({error}); samples after it are not read")


def iter_split(
    shards_root: str | Path, split: str, max_cases: int | None = None, source: str | None = None,
    skipped: list[dict[str, str]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Every intact sample of ``split`` once, in index order (optionally only one source).

    Args:
        skipped: damaged samples are appended here (``{"shard", "key", "error"}``) instead of
            being logged; they do not count towards ``max_cases``.
    """
    expect = _expectation(read_index(shards_root))
    n = 0
    for shard in split_shards(shards_root, split):
        for sample in iter_shard_samples(shard, expect, skipped):
            meta = sample.get("meta", {})
            if source is not None and meta.get("source") != source:
                continue
            yield sample
            n += 1
            if max_cases is not None and n >= max_cases:
                return


def batches_by_shape(samples: Iterable[dict[str, Any]], batch_size: int) -> Iterator[dict[str, Any]]:
    """Group consecutive samples of equal volume shape (CT-RATE volumes and OmniAbnorm slabs differ)."""
    pending: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for s in samples:
        key = tuple(s["image"].shape)
        group = pending.setdefault(key, [])
        group.append(s)
        if len(group) == batch_size:
            yield collate_samples(group)
            pending[key] = []
    for group in pending.values():
        if group:
            yield collate_samples(group)
