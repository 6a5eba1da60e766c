"""The whole build-shards pipeline (core runner + regions/text/pack): incremental behaviour."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

from ctprep.config import load_config
from ctprep.runner import build
from ctprep.schema import TRUNCATION_KEYS
from ctprep.shards import live_shard_urls
from ctprep.stages.pack import check_index, read_index, tar_sample_keys
from ctprep.tokenizer import default_tokenizer_dir

import ctprep.synth.ctrate as synth_ct
import ctprep.synth.omniabnorm as synth_omni


def run(srcs, out, cfg=None, **kw):
    return build([str(s) for s in srcs], out, cfg or load_config("demo"), workers=0, progress=False,
                 log=lambda msg: None, **kw)


def ran(report):
    return {name: t.ran for name, t in report.tallies.items()}


def shard_files(out):
    return {p.relative_to(out).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns,
                                            p.stat().st_ino) for p in sorted(out.glob("*/*.tar"))}


def listed_keys(out):
    index = read_index(out)
    return [k for entries in index["splits"].values() for e in entries for k in tar_sample_keys(out / e["path"])]


def live_keys(out):
    index = read_index(out)
    return [k for entries in index["splits"].values() for e in entries for k in tar_sample_keys(out / e["path"])
            if k not in e.get("superseded", [])]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    synth_ct.write_ctrate(root / "ctrate", cases=3, seed=0)
    synth_omni.write_omniabnorm(root / "omni" / "batch_01", cases=3, seed=1, layout="batches")
    return root


def test_batches_generations_and_tokenizer_change(data, tmp_path):
    out = tmp_path / "shards"
    first = run([data / "ctrate", data / "omni"], out)
    assert first.exit_code == 0
    assert first.tallies["pack"].done == 6 and check_index(out) == []
    first_tokenizer = read_index(out)["tokenizer"]
    before = shard_files(out)

    # A new OmniAbnorm batch: every stage runs for its 2 cases only; old shards untouched.
    synth_omni.write_omniabnorm(data / "omni" / "batch_02", cases=2, seed=2, layout="batches")
    second = run([data / "ctrate", data / "omni"], out)
    assert ran(second) == {"resample": 2, "regions": 2, "text": 2, "pack": 2}
    after = shard_files(out)
    assert {p: after[p] for p in before} == before  # same bytes, same file (inode, mtime)
    index = read_index(out)
    assert [g["generation"] for g in index["generations"]] == [1, 2]
    new = [e for e in index["splits"]["train"] if e["generation"] == 2]
    assert [e["source"] for e in new] == ["omniabnorm"] and sum(e["samples"] for e in new) == 2
    assert check_index(out) == [] and len(listed_keys(out)) == len(set(listed_keys(out))) == 8

    # Nothing changed: nothing runs.
    assert sum(ran(run([data / "ctrate", data / "omni"], out)).values()) == 0

    # Only the tokenizer changes (a copy with one extra vocabulary entry): text + pack rerun, nothing else.
    tok = tmp_path / "tok"
    shutil.copytree(default_tokenizer_dir(), tok, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer.json"))
    with open(tok / "vocab.txt", "a") as f:
        f.write("zzzextratoken\n")
    cfg = load_config("demo")
    cfg.text.tokenizer = str(tok)
    third = run([data / "ctrate", data / "omni"], out, cfg)
    assert ran(third) == {"resample": 0, "regions": 0, "text": 8, "pack": 8}
    index = read_index(out)
    assert index["tokenizer"]["hash"] != first_tokenizer["hash"] and index["tokenizer"]["name"] == "nreimers/MiniLM-L6-H384-uncased"
    assert {e["generation"] for e in index["splits"]["train"]} == {3}
    assert {r["path"] for r in index["retired"]} == set(after)  # all old shards retired, still on disk
    assert all((out / p).is_file() for p in after) and check_index(out) == []


def test_rebuild_is_byte_identical_and_readable(data, tmp_path):
    import webdataset as wds
    a, b = tmp_path / "a", tmp_path / "b"
    run([data / "omni" / "batch_01"], a)
    run([data / "omni" / "batch_01"], b)
    fa, fb = shard_files(a), shard_files(b)
    assert fa.keys() == fb.keys() and all(fa[p][0] == fb[p][0] for p in fa)
    index = read_index(a)
    urls = [str(a / e["path"]) for e in index["splits"]["train"]]
    for s in wds.WebDataset(urls, shardshuffle=False).decode():
        meta = s["meta.json"]
        assert meta["source"] == "omniabnorm" and meta["header_style"] == "jpg" and meta["id"] == s["__key__"]
        assert meta["shape"] == [4, 128, 128] and meta["tokenizer"] == index["tokenizer"]
        assert s["regions.npy"].shape == (64, 7) and np.allclose(s["regions.npy"].astype(np.float32).sum(1), 1, atol=4e-3)
        assert (s["labels.npy"] != 0).all()  # slice-level labels: 1 or unknown
        assert s["report_len.npy"].shape == () and s["steps_ids.npy"].shape[0] == s["steps_len.npy"].shape[0]


def test_trainer_reads_the_shards(data, tmp_path):
    """The contract with the trainer: its reader and collate accept what pack writes."""
    import ctprep_train.data as tdata
    out = tmp_path / "s"
    run([data / "omni" / "batch_01"], out)
    expect = tdata.ShardExpectation(tokenizer=read_index(out)["tokenizer"])
    index = tdata.load_shard_index(out, expect)
    samples = [tdata.decode_sample(ref, expect, index.tokenizer)
               for shard in index.shards("train")["omniabnorm"] for ref in tdata.scan_tar(shard.path)[0]]
    batch = tdata.collate_samples(samples)
    assert tuple(batch["image"].shape) == (3, 4, 128, 128) and tuple(batch["regions"].shape) == (3, 64, 7)
    assert batch["report_attn"].sum(1).tolist() == [int(s["report_len"]) for s in samples]


def test_changed_case_supersedes_its_sample(data, tmp_path):
    import json

    src = tmp_path / "omni"
    shutil.copytree(data / "omni" / "batch_01", src / "batch_01")
    out = tmp_path / "shards"
    run([src], out)
    old = read_index(out)["splits"]["train"]
    records = json.loads((src / "batch_01" / "records.json").read_text())
    records[0]["abnormality"][0]["rewritten_findings"] += " It has grown."
    (src / "batch_01" / "records.json").write_text(json.dumps(records))
    before = shard_files(out)
    report = run([src], out)
    # the changed case reruns text (its findings changed) and pack, for it alone
    assert ran(report) == {"resample": 0, "regions": 0, "text": 1, "pack": 1}
    index = read_index(out)
    changed = records[0]["id"]
    kept, new = index["splits"]["train"][: len(old)], index["splits"]["train"][len(old):]
    assert [e["path"] for e in kept] == [e["path"] for e in old] and index["retired"] == []
    assert [e.get("superseded", []) for e in kept] == [[changed] if changed in e["cases"] else [] for e in old]
    assert [list(e["cases"]) for e in new] == [[changed]] and new[0]["generation"] == 2
    assert {p: v for p, v in shard_files(out).items() if p in before} == before  # old files untouched
    assert index["generations"][-1]["superseded"] == {e["path"]: [changed] for e in old if changed in e["cases"]}
    assert sorted(live_keys(out)) == sorted(r["id"] for r in records) and check_index(out) == []
    # plain webdataset with the tombstone filter: every case once, the changed one with its new text
    import webdataset as wds
    urls, live = live_shard_urls(out, "train")
    seen = {s["__key__"]: s["meta.json"] for s in wds.WebDataset(urls, shardshuffle=False).select(live).decode()}
    assert sorted(seen) == sorted(r["id"] for r in records)
    assert "It has grown." in seen[changed]["report_text"]
    cut, max_steps = seen[changed]["truncated"], load_config("demo").text.max_steps
    assert sorted(cut) == sorted(TRUNCATION_KEYS) and all(type(v) is int and v >= 0 for v in cut.values())
    assert cut["steps_dropped"] == 0 or len(seen[changed]["steps_text"]) == max_steps


def test_run_with_one_source_root_keeps_the_other_roots_shards(data, tmp_path):
    out = tmp_path / "shards"
    both = [data / "ctrate", data / "omni" / "batch_01"]
    run(both, out)
    first = read_index(out)
    run([data / "omni" / "batch_01"], out)  # ctrate not given this time: its cases are not "gone"
    assert read_index(out)["splits"] == first["splits"]
    again = run(both, out)  # the manifest catches up without rewriting anything
    assert ran(again)["pack"] == 3 and read_index(out) == first and check_index(out) == []


def test_summary_counts_reports_cut_by_max_len(data, tmp_path):
    """A report longer than text.max_len_report still trains, but the build summary says how many were cut."""
    cfg = load_config("demo")
    cfg.text.max_len_report = 24  # the synthetic reports are 100-300 tokens
    report = run([data / "ctrate"], tmp_path / "shards", cfg)
    assert report.exit_code == 0
    assert report.tallies["text"].notes["reports cut at text.max_len_report"] == report.tallies["text"].done == 3
    assert "3 reports cut at text.max_len_report" in report.summary
    # the demo preset keeps every synthetic report whole
    whole = run([data / "ctrate"], tmp_path / "whole")
    assert whole.tallies["text"].done == 3 and "reports cut" not in whole.summary


def test_steps_cut_by_max_steps_are_counted_in_the_summary_and_the_samples(data, tmp_path):
    import webdataset as wds
    cfg = load_config("demo")
    cfg.text.max_steps = 1
    out = tmp_path / "shards"
    report = run([data / "omni" / "batch_01"], out, cfg)
    urls, live = live_shard_urls(out, "train")
    metas = [s["meta.json"] for s in wds.WebDataset(urls, shardshuffle=False).select(live).decode()]
    dropped = sum(m["truncated"]["steps_dropped"] for m in metas)
    assert len(metas) == 3 and all(len(m["steps_text"]) <= 1 for m in metas) and dropped > 0
    assert report.tallies["text"].notes["CoT steps dropped at text.max_steps"] == dropped
    assert f"{dropped} CoT steps dropped at text.max_steps" in report.summary


def _build_then_change_one_case(data, tmp_path):
    """A build of one OmniAbnorm batch, then a rebuild after one record's findings changed: the
    changed case's old sample is superseded by a new one. Returns (src, out)."""
    import json

    src = tmp_path / "omni"
    shutil.copytree(data / "omni" / "batch_01", src / "batch_01")
    out = tmp_path / "shards"
    run([src], out)
    records = json.loads((src / "batch_01" / "records.json").read_text())
    records[0]["abnormality"][0]["rewritten_findings"] += " It has grown."
    (src / "batch_01" / "records.json").write_text(json.dumps(records))
    run([src], out)
    return src, out


