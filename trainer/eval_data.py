"""Deterministic, sequential reading of one split of the shards for evaluation.

Training streams shuffled samples (``trainer.data``); evaluation needs the
opposite: every case of a split exactly once, in index order, with its
``meta.json`` (report text for dedup, step regions for CoT alignment). Reading
is plain ``tarfile`` over the shards that ``index.json`` lists; members are
decoded and batches collated by ``trainer.data`` (no pickle, same batch
contract as training).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ctprep.schema import INDEX_FILE, strip_compression
from trainer.data import collate_samples, decode_member


def read_index(shards_root: str | Path) -> dict[str, Any]:
    path = Path(shards_root) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {shards_root} a `ctprep build-shards` output folder?")
    return json.loads(path.read_text())


def split_shards(shards_root: str | Path, split: str) -> list[Path]:
    index = read_index(shards_root)
    splits = index.get("splits", {})
    if split not in splits:
        raise KeyError(f"split {split!r} not in {Path(shards_root) / INDEX_FILE}; available: {sorted(splits)}")
    return [Path(shards_root) / entry["path"] for entry in splits[split]]


def iter_tar_samples(path: Path) -> Iterator[dict[str, Any]]:
    """Yield {member name without compression suffix: decoded value, "__key__": key} per sample."""
    current: dict[str, Any] = {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = Path(info.name).name
            key, _, member = name.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key
            raw = tar.extractfile(info).read()  # type: ignore[union-attr]
            base, _ = strip_compression(member)
            if base.endswith((".npy", ".json")):
                current[base.rsplit(".", 1)[0]] = decode_member(member, raw)
    if current:
        yield current


def iter_split(
    shards_root: str | Path, split: str, max_cases: int | None = None, source: str | None = None
) -> Iterator[dict[str, Any]]:
    """Every sample of ``split`` once, in index order (optionally only one source)."""
    n = 0
    for shard in split_shards(shards_root, split):
        for sample in iter_tar_samples(shard):
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
