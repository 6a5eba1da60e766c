"""The shard index a run reads: ``index.json`` checked against what the trainer expects.

``load_shard_index`` reads ``index.json`` through ``ctprep.shards`` (the one home of the shard
format, shared with the writer; a URL's through ``ctprep_train.shard_io``) and refuses shards whose schema version, tokenizer identity or
patch grid differ from what the trainer expects, naming the mismatch and the file. Every
sample's ``meta.json`` is checked against the same expectation when it is decoded
(``ctprep_train.data.decode``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctprep import schema, shards
from ctprep.shards import INDEX_CHECKSUM_KEY, ShardMismatchError
from ctprep_train import shard_io
from ctprep_train.data.tar import SampleRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    path: str  # absolute path of the tar, or its http(s):// / s3:// URL
    samples: int  # samples in the tar, superseded ones included (index.json "samples")
    source: str
    bytes: int = 0
    # sample key -> CRC32 of its meta.json, from the index; None: packed before checksums
    meta_crc32: Mapping[str, int] | None = field(default=None, compare=False, hash=False, repr=False)
    # keys of samples in the tar that are not to be read (index.json "superseded": tombstones)
    superseded: frozenset[str] = field(default=frozenset(), compare=False, hash=False, repr=False)

    @classmethod
    def from_entry(cls, path: str, entry: Mapping[str, Any]) -> ShardInfo:
        """The shard of an ``index.json`` shard entry, found at ``path``."""
        return cls(path=path, samples=int(entry["samples"]), source=str(entry.get("source", "ctrate")),
                   bytes=int(entry.get("bytes", 0)), meta_crc32=shards.index_meta_crcs(entry),
                   superseded=shards.superseded_keys(entry))

    @property
    def live_samples(self) -> int:
        """Samples to be read: the tar's minus the superseded ones."""
        return self.samples - len(self.superseded)

    def live(self, refs: Sequence[SampleRef]) -> list[SampleRef]:
        """``refs`` of this shard without its superseded samples (every reader drops them here)."""
        return [ref for ref in refs if ref.key not in self.superseded]


@dataclass(frozen=True)
class ShardExpectation:
    """What the trainer requires of the shards it reads."""

    schema_version: int = schema.SCHEMA_VERSION
    tokenizer: dict[str, str] | None = None  # None: accept the index's tokenizer
    patch_size: tuple[int, int, int] = (4, 16, 16)
    verify_checksums: bool = True  # False only to measure what verification costs (bench/loader.py)


@dataclass
class ShardIndex:
    root: Path | str  # the shard folder: a local path, or an http(s):// / s3:// URL (ctprep_train.shard_io)
    raw: dict[str, Any]

    @property
    def index_file(self) -> str:
        return shard_io.join(self.root, schema.INDEX_FILE)

    @property
    def tokenizer(self) -> dict[str, str]:
        return dict(self.raw["tokenizer"])

    @property
    def region_names(self) -> list[str]:
        return list(self.raw.get("region_names", []))

    def shards(self, split: str, sources: Sequence[str] | None = None) -> dict[str, list[ShardInfo]]:
        """Shards of ``split`` grouped by source (only ``sources`` if given, in that order).

        A shard whose samples are all superseded is left out: it has nothing to read, and a rank
        slot holding only such shards could produce no batch.
        """
        entries = self.raw.get("splits", {}).get(split)
        if entries is None:
            raise ShardMismatchError(
                f"{self.index_file}: no split '{split}' (has {sorted(self.raw.get('splits', {}))})"
            )
        grouped: dict[str, list[ShardInfo]] = {}
        for entry in entries:
            info = ShardInfo.from_entry(shard_io.join(self.root, entry["path"]), entry)
            if info.live_samples > 0:
                grouped.setdefault(info.source, []).append(info)
        if sources is None:
            return grouped
        missing = [s for s in sources if s not in grouped]
        if missing:
            raise ShardMismatchError(
                f"{self.index_file}: split '{split}' has no shards of source(s) {missing} "
                f"(has {sorted(grouped)}); set its weight to 0 in data.sources to train without it"
            )
        return {s: grouped[s] for s in sources}


def warn_unverified(shard: ShardInfo) -> None:
    """One warning for a shard whose samples cannot be verified (packed before checksums)."""
    log.warning("%s: its index entry has no %s (packed before per-sample checksums): its samples are read "
                "unverified; rebuild the shards with this ctprep version to verify them", shard.path,
                INDEX_CHECKSUM_KEY)


def _describe_tokenizer(identity: Any) -> str:
    if not isinstance(identity, Mapping):
        return f"{identity!r} (no identity)"
    return f"{identity.get('name')!r} (hash {identity.get('hash')})"


def check_tokenizer(where: str, found: Any, expected: Mapping[str, str], fix: str = "") -> None:
    """Refuse a tokenizer identity ``found`` whose hash is not ``expected``'s.

    The identity is the hash of the tokenizer files (``ctprep.tokenizer.tokenizer_files_hash``);
    the name is informational: the same files copied elsewhere (an export's tokenizer folder) have
    another name and the same hash, and pass. The trainer (index and every ``meta.json`` against
    the model's tokenizer) and evaluation (the shards against the encoder's export) both check here.

    Args:
        where: the file (or sample) ``found`` comes from, for the message.
        fix: what to do about a mismatch, appended to the message.

    Raises:
        ShardMismatchError: naming both identities (name and hash).
    """
    if isinstance(found, Mapping) and found.get("hash") and found.get("hash") == expected.get("hash"):
        return
    raise ShardMismatchError(
        f"{where}: tokenizer {_describe_tokenizer(found)} != expected {_describe_tokenizer(expected)}; the token "
        "ids would not match the text encoder's vocabulary" + (f". {fix}" if fix else "")
    )


def check_identity(where: str, found: dict[str, Any], exp: ShardExpectation, tokenizer: dict | None) -> None:
    """Refuse ``found`` (``index.json`` or a ``meta.json``) of another schema, tokenizer or patch grid.

    Args:
        tokenizer: the identity to require (the index's, for a sample); None: ``exp.tokenizer``.
    """
    shards.check_schema_version(where, found.get("schema_version"), exp.schema_version)
    want = tokenizer if tokenizer is not None else exp.tokenizer
    if want is not None:
        check_tokenizer(where, found.get("tokenizer"), want,
                        "Rebuild the shards with the model's tokenizer or pick a matching config")
    patch = found.get("patch_size")
    if patch is None or [int(p) for p in patch] != [int(p) for p in exp.patch_size]:
        raise ShardMismatchError(
            f"{where}: patch_size {patch} != data.patch_size {list(exp.patch_size)}; regions.npy rows "
            "would not line up with the model's patch grid"
        )


def load_shard_index(root: str | Path, expect: ShardExpectation) -> ShardIndex:
    """Read ``root/index.json`` (a folder or a URL) and refuse it if it does not match ``expect``."""
    root = root if shard_io.is_remote(root) else Path(root)
    raw = shard_io.read_index(root, expect.schema_version)
    check_identity(shard_io.join(root, schema.INDEX_FILE), raw, expect, None)
    return ShardIndex(root=root, raw=raw)
