"""VisionEncoder3D: HU window -> patch embedding -> anatomy -> hybrid blocks -> multi-scale -> heads."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .anatomical_encoder import AnatomicalStructureEncoder, patch_region_fraction
from .block import TokenContext, TransformerBlock
from .config import VisionConfig
from .input_norm import HUWindow
from .patch_embed import ThreeDPatchEmbedding, token_z_index
from .region_attention import RegionAwareAttention
from .slice_attention import SliceAwareAttention


class EvidencePool(nn.Module):
    """K learned queries attend over patch tokens -> K evidence tokens (what CoT steps look at)."""

    def __init__(self, dim: int, num_tokens: int, num_heads: int, query_std: float = 0.02):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(1, num_tokens, dim))
        nn.init.trunc_normal_(self.queries, std=query_std)  # cut at +-2 (absolute), as before
        self.num_heads = num_heads
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: (B, P, C) -> evidence (B, K, C), attention (B, K, P) averaged over heads."""
        b, p, c = tokens.shape
        h, dh = self.num_heads, c // self.num_heads
        q = self.queries.expand(b, -1, -1).reshape(b, -1, h, dh).transpose(1, 2)  # (B, H, K, Dh)
        k, v = self.kv(tokens).reshape(b, p, 2, h, dh).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * dh**-0.5, dim=-1)  # (B, H, K, P)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, -1, c)
        return self.proj(out), attn.mean(1)


