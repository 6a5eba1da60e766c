"""Growing data: CoT edits write only the edited samples (tombstones), compaction equals a fresh
build, and shards written by the Dask workers equal the serial pack byte for byte."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest

from ctprep.compact import compact
from ctprep.errors import UserError
from ctprep.shards import live_samples, superseded_keys
from ctprep.stages import pack
from ctprep.stages.pack import build_sample, check_index, read_index, run_pack
from tests.pack_helpers import aggregate_task, make_case, record, run_case_stages, small_config, with_cot_edit


def stage_outputs(tmp, cfg, n, edited=(), note="edited"):
    """(case, upstream outputs) for cases c00..c<n-1>; the ids in ``edited`` get a CoT edit."""
    entries = []
    for i in range(n):
        case = make_case(f"c{i:02d}", i)
        if case.case_id in edited:
            case = with_cot_edit(case, note)
        entries.append((case, run_case_stages(tmp / "work", case, i, cfg)))
    return entries


def live_members(out):
    """key -> {member: bytes} of every live sample listed in ``out/index.json``."""
    samples = {}
    for entries in read_index(out)["splits"].values():
        for e in entries:
            dead = superseded_keys(e)
            with tarfile.open(out / e["path"]) as tar:
                for m in tar:
                    key, _, member = m.name.partition(".")
                    if key not in dead:
                        assert member not in samples.setdefault(key, {})  # a key is live once
                        samples[key][member] = tar.extractfile(m).read()
    return samples


def all_files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.tar"))}


def edit_run(tmp_path, cfg, n, k):
    """Pack n cases, edit the CoT of the first k, pack again; (bytes written, bytes listed, out)."""
    out = tmp_path / f"k{k}"
    manifest = record({}, run_pack(aggregate_task(tmp_path / "work", out, cfg, stage_outputs(tmp_path, cfg, n))))
    before = all_files(out)
    edited = {f"c{i:02d}" for i in range(k)}
    results = run_pack(aggregate_task(tmp_path / "work", out, cfg, stage_outputs(tmp_path, cfg, n, edited), manifest))
    assert sorted(r.case_id for r in results) == sorted(edited) and all(r.status == "done" for r in results)
    index = read_index(out)
    new = [e for entries in index["splits"].values() for e in entries if e["generation"] == 2]
    assert sorted(cid for e in new for cid in e["cases"]) == sorted(edited)  # only the edited samples written
    assert {p: all_files(out)[p] for p in before} == before  # no existing shard file rewritten
    assert sum(live_samples(e) for entries in index["splits"].values() for e in entries) == n
    assert check_index(out) == []
    written = sum(e["bytes"] for e in new)
    assert written == sum(len(data) for p, data in all_files(out).items() if p not in before)
    listed = sum(e["bytes"] for entries in index["splits"].values() for e in entries)
    return written, listed, out


def test_cot_edits_write_bytes_proportional_to_the_edited_cases(tmp_path):
    cfg = small_config(shard_max_samples=4)
    n = 12
    sizes = {k: edit_run(tmp_path, cfg, n, k) for k in (1, 3, 6)}
    one = sizes[1][0]
    sample = min(len(b"".join(m.values())) for m in live_members(sizes[6][2]).values())
    for k, (written, listed, _) in sizes.items():
        # k samples' bytes plus per-shard tar framing (headers, end blocks, 10 KiB record padding)
        shards = -(-k // 4)
        assert k * sample <= written <= k * (sample + 16 * 512) + shards * 10240 * 2
        assert 0.6 * k * one <= written <= 1.4 * k * one
        assert written < listed
    assert sizes[1][0] < sizes[3][0] < sizes[6][0]


def test_compaction_gives_the_samples_of_a_fresh_build(tmp_path):
    cfg = small_config(shard_max_samples=4)
    n, edited = 10, {"c01", "c02", "c05", "c09"}
    out = tmp_path / "grown"
    manifest = record({}, run_pack(aggregate_task(tmp_path / "work", out, cfg, stage_outputs(tmp_path, cfg, n))))
    first_edit = stage_outputs(tmp_path, cfg, n, edited, "first edit")
    record(manifest, run_pack(aggregate_task(tmp_path / "work", out, cfg, first_edit, manifest)))
    second = stage_outputs(tmp_path, cfg, n, {"c02"}, "second edit")  # c02 edited twice; the others reverted
    record(manifest, run_pack(aggregate_task(tmp_path / "work", out, cfg, second, manifest)))
    before = read_index(out)
    fractions = [len(superseded_keys(e)) / e["samples"] for e in before["splits"]["train"]]
    assert max(fractions) >= 0.5 and min(fractions) < 0.25  # some shards at the threshold, some below

    report = compact(out, threshold=0.25)
    after = read_index(out)
    assert report.compacted and set(report.compacted) == {
        e["path"] for e in before["splits"]["train"] if superseded_keys(e) and
        len(superseded_keys(e)) / e["samples"] >= 0.25}
    assert {r["path"] for r in after["retired"]} >= set(report.compacted)
    assert all(not superseded_keys(e) for e in after["splits"]["train"] if e["path"] in report.written)
    assert check_index(out) == []

    fresh = tmp_path / "fresh"
    run_pack(aggregate_task(tmp_path / "work", fresh, cfg, second))
    got, want = live_members(out), live_members(fresh)
    assert sorted(got) == sorted(want) == [f"c{i:02d}" for i in range(n)]
    for key in want:
        assert got[key] == want[key], key  # same members, byte for byte

    # A second compaction finds nothing at the threshold; the next pack run writes nothing.
    assert compact(out, threshold=0.25).compacted == [] and read_index(out) == after
    assert [r for r in run_pack(aggregate_task(tmp_path / "work", out, cfg, second, manifest))
            if not r.info.get("reused")] == []
    assert read_index(out)["splits"] == after["splits"]


def test_compaction_refuses_to_copy_a_damaged_sample(tmp_path):
    cfg = small_config(shard_max_samples=4)
    out = tmp_path / "s"
    manifest = record({}, run_pack(aggregate_task(tmp_path / "work", out, cfg, stage_outputs(tmp_path, cfg, 4))))
    run_pack(aggregate_task(tmp_path / "work", out, cfg, stage_outputs(tmp_path, cfg, 4, {"c00", "c01"}), manifest))
    index = read_index(out)
    shard = out / index["splits"]["train"][0]["path"]
    with tarfile.open(shard) as tar:
        member = tar.getmember("c03.labels.npy")
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size - 1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="c03.*crc32"):
        compact(out, threshold=0.25)
    assert read_index(out) == index  # nothing committed
    with pytest.raises(UserError, match="threshold"):
        compact(out, threshold=0)


def test_compact_command(tmp_path, capsys):
    from typer.testing import CliRunner

    from ctprep.cli import app

    cfg = small_config(shard_max_samples=2)
    out = tmp_path / "s"
    manifest = record({}, run_pack(aggregate_task(tmp_path / "work", out, cfg, stage_outputs(tmp_path, cfg, 4))))
    run_pack(aggregate_task(tmp_path / "work", out, cfg, stage_outputs(tmp_path, cfg, 4, {"c00"}), manifest))
    assert pack.main(["--check", str(out)]) == 0
    assert f"{out}: 4 samples (1 superseded) in 3 listed shards, 2 generations, 0 problems" in capsys.readouterr().out
    result = CliRunner().invoke(app, ["compact", "--out", str(out), "--threshold", "0.5"])
    assert result.exit_code == 0, result.output
    assert "1 shard(s) rewritten as 1" in result.output and "1 live samples copied, 1 superseded" in result.output
    assert check_index(out) == []
    missing = CliRunner().invoke(app, ["compact", "--out", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "no index.json" in missing.output


def footprints(tmp_path, entries, cfg):
    return [pack.tar_footprint(build_sample(pack._sample_job(c, cfg)))
            for c in aggregate_task(tmp_path / "work", tmp_path / "unused", cfg, entries).cases]


@pytest.mark.multiprocess
def test_parallel_pack_equals_serial_pack_byte_for_byte(tmp_path):
    import distributed as distributed
    cfg = small_config(shard_max_samples=4)
    entries = stage_outputs(tmp_path, cfg, 11)
    np.save(entries[4][1]["regions"].path, np.zeros((3, 7), np.float16))  # c04 cannot be encoded
    sizes = footprints(tmp_path, [e for i, e in enumerate(entries) if i != 4], cfg)
    cfg.pack.shard_max_bytes = int(2.5 * max(sizes))  # shards cut by bytes (every 2-3 samples) as well
    serial = run_pack(aggregate_task(tmp_path / "work", tmp_path / "serial", cfg, entries))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            distributed.Client(lc) as client:
        task = aggregate_task(tmp_path / "work", tmp_path / "parallel", cfg, entries)
        task.client = client
        parallel = run_pack(task)
    a, b = all_files(tmp_path / "serial"), all_files(tmp_path / "parallel")
    assert len(a) >= 4 and a.keys() == b.keys()
    for path in a:
        assert a[path] == b[path], path
    assert read_index(tmp_path / "serial")["splits"] == read_index(tmp_path / "parallel")["splits"]
    assert [(r.case_id, r.status, r.output) for r in serial] == [(r.case_id, r.status, r.output) for r in parallel]
    assert [r.case_id for r in serial if r.status == "quarantined"] == ["c04"]
