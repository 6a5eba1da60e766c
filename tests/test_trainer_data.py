"""Streaming loader: identity checks, tar-by-offset reading, corrupt members, rank splitting."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ctprep import shards
from ctprep_train import data as D
from ctprep_train import shard_io
from ctprep_train.data import collate as data_collate
from ctprep_train.data import decode as data_decode
from ctprep_train.config import DataConfig
from ctprep_train.testing import TEST_TOKENIZER, make_sample, shard_entry, write_shard, write_test_shards

EXPECT = D.ShardExpectation(tokenizer=TEST_TOKENIZER, patch_size=(4, 16, 16))


def _cfg(root: Path, **kw) -> DataConfig:
    base = dict(shards=str(root), batch_size=2, buffer_size=4, num_workers=0, tokenizer=dict(TEST_TOKENIZER))
    base.update(kw)
    return DataConfig(**base)


def _train_iter(root: Path, *, rank=0, world=1, start=0, **kw):
    cfg = _cfg(root, **kw)
    index = D.load_shard_index(root, EXPECT)
    return iter(D.build_train_loader(cfg, index, EXPECT, rank=rank, world_size=world, start_batch=start))


def test_scan_tar_matches_tarfile_and_decodes_all_compressions(tmp_path):
    rng = np.random.default_rng(0)
    sample = make_sample("case_a", rng=rng)
    path = tmp_path / "s.tar"
    write_shard(path, [sample], compress=("image",))
    # add a .npy.gz member and a long (pax) name to check format compatibility
    extra = io.BytesIO()
    np.save(extra, np.arange(5, dtype=np.int32))
    with tarfile.open(path, "a", format=tarfile.PAX_FORMAT) as tar:
        data = gzip.compress(extra.getvalue())
        info = tarfile.TarInfo("case_a.extra.npy.gz")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        long_key = "d" * 120
        info = tarfile.TarInfo(f"{long_key}/case_b.extra.npy")
        info.size = len(extra.getvalue())
        tar.addfile(info, io.BytesIO(extra.getvalue()))
    refs, error = D.scan_tar(str(path))
    assert error is None
    assert [r.key for r in refs] == ["case_a", f"{long_key}/case_b"]
    with tarfile.open(path) as tar:
        expected = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for ref in refs:
        for name, offset, size in ref.members:
            assert D.read_member(str(path), offset, size) == expected[f"{ref.key}.{name}"]
    decoded = D.decode_sample(refs[0], EXPECT, TEST_TOKENIZER)
    np.testing.assert_array_equal(decoded["image"], sample["image"])
    np.testing.assert_array_equal(decoded["extra"], np.arange(5))
    assert decoded["meta"]["id"] == "case_a"


def test_object_npy_is_refused_without_unpickling():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(D.CorruptMemberError, match="object"):
        D.decode_member("x.npy", buf.getvalue())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tokenizer": {"name": "other", "hash": "f" * 16}}, "tokenizer"),
        ({"schema_version": 99}, "schema_version"),
        ({"patch_size": (2, 8, 8)}, "patch_size"),
    ],
)
def test_mismatched_shards_are_refused_with_the_file_named(tmp_path, kwargs, match):
    write_test_shards(tmp_path, {"train": [2]}, **kwargs)
    with pytest.raises(D.ShardMismatchError, match=match) as err:
        D.load_shard_index(tmp_path, EXPECT)
    assert "index.json" in str(err.value)


def test_tokenizer_identity_is_the_hash_not_the_name(tmp_path):
    renamed = {"name": "the same files, exported elsewhere", "hash": TEST_TOKENIZER["hash"]}
    write_test_shards(tmp_path, {"train": [2]}, tokenizer=renamed)  # index and every meta.json
    index = D.load_shard_index(tmp_path, EXPECT)  # same hash, another name: accepted
    batch = next(_train_iter(tmp_path))  # every sample's meta.json is checked too
    assert len(batch["ids"]) == 2 and index.tokenizer == renamed
    other = {"name": TEST_TOKENIZER["name"], "hash": "f" * 16}  # same name, other files: refused
    with pytest.raises(D.ShardMismatchError) as err:
        D.check_tokenizer("shards/index.json", other, TEST_TOKENIZER)
    message = str(err.value)
    assert message.startswith("shards/index.json: tokenizer") and "f" * 16 in message
    assert TEST_TOKENIZER["hash"] in message and message.count(repr(TEST_TOKENIZER["name"])) == 2
    with pytest.raises(D.ShardMismatchError, match="no identity"):
        D.check_tokenizer("shards/index.json", None, TEST_TOKENIZER)


def test_sample_level_mismatch_is_refused(tmp_path):
    # index says the right tokenizer, but one shard's samples were made with another
    index = write_test_shards(tmp_path, {"train": [2]})
    write_test_shards(tmp_path / "x", {"train": [2]}, tokenizer={"name": "old", "hash": "1" * 16})
    (tmp_path / "train" / "ctrate-0-000000.tar").write_bytes((tmp_path / "x/train/ctrate-0-000000.tar").read_bytes())
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(D.ShardMismatchError, match="tokenizer") as err:
        next(_train_iter(tmp_path))
    assert "ctrate-0-000000.tar" in str(err.value)


def test_corrupt_member_is_skipped_and_counted(tmp_path):
    write_test_shards(tmp_path, {"train": [4]})
    path = tmp_path / "train" / "ctrate-0-000000.tar"
    refs, _ = D.scan_tar(str(path))
    name, offset, size = next(m for m in refs[1].members if m[0].startswith("image"))
    raw = bytearray(path.read_bytes())
    raw[offset : offset + size] = b"\xff" * size  # garbage zstd frame, tar headers intact
    path.write_bytes(bytes(raw))
    it = _train_iter(tmp_path, buffer_size=1)
    batches = [next(it) for _ in range(2)]
    ids = [i for b in batches for i in b["ids"]]
    assert refs[1].key not in ids
    assert sum(b[D.BATCH_STATS_KEY]["corrupt"] for b in batches) == 1


def test_truncated_tar_reads_samples_before_the_damage(tmp_path):
    write_test_shards(tmp_path, {"train": [3]})
    path = tmp_path / "train" / "ctrate-0-000000.tar"
    refs, _ = D.scan_tar(str(path))
    cut = refs[2].members[3][1] + 10  # inside the third sample
    path.write_bytes(path.read_bytes()[:cut])
    found, error = D.scan_tar(str(path))
    assert [r.key for r in found] == [refs[0].key, refs[1].key, refs[2].key] and "truncated" in error
    it = _train_iter(tmp_path, buffer_size=1, batch_size=1)
    batch = next(it)
    assert batch["image"].shape == (1, 8, 32, 32)


def test_batch_contract_dtypes_and_shapes(tmp_path):
    write_test_shards(tmp_path, {"train": [3]})
    batch = next(_train_iter(tmp_path, batch_size=3))
    assert batch["image"].dtype == torch.int16 and batch["image"].shape == (3, 8, 32, 32)
    assert batch["mask"].dtype == torch.uint8
    assert batch["regions"].shape == (3, 8, 4)
    assert batch["report_ids"].dtype == torch.int64 and batch["report_attn"].dtype == torch.bool
    s = batch["steps_ids"].shape[1]
    assert batch["steps_attn"].shape[:2] == (3, s) and batch["steps_valid"].shape == (3, s)
    assert batch["step_regions"].shape == (3, s) and batch["step_regions"].dtype == torch.int64
    assert (batch["step_regions"][~batch["steps_valid"]] == -1).all()
    assert not batch["steps_attn"][~batch["steps_valid"]].any()
    assert batch["region_text_ids"].shape[:2] == (3, 3) and batch["region_has_text"].dtype == torch.bool
    assert batch["labels"].dtype == torch.int64 and batch["labels"].shape == (3, 18)
    assert len(batch["ids"]) == 3 and len(batch["meta"]) == 3


def test_uneven_shards_give_every_rank_endless_equal_batches(tmp_path):
    # 7 samples in shards of 5, 1, 1 over 2 ranks: one rank gets 5 samples, the other 1 or 2
    write_test_shards(tmp_path, {"train": [5, 1, 1]})
    index = D.load_shard_index(tmp_path, EXPECT)
    shards = index.shards("train", ["ctrate"])
    for rank in range(2):
        it = iter(D.TrainBatches(shards, {"ctrate": 1.0}, batch_size=2, buffer_size=2, seed=0, rank=rank,
                                 world_size=2, expect=EXPECT, tokenizer=TEST_TOKENIZER))
        for _ in range(10):  # more batches than this rank's share: it cycles instead of ending
            assert len(next(it)["ids"]) == 2


def test_shard_order_is_shared_by_ranks_and_split_disjointly(tmp_path):
    write_test_shards(tmp_path, {"train": [1] * 8})
    shards = D.load_shard_index(tmp_path, EXPECT).shards("train")["ctrate"]
    order = D.shuffled_shards(shards, seed=3, source="ctrate", epoch=0)
    assert order == D.shuffled_shards(list(reversed(shards)), seed=3, source="ctrate", epoch=0)
    assert order != D.shuffled_shards(shards, seed=3, source="ctrate", epoch=1)
    slots = [D.slot_shards(order, s, 4) for s in range(4)]
    assert sorted(x.path for s in slots for x in s) == sorted(x.path for x in shards)


def test_resume_position_replays_the_same_stream(tmp_path):
    write_test_shards(tmp_path, {"train": [4, 3, 5]})
    full = _train_iter(tmp_path)
    ids = [next(full)["ids"] for _ in range(7)]
    resumed = _train_iter(tmp_path, start=4)
    assert [next(resumed)["ids"] for _ in range(3)] == ids[4:]


def test_sources_are_mixed_by_weight_but_never_within_a_batch(tmp_path):
    index = write_test_shards(tmp_path, {"train": [6], "valid": [2]})
    write_test_shards(tmp_path, {"train": [6], "valid": [3]}, source="omniabnorm", shape_zyx=(4, 32, 32),
                      index=index, seed=1)
    it = _train_iter(tmp_path, sources={"ctrate": 1.0, "omniabnorm": 1.0})
    seen = set()
    for _ in range(12):
        batch = next(it)
        source = {m["source"] for m in batch["meta"]}
        assert len(source) == 1
        seen |= source
        assert batch["image"].shape[1] == (8 if source == {"ctrate"} else 4)
    assert seen == {"ctrate", "omniabnorm"}
    # validation: every sample once over 2 ranks, equal batch counts
    cfg = _cfg(tmp_path, sources={"ctrate": 1.0, "omniabnorm": 1.0})
    idx = D.load_shard_index(tmp_path, EXPECT)
    per_rank = [list(D.build_valid_loader(cfg, idx, EXPECT, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    positions = {p for batches in per_rank for b in batches for p in b[D.BATCH_STATS_KEY]["positions"]}
    assert positions == set(range(5))


def test_loader_with_workers_yields_in_global_order(tmp_path):
    write_test_shards(tmp_path, {"train": [3, 3, 3, 3]})
    plain = _train_iter(tmp_path, num_workers=0)
    a = [next(plain)[D.BATCH_STATS_KEY]["batch"] for _ in range(4)]
    workers = _train_iter(tmp_path, num_workers=2)
    b = [next(workers)[D.BATCH_STATS_KEY]["batch"] for _ in range(4)]
    assert a == b == [0, 1, 2, 3]


@pytest.mark.parametrize("workers,read_threads", [(0, 1), (1, 1), (0, 3), (1, 2)])
def test_large_uncompressed_volumes_are_read_straight_into_the_batch(tmp_path, monkeypatch, workers, read_threads):
    monkeypatch.setattr(data_decode, "LAZY_MIN_BYTES", 0)  # every uncompressed .npy member takes the lazy path
    monkeypatch.setattr(data_collate, "READ_CHUNK", 1000)  # parallel reads split volumes at odd, unaligned offsets
    write_test_shards(tmp_path, {"train": [4]}, compress=())
    refs, _ = D.scan_tar(str(tmp_path / "train" / "ctrate-0-000000.tar"))
    lazy = D.decode_sample(refs[0], EXPECT, TEST_TOKENIZER)
    assert isinstance(lazy["image"], D.LazyNpy)
    batch = next(_train_iter(tmp_path, batch_size=2, buffer_size=1, num_workers=workers, read_threads=read_threads))
    assert batch["image"].dtype == torch.int16 and batch["mask"].dtype == torch.uint8
    by_key = {r.key: r for r in refs}
    for i, key in enumerate(batch["ids"]):
        monkeypatch.setattr(data_decode, "LAZY_MIN_BYTES", 1 << 40)
        eager = D.decode_sample(by_key[key], EXPECT, TEST_TOKENIZER)
        monkeypatch.setattr(data_decode, "LAZY_MIN_BYTES", 0)
        np.testing.assert_array_equal(batch["image"][i].numpy(), eager["image"])
        np.testing.assert_array_equal(batch["mask"][i].numpy(), eager["mask"])


def test_lazy_member_with_truncated_data_is_corrupt(tmp_path, monkeypatch):
    monkeypatch.setattr(data_decode, "LAZY_MIN_BYTES", 0)
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 4), np.int16))
    data = buf.getvalue()[:-8]
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("k.image.npy")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    refs, _ = D.scan_tar(str(path))
    with pytest.raises(D.CorruptMemberError, match="truncated"):
        D.decode_sample(refs[0], EXPECT, TEST_TOKENIZER)


def test_parallel_read_of_a_truncated_file_is_a_corrupt_member_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data_collate, "READ_CHUNK", 64)
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(range(200)))
    part = D.LazyNpy(str(path), 8, (2, 100), np.dtype(np.uint8), False)  # wants 200 bytes from offset 8
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool, pytest.raises(D.CorruptMemberError, match="short read"):
        D.LazyVolumes([part], torch.uint8).materialize(executor=pool)
    ok = D.LazyNpy(str(path), 8, (2, 96), np.dtype(np.uint8), False)
    with ThreadPoolExecutor(2) as pool:
        out = D.LazyVolumes([ok, ok], torch.uint8).materialize(executor=pool)
    np.testing.assert_array_equal(out.numpy().reshape(2, -1), np.tile(np.arange(8, 200, dtype=np.uint8), (2, 1)))


def test_crc32_combine_fallback_joins_pieces_as_zlib_does():
    import zlib

    rng = np.random.default_rng(0)
    for sizes in ([0, 5], [1, 1], [7, 0, 300, 4096], [70_001, 3, 1 << 16]):
        pieces = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
        whole = zlib.crc32(b"".join(pieces))
        for combine in (data_decode._crc32_combine_py, data_decode.crc32_combine):
            crc = 0
            for piece in pieces:
                crc = combine(crc, zlib.crc32(piece), len(piece))
            assert crc == whole


def test_decode_reads_the_headers_of_large_volumes_never_their_data(tmp_path, monkeypatch):
    """The worker's reads of a sample skip the volumes' data (read once, into the batch), even
    where a small member (labels.npy) lies between image.npy and mask.npy in the tar."""
    from ctprep_train import shard_io

    monkeypatch.setattr(data_decode, "LAZY_MIN_BYTES", 0)
    write_test_shards(tmp_path, {"train": [2]}, shape_zyx=(16, 128, 128), compress=())
    refs, _ = D.scan_tar(str(tmp_path / "train" / "ctrate-0-000000.tar"))
    names = [name for name, _, _ in refs[0].members]
    assert names.index("image.npy") < names.index("labels.npy") < names.index("mask.npy")
    reads: list[int] = []
    real = shard_io.LocalFile.pread
    monkeypatch.setattr(shard_io.LocalFile, "pread", lambda self, offset, n: reads.append(n) or real(self, offset, n))
    index = D.load_shard_index(tmp_path, EXPECT)
    crcs = index.shards("train")["ctrate"][0].meta_crc32
    sample = D.decode_sample(refs[0], EXPECT, TEST_TOKENIZER, crcs)
    small = sum(size for name, _, size in refs[0].members if name not in ("image.npy", "mask.npy"))
    assert len(reads) == 3  # image header | labels + mask header | meta.json .. the last member
    # each member may add its tar header and padding to a read; the mask alone is 256 KiB
    assert sum(reads) <= small + 2 * data_decode.NPY_HEAD_BYTES + len(names) * 2 * D.TAR_BLOCK < (256 << 10) // 8
    assert isinstance(sample["image"], D.LazyNpy) and sample["image"].crc is not None
    assert sample["meta"]["id"] == refs[0].key


def test_a_volume_chunk_opens_its_shard_once_and_reads_it_piece_by_piece(tmp_path, monkeypatch):
    """One open per READ_CHUNK, one preadv per CRC_PIECE (an open per piece cost ~7% of the read
    threads' CPU in bench/loader.py); unverified, the whole range in one read."""
    monkeypatch.setattr(data_decode, "LAZY_MIN_BYTES", 0)
    monkeypatch.setattr(data_decode, "CRC_PIECE", 1000)
    write_test_shards(tmp_path, {"train": [1]}, shape_zyx=(4, 32, 32), compress=())
    refs, _ = D.scan_tar(str(tmp_path / "train" / "ctrate-0-000000.tar"))
    crcs = D.load_shard_index(tmp_path, EXPECT).shards("train")["ctrate"][0].meta_crc32
    image = D.decode_sample(refs[0], EXPECT, TEST_TOKENIZER, crcs)["image"]
    opened, reads = [], []
    real_init, real_readinto = shard_io.LocalFile.__init__, shard_io.LocalFile.readinto
    monkeypatch.setattr(shard_io.LocalFile, "__init__", lambda self, path: opened.append(path) or real_init(self, path))
    monkeypatch.setattr(shard_io.LocalFile, "readinto",
                        lambda self, offset, target: reads.append(len(target)) or real_readinto(self, offset, target))
    out = np.empty(image.shape, image.dtype)
    target = memoryview(out.reshape(-1).view(np.uint8))
    crc = image.read_range_into(target, 0, 2500)
    assert len(opened) == 1 and reads == [1000, 1000, 500]
    whole = np.asarray(image)
    assert crc == shards.crc32(memoryview(whole.reshape(-1).view(np.uint8))[:2500])
    opened.clear(), reads.clear()
    image.crc = None
    assert image.read_range_into(target, 0, 2500) == 0 and len(opened) == 1 and reads == [2500]


@pytest.mark.parametrize("read_threads", [1, 3])
def test_volume_crc_joined_from_unaligned_chunks_and_pieces_finds_one_flipped_byte(tmp_path, monkeypatch, read_threads):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(data_decode, "LAZY_MIN_BYTES", 0)
    monkeypatch.setattr(data_decode, "CRC_PIECE", 333)  # pieces and chunks at odd, unaligned offsets
    monkeypatch.setattr(data_collate, "READ_CHUNK", 1000)
    write_test_shards(tmp_path, {"train": [2]}, shape_zyx=(4, 32, 32), compress=())
    path = tmp_path / "train" / "ctrate-0-000000.tar"
    refs, _ = D.scan_tar(str(path))
    crcs = D.load_shard_index(tmp_path, EXPECT).shards("train")["ctrate"][0].meta_crc32

    def images(executor, failed=None):
        parts = [D.decode_sample(ref, EXPECT, TEST_TOKENIZER, crcs)["image"] for ref in refs]
        return D.LazyVolumes(parts, torch.int16).materialize(executor=executor, failed=failed)

    with ThreadPoolExecutor(read_threads) as pool:
        executor = pool if read_threads > 1 else None
        intact = images(executor)
        _, offset, size = next(m for m in refs[1].members if m[0] == "image.npy")
        raw = bytearray(path.read_bytes())
        raw[offset + size - 1500] ^= 0x01  # inside a middle chunk and piece of the second image
        path.write_bytes(bytes(raw))
        with pytest.raises(D.CorruptMemberError, match="image.npy: crc32"):
            images(executor)
        failed: dict[int, str] = {}
        damaged = images(executor, failed)
    assert list(failed) == [1] and "crc32" in failed[1]
    assert torch.equal(damaged[0], intact[0])
    eager = D.decode_sample(refs[0], EXPECT, TEST_TOKENIZER)["image"]
    np.testing.assert_array_equal(intact[0].numpy(), np.asarray(eager))


@pytest.mark.parametrize("read_threads", [1, 3])
def test_volume_failing_while_read_into_the_batch_is_replaced_not_fatal(tmp_path, monkeypatch, read_threads):
    """A shard cut after it was scanned: the reader thread's short read skips that sample, counted."""
    monkeypatch.setattr(data_decode, "LAZY_MIN_BYTES", 0)
    monkeypatch.setattr(data_collate, "READ_CHUNK", 1000)
    write_test_shards(tmp_path, {"train": [4]}, compress=())
    shard = str(tmp_path / "train" / "ctrate-0-000000.tar")
    refs, _ = D.scan_tar(shard)
    victim = refs[1]
    _, lo, size = next(m for m in victim.members if m[0] == "image.npy")
    real = shard_io.LocalFile.readinto

    def flaky(self, offset, target):
        if self.location == shard and lo <= offset < lo + size:
            raise D.CorruptMemberError(f"{self.location}: short read at {offset}")
        real(self, offset, target)

    monkeypatch.setattr(shard_io.LocalFile, "readinto", flaky)
    batch = next(_train_iter(tmp_path, batch_size=4, buffer_size=1, num_workers=0, read_threads=read_threads))
    ids = batch["ids"]
    assert victim.key not in ids and len(set(ids)) == 3 and len(ids) == 4
    assert batch[D.BATCH_STATS_KEY]["corrupt"] == 1
    dup = [i for i, k in enumerate(ids) if ids.count(k) == 2]
    a, b = dup
    for key in ("image", "mask", "regions", "report_ids", "labels", "steps_ids"):
        torch.testing.assert_close(batch[key][a], batch[key][b])  # one consistent sample, not a mix
    assert batch["meta"][a] == batch["meta"][b]


def test_replace_failed_rows_keeps_positions_and_refuses_an_all_failed_batch():
    batch = {"ids": ["a", "b", "c"], "image": torch.arange(3)[:, None].repeat(1, 4), "labels": np.arange(3),
             "meta": [{"k": 0}, {"k": 1}, {"k": 2}], "scalar": torch.tensor(7),
             D.BATCH_STATS_KEY: {"corrupt": 1, "positions": [10, 11, 12]}}
    D.replace_failed_rows(batch, {1: "short read"})
    assert batch["ids"] == ["a", "a", "c"] and batch["image"][1].tolist() == [0, 0, 0, 0]
    assert batch["labels"].tolist() == [0, 0, 2] and batch["meta"][1] == {"k": 0}
    assert batch[D.BATCH_STATS_KEY] == {"corrupt": 2, "positions": [10, 10, 12]}  # validation counts it once
    with pytest.raises(D.CorruptMemberError, match="no volume of the batch"):
        D.replace_failed_rows({"ids": ["a"], "image": torch.zeros(1, 2)}, {0: "short read"})


def test_buffer_pool_reuses_only_unreferenced_buffers():
    pool = D.BufferPool()
    a = pool.take((4, 8), torch.int16)
    a_id = id(a)
    b = pool.take((4, 8), torch.int16)
    assert b is not a  # a is still held by the caller
    del a
    c = pool.take((4, 8), torch.int16)
    assert id(c) == a_id  # released: handed out again
    view = c[1:]
    del c
    d = pool.take((4, 8), torch.int16)
    assert id(d) != a_id and view.untyped_storage().data_ptr() != d.untyped_storage().data_ptr()


def test_compressed_volume_corrupt_past_its_header_is_replaced_and_counted(tmp_path):
    # 16 x 128 x 128 int16 = 512 KB: four zstd blocks, so the header decodes and a later block fails
    write_test_shards(tmp_path, {"train": [6]}, shape_zyx=(16, 128, 128))
    path = tmp_path / "train" / "ctrate-0-000000.tar"
    refs, _ = D.scan_tar(str(path))
    sample = D.decode_sample(refs[0], EXPECT, TEST_TOKENIZER)
    assert isinstance(sample["image"], D.CompressedNpy)
    name, offset, size = next(m for m in refs[0].members if m[0].startswith("image"))
    raw = bytearray(path.read_bytes())
    start = offset + size * 3 // 4
    raw[start : offset + size - 4] = b"\x00" * (offset + size - 4 - start)
    path.write_bytes(bytes(raw))
    assert isinstance(D.decode_sample(refs[0], EXPECT, TEST_TOKENIZER)["image"], D.CompressedNpy)  # header still fine
    it = _train_iter(tmp_path, batch_size=4, buffer_size=1)
    batch = next(it)
    assert refs[0].key not in batch["ids"] and len(batch["ids"]) == 4
    assert batch[D.BATCH_STATS_KEY]["corrupt"] == 1
    eager = np.asarray(D.decode_sample(refs[1], EXPECT, TEST_TOKENIZER)["image"])
    np.testing.assert_array_equal(batch["image"][batch["ids"].index(refs[1].key)].numpy(), eager)


def test_collate_drops_region_anchors_of_a_case_without_mask():
    rng = np.random.default_rng(5)
    with_mask, without = make_sample("case_m", rng=rng), make_sample("case_n", rng=rng)
    with_mask["region_has_text"][:] = 1
    without["region_has_text"][:] = 1
    without["meta"]["has_mask"] = False  # packed under ctrate.missing_mask: allow
    for s in (with_mask, without):
        s["__key__"] = s["meta"]["id"]
    batch = D.collate_samples([with_mask, without])
    assert batch["region_has_text"][0].all()
    assert not batch["region_has_text"][1].any()
    assert batch["meta"][1]["has_mask"] is False


def _with_tombstones(root: Path) -> tuple[set[str], set[str], set[str]]:
    """Train shards of 4, 4, 4, 2 samples and valid 3; one sample of each 4-shard and one valid
    sample superseded, the 2-shard wholly superseded (its cases are gone), and a generation-1
    shard with the new samples of the three changed train cases (report text "new version").

    Returns:
        (live train keys, keys whose old sample is superseded but a new one is live, gone keys)
    """
    index = write_test_shards(root, {"train": [4, 4, 4, 2], "valid": [3]})
    train = index["splits"]["train"]
    keys = [[f"ctrate_train_0_{n:05d}" for n in range(start, start + size)]
            for start, size in ((0, 4), (4, 4), (8, 4), (12, 2))]
    changed = {keys[0][1], keys[1][2], keys[2][0]}
    gone = set(keys[3])
    for entry, shard_keys in zip(train, keys):
        entry["superseded"] = sorted((changed | gone) & set(shard_keys))
    rng = np.random.default_rng(9)
    renewed = []
    for key in sorted(changed):
        sample = make_sample(key, rng=rng)
        sample["meta"]["report_text"] = "new version"
        renewed.append(sample)
    train.append(shard_entry(root, "train/ctrate-g0001-000000.tar", renewed, generation=1))
    index["splits"]["valid"][0]["superseded"] = ["ctrate_valid_0_00015"]
    shards.write_index(root, index)
    live = {k for shard_keys in keys for k in shard_keys} - gone
    return live, changed, gone


def _assert_current(batch: dict, changed: set[str], gone: set[str]) -> None:
    for key, meta in zip(batch["ids"], batch["meta"]):
        assert key not in gone, f"{key}: superseded sample read"
        assert key not in changed or meta["report_text"] == "new version", f"{key}: old sample read"


def test_superseded_samples_are_never_read_and_not_counted(tmp_path):
    live, changed, gone = _with_tombstones(tmp_path)
    index = D.load_shard_index(tmp_path, EXPECT)
    listed = index.shards("train")["ctrate"]
    assert len(listed) == 4 and sorted(s.live_samples for s in listed) == [3, 3, 3, 3]  # the 2-shard: nothing left
    cfg = _cfg(tmp_path, batch_size=2, buffer_size=3)
    assert D.samples_per_epoch(index, cfg) == len(live) == 12
    steps = D.samples_per_epoch(index, cfg) // (cfg.batch_size * 2)  # the trainer's equal-steps rule
    per_rank = []
    for rank in range(2):
        it = _train_iter(tmp_path, rank=rank, world=2, batch_size=2, buffer_size=3)
        batches = [next(it) for _ in range(steps)]
        for batch in batches:
            _assert_current(batch, changed, gone)
        per_rank.append([k for b in batches for k in b["ids"]])
    assert [len(ids) for ids in per_rank] == [steps * 2] * 2  # equal steps per rank
    for ids in per_rank:
        assert len(ids) == len(set(ids)), f"a sample read twice in one epoch: {ids}"
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == live  # every live sample, once
    resumed = _train_iter(tmp_path, rank=0, world=2, start=2, batch_size=2, buffer_size=3)
    assert [k for _ in range(steps - 2) for k in next(resumed)["ids"]] == per_rank[0][4:]
    # validation: the superseded valid sample is not read, positions cover the 2 live ones
    valid = [list(D.build_valid_loader(cfg, index, EXPECT, rank=r, world_size=2)) for r in range(2)]
    assert len(valid[0]) == len(valid[1])
    assert {p for batches in valid for b in batches for p in b[D.BATCH_STATS_KEY]["positions"]} == {0, 1}
    assert {k for batches in valid for b in batches for k in b["ids"]} == {"ctrate_valid_0_00014", "ctrate_valid_0_00016"}


def test_evaluation_reads_each_live_sample_once_and_never_a_superseded_one(tmp_path):
    from ctprep_train.eval.data import iter_split, split_shards

    live, changed, gone = _with_tombstones(tmp_path)
    assert len(split_shards(tmp_path, "train")) == 4
    samples = list(iter_split(tmp_path, "train"))
    ids = [s["__key__"] for s in samples]
    assert sorted(ids) == sorted(live)
    for sample in samples:
        assert sample["__key__"] not in changed or sample["meta"]["report_text"] == "new version"
    assert [s["__key__"] for s in iter_split(tmp_path, "valid")] == ["ctrate_valid_0_00014", "ctrate_valid_0_00016"]


def _masks_and_anchors(root: Path, batches: int, **kw) -> list[dict]:
    it = _train_iter(root, batch_size=3, buffer_size=2, **kw)
    return [next(it) for _ in range(batches)]


def test_mask_dropout_zero_leaves_every_sample_as_packed(tmp_path):
    write_test_shards(tmp_path, {"train": [5, 4]}, compress=())
    plain = _masks_and_anchors(tmp_path, 3)
    zero = _masks_and_anchors(tmp_path, 3, mask_dropout=0.0)
    refs = {r.key: r for p in sorted((tmp_path / "train").glob("*.tar")) for r in D.scan_tar(str(p))[0]}
    for a, b in zip(plain, zero):
        assert a["ids"] == b["ids"]
        for key in ("mask", "regions", "region_has_text"):
            assert torch.equal(a[key], b[key])
        for i, key in enumerate(b["ids"]):
            packed = D.decode_sample(refs[key], EXPECT, TEST_TOKENIZER)
            np.testing.assert_array_equal(b["mask"][i].numpy(), np.asarray(packed["mask"]))
            assert b["meta"][i]["has_mask"] is True and "mask_dropout" not in b["meta"][i]


def test_mask_dropout_one_makes_every_sample_a_case_without_mask(tmp_path):
    write_test_shards(tmp_path, {"train": [5, 4]})
    for batch in _masks_and_anchors(tmp_path, 3, mask_dropout=1.0):
        assert batch["mask"].shape == (3, 8, 32, 32) and batch["mask"].dtype == torch.uint8
        assert not batch["mask"].any()  # all background
        assert (batch["regions"][..., 0] == 1).all() and not batch["regions"][..., 1:].any()
        assert not batch["region_has_text"].any()  # region anchors dropped, as for has_mask: false
        assert all(m["has_mask"] is False and m["mask_dropout"] is True for m in batch["meta"])
        assert batch["image"].abs().sum() > 0  # the image itself is untouched


def test_mask_dropout_half_drops_about_half_deterministically_per_global_batch(tmp_path):
    rows = np.concatenate([D.mask_dropout_rows(0.5, 7, k, 4) for k in range(1000)])
    assert 0.47 < rows.mean() < 0.53  # 4000 draws: the binomial sd is 0.008
    assert not D.mask_dropout_rows(0.0, 7, 0, 4).any()
    write_test_shards(tmp_path, {"train": [6, 6]})
    batches = _masks_and_anchors(tmp_path, 8, mask_dropout=0.5, seed=7)
    again = _masks_and_anchors(tmp_path, 8, mask_dropout=0.5, seed=7)
    dropped = []
    for k, (batch, same) in enumerate(zip(batches, again)):
        assert batch[D.BATCH_STATS_KEY]["batch"] == k
        rows = [not m["has_mask"] for m in batch["meta"]]
        assert rows == D.mask_dropout_rows(0.5, 7, k, 3).tolist()  # drawn from (seed, global batch)
        assert torch.equal(batch["mask"], same["mask"]) and rows == [not m["has_mask"] for m in same["meta"]]
        for i, gone in enumerate(rows):
            assert bool(batch["mask"][i].any()) != gone and bool(batch["region_has_text"][i].any()) <= (not gone)
        dropped += rows
    assert 0 < sum(dropped) < len(dropped)


def test_mask_dropout_must_be_a_probability():
    from ctprep_train.config import ConfigError, load_config

    assert load_config(None).data.mask_dropout == 0.0
    assert load_config(None, ["data.mask_dropout=0.25"]).data.mask_dropout == 0.25
    with pytest.raises(ConfigError, match="mask_dropout"):
        load_config(None, ["data.mask_dropout=1.5"])
