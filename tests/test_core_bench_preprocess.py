"""bench/preprocess.py --quick end to end: every measurement runs, ``ctprep build-shards`` really
builds the cases, and the ratio table is computed from the printed medians (figures:
docs/benchmarks.md; no timing is asserted)."""

from __future__ import annotations

import numpy as np
import pytest

from ctprep.stages.resample import read_case_zarr
from tests.bench_helpers import load_bench


@pytest.mark.multiprocess
def test_preprocess_bench_quick_runs_every_measurement(tmp_path, capsys):
    bench = load_bench("preprocess")
    result = bench.main(["--quick", "--config", "demo", "--workdir", str(tmp_path)])
    med = result["median"]
    assert set(med) == {"floor", "isal", "ctclip", "stage", "cli", "cli_fixed"}
    for key in ("floor", "isal", "ctclip", "stage"):
        wall, cpu = med[key]
        assert wall > 0 and cpu > 0, key
    assert med["cli_fixed"][0] > 0  # a build-shards run costs more than its marginal volume
    # The command built both volumes, each exactly as the resample stage does in process.
    built = sorted(result["cli_zarr"].glob("*.zarr"))
    assert [p.name for p in built] == ["train_1_a_1.zarr", "train_2_a_1.zarr"]
    ref_image, ref_mask, _ = read_case_zarr(result["stage_zarr"])
    for path in built:
        image, mask, attrs = read_case_zarr(path)
        assert np.array_equal(image, ref_image) and np.array_equal(mask, ref_mask)
        assert attrs["has_mask"] and mask.max() > 0
    ratios = result["ratios"]
    assert ratios["build-shards wall / nibabel floor wall"] == med["cli"][0] / med["floor"][0]
    assert ratios["CT-CLIP way wall / build-shards wall"] == med["ctclip"][0] / med["cli"][0]
    assert 0 < ratios["output bytes / CT-CLIP bytes"] < 1  # int16 + compression vs float32 npz
    table = capsys.readouterr().out
    assert "| **`ctprep build-shards --stages scan,resample --workers 1`**, marginal per volume |" in table
    assert table.count("| met |") + table.count("| MISSED |") == 5
