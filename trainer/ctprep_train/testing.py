"""Test support, not used by training: small schema-conforming shards for tests and benchmarks.

Nothing in ``ctprep_train`` imports this module. It ships inside the library rather than under
``tests/`` because ``bench/loader.py`` and the multi-process tests write their shards with it
from the installed package. The real writer is ``ctprep.stages.pack``; this one exists so the
trainer can be tested on tiny, hand-controlled shards (uneven sizes, a wrong tokenizer, a
corrupt member) without running the pipeline. Member bytes come from the writer's own encoder
(``ctprep.shards.encode_sample``: npy, zstd frames with checksums, canonical ``meta.json`` with
its ``crc32`` map) and the index, written by ``ctprep.shards.write_index``, records each
sample's ``meta_crc32``, so the trainer verifies test shards as it does real ones. Samples
carry a learnable signal: each case has a class ``c`` that sets both a bright
blob in the image and the first report tokens.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctprep import schema, shards

TEST_TOKENIZER = {"name": "trainer-test-tokenizer", "hash": "0" * 16}
TEST_REGIONS = ("lung", "heart", "aorta")


def make_sample(
    case_id: str,
    *,
    rng: np.random.Generator,
    source: str = "ctrate",
    split: str = "train",
    shape_zyx: tuple[int, int, int] = (8, 32, 32),
    patch_size: tuple[int, int, int] = (4, 16, 16),
    tokenizer: dict[str, str] = TEST_TOKENIZER,
    schema_version: int = schema.SCHEMA_VERSION,
    vocab: int = 64,
    report_len: int = 12,
    step_len: int = 6,
    max_steps: int = 3,
    region_len: int = 6,
    n_classes: int = 4,
) -> dict[str, Any]:
    """One decoded sample (arrays + meta) following ctprep.schema."""
    z, y, x = shape_zyx
    pz, py, px = patch_size
    regions = len(TEST_REGIONS)
    cls = int(rng.integers(n_classes))
    image = rng.normal(-700, 60, size=shape_zyx).astype(np.int16)
    cz, cy, cx = z // 2, (cls + 1) * y // (n_classes + 1), x // 2
    image[max(0, cz - 2) : cz + 2, max(0, cy - 3) : cy + 3, max(0, cx - 3) : cx + 3] = 200
    mask = np.zeros(shape_zyx, dtype=np.uint8)
    mask[:, : y // 2, : x // 2] = 1
    mask[:, y // 2 :, x // 2 :] = 2
    mask[: z // 2, : y // 2, x // 2 :] = 3
    grid = mask.reshape(z // pz, pz, y // py, py, x // px, px).transpose(0, 2, 4, 1, 3, 5)
    grid = grid.reshape(-1, pz * py * px)
    fractions = np.stack([(grid == r).mean(axis=1) for r in range(regions + 1)], axis=1).astype(np.float16)

    n_real = int(rng.integers(report_len // 2, report_len + 1))
    report = np.zeros(report_len, dtype=np.int32)
    report[:n_real] = rng.integers(5, vocab, size=n_real)
    report[:3] = [1, 2 + cls, 2 + cls]  # class signal
    n_steps = int(rng.integers(0, max_steps + 1))
    steps = rng.integers(5, vocab, size=(n_steps, step_len)).astype(np.int32)
    steps_len = rng.integers(2, step_len + 1, size=n_steps).astype(np.int32)
    region_text = rng.integers(5, vocab, size=(regions, region_len)).astype(np.int32)
    labels = rng.integers(-1, 2, size=len(schema.ABNORMALITY_LABELS)).astype(np.int8)
    meta = {
        "id": case_id,
        "source": source,
        "split": split,
        "spacing": [10.0, 3.0, 3.0],
        "affine": np.diag([3.0, 3.0, 10.0, 1.0])[[2, 1, 0, 3]].tolist(),
        "shape": list(shape_zyx),
        "header_style": "v2" if source == "ctrate" else "jpg",
        "tokenizer": dict(tokenizer),
        "schema_version": schema_version,
        "pipeline_version": "test",
        "patch_size": list(patch_size),
        "region_names": list(TEST_REGIONS),
        "report_text": f"class {cls} findings",
        "steps_text": [f"step {i}" for i in range(n_steps)],
        "step_regions": [int(rng.integers(-1, regions)) for _ in range(n_steps)],
        "region_texts": [f"{r} text" for r in TEST_REGIONS],
        "has_mask": True,
        "plane": "axial",
    }
    return {
        "image": image,
        "mask": mask,
        "regions": fractions,
        "report_ids": report,
        "report_len": np.array(n_real, dtype=np.int32),
        "steps_ids": steps,
        "steps_len": steps_len,
        "region_text_ids": region_text,
        "region_text_len": np.full(regions, region_len, dtype=np.int32),
        "region_has_text": rng.integers(0, 2, size=regions).astype(np.uint8),
        "labels": labels,
        "meta": meta,
    }


def write_shard(path: Path, samples: Sequence[dict[str, Any]], compress: Sequence[str] = ("image", "mask"),
                meta_crc32: dict[str, int] | None = None) -> int:
    """Write samples as one WebDataset tar; members in ``compress`` get ``.npy.zst``.

    Args:
        meta_crc32: filled with {sample key: CRC32 of its meta.json} (the index entry's ``meta_crc32``).
    Returns:
        the tar's size in bytes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["meta"]["id"]
            arrays = {m: np.asarray(sample[m]) for m in schema.NPY_MEMBERS}
            members = shards.encode_sample(arrays, sample["meta"], "zst", compressed=compress)
            if meta_crc32 is not None:
                meta_crc32[key] = shards.meta_crc32(members)
            for name in sorted(members):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime = len(members[name]), 0
                tar.addfile(info, io.BytesIO(members[name]))
    return path.stat().st_size


def shard_entry(root: Path, rel: str, samples: Sequence[dict[str, Any]], compress: Sequence[str] = ("image", "mask"),
                source: str = "ctrate", generation: int = 0) -> dict[str, Any]:
    """Write ``root/rel`` (:func:`write_shard`) and return its ``index.json`` shard entry."""
    crcs: dict[str, int] = {}
    size = write_shard(root / rel, samples, compress, crcs)
    digest = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    return shards.shard_entry(rel, len(samples), size, digest, source, generation, crcs)


def write_test_shards(
    root: str | Path,
    shard_sizes: dict[str, Sequence[int]] | None = None,
    *,
    source: str = "ctrate",
    shape_zyx: tuple[int, int, int] = (8, 32, 32),
    patch_size: tuple[int, int, int] = (4, 16, 16),
    tokenizer: dict[str, str] = TEST_TOKENIZER,
    schema_version: int = schema.SCHEMA_VERSION,
    seed: int = 0,
    compress: Sequence[str] = ("image", "mask"),
    index: dict[str, Any] | None = None,
    **sample_kwargs: Any,
) -> dict[str, Any]:
    """Write shards of one source and (create or extend) ``root/index.json``.

    Args:
        shard_sizes: split -> samples per shard, e.g. ``{"train": [5, 3], "valid": [4]}``.
        index: an index returned by a previous call, to add a second source to the same root.
    Returns:
        the index written.
    """
    root = Path(root)
    shard_sizes = shard_sizes or {"train": [6, 6], "valid": [4]}
    rng = np.random.default_rng(seed)
    if index is None:
        index = {
            "schema_version": schema_version,
            "pipeline_version": "test",
            "tokenizer": dict(tokenizer),
            "patch_size": list(patch_size),
            "region_names": list(TEST_REGIONS),
            "generations": [{"generation": 0, "created": "1970-01-01T00:00:00Z", "shards": []}],
            "splits": {},
        }
    counter = 0
    for split, sizes in shard_sizes.items():
        entries = index["splits"].setdefault(split, [])
        for shard_no, n in enumerate(sizes):
            samples = []
            for _ in range(n):
                case_id = f"{source}_{split}_{seed}_{counter:05d}"
                counter += 1
                samples.append(
                    make_sample(
                        case_id, rng=rng, source=source, split=split, shape_zyx=shape_zyx,
                        patch_size=patch_size, tokenizer=tokenizer, schema_version=schema_version,
                        **sample_kwargs,
                    )
                )
            rel = f"{split}/{source}-{seed}-{shard_no:06d}.tar"
            entries.append(shard_entry(root, rel, samples, compress, source))
            index["generations"][0]["shards"].append(rel)
    shards.write_index(root, index)
    return index
