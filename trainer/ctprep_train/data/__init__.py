"""Streaming WebDataset shards into training batches (the ``Batch`` of docs/training.md).

The modules, in the order data flows:

1. ``index``: ``load_shard_index`` reads ``index.json`` (through ``ctprep.shards``) and refuses
   shards of another schema version, tokenizer or patch grid than the trainer expects.
2. ``tar``: ``scan_tar`` lists a tar's samples from its headers alone; member data is read by
   offset (``read_member``, ``pread_into``).
3. ``decode``: ``decode_sample`` reads and verifies one sample (CRC32s, no pickle), leaving large
   volumes unread (``LazyNpy``, ``CompressedNpy``) until they are written into the batch.
4. ``collate``: ``collate_samples`` stacks samples into the batch contract.
5. ``streams``: ``TrainBatches`` (endless, shuffled, equal steps per rank, sources mixed per
   batch; ``mask_dropout`` makes some samples mask-free) and ``ValidBatches`` (every validation
   sample once over all ranks).
6. ``loaders``: ``BatchLoader`` and the ``build_*_loader`` functions the trainer calls.

Every public name is importable from ``ctprep_train.data``. Tuning constants
(``decode.LAZY_MIN_BYTES``, ``collate.READ_CHUNK``) are read from their own module, so that is
where a test or benchmark changes them.
"""

from ctprep.shards import (
    CHECKSUM_KEY,
    INDEX_CHECKSUM_KEY,
    CorruptMemberError,
    MetaChecksumError,
    ShardMismatchError,
    crc32,
    decode_member,
    decode_npy,
    member_field,
)
from ctprep_train.data.collate import READ_CHUNK, BufferPool, LazyVolumes, PendingVolumes, collate_samples
from ctprep_train.data.decode import (
    LAZY_FIELDS,
    LAZY_MIN_BYTES,
    REQUIRED_MEMBERS,
    CompressedNpy,
    CorruptVolumeError,
    LazyNpy,
    decode_sample,
)
from ctprep_train.data.index import (
    ShardExpectation,
    ShardIndex,
    ShardInfo,
    check_identity,
    check_tokenizer,
    load_shard_index,
    warn_unverified,
)
from ctprep_train.data.loaders import (
    BatchLoader,
    build_train_loader,
    build_valid_loader,
    expectation_from_config,
    samples_per_epoch,
)
from ctprep_train.data.mask_dropout import drop_mask, mask_dropout_rows
from ctprep_train.data.streams import (
    BATCH_STATS_KEY,
    SourceSchedule,
    SourceStream,
    TrainBatches,
    ValidBatches,
    replace_failed_rows,
    shuffled_shards,
    slot_shards,
)
from ctprep_train.data.tar import TAR_BLOCK, SampleRef, pread_into, read_member, scan_tar

__all__ = [
    "BATCH_STATS_KEY",
    "CHECKSUM_KEY",
    "INDEX_CHECKSUM_KEY",
    "LAZY_FIELDS",
    "LAZY_MIN_BYTES",
    "READ_CHUNK",
    "REQUIRED_MEMBERS",
    "TAR_BLOCK",
    "BatchLoader",
    "BufferPool",
    "CompressedNpy",
    "CorruptMemberError",
    "CorruptVolumeError",
    "LazyNpy",
    "LazyVolumes",
    "PendingVolumes",
    "MetaChecksumError",
    "SampleRef",
    "ShardExpectation",
    "ShardIndex",
    "ShardInfo",
    "ShardMismatchError",
    "SourceSchedule",
    "SourceStream",
    "TrainBatches",
    "ValidBatches",
    "build_train_loader",
    "build_valid_loader",
    "check_identity",
    "check_tokenizer",
    "collate_samples",
    "crc32",
    "decode_member",
    "decode_npy",
    "decode_sample",
    "drop_mask",
    "expectation_from_config",
    "load_shard_index",
    "mask_dropout_rows",
    "member_field",
    "pread_into",
    "read_member",
    "replace_failed_rows",
    "samples_per_epoch",
    "scan_tar",
    "shuffled_shards",
    "slot_shards",
    "warn_unverified",
]
