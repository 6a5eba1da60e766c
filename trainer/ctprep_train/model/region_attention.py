"""RegionAwareAttention (patches -> region embeddings) and HybridAttention (+ slice-aware self-attention)."""

from __future__ import annotations

import torch
from torch import nn


class RegionAwareAttention(nn.Module):
    """Cross-attention from tokens to region embeddings, weighted by the soft assignment.

    Weight of region r for token p: ``a[p, r] * exp(s[p, r]) / sum_r' a[p, r'] * exp(s[p, r'])``
    with s the scaled query-key score, i.e. softmax(s + log a). A region a token does not touch
    (a = 0) gets exactly zero weight; a token with no assignment at all gets zero output.

    Args:
        dim: token and region-embedding channels.
        num_heads: heads.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.norm_context = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, region_embed: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) tokens; region_embed: (B, R+1, C); assignment: (B, N, R+1) >= 0 -> (B, N, C)."""
        b, n, c = x.shape
        r = region_embed.shape[1]
        if assignment.shape != (b, n, r):
            raise ValueError(f"assignment {tuple(assignment.shape)} does not match tokens/regions {(b, n, r)}")
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
        kv = self.kv(self.norm_context(region_embed)).reshape(b, r, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)  # (B, H, R, Dh) each
        s = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # (B, H, N, R): tiny, R ~ 10
        s = s - s.amax(-1, keepdim=True).detach()
        w = s.exp() * assignment.to(s.dtype).unsqueeze(1)
        w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        out = torch.matmul(w, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class HybridAttention(nn.Module):
    """Slice-aware self-attention plus region-aware cross-attention.

    ``mode="sum"``: residual sum of both. ``mode="gated"``: region branch scaled by a learned
    per-channel ``tanh(gate)`` (initialised small, not zero, so the branch learns from step 1).
    ``region_attn=None`` is the ablation without region attention.
    """

    def __init__(self, self_attn: nn.Module, region_attn: nn.Module | None = None, mode: str = "sum",
                 dim: int | None = None, gate_init: float = 0.1):
        super().__init__()
        if mode not in ("sum", "gated"):
            raise ValueError(f"unknown hybrid mode {mode!r}; valid choices: 'sum', 'gated'")
        self.self_attn = self_attn
        self.region_attn = region_attn
        self.mode = mode
        if region_attn is not None and mode == "gated":
            if dim is None:
                raise ValueError("gated HybridAttention needs dim")
            self.gate = nn.Parameter(torch.full((dim,), gate_init))
        else:
            self.register_parameter("gate", None)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        out = self.self_attn(x, ctx.z_index)
        if self.region_attn is not None:
            if ctx.region_embed is None or ctx.assignment is None:
                raise ValueError("region attention is on but the batch gave no label map / region assignment")
            region = self.region_attn(x, ctx.region_embed, ctx.assignment)
            out = out + (region if self.gate is None else torch.tanh(self.gate) * region)
        return out
