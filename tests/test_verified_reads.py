"""Verified reads: one flipped byte in a shard is skipped and reported, never trained or evaluated on.

Shards are packed by the real ``pack`` stage (tests/pack_helpers: tiny cases, no runner), so the
member encoding is the production one; the trainer run uses ``ctprep_train.testing`` shards, which go
through the same ``sample_members`` encoder.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest

from ctprep import schema, shards
from ctprep.stages import pack
from ctprep.stages.pack import check_index, read_index, run_pack
from tests.pack_helpers import aggregate_task, make_case, run_case_stages, small_config
from tests.trainer_helpers import STAND_IN, launch, read_metrics
from torch.utils.data import DataLoader, IterableDataset

from ctprep_train import data as D
from ctprep_train.data import decode as data_decode
from ctprep_train.eval import data as eval_data
from ctprep_train.testing import write_test_shards

CASES = [(f"v{i}", i + 1) for i in range(5)]
DAMAGED = 1  # index in tar order: not the last sample, so one pass of the others meets it


def _pack(tmp: Path, out: Path, compression: str) -> Path:
    cfg = small_config(shard_max_samples=16, compression=compression)
    work = tmp / f"work-{compression}"
    entries = [(make_case(cid, seed), None) for cid, seed in CASES]
    entries = [(case, run_case_stages(work, case, seed, cfg)) for (case, _), (_, seed) in zip(entries, CASES)]
    run_pack(aggregate_task(work, out, cfg, entries))
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed")
    return {c: _pack(tmp, tmp / f"shards-{c}", c) for c in ("zst", "none")}


def _copy(src: Path, dst: Path) -> tuple[Path, Path, list[D.SampleRef]]:
    shutil.copytree(src, dst)
    (entry,) = read_index(dst)["splits"]["train"]
    shard = dst / entry["path"]
    refs, error = D.scan_tar(str(shard))
    assert error is None and len(refs) == len(CASES)
    return dst, shard, refs


def _flip(shard: Path, ref: D.SampleRef, member: str, at: str = "middle") -> None:
    """XOR one byte of ``member`` of ``ref``: its last byte, the middle one, or one inside meta's report_text."""
    _, offset, size = next(m for m in ref.members if m[0] == member)
    raw = bytearray(shard.read_bytes())
    if at == "report_text":
        body = bytes(raw[offset : offset + size])
        start = body.index(b'"report_text":"') + len(b'"report_text":"')
        pos = offset + next(i for i in range(start, size) if chr(body[i]).isalpha())
        raw[pos] ^= 0x01  # a letter stays a letter: the JSON still parses and passes every identity check
    else:
        raw[offset + (size - 1 if at == "last" else size // 2)] ^= 0x01
    shard.write_bytes(bytes(raw))


def _expect(root: Path, **kw) -> D.ShardExpectation:
    return D.ShardExpectation(tokenizer=read_index(root)["tokenizer"], patch_size=(4, 16, 16), **kw)


class _FirstBatches(IterableDataset):
    """The first ``n`` batches of a dataset: the loader's read-ahead cannot start another pass."""

    def __init__(self, dataset, n: int):
        super().__init__()
        self.dataset, self.n = dataset, n

    def __iter__(self):
        return itertools.islice(iter(self.dataset), self.n)


def _as_is(batch):
    return batch


def _train_ids(root: Path, batch_size: int, batches: int, **expect_kw) -> tuple[list[str], int]:
    """Sample ids of the first ``batches`` training batches (one worker slot, tar order) and the corrupt count."""
    expect = _expect(root, **expect_kw)
    index = D.load_shard_index(root, expect)
    dataset = D.TrainBatches(index.shards("train"), {"ctrate": 1.0}, batch_size=batch_size, buffer_size=1, seed=0,
                             rank=0, world_size=1, expect=expect, tokenizer=index.tokenizer)
    loader = D.BatchLoader(DataLoader(_FirstBatches(dataset, batches), batch_size=None, collate_fn=_as_is),
                           pin_memory=False)
    ids, corrupt = [], 0
    for batch in loader:  # the trainer's path: worker-side decode, reader-thread volume reads
        ids += batch["ids"]
        corrupt += batch[D.BATCH_STATS_KEY]["corrupt"]
    return ids, corrupt


CASES_OF_DAMAGE = [
    pytest.param("zst", "image.npy.zst", "middle", id="image-zst"),
    pytest.param("none", "image.npy", "middle", id="image-uncompressed"),
    pytest.param("zst", "labels.npy", "last", id="small-npy-labels"),
    pytest.param("zst", "meta.json", "report_text", id="meta-json-text"),
]


@pytest.mark.parametrize("compression, member, at", CASES_OF_DAMAGE)
def test_training_loader_skips_exactly_the_damaged_sample(packed, tmp_path, caplog, monkeypatch, compression, member,
                                                         at):
    root, shard, refs = _copy(packed[compression], tmp_path / "s")
    _flip(shard, refs[DAMAGED], member, at)
    good = [r.key for i, r in enumerate(refs) if i != DAMAGED]
    bad = refs[DAMAGED].key
    caplog.set_level(logging.WARNING, logger="ctprep_train.data")
    if member == "image.npy":
        # Uncompressed volumes are read straight into the batch by the trainer process and checked
        # there; the damaged row is refilled from another row of its batch (no new draw possible).
        monkeypatch.setattr(data_decode, "LAZY_MIN_BYTES", 0)
        ids, corrupt = _train_ids(root, batch_size=len(refs), batches=1)
        assert bad not in ids and set(ids) == set(good) and len(ids) == len(refs)
    else:
        ids, corrupt = _train_ids(root, batch_size=2, batches=2)  # one pass: 4 intact samples
        assert sorted(ids) == sorted(good)
    assert corrupt == 1
    reports = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(reports) == 1 and str(shard.resolve()) in reports[0] and "crc32" in reports[0], reports


@pytest.mark.parametrize("compression, member, at", CASES_OF_DAMAGE)
def test_evaluation_skips_and_reports_exactly_the_damaged_sample(packed, tmp_path, compression, member, at):
    root, shard, refs = _copy(packed[compression], tmp_path / "s")
    _flip(shard, refs[DAMAGED], member, at)
    skipped: list[dict[str, str]] = []
    ids = [s["__key__"] for s in eval_data.iter_split(root, "train", skipped=skipped)]
    assert ids == [r.key for i, r in enumerate(refs) if i != DAMAGED]
    assert len(skipped) == 1 and skipped[0]["key"] == refs[DAMAGED].key
    assert Path(skipped[0]["shard"]).resolve() == shard.resolve() and "crc32" in skipped[0]["error"]


@pytest.mark.parametrize("member, at", [("labels.npy", "last"), ("meta.json", "report_text")])
def test_without_verification_the_same_flip_is_read_silently(packed, tmp_path, member, at):
    """The damage the checksums catch is invisible to decoding alone (the reason for this feature)."""
    root, shard, refs = _copy(packed["zst"], tmp_path / "s")
    _flip(shard, refs[DAMAGED], member, at)
    ids, corrupt = _train_ids(root, batch_size=len(refs), batches=1, verify_checksums=False)
    assert refs[DAMAGED].key in ids and corrupt == 0


def test_check_names_the_damaged_sample_and_member(packed, tmp_path):
    root, shard, refs = _copy(packed["zst"], tmp_path / "s")
    assert check_index(root) == []
    _flip(shard, refs[DAMAGED], "labels.npy", "last")
    problems = check_index(root)
    rel = shard.relative_to(root).as_posix()
    assert f"{rel}: sha256 differs from the index" in problems
    named = [p for p in problems if "sample" in p]
    assert len(named) == 1 and named[0].startswith(f"{rel}: sample {refs[DAMAGED].key}: labels.npy: crc32 "), problems


def test_checksums_are_written_and_identical_across_packs(packed, tmp_path):
    again = _pack(tmp_path, tmp_path / "again", "zst")
    a, b = read_index(packed["zst"]), read_index(again)
    (ea,), (eb,) = a["splits"]["train"], b["splits"]["train"]
    assert ea["meta_crc32"] == eb["meta_crc32"] and sorted(ea["meta_crc32"]) == sorted(c for c, _ in CASES)
    assert (packed["zst"] / ea["path"]).read_bytes() == (again / eb["path"]).read_bytes()
    with tarfile.open(packed["zst"] / ea["path"]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for key, crc in ea["meta_crc32"].items():
        meta_bytes = members[f"{key}.meta.json"]
        assert D.crc32(meta_bytes) == crc
        sums = json.loads(meta_bytes)["crc32"]
        stored = {n.split(".", 1)[1]: d for n, d in members.items() if n.startswith(f"{key}.")}
        assert sums == {n: D.crc32(d) for n, d in stored.items() if n != "meta.json"}
    # zstd frames carry their content checksum (frame header descriptor bit 2)
    frame = members[f"{CASES[0][0]}.image.npy.zst"]
    assert frame[:4] == b"\x28\xb5\x2f\xfd" and frame[4] & 0x04


def test_reader_and_writer_share_one_checksum_home():
    # pack encodes and the trainer verifies through ctprep.shards: one set of names, one CRC32.
    assert pack.encode_sample is shards.encode_sample and D.crc32 is shards.crc32
    assert (D.CHECKSUM_KEY, D.INDEX_CHECKSUM_KEY) == (schema.CHECKSUM_KEY, schema.INDEX_CHECKSUM_KEY)
    assert D.CHECKSUM_KEY in schema.META_KEYS
    assert shards.crc32(b"123456789") == 0xCBF43926  # the CRC-32 check value


def test_evaluation_refuses_another_schema_version(packed, tmp_path):
    root, _, _ = _copy(packed["zst"], tmp_path / "s")
    index = read_index(root)
    index["schema_version"] = 1
    (root / schema.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(D.ShardMismatchError) as err:
        list(eval_data.iter_split(root, "train"))
    assert "schema_version 1" in str(err.value) and f"schema_version {schema.SCHEMA_VERSION}" in str(err.value)
    assert str(root / schema.INDEX_FILE) in str(err.value)


def test_shards_packed_before_checksums_load_unverified_with_one_warning_per_shard(tmp_path, caplog):
    index = write_test_shards(tmp_path, {"train": [3, 2]})
    for entry in index["splits"]["train"]:  # what an index written before checksums looks like
        del entry["meta_crc32"]
    (tmp_path / schema.INDEX_FILE).write_text(json.dumps(index))
    caplog.set_level(logging.WARNING, logger="ctprep_train.data")
    ids, corrupt = _train_ids(tmp_path, batch_size=5, batches=1)
    assert len(set(ids)) == 5 and corrupt == 0
    warnings = [r.getMessage() for r in caplog.records if "unverified" in r.getMessage()]
    assert len(warnings) == 2 and all(".tar" in w for w in warnings)


def test_train_run_over_a_flipped_byte_counts_one_corrupt_sample(tmp_path):
    root = tmp_path / "shards"
    write_test_shards(root, {"train": [5]})
    shard = root / "train" / "ctrate-0-000000.tar"
    refs, _ = D.scan_tar(str(shard))
    _flip(shard, refs[DAMAGED], "labels.npy", "last")  # a silently wrong label without verification
    out = tmp_path / "run"
    # One worker slot, tar order (buffer 1, one shard): 2 steps x 2 samples = the 4 intact samples,
    # so the damaged one is met exactly once.
    proc = launch(["--config", "configs/train/demo.yaml", "--shards", str(root), "--output", str(out), *STAND_IN,
                   "train.val_every=0", "train.log_every=1", "train.steps=2", "train.ckpt_every=0",
                   "data.batch_size=2", "data.buffer_size=1"])
    rows = read_metrics(out)
    assert [r["corrupt_skipped"] for r in rows] == [1, 1]
    assert refs[DAMAGED].key in proc.stderr + proc.stdout and str(shard.resolve()) in proc.stderr + proc.stdout
