"""ctprep_train.augment: shifts keep image, mask and regions consistent; jitter bounded; seeded; no flips."""

from __future__ import annotations

import pytest
import torch

from ctprep_train.augment import augment_batch
from ctprep_train.config import AugmentConfig, ConfigError, load_config
from ctprep_train.model.anatomical_encoder import patch_region_fraction

PATCH = (2, 4, 4)


def _batch(b=3, shape=(8, 16, 16)):
    g = torch.Generator().manual_seed(0)
    image = torch.randint(-1000, 1000, (b, *shape), generator=g, dtype=torch.int16)
    mask = torch.zeros((b, *shape), dtype=torch.uint8)
    mask[:, 2:6, 3:9, 2:7] = 1  # a "right" structure (low x) and a "left" one (high x)
    mask[:, 1:7, 5:12, 10:15] = 2
    return {"image": image, "mask": mask, "regions": patch_region_fraction(mask, PATCH, 2)}


def _reference_shift(volume, shift, fill):
    """Independent shift: pad every side by the largest shift, then crop the moved window."""
    pad = 4
    padded = torch.nn.functional.pad(volume.float()[None, None], (pad,) * 6, value=float(fill))[0, 0]
    z, y, x = volume.shape
    dz, dy, dx = shift
    return padded[pad - dz : pad - dz + z, pad - dy : pad - dy + y, pad - dx : pad - dx + x].to(volume.dtype)


MARK = (4, 8, 8)  # a voxel with a value nothing else has: where it lands gives the shift


def test_disabled_is_the_identity_object():
    batch = _batch()
    image = batch["image"]
    assert augment_batch(batch, AugmentConfig(), PATCH, seed=0, rank=0, step=0)["image"] is image


def test_shift_moves_image_and_mask_together_and_recomputes_regions():
    cfg = AugmentConfig(enabled=True, shift_voxels=[2, 3, 3], pad_hu=-1024.0)
    orig = _batch()
    orig["image"][(slice(None), *MARK)] = 5000
    seen_shifts = set()
    for step in range(6):
        batch = {k: v.clone() for k, v in orig.items()}
        out = augment_batch(batch, cfg, PATCH, seed=1, rank=0, step=step)
        assert out["image"].dtype == torch.float32
        for i in range(3):
            landed = (out["image"][i] == 5000).nonzero()
            assert landed.shape[0] == 1, f"sample {i} at step {step}: the marker was lost or duplicated"
            match = tuple(int(a - b) for a, b in zip(landed[0], MARK))
            assert all(abs(m) <= lim for m, lim in zip(match, (2, 3, 3)))
            seen_shifts.add(match)
            assert torch.equal(out["image"][i], _reference_shift(orig["image"][i].float(), match, -1024.0))
            assert torch.equal(out["mask"][i], _reference_shift(orig["mask"][i], match, 0))
        torch.testing.assert_close(out["regions"], patch_region_fraction(out["mask"], PATCH, 2))
        torch.testing.assert_close(out["regions"].sum(-1), torch.ones(out["regions"].shape[:2]))
    assert len(seen_shifts) > 3  # shifts are drawn, not constant


def test_no_flip_sides_stay_sides():
    cfg = AugmentConfig(enabled=True, shift_voxels=[0, 2, 2])
    for step in range(10):
        out = augment_batch(_batch(), cfg, PATCH, seed=0, rank=0, step=step)
        xs1 = out["mask"].eq(1).nonzero()[:, 3].float().mean()
        xs2 = out["mask"].eq(2).nonzero()[:, 3].float().mean()
        assert xs1 < xs2  # structure 1 stays on the low-x side


def test_hu_jitter_is_bounded_per_sample_and_seeded():
    cfg = AugmentConfig(enabled=True, hu_offset=50.0, hu_scale=0.0)
    orig = _batch()
    out = augment_batch({k: v.clone() for k, v in orig.items()}, cfg, PATCH, seed=3, rank=1, step=7)
    delta = out["image"] - orig["image"].float()
    for i in range(3):
        assert torch.allclose(delta[i], delta[i].flatten()[0].expand_as(delta[i]))  # one offset per sample
        assert abs(float(delta[i].flatten()[0])) <= 50.0
    assert len({round(float(delta[i].flatten()[0]), 3) for i in range(3)}) == 3
    again = augment_batch({k: v.clone() for k, v in orig.items()}, cfg, PATCH, seed=3, rank=1, step=7)
    assert torch.equal(again["image"], out["image"])  # same (seed, rank, step): same batch
    other = augment_batch({k: v.clone() for k, v in orig.items()}, cfg, PATCH, seed=3, rank=2, step=7)
    assert not torch.equal(other["image"], out["image"])  # another rank draws its own numbers
    noisy = augment_batch({k: v.clone() for k, v in orig.items()}, AugmentConfig(enabled=True, noise_hu=20.0),
                          PATCH, seed=0, rank=0, step=0)
    std = float((noisy["image"] - orig["image"].float()).std())
    assert 15.0 < std < 25.0


