"""The shard schema: the contract between ``ctprep`` (writer) and ``trainer`` (reader).

Change it only on purpose, in both at once, and bump ``SCHEMA_VERSION``.
This module is dependency-free so that the trainer can import it without Dask.
The code that writes and reads this format (members, ``index.json``, checksums) is
``ctprep.shards``; everything else goes through it.

One WebDataset sample per case; the sample key is the case id (``CASE_ID_RE``).
Members (``<key>.<member>``); any ``.npy`` member may carry a compression
suffix (``.npy.zst`` or ``.npy.gz``) that the reader must strip:

==========================  =======  =========================  ==========================================
member                      dtype    shape                      meaning
==========================  =======  =========================  ==========================================
``image.npy``               int16    (Z, Y, X)                  HU, canonical orientation (see below)
``mask.npy``                uint8    (Z, Y, X)                  coarse region id, 0 = background,
                                                                k = ``region_names[k-1]``
``regions.npy``             float16  (P, R + 1)                 per-patch fraction of voxels in each
                                                                region; column 0 = background; rows
                                                                sum to 1; P patches in z-major raster
                                                                order (pz, py, px) = Conv3d flatten order
``report_ids.npy``          int32    (L_report,)                token ids of findings + impression,
                                                                padded with the tokenizer's pad id
``report_len.npy``          int32    ()                         number of real tokens in report_ids
``steps_ids.npy``           int32    (S, L_step)                CoT steps in order, S <= max_steps (S may be 0)
``steps_len.npy``           int32    (S,)                       real tokens per step
``region_text_ids.npy``     int32    (R, L_region)              one sentence group per region (in
                                                                ``region_names`` order)
``region_text_len.npy``     int32    (R,)
``region_has_text.npy``     uint8    (R,)                       1 = region has its own finding text,
                                                                0 = default "no significant abnormality"
``labels.npy``              int8     (18,)                      ``ABNORMALITY_LABELS`` order; 1/0, -1 unknown
``meta.json``               --       --                         see ``META_KEYS``
==========================  =======  =========================  ==========================================

Canonical orientation: nibabel's closest-canonical RAS+ array transposed to
(z, y, x), i.e. increasing z, y, x index points Superior, Anterior, Right
(``CANONICAL_ORIENTATION``); ``meta.json["affine"]``
maps the stored array's voxel indices (in stored axis order z, y, x) to
patient millimetres in RAS+ (nibabel's convention).

``index.json`` at the shard root (``INDEX_FILE``)::

    {"schema_version": int, "pipeline_version": str,
     "tokenizer": {"name": str, "hash": str},
     "patch_size": [pz, py, px], "region_names": [...],
     "generations": [{"generation": int, "created": str, "shards": [path, ...]}],
     "splits": {"train": [{"path": str, "samples": int, "bytes": int,
                            "sha256": str, "source": str, "generation": int}], ...}}

Additive keys written by ``ctprep.stages.pack`` (readers may ignore them): each
shard entry's ``"cases": {case_id: pack_key}``, each generation's ``"retired":
[path, ...]`` and a top-level ``"retired": [{"path", "generation"}]`` listing
shards no longer to be read (files kept for readers of an older index).
Each shard entry's ``"meta_crc32": {sample key: CRC32 of its meta.json}``
(``INDEX_CHECKSUM_KEY``) lets readers verify ``meta.json`` itself; an entry without
it was packed before checksums and is read unverified.

Tombstones (``SUPERSEDED_KEY``, schema 3; readers must honour it): a shard entry may hold
``"superseded": [sample key, ...]``, samples of that tar that are no longer to be read (the
case changed and its new sample is in a shard of a later generation, or the case is gone).
The tar is never rewritten for it; ``samples`` still counts every sample in the tar, so a
shard holds ``samples - len(superseded)`` live samples. ``ctprep.shards.superseded_keys``
reads the list, ``ctprep.shards.live_shard_urls`` gives plain-webdataset readers the URLs and
a ``select`` predicate that drops them.

``splits`` lists exactly the shards to read; a case has a live sample in at most one listed
shard (its older samples are superseded, or their shard is retired).
"""

