"""Resample stage geometry: hand-computed grids, SimpleITK agreement, image/mask alignment, v1/v2 reading."""

from __future__ import annotations

import numpy as np
import pytest

from ctprep.quarantine import NONFINITE, UNREADABLE, QuarantineError
from ctprep.sources.ctrate import read_ctrate_volume
from ctprep.stages.resample import AxisGrid, canonical_zyx, check_not_constant, read_case_zarr, resample_case
from tests.core_helpers import oblique_free_affine, sitk_resample, smooth_volume, write_v1, write_v2


def test_axis_grid_hand_computed():
    # 4 input voxels of 1 mm -> 2 mm: 2 output voxels centred at input index 0.5 and 2.5 (edge-aligned).
    g = AxisGrid.make(4, 1.0, 2.0, 2)
    src, valid = g.src()
    assert g.n_full == 2 and g.start == 0
    np.testing.assert_allclose(src, [0.5, 2.5])
    assert valid.all()
    # Pad to 4 voxels: one before, one after; centre crop/pad start = (2 - 4) // 2 = -1.
    g = AxisGrid.make(4, 1.0, 2.0, 4)
    src, valid = g.src()
    assert g.start == -1
    assert valid.tolist() == [False, True, True, False]
    # Upsampling 3 -> 0.5 mm: 6 voxels at -0.25, 0.25, ..., 2.25.
    g = AxisGrid.make(3, 1.0, 0.5, 6)
    np.testing.assert_allclose(g.src()[0], [-0.25, 0.25, 0.75, 1.25, 1.75, 2.25])
    idx, _ = g.nearest()
    assert idx.tolist() == [0, 0, 1, 1, 2, 2]


def test_canonical_orientation_tiny():
    # i -> L, j -> P, k -> S: canonical (z, y, x) = (S, A, R) flips i and j and transposes.
    data = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    aff = oblique_free_affine("LPS", (1.0, 1.0, 1.0), origin=(0, 0, 0))
    view, aff_zyx = canonical_zyx(data, aff)
    assert view.shape == (4, 3, 2)
    # canonical voxel (z, y, x) = (k, 2 - j, 1 - i)
    for z, y, x in [(0, 0, 0), (3, 2, 1), (1, 1, 0)]:
        assert view[z, y, x] == data[1 - x, 2 - y, z]
    # increasing z, y, x index points S, A, R
    np.testing.assert_allclose(aff_zyx[:3, :3], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    # the same voxel maps to the same world point before and after
    world_in = aff @ np.array([1, 2, 0, 1])
    world_out = aff_zyx @ np.array([0, 0, 0, 1])
    np.testing.assert_allclose(world_in, world_out)


@pytest.mark.parametrize(
    "axes,spacing,out_spacing,out_shape",
    [
        ("PLS", (0.8, 0.7, 2.5), (2.0, 1.1, 0.9), (20, 24, 30)),  # permuted + flipped, anisotropic, crop x pad
        ("RAS", (0.7, 0.7, 1.25), (1.5, 0.75, 0.75), (22, 40, 40)),  # ctclip-like ratios
        ("LIA", (1.5, 3.0, 0.6), (0.9, 1.3, 2.2), (48, 18, 16)),  # upsampling along some axes
    ],
)
def test_matches_simpleitk(tmp_path, axes, spacing, out_spacing, out_shape):
    shape = (40, 36, 30)
    vol = smooth_volume(shape, seed=1)
    labels = np.zeros(shape, np.int16)
    labels[5:20, 8:30, 4:25] = 11
    labels[22:35, 3:18, 10:28] = 51
    aff = oblique_free_affine(axes, spacing)
    img_path = write_v2(tmp_path / "v.nii.gz", vol, aff)
    lab_path = write_v2(tmp_path / "m.nii.gz", labels, aff)
    image, affine, style, _ = read_ctrate_volume(str(img_path), {})
    assert style == "v2"
    res = resample_case(image, labels, affine, out_spacing, out_shape, (-3000, 3000), -1024, slab_z=7)

    ref = sitk_resample(img_path, res.affine, out_shape, linear=True, default=-1024)
    ref = np.clip(np.rint(ref), -3000, 3000)
    diff = np.abs(ref - res.image.astype(np.float32))
    assert diff.max() <= 1.0, f"max |ours - SimpleITK| = {diff.max()} HU"  # rounding only
    assert (ref == -1024).sum() == (res.image == -1024).sum()  # same padded region

    ref_mask = sitk_resample(lab_path, res.affine, out_shape, linear=False, default=0)
    lut = np.arange(256, dtype=np.uint8)
    agree = (lut[ref_mask.clip(0, 255)] == res.mask).mean()
    assert agree >= 0.999, f"nearest-neighbour masks agree on {agree:.4%} of voxels"


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).mean(axis=0)
    return (affine @ np.append(idx, 1.0))[:3]


