"""regions: per-patch region fractions vs a brute-force count."""

from __future__ import annotations

import numpy as np
import pytest

from ctprep.stages.regions import FLOAT16_ROW_SUM_TOL, patch_region_fraction


def brute_force(mask, num_regions, patch):
    pz, py, px = patch
    Z, Y, X = mask.shape
    rows = []
    for z in range(0, Z, pz):  # z-major raster, as Conv3d(...).flatten(2)
        for y in range(0, Y, py):
            for x in range(0, X, px):
                block = mask[z : z + pz, y : y + py, x : x + px]
                rows.append([np.count_nonzero(block == r) / block.size for r in range(num_regions + 1)])
    return np.array(rows, dtype=np.float64)


@pytest.mark.parametrize("patch", [(2, 4, 4), (1, 2, 3), (4, 8, 6)])
def test_matches_brute_force_and_rows_sum_to_one(patch):
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 6, size=(8, 16, 24), dtype=np.uint8)
    mask[:, :4] = 0  # a band of pure background patches
    got = patch_region_fraction(mask, 5, patch)
    want = brute_force(mask, 5, patch)
    assert got.dtype == np.float16 and got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float64), want, atol=FLOAT16_ROW_SUM_TOL)
    np.testing.assert_allclose(got.astype(np.float32).sum(1), 1.0, atol=6 * FLOAT16_ROW_SUM_TOL)


def test_order_is_conv3d_flatten_order():
    import torch as torch
    mask = np.zeros((4, 8, 8), dtype=np.uint8)
    mask[2:, 4:, :4] = 1  # patch (z=1, y=1, x=0) of a 2x2x2 grid of (2, 4, 4) patches
    frac = patch_region_fraction(mask, 1, (2, 4, 4))
    conv = torch.nn.Conv3d(1, 1, kernel_size=(2, 4, 4), stride=(2, 4, 4), bias=False)
    torch.nn.init.constant_(conv.weight, 1.0 / 32)
    with torch.no_grad():
        tokens = conv(torch.from_numpy(mask).float()[None, None]).flatten(2)[0, 0].numpy()
    np.testing.assert_allclose(frac[:, 1].astype(np.float32), tokens, atol=1e-3)
    assert frac[6, 1] == 1 and frac[:, 1].sum() == 1


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of patch size"):
        patch_region_fraction(np.zeros((5, 8, 8), np.uint8), 2, (4, 4, 4))
    with pytest.raises(ValueError, match="expected 0..2"):
        patch_region_fraction(np.full((4, 4, 4), 3, np.uint8), 2, (4, 4, 4))
