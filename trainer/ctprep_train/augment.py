"""Training-time augmentation of a batch on the device: in-plane zoom, shifts and HU jitter, never flips.

Left-right (and any) flips are left out on purpose: reports and CoT steps name sides ("right
lower lobe"), so a flipped volume would contradict its own text. What is applied, per sample:

* in-plane zoom: y and x each scaled by its own factor in ``1 +- zoom`` about the volume centre
  (z untouched), the image trilinearly, the mask by nearest label. A scan's outline then differs
  from epoch to epoch, so it cannot be recognised (and its report recalled) by body shape alone.
  Lesion sizes change by the same factor, so keep ``zoom`` small (0.1: an 18 mm nodule is drawn
  16-20 mm), since the report still says 18 mm;
* translation by a whole number of voxels, up to ``shift_voxels`` (z, y, x) each way; the volume
  is padded with air (``pad_hu``) and the mask with background (0), and after a zoom or a shift
  the patch-to-region assignment is recomputed from the new mask (the pipeline's ``regions.npy`` rule), so image,
  mask and regions stay consistent;
* HU jitter: ``hu * (1 + U(-hu_scale, hu_scale)) + U(-hu_offset, hu_offset)``, then Gaussian
  noise of ``noise_hu`` HU.

The random numbers come from a generator seeded with (seed, rank, step), so a resumed run
augments its batches as the uninterrupted run would have.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ctprep_train.config import AugmentConfig
from ctprep_train.model.anatomical_encoder import patch_region_fraction

__all__ = ["AugmentConfig", "augment_batch"]


def _shift(volume: torch.Tensor, shift: tuple[int, int, int], fill: float) -> torch.Tensor:
    """(Z, Y, X) volume moved by ``shift`` voxels; uncovered voxels are ``fill``."""
    out = torch.full_like(volume, fill)
    src, dst = [], []
    for n, s in zip(volume.shape, shift):
        src.append(slice(max(0, -s), n - max(0, s)))
        dst.append(slice(max(0, s), n - max(0, -s)))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def _zoom(volumes: torch.Tensor, factors: torch.Tensor, mode: str, fill: float) -> torch.Tensor:
    """(B, Z, Y, X) volumes scaled in y and x by ``factors`` (B, 2) about the centre; outside is ``fill``."""
    b = volumes.shape[0]
    theta = torch.zeros(b, 3, 4, dtype=torch.float32)
    theta[:, 0, 0] = 1.0 / factors[:, 1]  # grid coordinates are (x, y, z); output -> input
    theta[:, 1, 1] = 1.0 / factors[:, 0]
    theta[:, 2, 2] = 1.0
    x = volumes.unsqueeze(1).float() - fill
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return (out + fill).squeeze(1)


def augment_batch(batch: dict[str, Any], cfg: AugmentConfig, patch_size, *, seed: int, rank: int, step: int) -> dict[str, Any]:
    """Return ``batch`` with augmented ``image`` (float32 HU), ``mask`` and ``regions``; in place safe."""
    if not cfg.enabled:
        return batch
    image = batch["image"]
    device = image.device
    entropy = np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1)[0]
    gen = torch.Generator().manual_seed(int(entropy))
    b = image.shape[0]
    limits = [int(v) for v in cfg.shift_voxels]
    if len(limits) != 3 or min(limits) < 0:
        raise ValueError(f"augment.shift_voxels must be three non-negative voxel counts, got {cfg.shift_voxels}")
    shifts = [
        tuple(int(torch.randint(-m, m + 1, (), generator=gen)) if m else 0 for m in limits) for _ in range(b)
    ]
    image = image.float()
    zoom = float(cfg.zoom)
    if not 0.0 <= zoom < 0.5:
        raise ValueError(f"augment.zoom must be in [0, 0.5), got {zoom}")
    if zoom:
        factors = 1 + (torch.rand(b, 2, generator=gen) * 2 - 1) * zoom
        image = _zoom(image, factors, "bilinear", cfg.pad_hu)
        if batch.get("mask") is not None:
            batch["mask"] = _zoom(batch["mask"], factors, "nearest", 0.0).round().to(batch["mask"].dtype)
    shifted = any(any(s) for s in shifts)
    if shifted:
        image = torch.stack([_shift(image[i], shifts[i], cfg.pad_hu) for i in range(b)])
        if batch.get("mask") is not None:
            batch["mask"] = torch.stack([_shift(batch["mask"][i], shifts[i], 0) for i in range(b)])
    if (zoom or shifted) and batch.get("mask") is not None and batch.get("regions") is not None:
        r = batch["regions"].shape[-1] - 1  # once, from the final mask
        batch["regions"] = patch_region_fraction(batch["mask"], patch_size, r).to(batch["regions"].dtype)
    if cfg.hu_scale or cfg.hu_offset:
        scale = 1 + (torch.rand(b, generator=gen) * 2 - 1) * cfg.hu_scale
        offset = (torch.rand(b, generator=gen) * 2 - 1) * cfg.hu_offset
        image = image * scale.to(device).view(b, 1, 1, 1) + offset.to(device).view(b, 1, 1, 1)
    if cfg.noise_hu:
        noise_gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**31 - 1, (), generator=gen)))
        image = image + torch.randn(image.shape, generator=noise_gen, device=device) * cfg.noise_hu
    batch["image"] = image
    return batch
