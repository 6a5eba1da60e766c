"""ctprep.shards: the one home of the shard format (members, index.json, encode / decode)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctprep import schema, shards
from ctprep_train.testing import TEST_TOKENIZER, make_sample


def _sample(case_id: str = "case_1"):
    sample = make_sample(case_id, rng=np.random.default_rng(0))
    arrays = {m: np.asarray(sample[m]) for m in schema.NPY_MEMBERS}
    return arrays, sample["meta"]


def test_encode_decode_round_trip_with_checksums():
    arrays, meta = _sample()
    members = shards.encode_sample(arrays, meta, "zst")
    assert set(members) == {f"{m}.npy" for m in schema.NPY_MEMBERS if m not in shards.COMPRESSED_MEMBERS} | {
        "image.npy.zst", "mask.npy.zst", "meta.json"}
    stored = json.loads(members["meta.json"])
    assert stored[schema.CHECKSUM_KEY] == {n: shards.crc32(d) for n, d in members.items() if n != "meta.json"}
    back, back_meta = shards.decode_sample(members, shards.meta_crc32(members))
    assert back_meta == {**meta, schema.CHECKSUM_KEY: stored[schema.CHECKSUM_KEY]}
    for name, arr in arrays.items():
        assert back[name].dtype == arr.dtype and back[name].shape == arr.shape and np.array_equal(back[name], arr)
    assert shards.verify_sample(members, shards.meta_crc32(members)) == []
    # Deterministic: the same arrays give the same bytes (rebuilt shards are byte-identical).
    assert shards.encode_sample(arrays, meta, "zst") == members


def test_unknown_members_are_refused_on_encode():
    arrays, meta = _sample()
    with pytest.raises(ValueError, match="not shard members"):
        shards.encode_sample({**arrays, "extra": np.zeros(2)}, meta, "zst")


@pytest.mark.parametrize("member", ["labels.npy", "image.npy.zst", "meta.json"])
def test_a_flipped_byte_is_refused(member):
    arrays, meta = _sample()
    members = shards.encode_sample(arrays, meta, "zst")
    crc = shards.meta_crc32(members)
    data = bytearray(members[member])
    data[len(data) // 2] ^= 0x01
    damaged = {**members, member: bytes(data)}
    with pytest.raises(shards.CorruptMemberError, match="crc32"):
        shards.decode_sample(damaged, crc)
    problems = shards.verify_sample(damaged, crc)
    assert len(problems) == 1 and "crc32" in problems[0] and problems[0].startswith(member), problems
    if member == "meta.json":  # the index's checksum catches it, whatever the flip did to the text
        with pytest.raises(shards.MetaChecksumError):
            shards.check_meta(damaged[member], damaged, crc, recorded=True)


def test_a_sample_missing_from_the_index_checksums_is_refused():
    arrays, meta = _sample()
    members = shards.encode_sample(arrays, meta, "none")
    with pytest.raises(shards.CorruptMemberError, match="no checksum"):
        shards.decode_sample(members, None, recorded=True)
    shards.decode_sample(members, None, recorded=False)  # packed before checksums: read unverified


def test_index_round_trip_is_atomic(tmp_path):
    assert shards.read_index_if_present(tmp_path) is None
    index = {"schema_version": schema.SCHEMA_VERSION, "tokenizer": dict(TEST_TOKENIZER), "splits": {"train": [
        shards.shard_entry("train/a-00000.tar", 1, 1024, "0" * 64, "ctrate", 1, {"case_1": 7}, {"case_1": "k"})]}}
    path = shards.write_index(tmp_path, index)
    assert path == tmp_path / schema.INDEX_FILE and [p.name for p in tmp_path.iterdir()] == [schema.INDEX_FILE]
    assert shards.read_index(tmp_path) == index == shards.read_index_if_present(tmp_path)
    (entry,) = index["splits"]["train"]
    assert shards.index_meta_crcs(entry) == {"case_1": 7}
    assert list(entry) == ["path", "samples", "bytes", "sha256", "source", "generation", "cases",
                           schema.INDEX_CHECKSUM_KEY]


def test_reader_refuses_another_schema_version_naming_both_and_the_file(tmp_path):
    shards.write_index(tmp_path, {"schema_version": schema.SCHEMA_VERSION + 7, "splits": {}})
    with pytest.raises(shards.SchemaVersionError) as err:
        shards.read_index(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / schema.INDEX_FILE) in msg
    assert f"schema_version {schema.SCHEMA_VERSION + 7}" in msg and f"schema_version {schema.SCHEMA_VERSION}" in msg
    # the writer's view reads any version (pack replaces an old index rather than refusing it)
    assert shards.read_index_if_present(tmp_path)["schema_version"] == schema.SCHEMA_VERSION + 7


def test_missing_index_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="build-shards"):
        shards.read_index(tmp_path)


def test_imports_without_dask_zarr_or_the_tokenizer():
    import subprocess
    import sys

    code = ("import sys, ctprep.shards; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'dask', 'distributed', 'zarr', 'transformers', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_text_stage_writes_exactly_the_schema_text_members(tmp_path):
    from ctprep.stages.base import CaseTask
    from ctprep.stages.text import TEXT_META_FILE, read_case_text, run_text
    from tests.pack_helpers import make_case, small_config

    task = CaseTask("text", make_case("t_1", 1), "k", str(tmp_path / "text" / "t_1"), str(tmp_path), small_config(), {})
    run_text(task)
    arrays, meta = read_case_text(task.output_path)
    assert tuple(arrays) == schema.TEXT_MEMBERS and set(schema.TEXT_MEMBERS) < set(schema.NPY_MEMBERS)
    written = {p.name for p in (tmp_path / "text" / "t_1").iterdir()}
    assert written == {f"{m}.npy" for m in schema.TEXT_MEMBERS} | {TEXT_META_FILE}
    assert meta["steps_text"] == ["Look at the lungs.", "Measure it: 3 mm."]


def test_tombstones_skip_a_key_only_in_the_shard_that_supersedes_it(tmp_path):
    old = shards.shard_entry("train/a-g0001-00000.tar", 3, 100, "x", "ctrate", 1, {"c1": 1, "c2": 2, "c3": 3},
                             {"c1": "k1", "c2": "k2", "c3": "k3"})
    new = shards.shard_entry("train/a-g0002-00000.tar", 1, 50, "y", "ctrate", 2, {"c2": 4}, {"c2": "k2b"})
    old = shards.with_superseded(old, ["c2"])
    assert old[schema.SUPERSEDED_KEY] == ["c2"] and shards.with_superseded(old, ["c2"]) == old
    assert shards.live_samples(old) == 2 and shards.live_samples(new) == 1
    assert shards.superseded_keys(new) == frozenset()
    index = {"schema_version": schema.SCHEMA_VERSION, "splits": {"train": [old, new]}}
    shards.write_index(tmp_path, index)
    urls, live = shards.live_shard_urls(tmp_path, "train", base_url="http://host/shards/")
    assert urls == ["http://host/shards/train/a-g0001-00000.tar", "http://host/shards/train/a-g0002-00000.tar"]
    read = [(urls[0], "c1"), (urls[0], "c2"), (urls[0], "c3"), (urls[1], "c2")]  # what the tars hold
    kept = [(u, k) for u, k in read if live({"__url__": u, "__key__": k})]
    assert kept == [(urls[0], "c1"), (urls[0], "c3"), (urls[1], "c2")]  # c2 read once, from its new shard
    local, _ = shards.live_shard_urls(tmp_path, "train")
    assert local[0] == str(tmp_path / "train/a-g0001-00000.tar")
    with pytest.raises(shards.ShardMismatchError, match="superseded"):
        shards.superseded_keys({**old, schema.SUPERSEDED_KEY: "c2"})
    shards.write_index(tmp_path, {**index, "schema_version": 2})
    with pytest.raises(shards.SchemaVersionError, match="schema_version 2"):
        shards.live_shard_urls(tmp_path, "train")