def test_image_and_mask_stay_aligned():
    # A bright box with its label: after resampling both must sit at the same place in mm.
    shape = (50, 44, 36)
    vol = np.full(shape, -1000, np.int16)
    lab = np.zeros(shape, np.int16)
    vol[10:30, 12:30, 6:20] = 400
    lab[10:30, 12:30, 6:20] = 52
    aff = oblique_free_affine("LPS", (0.7, 0.9, 2.0))
    lut = np.zeros(256, np.uint8)
    lut[52] = 4
    res = resample_case(vol, lab, aff, (1.7, 1.2, 1.1), (40, 48, 40), (-1024, 3071), -1024, lut)
    assert set(np.unique(res.mask)) == {0, 4}
    c_in = _world_centroid(lab == 52, aff)
    c_mask = _world_centroid(res.mask == 4, res.affine)
    c_img = _world_centroid(res.image > -300, res.affine)
    assert np.abs(c_mask - c_in).max() < 0.6  # mm, well under one output voxel
    assert np.abs(c_img - c_in).max() < 0.6
    inside = res.mask == 4
    # nearest-neighbour voxels at the edge are partial-volume in the linear image, never air
    assert (res.image[inside] > -800).all()


def _meta(spacing_ijk, slope=1, inter=-1024):
    return {"XYSpacing": f"[{spacing_ijk[1]}, {spacing_ijk[0]}]", "ZSpacing": str(spacing_ijk[2]),
            "RescaleSlope": str(slope), "RescaleIntercept": str(inter),
            "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]"}


def test_v1_v2_detection_and_same_result(tmp_path):
    hu = smooth_volume((30, 28, 20), seed=3)  # (i, j, k) in RAS order for the v2 file
    spacing = (0.8, 0.8, 2.0)
    v2 = write_v2(tmp_path / "v2.nii.gz", hu, oblique_free_affine("RAS", spacing))
    # v1: the same voxels in DICOM (L, P, S) order, raw = HU + 1024 stored as uint16, blank header.
    raw = (hu[::-1, ::-1, :].astype(np.int32) + 1024).astype(np.uint16)
    v1 = write_v1(tmp_path / "v1.nii.gz", raw)
    img1, aff1, style1, info1 = read_ctrate_volume(str(v1), _meta(spacing))
    img2, aff2, style2, info2 = read_ctrate_volume(str(v2), _meta(spacing))  # CSV must be ignored for v2
    assert (style1, style2) == ("v1", "v2")
    assert info1["rescale_source"] == "metadata_csv" and info2["rescale_source"] == "header"
    assert img1.dtype == np.int16 and img2.dtype == np.int16  # exact integer rescale stays int16
    out1 = resample_case(img1, None, aff1, (2.5, 1.0, 1.0), (12, 24, 24))
    out2 = resample_case(img2, None, aff2, (2.5, 1.0, 1.0), (12, 24, 24))
    np.testing.assert_array_equal(out1.image, out2.image)
    np.testing.assert_allclose(out1.affine[:3, :3], out2.affine[:3, :3], atol=1e-5)


def test_v2_header_rescale_applied_once(tmp_path):
    hu = smooth_volume((10, 10, 6), seed=4)
    raw = (hu.astype(np.int32) + 1024).astype(np.int16)
    path = write_v2(tmp_path / "s.nii.gz", raw, oblique_free_affine("RAS", (1, 1, 2)), slope=1.0, inter=-1024.0)
    img, _, style, info = read_ctrate_volume(str(path), _meta((1, 1, 2), 1, -1024))
    assert style == "v2" and info["intercept"] == -1024.0
    np.testing.assert_array_equal(img, hu)  # not hu - 1024 (no double rescale)


def test_float_nan_and_truncated_are_quarantined(tmp_path):
    data = smooth_volume((8, 8, 4)).astype(np.float32)
    data[2, 3, 1] = np.nan
    path = write_v2(tmp_path / "nan.nii.gz", data, oblique_free_affine("RAS", (1, 1, 1)))
    with pytest.raises(QuarantineError) as e:
        read_ctrate_volume(str(path), {})
    assert e.value.kind == NONFINITE
    good = write_v2(tmp_path / "t.nii.gz", smooth_volume((16, 16, 8)), oblique_free_affine("RAS", (1, 1, 1)))
    blob = good.read_bytes()
    good.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(QuarantineError) as e:
        read_ctrate_volume(str(good), {})
    assert e.value.kind == UNREADABLE
    with pytest.raises(QuarantineError):
        check_not_constant(np.zeros((4, 4, 4), np.int16))


