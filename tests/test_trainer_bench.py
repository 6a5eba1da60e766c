"""bench/loader.py at tiny sizes: every method runs and the ratio table is computed (figures: docs/benchmarks.md)."""

from __future__ import annotations

import json

from tests.bench_helpers import load_bench


def test_loader_bench_runs_every_method_and_pairs_ratios(tmp_path, capsys):
    bench = load_bench("loader")
    out = tmp_path / "result.json"
    result = bench.main(["--cases", "4", "--src", "8", "32", "32", "--grid", "8", "32", "32", "--batch-size", "2",
                         "--workers", "0", "1", "--repeats", "1", "--passes", "2", "--work", str(tmp_path / "w"),
                         "--json", str(out)])
    rows = {(r["method"], r["workers"]): r for r in result["rows"]}
    assert set(rows) == {("raw read", "-"), ("ctclip nii.gz", 0), ("ctclip nii.gz", 1),
                         ("stream shards", 0), ("stream shards", 1), ("webdataset", 0), ("webdataset", 1)}
    for key, row in rows.items():
        assert row["samples_s"] > 0 and row["mb_s"] > 0, key
    for workers in (0, 1):
        stream = rows[("stream shards", workers)]
        assert stream["vs_ctclip"] == stream["samples_s"] / rows[("ctclip nii.gz", workers)]["samples_s"]
        assert 0 < stream["vs_raw"]
    assert json.loads(out.read_text())["rows"] == result["rows"]
    table = capsys.readouterr().out
    assert table.count("| stream shards |") == 2 and table.count("| webdataset |") == 2 and "| raw read |" in table
    # A second run reuses the prepared inputs instead of writing them again.
    first_nii = tmp_path / "w" / "nii" / "case_0000.nii.gz"
    written = first_nii.stat().st_mtime_ns
    again = bench.main(["--cases", "4", "--src", "8", "32", "32", "--grid", "8", "32", "32", "--workers", "0",
                        "--repeats", "1", "--passes", "1", "--skip-ctclip", "--skip-webdataset", "--work", str(tmp_path / "w")])
    assert [r["method"] for r in again["rows"]] == ["raw read", "stream shards"]
    assert first_nii.stat().st_mtime_ns == written
