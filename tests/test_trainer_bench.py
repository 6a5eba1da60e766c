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
        assert 0 < stream["vs_raw"] and stream["vs_raw"] in stream["vs_raw_pairs"]
    assert all(rows[("stream shards", w)]["first_batch_s"] > 0 for w in (0, 1))
    assert "first_batch_s" not in rows[("ctclip nii.gz", 0)]
    assert json.loads(out.read_text())["rows"] == result["rows"]
    table = capsys.readouterr().out
    assert "| first batch s |" in table
    assert table.count("| stream shards |") == 2 and table.count("| webdataset |") == 2 and "| raw read |" in table
    # A second run reuses the prepared inputs instead of writing them again.
    first_nii = tmp_path / "w" / "nii" / "case_0000.nii.gz"
    written = first_nii.stat().st_mtime_ns
    again = bench.main(["--cases", "4", "--src", "8", "32", "32", "--grid", "8", "32", "32", "--workers", "0",
                        "--repeats", "1", "--passes", "1", "--skip-ctclip", "--skip-webdataset", "--work", str(tmp_path / "w")])
    assert [r["method"] for r in again["rows"]] == ["raw read", "stream shards"]
    assert first_nii.stat().st_mtime_ns == written


def test_loader_measurements_skip_the_first_batch_and_the_warmup(tmp_path, monkeypatch):
    """The steady-state window: the first batch and ``warmup`` more are taken from the loader but
    neither timed nor counted; the time to the first batch is reported on its own."""
    bench = load_bench("loader")
    args = bench.parse_args(["--cases", "4", "--src", "8", "32", "32", "--grid", "8", "32", "32", "--batch-size", "2",
                             "--work", str(tmp_path / "w")])
    inputs = bench.prepared_inputs(args)
    taken = []
    build = bench.D.build_train_loader

    def counting(*a, **k):
        loader = build(*a, **k)

        class Counted:
            def __iter__(self):
                for batch in loader:
                    taken.append(len(batch["ids"]))
                    yield batch

        return Counted()

    monkeypatch.setattr(bench.D, "build_train_loader", counting)
    first: list[float] = []
    elapsed, samples = bench.measure_stream(inputs["shards"], 0, 2, 3, 1, warmup=2, first_batch=first)
    assert samples == 3 * 2 and elapsed > 0
    assert taken == [2] * (1 + 2 + 3)  # the first batch, the warm-up, the timed ones
    assert len(first) == 1 and first[0] > 0
    assert bench.Bench(args, inputs).warmup == 2  # one pass of 4 cases at batch 2 (--warmup-passes 1)
    wds_elapsed, wds_samples = bench.measure_webdataset(inputs["tars"], 4, 0, 2, 3, warmup=2)
    assert wds_samples == 6 and wds_elapsed > 0
