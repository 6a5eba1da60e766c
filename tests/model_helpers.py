"""Synthetic batches in the ctprep_train.data.collate_samples contract, for the model tests."""

from __future__ import annotations

import torch

from ctprep_train.model.anatomical_encoder import patch_region_fraction


def make_batch(batch_size: int = 2, shape_zyx=(16, 64, 64), num_regions: int = 4, num_steps: int = 3,
               patch_size=(4, 16, 16), seed: int = 0) -> dict:
    """A batch exactly as ctprep_train.data.collate_samples yields it (dtypes and shapes of the plan's contract).

    The label map is a stack of z-slabs, one region per slab band, so region presence is known.
    """
    g = torch.Generator().manual_seed(seed)
    b, r, s = batch_size, num_regions, num_steps
    z, y, x = shape_zyx
    image = torch.randint(-1024, 1500, (b, z, y, x), generator=g).to(torch.int16)
    mask = torch.zeros(b, z, y, x, dtype=torch.uint8)
    band = max(z // (r + 1), 1)
    for k in range(1, r + 1):
        mask[:, k * band:(k + 1) * band, y // 4: 3 * y // 4, x // 4: 3 * x // 4] = k
    regions = patch_region_fraction(mask, patch_size, r).to(torch.float16)

    def tokens(*size):
        return torch.randint(1000, 5000, size, generator=g)

    report_attn = torch.ones(b, 12, dtype=torch.bool)
    report_attn[0, 9:] = False
    steps_attn = torch.ones(b, s, 8, dtype=torch.bool)
    steps_attn[:, :, 6:] = False
    steps_valid = torch.ones(b, s, dtype=torch.bool)
    steps_valid[0, s - 1] = False  # case 0 has one step fewer: padded
    steps_attn[0, s - 1] = False
    region_text_attn = torch.ones(b, r, 6, dtype=torch.bool)
    has_text = torch.zeros(b, r, dtype=torch.bool)
    has_text[:, : (r + 1) // 2] = True
    labels = torch.randint(0, 2, (b, 18), generator=g)
    labels[:, ::5] = -1
    step_regions = torch.full((b, s), -1, dtype=torch.int64)
    return {
        "image": image, "mask": mask, "regions": regions,
        "report_ids": tokens(b, 12) * report_attn, "report_attn": report_attn,
        "steps_ids": tokens(b, s, 8) * steps_attn, "steps_attn": steps_attn, "steps_valid": steps_valid,
        "region_text_ids": tokens(b, r, 6), "region_text_attn": region_text_attn, "region_has_text": has_text,
        "labels": labels, "step_regions": step_regions,
        "ids": [f"case{i}" for i in range(b)], "meta": [{} for _ in range(b)],
    }
