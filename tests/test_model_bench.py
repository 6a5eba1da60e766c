"""bench/attention.py's measurement and table code at tiny sizes (the real run is in docs/benchmarks.md)."""

import argparse

from tests.bench_helpers import load_bench


def _bench_module():
    return load_bench("attention")


def test_attention_bench_measures_and_prints_table(capsys):
    # In-process (the CLI runs each row in a fresh subprocess only to isolate max-RSS peaks).
    bench = _bench_module()
    args = argparse.Namespace(heads=2, head_dim=8, block_size=8, batch=1)
    rows = []
    for layers in (1, 2):
        for kernel in bench.CPU_KERNELS:
            rows.append(bench.cpu_worker(dict(kernel=kernel, grid=(layers, 4, 4), heads=2, head_dim=8,
                                              max_distance=4, block_size=8, reps=1)))
    assert {r["n"] for r in rows} == {17, 33}
    assert all(r["seconds"] > 0 and r["peak_mb"] >= 0 for r in rows)
    bench.print_cpu_table(rows, args)
    out = capsys.readouterr().out
    for kernel in bench.CPU_KERNELS:
        assert f"| {kernel:9} |" in out
    assert "largest N where reference ran: 33" in out and "memory growth / N growth" in out


def test_train_step_bench_times_each_kernel_and_checks_they_agree(capsys):
    bench = load_bench("train_step")
    rows = bench.main(["--grid", "8", "32", "32", "--batch", "2", "--reps", "1", "--amp", "fp32",
                       "--kernels", "augmented", "blocked", "reference"])
    by = {r["kernel"]: r for r in rows}
    assert set(by) == {"augmented", "blocked", "reference"}
    assert by["blocked"]["ratio"] == 1.0 and all(r["median_s"] > 0 for r in rows)
    # same weights, same batch: the three kernels compute the same loss
    assert abs(by["augmented"]["loss"] - by["blocked"]["loss"]) < 1e-4 * max(1.0, abs(by["blocked"]["loss"]))
    assert abs(by["reference"]["loss"] - by["blocked"]["loss"]) < 1e-4 * max(1.0, abs(by["blocked"]["loss"]))
    assert "| augmented |" in capsys.readouterr().out
