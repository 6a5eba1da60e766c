"""Analytic FLOP count of the vision encoder (multiply-add = 2 FLOPs), for the MFU that
``bench/gpu_check.py`` and docs/cluster.md report; checked against torch's FlopCounterMode in
tests/test_scale_gpu_check.py."""

from __future__ import annotations

import math

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H200 SXM datasheet, BF16 Tensor Core, dense (no sparsity)


def encoder_flops(vision, grid_zyx: tuple[int, int, int], num_regions: int) -> dict[str, float]:
    """Forward FLOPs of one sample through the vision encoder, by term (multiply-add = 2 FLOPs).

    Args:
        vision: ``ctprep_train.model.config.VisionConfig`` (width, depth, heads, mlp_ratio, patch,
            attention.region_attention).
        grid_zyx: input volume shape in voxels (Z, Y, X).
        num_regions: region embeddings that patches cross-attend to (R).

    Counts the terms that scale with tokens: patch-embed Conv3d (and conv stem), per block the QKV / output
    projections, attention scores QK^T and the weighted sum AV (exact attention, every kernel the
    same), the MLP, region cross-attention (query / output projections over tokens, key / value
    projections over the R region embeddings, scores and weighted sum over R keys), and the
    multi-scale fuse, the anatomy CNN over the subsampled label map, and the heads' work over patch
    tokens (evidence pool, region pooling). Norms, biases, softmax and the small per-volume heads
    are left out. The count is checked against torch's FlopCounterMode in
    tests/test_scale_gpu_check.py.
    """
    pz, py, px = vision.patch.patch_size
    z, y, x = grid_zyx
    patches = (z // pz) * (y // py) * (x // px)
    n = patches + 1  # + CLS
    d = vision.width
    hidden = int(vision.mlp_ratio * d)
    depth = vision.depth
    terms = {
        "patch_embed": _patch_embed_flops(vision.patch, grid_zyx, d),
        "qkv_proj": depth * 2.0 * n * d * 3 * d,
        "attn_qk": depth * 2.0 * n * n * d,
        "attn_av": depth * 2.0 * n * n * d,
        "attn_out_proj": depth * 2.0 * n * d * d,
        "mlp": depth * 2.0 * n * d * hidden * 2,
        # multi-scale aggregation: Linear(S * width -> width) over all tokens
        "multiscale_fuse": 2.0 * n * len(set(vision.out_indices) | {depth - 1}) * d * d,
    }
    if vision.attention.region_attention and vision.anatomy.enabled:
        r = num_regions
        terms["region_xattn"] = depth * (
            2.0 * n * d * d  # query projection over tokens
            + 2.0 * 2 * r * d * d  # key and value projections over region embeddings
            + 2.0 * 2 * n * r * d  # scores and weighted sum
            + 2.0 * n * d * d  # output projection
        )
    if vision.anatomy.enabled:
        terms["anatomy_cnn"] = _anatomy_cnn_flops(vision.anatomy, grid_zyx, num_regions, d)
    k = vision.num_evidence_tokens
    terms["heads"] = (
        2.0 * patches * d * 2 * d  # evidence pool key/value projection over patches
        + 2.0 * 2 * k * patches * d  # evidence attention scores and weighted sum
        + 2.0 * patches * num_regions * d  # region pooling of patch tokens
    )
    return terms


def _patch_embed_flops(patch, grid_zyx, width: int) -> float:
    """The optional conv stem's Conv3d stages (``stem_strides``) plus the patch projection."""
    from ctprep_train.model.patch_embed import stem_strides

    channels = list(getattr(patch, "stem_channels", ()))  # configs from before the stem have none
    *stages, proj = stem_strides(patch.patch_size, len(channels))
    shape, prev, flops = list(grid_zyx), patch.in_chans, 0.0
    for ch, stride in zip(channels, stages):
        kernel = [s if s > 2 else 3 for s in stride]
        shape = [v // s for v, s in zip(shape, stride)]
        flops += 2.0 * math.prod(shape) * ch * prev * math.prod(kernel)
        prev = ch
    shape = [v // s for v, s in zip(shape, proj)]
    return flops + 2.0 * math.prod(shape) * width * prev * math.prod(proj)


def _anatomy_cnn_flops(anatomy, grid_zyx, num_regions: int, width: int) -> float:
    """Stride-2 3x3x3 Conv3d stages over the subsampled label map, plus the region pooling."""
    shape = [math.ceil(g / s) for g, s in zip(grid_zyx, anatomy.mask_stride)]
    flops, prev = 0.0, anatomy.cnn_channels[0]
    for ch in anatomy.cnn_channels:
        shape = [math.ceil(v / 2) for v in shape]
        flops += 2.0 * math.prod(shape) * ch * prev * 27
        prev = ch
    cells = math.prod(shape)
    return flops + 2.0 * num_regions * cells * prev + 2.0 * num_regions * prev * width


def train_flops_per_sample(forward_terms: dict[str, float]) -> float:
    """Model FLOPs of forward + backward (backward = 2x forward: grads w.r.t. inputs and weights)."""
    return 3.0 * sum(forward_terms.values())