class VisionEncoder3D(nn.Module):
    """The 3D CT encoder with global, local (per region) and step (evidence) heads.

    Inputs follow the batch contract: ``image`` int16 HU (B, Z, Y, X), ``mask`` uint8 region ids
    (B, Z, Y, X), ``regions`` (B, P, R+1) soft assignment (optional; computed from ``mask`` if absent).

    Args:
        cfg: VisionConfig (sizes, ablation switches, kernels).
        embed_dim: output size of the three projection heads.
        embed_layer, block_fn, attn_layer, region_attn_layer, anatomy_layer, norm_layer: the parts
            (timm style), so variants swap classes instead of copying this one.
    """

    def __init__(self, cfg: VisionConfig, embed_dim: int = 256,
                 embed_layer: Callable[..., nn.Module] = ThreeDPatchEmbedding,
                 block_fn: Callable[..., nn.Module] = TransformerBlock,
                 attn_layer: Callable[..., nn.Module] = SliceAwareAttention,
                 region_attn_layer: Callable[..., nn.Module] = RegionAwareAttention,
                 anatomy_layer: Callable[..., nn.Module] = AnatomicalStructureEncoder,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm):
        super().__init__()
        self.cfg = cfg
        width, att = cfg.width, cfg.attention
        self.patch_size = tuple(cfg.patch.patch_size)
        self.input_norm = HUWindow(cfg.input.hu_min, cfg.input.hu_max)
        self.patch_embed = embed_layer(cfg.patch.patch_size, cfg.patch.in_chans, width,
                                       cfg.patch.grid_size, cfg.patch.pos_embed,
                                       stem_channels=cfg.patch.stem_channels,
                                       stem_norm=cfg.patch.stem_norm)
        self.anatomy = (anatomy_layer(width, cfg.anatomy.max_regions, cfg.anatomy.cnn_channels,
                                      cfg.anatomy.mask_stride) if cfg.anatomy.enabled else None)
        attn_kwargs = dict(max_slice_distance=att.max_slice_distance, slice_bias=att.slice_bias,
                           kernel=att.kernel, block_size=att.block_size, qkv_bias=att.qkv_bias)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([
            block_fn(width, cfg.num_heads, cfg.mlp_ratio, dpr[i], attn_layer=attn_layer,
                     region_attn_layer=region_attn_layer if att.region_attention else None,
                     hybrid=att.hybrid, norm_layer=norm_layer, attn_kwargs=attn_kwargs)
            for i in range(cfg.depth)
        ])
        # Multi-scale aggregation: the chosen depths plus the last block, each normed, concatenated, fused.
        self.scale_indices = tuple(sorted(set(cfg.out_indices) | {cfg.depth - 1}))
        self.scale_norms = nn.ModuleList([norm_layer(width) for _ in self.scale_indices])
        self.fuse = nn.Linear(width * len(self.scale_indices), width)
        self.norm = norm_layer(width)
        self.head_norm = nn.BatchNorm1d(width) if cfg.head_norm == "batch" else nn.Identity()
        self.head_global = nn.Linear(width, embed_dim, bias=False)
        self.head_local = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim, bias=False))
        self.evidence = EvidencePool(width, cfg.num_evidence_tokens, cfg.num_heads, cfg.evidence_query_std)
        self.head_step = nn.Linear(width, embed_dim, bias=False)
        self.head_labels = nn.Linear(width, cfg.num_labels) if cfg.num_labels > 0 else None
        if self.head_labels is not None:
            # Start at a 10% prior (CT-RATE findings are mostly absent): from a zero bias the BCE
            # spends its first hundreds of steps only learning that most labels are 0.
            nn.init.constant_(self.head_labels.bias, math.log(0.1 / 0.9))
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    # timm-style interface -------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for blk in self.blocks:
            blk.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names that should not get weight decay (embeddings, tables, queries, gates)."""
        skip = {"patch_embed.cls_token", "patch_embed.pos_embed", "patch_embed.cls_pos", "evidence.queries"}
        for name, _ in self.named_parameters():
            if name.endswith(("slice_bias_table", ".gate")) or "region_table" in name:
                skip.add(name)
        return {n for n in skip if n in dict(self.named_parameters())}

    def region_assignment(self, mask, regions, grid, batch_size: int, device,
                          num_regions: int | None = None) -> torch.Tensor | None:
        """(B, P, R+1) float32 patch-to-region assignment: the pipeline's, else computed from ``mask``.

        Without ``regions``, R is ``num_regions`` if given, else the largest id in the mask.
        """
        num_patches = grid[0] * grid[1] * grid[2]
        if regions is not None:
            regions = regions.to(device=device, dtype=torch.float32)
            if regions.dim() != 3 or regions.shape[:2] != (batch_size, num_patches):
                raise ValueError(f"regions {tuple(regions.shape)} does not match (B, P) = ({batch_size}, {num_patches})")
            return regions
        if mask is None:
            return None
        r = num_regions if num_regions is not None else max(int(mask.max()), 1)
        return patch_region_fraction(mask.to(device), self.patch_size, r)

    def forward_features(self, image: torch.Tensor, mask: torch.Tensor | None = None,
                         regions: torch.Tensor | None = None, num_regions: int | None = None) -> dict:
        """Tokens after the blocks and the multi-scale fused tokens.

        Returns a dict: ``tokens`` (B, 1+P, C) fused multi-scale tokens (CLS first), ``assignment``
        (B, P, R+1) or None, ``grid`` (gz, gy, gx), ``region_embed`` (B, R+1, C) or None.
        """
        # Cast to the weights' dtype: DeepSpeed bf16 converts the module, not its inputs.
        x, grid = self.patch_embed(self.input_norm(image).to(self.patch_embed.proj.weight.dtype))
        b = x.shape[0]
        z_index = token_z_index(grid, device=x.device)
        assignment = self.region_assignment(mask, regions, grid, b, x.device, num_regions)
        ctx = TokenContext(z_index=z_index)
        if self.anatomy is not None:
            if mask is None or assignment is None:
                raise ValueError("the anatomical encoder is on: the batch needs 'mask' (and 'regions' or a mask)")
            ctx.region_embed = self.anatomy(mask.to(x.device), assignment.shape[-1] - 1).to(x.dtype)
            # CLS sees the volume's overall anatomy mix: the mean patch assignment.
            ctx.assignment = torch.cat([assignment.mean(1, keepdim=True), assignment], dim=1)
        scales = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, ctx)
            if i in self.scale_indices:
                scales.append(x)
        fused = self.fuse(torch.cat([n(s) for n, s in zip(self.scale_norms, scales)], dim=-1))
        return {"tokens": self.norm(fused), "assignment": assignment, "grid": grid,
                "region_embed": ctx.region_embed}

    def forward_head(self, feats: dict) -> dict:
        """Projection heads on ``forward_features`` output.

        Returns: ``global`` (B, E); ``local`` (B, R, E) per region 1..R and ``region_present`` (B, R)
        bool (only with an assignment); ``evidence`` (B, K, E) and ``evidence_attn`` (B, K, P);
        ``label_logits`` (B, num_labels) if the auxiliary head is on. Not normalized.
        """
        tokens = feats["tokens"]
        patches = tokens[:, 1:]
        if self.cfg.global_pool == "token":
            pooled = tokens[:, 0]
        elif self.cfg.global_pool == "max":
            pooled = patches.amax(1)
        else:
            pooled = patches.mean(1)
        pooled = self.head_norm(pooled)
        out = {"global": self.head_global(pooled)}
        assignment = feats.get("assignment")
        if assignment is not None:
            w = assignment[..., 1:].to(patches.dtype)  # (B, P, R): background column dropped
            mass = w.sum(1)  # (B, R) patches' worth of each region
            region_feat = torch.einsum("bpr,bpc->brc", w, patches) / mass.clamp_min(1e-6).unsqueeze(-1)
            if feats.get("region_embed") is not None:
                # The anatomy encoder's shape code joins the pooled content, so the local head (and
                # the anatomy encoder itself, even with region attention ablated) learns from it.
                region_feat = region_feat + feats["region_embed"][:, 1:].to(region_feat.dtype)
            out["local"] = self.head_local(region_feat)
            out["region_present"] = mass > 0
        evidence, attn = self.evidence(patches)
        out["evidence"] = self.head_step(evidence)
        out["evidence_attn"] = attn
        if self.head_labels is not None:
            out["label_logits"] = self.label_logits(pooled, patches)
        return out

    def label_logits(self, pooled: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """(B, num_labels) scan logits: from the pooled feature, or log-mean-exp of patch logits.

        With ``lse`` a constant patch logit b pools to b, so the 10% prior bias holds as well.
        """
        if self.cfg.label_pool == "global":
            return self.head_labels(pooled)
        r = self.cfg.label_lse_r
        per_patch = self.head_labels(patches).float() * r  # (B, P, L)
        pooled_logit = (torch.logsumexp(per_patch, dim=1) - math.log(per_patch.shape[1])) / r
        return pooled_logit.to(patches.dtype)

    def forward(self, image, mask=None, regions=None, num_regions=None) -> dict:
        return self.forward_head(self.forward_features(image, mask, regions, num_regions))
