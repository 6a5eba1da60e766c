"""TransformerBlock: pre-norm, HybridAttention, MLP, residuals, drop-path, optional checkpointing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .region_attention import HybridAttention, RegionAwareAttention
from .slice_attention import SliceAwareAttention


@dataclass
class TokenContext:
    """Per-forward inputs every block needs besides the tokens."""

    z_index: torch.Tensor  # (N,) long: patch layer of each token, -1 = CLS
    region_embed: torch.Tensor | None = None  # (B, R+1, C) region embeddings, id 0 = background
    assignment: torch.Tensor | None = None  # (B, N, R+1) token-to-region soft assignment (CLS row included)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm ``DropPath``)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + DropPath(HybridAttention(LN(x))), then x + DropPath(MLP(LN(x))).

    Args:
        dim, num_heads, mlp_ratio: width, heads, MLP expansion.
        drop_path: stochastic-depth probability of this block.
        attn_layer: self-attention class (``SliceAwareAttention``), built with ``attn_kwargs``.
        region_attn_layer: cross-attention class (``RegionAwareAttention``) or None (ablation).
        hybrid: "sum" | "gated" (see ``HybridAttention``).
        norm_layer: normalisation class.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 attn_layer: Callable[..., nn.Module] = SliceAwareAttention,
                 region_attn_layer: Callable[..., nn.Module] | None = RegionAwareAttention,
                 hybrid: str = "sum", norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 attn_kwargs: dict | None = None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        region = region_attn_layer(dim, num_heads) if region_attn_layer is not None else None
        self.attn = HybridAttention(attn_layer(dim, num_heads, **(attn_kwargs or {})), region, hybrid, dim)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)
        self.grad_checkpointing = False

    def _forward(self, x: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), ctx))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            # Non-reentrant: keeps RNG state (drop-path) and works with non-tensor args.
            return checkpoint(self._forward, x, ctx, use_reentrant=False)
        return self._forward(x, ctx)