def test_slab_size_only_changes_rounding():
    vol = smooth_volume((24, 20, 18), seed=5)
    aff = oblique_free_affine("PLS", (0.9, 1.1, 1.7))
    a = resample_case(vol, None, aff, (1.3, 1.0, 0.8), (20, 24, 22), slab_z=1)
    b = resample_case(vol, None, aff, (1.3, 1.0, 0.8), (20, 24, 22), slab_z=64)
    c = resample_case(vol, None, aff, (1.3, 1.0, 0.8), (20, 24, 22), slab_z=64)
    assert np.abs(a.image.astype(int) - b.image).max() <= 1  # float rounding at .5 only
    np.testing.assert_array_equal(b.image, c.image)  # deterministic for a given config


def test_reuse_freed_memory_under_dask_malloc_env():
    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536: every freed 2 MB block is unmapped
    # and faults in again. Inside reuse_freed_memory() the block is reused; afterwards the environment's
    # behaviour is back. Counted in page faults of a fresh interpreter (no timing).
    import json
    import os
    import subprocess
    import sys

    code = """
import json, resource, numpy as np
from ctprep.stages.resample import reuse_freed_memory
def faults(n=40):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        a = np.empty(2 << 20, np.uint8); a.fill(1); del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
before = faults()
with reuse_freed_memory():
    inside = faults()
after = faults()
print(json.dumps([before, inside, after]))
"""
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    before, inside, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert before > 40 * 100  # the environment's policy: fresh pages every time (512 per block, fewer with THP)
    assert inside < before // 5
    assert after > inside * 5  # restored


@pytest.mark.parametrize("chunks", [(4, 16, 16), (3, 40, 30), (8, 40, 30)])  # edge chunks overhang; one chunk
@pytest.mark.parametrize("shuffle", ["shuffle", "bitshuffle"])
def test_direct_chunk_writer_matches_zarr_byte_for_byte(tmp_path, monkeypatch, chunks, shuffle):
    import os

    from ctprep.stages import resample as stage

    rng = np.random.default_rng(0)
    image = np.rint(rng.normal(0, 300, (7, 40, 30))).astype(np.int16)
    mask = rng.integers(0, 5, (7, 40, 30)).astype(np.uint8)
    case = stage.ResampledCase(image, mask, np.eye(4), (1.0, 1.0, 1.0), 1.0)
    direct = tmp_path / "direct.zarr"
    used, writer = [], stage.write_chunks_direct
    monkeypatch.setattr(stage, "write_chunks_direct", lambda *a: used.append(writer(*a)) or used[-1])
    stage.write_case_zarr(direct, case, {"case_id": "a"}, chunks, "zstd", 1, shuffle)
    assert used == [True, True]  # image and mask went through the direct writer, not zarr's
    monkeypatch.setattr(stage, "write_chunks_direct", lambda *a: False)  # zarr's own z[...] = arr
    ref = tmp_path / "zarr.zarr"
    stage.write_case_zarr(ref, case, {"case_id": "a"}, chunks, "zstd", 1, shuffle)

    def files(root):
        return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
                for d, _, names in os.walk(root) for f in names}

    got, want = files(direct), files(ref)
    assert sorted(got) == sorted(want) and len([k for k in want if "/c/" in k]) >= 2
    assert got == want
    img, msk, attrs = read_case_zarr(direct)
    assert np.array_equal(img, image) and np.array_equal(msk, mask) and attrs["case_id"] == "a"


@pytest.mark.parametrize("n,h,w,scale", [(5, 37, 41, (1 / 1.0714285714285714, 1 / 1.0714285714285714)),
                                          (3, 20, 30, (2.5, 0.4)), (7, 512, 512, (0.7 / 0.75, 0.7 / 0.75))])
def test_bilinear_into_buffer_is_f_interpolate(n, h, w, scale):
    import torch
    import torch.nn.functional as F

    from ctprep.stages.resample import _bilinear

    slab = torch.from_numpy(np.random.default_rng(n).normal(0, 500, (n, h, w)).astype(np.float32))
    ref = F.interpolate(slab[None], scale_factor=scale, mode="bilinear", align_corners=False,
                        recompute_scale_factor=False)[0]
    got, buf = _bilinear(slab, scale, None, 8)
    assert got.shape == ref.shape and torch.equal(got, ref)
    again, buf2 = _bilinear(slab[: n - 1], scale, buf, 8)  # a shorter last slab reuses the buffer
    assert buf2 is buf and torch.equal(again, ref[: n - 1])