def test_compaction_then_prune_then_build_writes_nothing(data, tmp_path):
    from ctprep.compact import compact
    from ctprep.runner import status
    from ctprep.stages.pack import prune_retired

    src, out = _build_then_change_one_case(data, tmp_path)
    moved = compact(out, threshold=0.01)
    assert moved.compacted and moved.samples >= 1 and check_index(out) == []
    compacted = read_index(out)
    assert prune_retired(out) == moved.compacted
    assert status(out).stages["pack"].stale["output missing"] == moved.samples
    again = run([src], out)  # re-records the moved cases; writes nothing
    assert ran(again) == {"resample": 0, "regions": 0, "text": 0, "pack": moved.samples}
    assert read_index(out)["splits"] == compacted["splits"] and check_index(out) == []
    assert status(out).stages["pack"].stale == {} and sum(ran(run([src], out)).values()) == 0


def test_trainer_reads_each_case_once_after_a_delta_build(data, tmp_path):
    """The contract with the trainer after a changed case: its old sample is skipped, its new one read."""
    import json

    import ctprep_train.data as tdata

    src, out = _build_then_change_one_case(data, tmp_path)
    records = json.loads((src / "batch_01" / "records.json").read_text())
    expect = tdata.ShardExpectation(tokenizer=read_index(out)["tokenizer"])
    index = tdata.load_shard_index(out, expect)
    read = [(shard.path, ref.key) for shard in index.shards("train")["omniabnorm"]
            for ref in shard.live(tdata.scan_tar(shard.path)[0])]
    assert sorted(k for _, k in read) == sorted(r["id"] for r in records)  # each case once
    assert [p for p, k in read if k == records[0]["id"]] == [str(out / e["path"]) for e in read_index(out)["splits"]["train"]
                                                             if e["generation"] == 2]
