"""AnatomicalStructureEncoder: the coarse region label map -> one embedding per region.

Region ids follow the shards: 0 = background, k = ``region_names[k-1]`` (k = 1..R). The soft
patch-to-region assignment (B, P, R+1) normally comes precomputed from the pipeline
(``regions.npy``); ``patch_region_fraction`` computes the same thing from the mask when absent.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .patch_embed import as_triple


def patch_region_fraction(mask: torch.Tensor, patch_size_zyx, num_regions: int) -> torch.Tensor:
    """Fraction of each patch's voxels in each region, the pipeline's ``regions.npy`` rule.

    Args:
        mask: (B, Z, Y, X) integer region ids in [0, num_regions].
        patch_size_zyx: voxels per patch (z, y, x); Z, Y, X must be multiples.
        num_regions: R (background excluded).
    Returns:
        (B, P, R + 1) float32, rows in z-major patch order, each row sums to 1.
    """
    patch = as_triple(patch_size_zyx)
    cols = []
    for r in range(num_regions + 1):  # one region at a time: never a (R+1) x full-volume one-hot
        frac = F.avg_pool3d((mask == r).unsqueeze(1).float(), kernel_size=patch, stride=patch)
        cols.append(frac.flatten(1))
    return torch.stack(cols, dim=-1)


class AnatomicalStructureEncoder(nn.Module):
    """Small 3D CNN over the label map + a learned region table -> region embeddings.

    The label map is subsampled by ``mask_stride`` (nearest), each id embedded into
    ``channels[0]`` features (a one-hot followed by a 1x1x1 conv, without the one-hot), then
    stride-2 Conv3d stages. Each region's embedding = its learned table row + the projection of the
    CNN features averaged over that region's voxels (zero for a region absent from the volume, so
    an absent region is just its table row).

    Args:
        embed_dim: output channels (the transformer width).
        max_regions: largest region id the table holds (R <= max_regions per batch).
        channels: channels of the CNN stages (each one halves z, y, x).
        mask_stride: voxels (z, y, x) between label samples fed to the CNN.
    """

    def __init__(self, embed_dim: int, max_regions: int = 16, channels: Sequence[int] = (16, 32, 64),
                 mask_stride=(1, 4, 4)):
        super().__init__()
        self.max_regions = max_regions
        self.mask_stride = as_triple(mask_stride)
        self.label_embed = nn.Embedding(max_regions + 1, channels[0])
        stages, prev = [], channels[0]
        for ch in channels:
            stages += [nn.Conv3d(prev, ch, 3, stride=2, padding=1), nn.GroupNorm(min(8, ch), ch), nn.GELU()]
            prev = ch
        self.cnn = nn.Sequential(*stages)
        self.feature_proj = nn.Linear(prev, embed_dim)
        self.region_table = nn.Embedding(max_regions + 1, embed_dim)
        nn.init.trunc_normal_(self.region_table.weight, std=0.02)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, mask: torch.Tensor, num_regions: int) -> torch.Tensor:
        """mask: (B, Z, Y, X) region ids -> (B, R + 1, C) embeddings for ids 0..R."""
        if num_regions > self.max_regions:
            raise ValueError(f"batch has {num_regions} regions but the model holds max_regions={self.max_regions}")
        sz, sy, sx = self.mask_stride
        labels = mask[:, ::sz, ::sy, ::sx].long()
        if labels.numel() and int(labels.max()) > num_regions:
            raise ValueError(f"label map has id {int(labels.max())} > number of regions {num_regions}")
        feats = self.cnn(self.label_embed(labels).permute(0, 4, 1, 2, 3))  # (B, C, z', y', x')
        # Region weights on the CNN grid: fraction of each coarse cell in each region.
        onehot = torch.stack([(labels == r) for r in range(num_regions + 1)], dim=1).to(feats.dtype)
        weights = F.adaptive_avg_pool3d(onehot, feats.shape[2:]).flatten(2)  # (B, R+1, cells)
        pooled = torch.einsum("brn,bcn->brc", weights, feats.flatten(2))
        mass = weights.sum(-1, keepdim=True)
        shape_code = self.feature_proj(pooled / mass.clamp_min(1e-6)) * (mass > 0).to(pooled.dtype)
        ids = torch.arange(num_regions + 1, device=mask.device)
        return self.norm(self.region_table(ids)[None] + shape_code)
