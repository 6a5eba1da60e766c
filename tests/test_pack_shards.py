"""pack: deterministic shards readable without project code, index consistency, generations, tombstones."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import zstandard

from ctprep.schema import NPY_MEMBERS, META_KEYS, strip_compression
from ctprep.shards import superseded_keys, with_superseded
from ctprep.stages.pack import check_index, read_index, run_pack, tar_sample_keys
from tests.pack_helpers import aggregate_task, make_case, record, run_case_stages, small_config


def build(tmp, cfg, ids_seeds, source="ctrate", split="train"):
    work, entries = tmp / "work", []
    for cid, seed in ids_seeds:
        case = make_case(cid, seed, source, split)
        entries.append((case, run_case_stages(work, case, seed, cfg)))
    return entries


def test_plain_webdataset_and_tar_roundtrip(tmp_path):
    import webdataset as wds
    cfg = small_config(shard_max_samples=2)
    entries = build(tmp_path, cfg, [("c_b", 2), ("c_a", 1), ("c_c", 3)])
    out = tmp_path / "shards"
    results = run_pack(aggregate_task(tmp_path / "work", out, cfg, entries))
    assert sorted(r.case_id for r in results if r.status == "done") == ["c_a", "c_b", "c_c"]
    index = read_index(out)
    assert [e["samples"] for e in index["splits"]["train"]] == [2, 1]
    assert check_index(out) == []

    # webdataset alone (no project code): every member present; plain .npy and .json decode.
    url = str(out / index["splits"]["train"][0]["path"])
    samples = list(wds.WebDataset(url, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == ["c_a", "c_b"]
    want = {f"{m}.npy" for m in NPY_MEMBERS if m not in ("image", "mask")} | {"image.npy.zst", "mask.npy.zst", "meta.json"}
    for s in samples:
        assert want == {k for k in s if not k.startswith("__")}
        assert set(s["meta.json"]) == set(META_KEYS) and s["meta.json"]["id"] == s["__key__"]
        assert s["regions.npy"].dtype == np.float16 and s["labels.npy"].dtype == np.int8
        assert s["labels.npy"][9] == 1 and s["labels.npy"][0] == -1
        assert s["report_ids.npy"].dtype == np.int32 and s["steps_ids.npy"].shape == (2, 16)
        assert s["report_len.npy"].shape == () and s["steps_len.npy"].shape == (2,)
        assert s["region_has_text.npy"].dtype == np.uint8 and s["region_text_len.npy"].shape == (6,)
        assert s["meta.json"]["steps_text"] == ["Look at the lungs.", s["meta.json"]["steps_text"][1]]
        assert isinstance(s["image.npy.zst"], bytes)  # zst is not a webdataset codec: raw bytes

    # tar + zstandard + numpy: the compressed members.
    with tarfile.open(url) as tar:
        names = tar.getnames()
        assert names == sorted(names)  # members sorted within (and across) samples
        for m in tar.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
        data = tar.extractfile("c_a.image.npy.zst").read()
        member, suffix = strip_compression("image.npy.zst")
        image = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(data)), allow_pickle=False)
        mask = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(tar.extractfile("c_a.mask.npy.zst").read())))
    assert (member, suffix) == ("image.npy", ".zst")
    assert image.dtype == np.int16 and image.shape == (8, 32, 32) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask.shape, samples[0]["meta.json"]["shape"])


def test_byte_identical_rebuild(tmp_path):
    cfg = small_config(shard_max_samples=2)
    entries = build(tmp_path, cfg, [("x1", 1), ("x2", 2), ("x3", 3)])
    run_pack(aggregate_task(tmp_path / "work", tmp_path / "a", cfg, entries))
    run_pack(aggregate_task(tmp_path / "work", tmp_path / "b", cfg, entries))
    a, b = read_index(tmp_path / "a"), read_index(tmp_path / "b")
    assert [e["sha256"] for e in a["splits"]["train"]] == [e["sha256"] for e in b["splits"]["train"]]
    for e in a["splits"]["train"]:
        assert (tmp_path / "a" / e["path"]).read_bytes() == (tmp_path / "b" / e["path"]).read_bytes()
    # Delete the shards and rebuild in place: same bytes again.
    shutil.rmtree(tmp_path / "b")
    run_pack(aggregate_task(tmp_path / "work", tmp_path / "b", cfg, entries))
    assert read_index(tmp_path / "b")["splits"] == b["splits"]


def test_new_batch_appends_a_generation_and_changed_case_supersedes(tmp_path):
    cfg = small_config(shard_max_samples=2)
    out = tmp_path / "shards"
    batch1 = build(tmp_path, cfg, [("o1", 1), ("o2", 2), ("o3", 3), ("o4", 4)], source="omniabnorm")
    manifest = record({}, run_pack(aggregate_task(tmp_path / "work", out, cfg, batch1)))
    first = read_index(out)
    before = {e["path"]: (out / e["path"]).read_bytes() for e in first["splits"]["train"]}
    mtimes = {p: (out / p).stat().st_mtime_ns for p in before}

    # Nothing changed: nothing written, index untouched.
    assert run_pack(aggregate_task(tmp_path / "work", out, cfg, batch1, manifest)) == []
    assert read_index(out) == first

    # A new batch: only its cases are packed, into generation 2, next to the old shards.
    batch2 = build(tmp_path, cfg, [("o5", 5), ("o6", 6), ("o7", 7)], source="omniabnorm")
    results = run_pack(aggregate_task(tmp_path / "work", out, cfg, batch1 + batch2, manifest))
    assert sorted(r.case_id for r in results) == ["o5", "o6", "o7"]
    record(manifest, results)
    second = read_index(out)
    assert [g["generation"] for g in second["generations"]] == [1, 2]
    assert second["splits"]["train"][:2] == first["splits"]["train"]
    assert {e["generation"] for e in second["splits"]["train"][2:]} == {2}
    for p, data in before.items():
        assert (out / p).read_bytes() == data and (out / p).stat().st_mtime_ns == mtimes[p]
    assert check_index(out) == []

    # A changed case (o2 re-processed) supersedes its sample: the new one goes into generation 3,
    # the old one is tombstoned in its shard, which stays listed and untouched with o1 live in it.
    changed = [(c, dict(u)) for c, u in batch1 + batch2]
    changed[1][1]["regions"].key = "changed"
    results = run_pack(aggregate_task(tmp_path / "work", out, cfg, changed, manifest))
    assert sorted(r.case_id for r in results) == ["o2"]
    record(manifest, results)
    third = read_index(out)
    first_shard = list(before)[0]
    assert third["splits"]["train"][:4] == [with_superseded(second["splits"]["train"][0], ["o2"])] + second["splits"]["train"][1:]
    assert third["splits"]["train"][4]["cases"].keys() == {"o2"} and third["splits"]["train"][4]["generation"] == 3
    assert third["retired"] == [] and third["generations"][-1]["superseded"] == {first_shard: ["o2"]}
    for p, data in before.items():
        assert (out / p).read_bytes() == data and (out / p).stat().st_mtime_ns == mtimes[p]
    assert sorted(live(out)) == [f"o{i}" for i in range(1, 8)]
    assert check_index(out) == []

    # o1 changes too: nothing live is left in the first shard, so it is retired (file kept).
    changed[0][1]["regions"].key = "changed"
    results = run_pack(aggregate_task(tmp_path / "work", out, cfg, changed, manifest))
    assert sorted(r.case_id for r in results) == ["o1"]
    fourth = read_index(out)
    assert first_shard not in [e["path"] for e in fourth["splits"]["train"]]
    assert fourth["retired"] == [{"path": first_shard, "generation": 4}] and (out / first_shard).is_file()
    assert sorted(live(out)) == [f"o{i}" for i in range(1, 8)] and check_index(out) == []


def test_a_gone_case_is_tombstoned_and_its_shard_mates_stay(tmp_path):
    cfg = small_config(shard_max_samples=3)
    out = tmp_path / "shards"
    entries = build(tmp_path, cfg, [("g1", 1), ("g2", 2), ("g3", 3)])
    manifest = record({}, run_pack(aggregate_task(tmp_path / "work", out, cfg, entries)))
    shard = read_index(out)["splits"]["train"][0]
    data = (out / shard["path"]).read_bytes()
    task = aggregate_task(tmp_path / "work", out, cfg, [entries[0], entries[2]], manifest)
    task.dropped, task.gone = ["g2"], frozenset({"g2"})
    assert run_pack(task) == []  # nothing to write
    index = read_index(out)
    assert index["splits"]["train"] == [with_superseded(shard, ["g2"])] and (out / shard["path"]).read_bytes() == data
    assert sorted(live(out)) == ["g1", "g3"] and check_index(out) == []


def test_check_index_catches_tampering(tmp_path):
    cfg = small_config()
    entries = build(tmp_path, cfg, [("t1", 1)])
    out = tmp_path / "s"
    run_pack(aggregate_task(tmp_path / "work", out, cfg, entries))
    path = out / read_index(out)["splits"]["train"][0]["path"]
    data = bytearray(path.read_bytes())
    data[700] ^= 1
    path.write_bytes(bytes(data))
    assert any("sha256" in p for p in check_index(out))
    index = read_index(out)
    index["splits"]["train"][0]["samples"] = 5
    (out / "index.json").write_text(json.dumps(index))
    assert any("samples" in p for p in check_index(out, hashes=False))


def test_killed_pack_leaves_nothing_listed_and_rerun_is_identical(tmp_path, monkeypatch):
    import ctprep.stages.pack as pack

    cfg = small_config(shard_max_samples=2)
    entries = build(tmp_path, cfg, [("k1", 1), ("k2", 2), ("k3", 3)])
    clean = tmp_path / "clean"
    run_pack(aggregate_task(tmp_path / "work", clean, cfg, entries))

    out = tmp_path / "killed"
    real, calls = pack.build_sample, []

    def dies_on_third(job):
        calls.append(job["case_id"])
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands in for a kill between two samples
        return real(job)

    monkeypatch.setattr(pack, "build_sample", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_pack(aggregate_task(tmp_path / "work", out, cfg, entries))
    assert read_index(out) is None  # nothing was committed
    (out / "train" / "ctrate-g0001-00001.tmp-deadbeef.tar").write_bytes(b"half a shard")  # a SIGKILL's debris
    (out / "train" / "ctrate-g0001-00007.tar").write_bytes(b"an unlisted shard of a killed run")
    monkeypatch.setattr(pack, "build_sample", real)
    run_pack(aggregate_task(tmp_path / "work", out, cfg, entries))
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(p.name for p in (clean / "train").iterdir())
    for p in (clean / "train").iterdir():
        assert (out / "train" / p.name).read_bytes() == p.read_bytes()


def test_dask_fan_out_writes_the_same_bytes(tmp_path):
    import distributed as distributed
    cfg = small_config(shard_max_samples=2)
    entries = build(tmp_path, cfg, [("d1", 1), ("d2", 2), ("d3", 3)])
    run_pack(aggregate_task(tmp_path / "work", tmp_path / "inline", cfg, entries))
    task = aggregate_task(tmp_path / "work", tmp_path / "dask", cfg, entries)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        task.client = client
        run_pack(task)
    a, b = read_index(tmp_path / "inline"), read_index(tmp_path / "dask")
    assert a["splits"] == b["splits"]


def test_text_stage_quarantines_a_case_without_text(tmp_path):
    from ctprep.quarantine import QuarantineError
    from ctprep.sources.base import CaseInput
    from ctprep.stages.base import CaseTask
    from ctprep.stages.text import run_text

    case = CaseInput("empty_1", "omniabnorm", "train", text={"findings": "", "impression": "Not given.", "steps": []})
    task = CaseTask("text", case, "k", str(tmp_path / "text" / "empty_1"), str(tmp_path), small_config(), {})
    with pytest.raises(QuarantineError) as e:
        run_text(task)
    assert e.value.kind == "missing_report" and not (tmp_path / "text" / "empty_1").exists()


def test_a_bad_case_is_quarantined_and_the_rest_packed(tmp_path):
    cfg = small_config()
    entries = build(tmp_path, cfg, [("b1", 1), ("b2", 2)])
    np.save(entries[0][1]["regions"].path, np.zeros((3, 7), np.float16))  # wrong patch count for b1
    out = tmp_path / "s"
    results = {r.case_id: r for r in run_pack(aggregate_task(tmp_path / "work", out, cfg, entries))}
    assert results["b1"].status == "quarantined" and "regions" in results["b1"].reason
    assert results["b2"].status == "done" and listed(out) == ["b2"] and check_index(out) == []


def listed(out):
    return [k for e in read_index(out)["splits"]["train"] for k in tar_sample_keys(out / e["path"])]


def live(out):
    return [k for e in read_index(out)["splits"]["train"] for k in tar_sample_keys(out / e["path"])
            if k not in superseded_keys(e)]
