"""3D patch embedding and 3D position embeddings.

Axis order everywhere: (z, y, x) = (D, H, W) of a (B, C, D, H, W) tensor; canonical orientation of
the shards (increasing z, y, x point Superior, Anterior, Right). Tokens: CLS first, then patches in
z-major raster order (pz, py, px), which is the Conv3d flatten order and the row order of the
pipeline's ``regions.npy``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def as_triple(value) -> tuple[int, int, int]:
    t = tuple(int(v) for v in (value if isinstance(value, (tuple, list)) else (value,) * 3))
    if len(t) != 3:
        raise ValueError(f"expected 3 values (z, y, x), got {value!r}")
    return t


def patch_grid(volume_shape_zyx, patch_size_zyx) -> tuple[int, int, int]:
    """Patches per axis (z, y, x); the volume must be a whole number of patches (the pipeline pads)."""
    shape, patch = as_triple(volume_shape_zyx), as_triple(patch_size_zyx)
    if any(s % p for s, p in zip(shape, patch)):
        raise ValueError(f"volume (z, y, x) {shape} is not a multiple of the patch size {patch}")
    return tuple(s // p for s, p in zip(shape, patch))


def num_tokens(volume_shape_zyx, patch_size_zyx=(4, 16, 16), class_token: bool = True) -> int:
    """Sequence length: patches + CLS. (64, 512, 512) with 4x16x16 patches -> 16,385."""
    return math.prod(patch_grid(volume_shape_zyx, patch_size_zyx)) + int(class_token)


def token_z_index(grid_zyx, class_token: bool = True, device=None) -> torch.Tensor:
    """(N,) long: the patch layer (z) of each token, -1 for CLS."""
    gz, gy, gx = grid_zyx
    z = torch.arange(gz, device=device).repeat_interleave(gy * gx)
    if class_token:
        z = torch.cat([torch.full((1,), -1, dtype=z.dtype, device=device), z])
    return z


class SinusoidalPositionalEmbedding3D(nn.Module):
    """Fixed sin/cos encoding of the patch (z, y, x) position, for any grid.

    The channels are split in three even groups (z, y, x); each group is the 1D transformer
    encoding of that coordinate (in patch units), so no table limits the grid size.
    """

    def __init__(self, dim: int, temperature: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"sinusoidal 3D embedding needs an even dim, got {dim}")
        self.dim = dim
        self.temperature = temperature
        per_axis = 2 * (dim // 6)
        self.split = (per_axis, per_axis, dim - 2 * per_axis)  # x gets the remainder (even)

    def _axis(self, n: int, channels: int, device) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float32, device=device)
        freq = self.temperature ** (-torch.arange(channels // 2, dtype=torch.float32, device=device) / (channels // 2))
        ang = pos[:, None] * freq[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)  # (n, channels)

    def forward(self, grid_zyx, device=None) -> torch.Tensor:
        """(P, dim) for a (gz, gy, gx) grid, rows in z-major raster order."""
        gz, gy, gx = grid_zyx
        ez, ey, ex = (self._axis(n, c, device) for n, c in zip((gz, gy, gx), self.split))
        ez = ez[:, None, None].expand(gz, gy, gx, -1)
        ey = ey[None, :, None].expand(gz, gy, gx, -1)
        ex = ex[None, None, :].expand(gz, gy, gx, -1)
        return torch.cat([ez, ey, ex], dim=-1).reshape(gz * gy * gx, self.dim)


def stem_strides(patch_size_zyx, stages: int) -> list[tuple[int, int, int]]:
    """Per-stage strides of a conv stem + the final projection's stride (last item).

    The projection and then the stages from the last one backwards each take a factor 2 along
    every axis that still has one; the first stage takes whatever is left. Their product is
    the patch size, so the stem + projection map a patch to exactly one token.
    """
    remaining = list(as_triple(patch_size_zyx))
    if stages == 0:
        return [tuple(remaining)]
    taken: list[tuple[int, int, int]] = []
    for _ in range(stages):  # projection first, then stages last -> second
        step = tuple(2 if r % 2 == 0 and r > 1 else 1 for r in remaining)
        remaining = [r // s for r, s in zip(remaining, step)]
        taken.append(step)
    proj, later = taken[0], taken[1:][::-1]
    return [tuple(remaining), *later, proj]


class ChannelLayerNorm3d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, Z, Y, X) map, per voxel (ConvNeXt's choice).

    Unlike BatchNorm/GroupNorm it uses no statistics across voxels or samples, so a token depends
    only on its own neighbourhood and on nothing else in the batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def stem_norm_layer(kind: str, channels: int) -> nn.Module | None:
    """The stem's normalisation: "batch" | "layer" | "none" (None)."""
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "layer":
        return ChannelLayerNorm3d(channels)
    if kind == "none":
        return None
    raise ValueError(f"unknown stem_norm {kind!r}; valid choices: 'batch', 'layer', 'none'")