from __future__ import annotations

import re

# 2: meta.json gained ``has_mask`` and ``plane`` (a volume packed without an anatomy mask
#    must not look like one whose mask is all background).
# 3: shard entries may list ``superseded`` sample keys that readers must skip (a changed case is
#    packed into a new shard instead of repacking its old shard); meta.json gained ``truncated``.
SCHEMA_VERSION = 3
INDEX_FILE = "index.json"

# z, y, x axis order of every stored array: RAS+ closest-canonical, transposed.
# Voxel (0, 0, 0) is the inferior-posterior-left corner.
CANONICAL_ORIENTATION = ("S", "A", "R")  # direction of increasing z, y, x index

ABNORMALITY_LABELS = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

# The token members, as the text stage writes them (ctprep.stages.text.read_case_text reads them).
TEXT_MEMBERS = (
    "report_ids",
    "report_len",
    "steps_ids",
    "steps_len",
    "region_text_ids",
    "region_text_len",
    "region_has_text",
)
NPY_MEMBERS = ("image", "mask", "regions", *TEXT_MEMBERS, "labels")
COMPRESSION_SUFFIXES = ("", ".zst", ".gz")

META_KEYS = (
    "id",  # case id == sample key
    "source",  # "ctrate" | "omniabnorm"
    "split",  # "train" | "valid" | ...
    "spacing",  # [z, y, x] mm of the stored grid
    "affine",  # 4x4 list, stored voxel (z, y, x) -> RAS+ mm
    "shape",  # [Z, Y, X]
    "header_style",  # "v1" (raw + CSV slope/intercept) | "v2" (HU header) | "jpg"
    "tokenizer",  # {"name": str, "hash": str}
    "schema_version",
    "pipeline_version",
    "patch_size",  # [pz, py, px] used for regions.npy
    "region_names",  # list[str], R entries
    "report_text",  # findings + impression as tokenized (for dedup / eval)
    "steps_text",  # list[str], the CoT steps as tokenized
    "step_regions",  # list[int], per step: index into region_names it names, -1 if none
    "region_texts",  # list[str], R entries
    "has_mask",  # bool: False = no anatomy mask was given; mask.npy is all 0 and regions.npy all background
    "plane",  # "axial" | "coronal" | "sagittal": acquisition plane of the source images
    # {member name: CRC32 (zlib polynomial) of the member's bytes exactly as stored in the tar}
    # for every other member of the sample. meta.json's own CRC32 is in its shard's index.json
    # entry, "meta_crc32": {sample key: int}. Readers skip a sample that fails either; a sample
    # without them was packed before checksums and cannot be verified (docs/verified-reads.md).
    "crc32",
    # What the text stage cut to fit the config: {"steps_dropped": CoT steps beyond
    # text.max_steps, "report_tokens": tokens cut at text.max_len_report, "step_tokens": at
    # text.max_len_step (all steps), "region_tokens": at text.max_len_region (all regions)}.
    "truncated",
)
CHECKSUM_KEY = "crc32"  # meta.json: {member name: CRC32 of its stored bytes}
INDEX_CHECKSUM_KEY = "meta_crc32"  # index.json shard entry: {sample key: CRC32 of its meta.json bytes}
SUPERSEDED_KEY = "superseded"  # index.json shard entry: [sample key, ...] not to be read (tombstones)
TRUNCATION_KEYS = ("steps_dropped", "report_tokens", "step_tokens", "region_tokens")  # meta.json "truncated"

# A case id is a file-name stem: letters, digits, '_', '-'; no path parts and
# no '.', because WebDataset splits sample keys at the first '.'.
CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,199}$")


def is_safe_case_id(case_id: str) -> bool:
    """True if ``case_id`` can be used as a file name and a WebDataset key."""
    return bool(CASE_ID_RE.match(case_id))


def strip_compression(member: str) -> tuple[str, str]:
    """Split ``'image.npy.zst'`` into ``('image.npy', '.zst')``."""
    for suffix in (".zst", ".gz"):
        if member.endswith(suffix):
            return member[: -len(suffix)], suffix
    return member, ""
