"""Mask dropout (``data.mask_dropout``): training samples made mask-free on purpose.

A scan without an anatomy mask is what a user without a segmentation gives the encoder
(``ctprep_train.inference``). The pipeline packs such a case (``ctrate.missing_mask: allow``) as
an all-background mask with a background-only patch assignment and ``meta.json has_mask:
false``, and ``collate_samples`` then drops its region anchors. With probability p per training
sample, ``drop_mask`` turns a sample into exactly that, so the model sees mask-free input while
it trains and inference without a mask is in distribution. Validation is never masked out.

The draws of global batch k come from a generator seeded with (seed, k), like the batch's source
(``SourceSchedule``): every rank and worker agrees, a resumed run drops the same masks, and the
number of DataLoader workers changes nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MASK_DROPOUT_STREAM = 0x6D61736B  # "mask": keeps these draws apart from other (seed, k) generators


def mask_dropout_rows(p: float, seed: int, batch: int, rows: int) -> np.ndarray:
    """bool (rows,): which samples of global batch ``batch`` lose their mask (each with probability p)."""
    if p <= 0:
        return np.zeros(rows, dtype=bool)
    return np.random.default_rng([int(seed), MASK_DROPOUT_STREAM, int(batch)]).random(rows) < p


def drop_mask(sample: dict[str, Any]) -> dict[str, Any]:
    """``sample`` as the pipeline packs a case without an anatomy mask (changed in place, returned).

    The mask (a decoded array or a volume not read yet) becomes zeros of its shape and dtype, every
    patch row of ``regions`` becomes wholly background (what ``ctprep.stages.regions`` gives for an
    all-zero mask), and ``meta`` says ``has_mask: false`` (so its region anchors are dropped) and
    ``mask_dropout: true``.
    """
    mask = sample["mask"]
    sample["mask"] = np.zeros(tuple(mask.shape), dtype=mask.dtype)
    regions = np.zeros_like(sample["regions"])
    regions[..., 0] = 1
    sample["regions"] = regions
    sample["meta"] = {**sample["meta"], "has_mask": False, "mask_dropout": True}
    return sample