def test_bad_shift_config_is_refused():
    with pytest.raises(ValueError, match="shift_voxels"):
        augment_batch(_batch(), AugmentConfig(enabled=True, shift_voxels=[1, 2]), PATCH, seed=0, rank=0, step=0)
    with pytest.raises(ConfigError, match="augment"):
        load_config(None, ["augment.flip=true"])
    # refused when the config is loaded, not at the first training step
    with pytest.raises(ConfigError, match="shift_voxels"):
        load_config(None, ["augment.shift_voxels=[1, -2, 2]"])
    with pytest.raises(ConfigError, match="hu_scale"):
        load_config(None, ["augment.hu_scale=1.5"])
    with pytest.raises(ConfigError, match="read_threads"):
        load_config(None, ["data.read_threads=0"])
    assert load_config(None, ["augment.enabled=true", "augment.shift_voxels=[1, 4, 4]"]).augment.shift_voxels == [1, 4, 4]


def test_zoom_scales_outline_image_and_mask_together_about_the_centre():
    """A box of HU 100 * label: after a zoom, image and mask still agree and the box area scales."""
    shape = (4, 32, 32)
    mask = torch.zeros((2, *shape), dtype=torch.uint8)
    mask[:, :, 8:24, 10:22] = 1  # 16 x 12 voxels, centred
    image = (mask.to(torch.int16) * 1100 - 1000).to(torch.int16)  # air -1000, box +100
    batch = {"image": image.clone(), "mask": mask.clone(), "regions": patch_region_fraction(mask, PATCH, 1)}
    out = augment_batch(batch, AugmentConfig(enabled=True, zoom=0.2, pad_hu=-1000.0), PATCH, seed=3, rank=0, step=0)
    areas = out["mask"][:, 0].sum((-1, -2)).float()
    assert not torch.equal(out["mask"], mask)  # the outline changed
    assert ((areas / (16 * 12) - 1).abs() <= 0.5).all()  # within (1 +- 0.2)^2
    for i in range(2):  # the box stays centred: its extent is symmetric about the centre
        ys, xs = out["mask"][i, 0].nonzero(as_tuple=True)
        assert abs(float(ys.min() + ys.max()) / 2 - 15.5) <= 1.0 and abs(float(xs.min() + xs.max()) / 2 - 15.5) <= 1.0
    # away from the box edge, image and mask agree exactly
    inside = out["mask"].float()[:, None]
    pool = lambda v: torch.nn.functional.max_pool3d(v, (1, 3, 3), 1, (0, 1, 1))[:, 0]  # noqa: E731
    edge = pool(inside).bool() & ~(-pool(-inside)).bool()  # dilated minus eroded box
    agree = (out["image"] - (out["mask"].float() * 1100 - 1000)).abs() < 1e-3
    assert agree[~edge].all()
    torch.testing.assert_close(out["regions"], patch_region_fraction(out["mask"], PATCH, 1))
    again = augment_batch({"image": image.clone(), "mask": mask.clone(), "regions": batch["regions"]},
                          AugmentConfig(enabled=True, zoom=0.2, pad_hu=-1000.0), PATCH, seed=3, rank=0, step=0)
    assert torch.equal(again["mask"], out["mask"])  # seeded by (seed, rank, step)
    both = augment_batch({"image": image.clone(), "mask": mask.clone(), "regions": batch["regions"]},
                         AugmentConfig(enabled=True, zoom=0.2, shift_voxels=[0, 3, 3], pad_hu=-1000.0),
                         PATCH, seed=4, rank=0, step=0)
    torch.testing.assert_close(both["regions"], patch_region_fraction(both["mask"], PATCH, 1))  # zoom + shift
    with pytest.raises(ConfigError, match="zoom"):
        load_config(None, ["augment.zoom=0.6"])