class ConvStem(nn.Sequential):
    """Conv3d -> norm -> GELU stages (strides: ``stem_strides``; norm: ``stem_norm_layer``).

    BatchNorm ("batch") standardises each channel over the batch and the voxels, so a voxel keeps
    its absolute density. Per-voxel LayerNorm ("layer") after the first
    conv maps a uniform region to one vector whatever its HU (only the sign survives),
    which hides emphysema, effusion density and calcium from everything after it. In a
    label-only probe of a plain 3D CNN on the demo volumes it learned far more slowly than
    BatchNorm; in the tiny transformer BatchNorm did not improve the demo (docs/experiments.md).
    With "none" each conv has a bias. The default "layer" is what encoders saved before this
    option were built with.
    """

    def __init__(self, in_chans: int, channels, strides, norm: str = "layer"):
        layers: list[nn.Module] = []
        c_in = in_chans
        for c, stride in zip(channels, strides):
            kernel = tuple(s if s > 2 else 3 for s in stride)
            padding = tuple((k - s + 1) // 2 for k, s in zip(kernel, stride))
            norm_layer = stem_norm_layer(norm, c)
            layers.append(nn.Conv3d(c_in, c, kernel, stride, padding, bias=norm_layer is None))
            layers += [norm_layer, nn.GELU()] if norm_layer is not None else [nn.GELU()]
            c_in = c
        super().__init__(*layers)


class ThreeDPatchEmbedding(nn.Module):
    """(Optional conv stem +) Conv3d patchify + 3D position embedding + CLS token.

    Args:
        patch_size: voxels (z, y, x) per patch.
        in_chans: input channels.
        embed_dim: token channels.
        grid_size: patches (z, y, x) the learned table is sized for; any other grid gets the table
            trilinearly interpolated.
        pos_embed: "learned" or "sinusoidal".
        stem_channels: channels of a convolutional stem's stages (empty: linear patchify).
        stem_norm: normalisation after each stem conv ("batch" | "layer" | "none").
    """

    def __init__(self, patch_size=(4, 16, 16), in_chans: int = 1, embed_dim: int = 768,
                 grid_size=(16, 32, 32), pos_embed: str = "learned", stem_channels=(), stem_norm: str = "layer"):
        super().__init__()
        self.patch_size = as_triple(patch_size)
        self.grid_size = as_triple(grid_size)
        self.embed_dim = embed_dim
        stem_channels = tuple(int(c) for c in stem_channels)
        if stem_channels:
            *stage_strides, proj_stride = stem_strides(self.patch_size, len(stem_channels))
            self.stem = ConvStem(in_chans, stem_channels, stage_strides, stem_norm)
            self.proj = nn.Conv3d(stem_channels[-1], embed_dim, kernel_size=proj_stride, stride=proj_stride)
        else:
            self.stem = None
            self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if pos_embed == "learned":
            # Stored as a (1, C, gz, gy, gx) volume so resizing is one trilinear interpolation.
            self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *self.grid_size))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            self.cls_pos = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.sincos = None
        elif pos_embed == "sinusoidal":
            self.register_parameter("pos_embed", None)
            self.register_parameter("cls_pos", None)
            self.sincos = SinusoidalPositionalEmbedding3D(embed_dim)
        else:
            raise ValueError(f"unknown pos_embed {pos_embed!r}; valid choices: 'learned', 'sinusoidal'")

    def position_embedding(self, grid_zyx, device=None) -> torch.Tensor:
        """(P, C) patch position embeddings for a (gz, gy, gx) grid."""
        if self.sincos is not None:
            return self.sincos(grid_zyx, device=device)
        table = self.pos_embed
        if tuple(grid_zyx) != self.grid_size:
            table = F.interpolate(table, size=tuple(grid_zyx), mode="trilinear", align_corners=False)
        return table.flatten(2).transpose(1, 2)[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """x: (B, C, Z, Y, X) -> tokens (B, 1 + P, C_embed) and the patch grid (gz, gy, gx)."""
        grid = patch_grid(x.shape[2:], self.patch_size)
        if self.stem is not None:
            x = self.stem(x)
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, P, C) z-major
        tokens = tokens + self.position_embedding(grid, device=x.device).to(tokens.dtype)
        cls = self.cls_token if self.cls_pos is None else self.cls_token + self.cls_pos
        return torch.cat([cls.expand(x.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1), grid
