"""Patch embedding, HU window, region assignment, anatomy encoder, region/hybrid attention, blocks."""

import pytest
import torch

from ctprep_train.model import (
    AnatomicalStructureEncoder, HUWindow, HybridAttention, RegionAwareAttention,
    SinusoidalPositionalEmbedding3D, SliceAwareAttention, ThreeDPatchEmbedding, TokenContext,
    TransformerBlock, num_tokens, patch_region_fraction,
)
from ctprep_train.model.patch_embed import patch_grid, token_z_index


def test_seed_volume_gives_16385_tokens_without_allocating():
    assert num_tokens((64, 512, 512), (4, 16, 16)) == 16_385
    with torch.device("meta"):  # the real module at the real size, no memory
        embed = ThreeDPatchEmbedding((4, 16, 16), 1, 768, grid_size=(16, 32, 32))
        tokens, grid = embed(torch.empty(1, 1, 64, 512, 512))
    assert tokens.shape == (1, 16_385, 768) and grid == (16, 32, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patch_grid((62, 512, 512), (4, 16, 16))


def test_token_order_is_cls_then_z_major():
    z = token_z_index((2, 2, 3))
    assert z.tolist() == [-1] + [0] * 6 + [1] * 6
    embed = ThreeDPatchEmbedding((1, 1, 1), 1, 4, grid_size=(2, 2, 3))
    with torch.no_grad():
        embed.proj.weight.fill_(1.0)
        embed.proj.bias.zero_()
        embed.pos_embed.zero_()
        embed.cls_token.zero_()
    vol = torch.arange(12.0).reshape(1, 1, 2, 2, 3)
    tokens, _ = embed(vol)
    assert tokens[0, 1:, 0].tolist() == list(range(12))  # raster (z, y, x) order = regions.npy rows


def test_learned_pos_embed_interpolates_to_other_grids():
    embed = ThreeDPatchEmbedding((4, 16, 16), 1, 24, grid_size=(4, 4, 4))
    same = embed.position_embedding((4, 4, 4))
    assert same.shape == (64, 24)
    torch.testing.assert_close(same, embed.pos_embed.flatten(2).transpose(1, 2)[0])
    other = embed.position_embedding((2, 8, 3))
    assert other.shape == (48, 24) and torch.isfinite(other).all()
    tokens, grid = embed(torch.randn(2, 1, 8, 128, 48))
    assert tokens.shape == (2, 1 + 48, 24) and grid == (2, 8, 3)


@pytest.mark.parametrize("patch,stages", [((4, 16, 16), 2), ((4, 16, 16), 3), ((2, 8, 8), 4), ((5, 12, 12), 2), ((1, 1, 1), 2)])
def test_conv_stem_strides_multiply_to_the_patch_and_tokens_stay_local(patch, stages):
    from ctprep_train.model.patch_embed import stem_strides

    strides = stem_strides(patch, stages)
    assert len(strides) == stages + 1
    assert tuple(int(torch.tensor(axis).prod()) for axis in zip(*strides)) == patch
    grid = (4, 3, 3)
    embed = ThreeDPatchEmbedding(patch, 1, 16, grid_size=grid, stem_channels=(4,) * (stages - 1) + (8,))
    embed.eval()
    vol = torch.zeros(1, 1, *(g * p for g, p in zip(grid, patch)))
    tokens, got = embed(vol)
    assert got == grid and tokens.shape == (1, 1 + 36, 16)
    # A change inside the last patch reaches only tokens whose receptive field covers it: never
    # the first patch when the grid has room (each stage's kernel overlaps by at most one voxel).
    bumped = vol.clone()
    bumped[..., -1, -1, -1] = 1.0
    delta = (embed(bumped)[0] - tokens).abs().sum(-1)[0, 1:]
    assert delta[-1] > 0 and delta[0] == 0


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_conv_stem_keeps_absolute_density_unless_layer_normed(norm):
    """Uniform lung at -850 / -950 HU, calcium / enhanced vessel: only per-voxel LayerNorm confuses them."""
    from ctprep_train.model.patch_embed import ConvStem

    torch.manual_seed(0)
    stem = ConvStem(1, (8,), [(1, 2, 2)], norm).train()
    levels = torch.tensor([-0.85, -0.95, 0.8, 0.2])  # HU / 1000: lung, emphysema, calcium, enhanced vessel
    out = stem(levels.view(4, 1, 1, 1, 1).expand(4, 1, 6, 12, 12).contiguous())
    centre = out[:, :, 3, 3, 3]  # far from the zero padding
    same_sign_pairs = [(0, 1), (2, 3)]
    for a, b in same_sign_pairs:
        if norm == "layer":
            torch.testing.assert_close(centre[a], centre[b], atol=1e-2, rtol=0)  # equal up to LayerNorm eps
        else:
            assert (centre[a] - centre[b]).abs().max() > 2e-2
    assert (centre[0] - centre[2]).abs().max() > 0.1  # opposite signs differ in every mode
    with pytest.raises(ValueError, match="stem_norm"):
        ConvStem(1, (8,), [(1, 2, 2)], "group")


def test_sinusoidal_any_grid_and_distinct_positions():
    sin = SinusoidalPositionalEmbedding3D(36)
    pe = sin((3, 5, 7))
    assert pe.shape == (105, 36)
    assert torch.unique(pe, dim=0).shape[0] == 105
    embed = ThreeDPatchEmbedding((4, 16, 16), 1, 36, pos_embed="sinusoidal")
    assert embed.pos_embed is None
    assert embed(torch.randn(1, 1, 12, 32, 48))[0].shape == (1, 1 + 3 * 2 * 3, 36)
    with pytest.raises(ValueError, match="valid choices"):
        ThreeDPatchEmbedding(pos_embed="rope")


def test_hu_window():
    hu = torch.tensor([[[[-3000, -1000, 0, 1000, 3000]]]], dtype=torch.int16)
    out = HUWindow(-1000, 1000)(hu)
    assert out.shape == (1, 1, 1, 1, 5) and out.dtype == torch.float32
    assert out.flatten().tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        HUWindow(100, -100)


def test_patch_region_fraction_hand_computed():
    mask = torch.zeros(1, 2, 2, 4, dtype=torch.uint8)
    mask[0, :, :, 0] = 1  # patch 0 (x 0..1): half region 1
    mask[0, :, :, 2:] = 2  # patch 1 (x 2..3): all region 2
    frac = patch_region_fraction(mask, (2, 2, 2), num_regions=2)
    assert frac.shape == (1, 2, 3)
    assert frac[0].tolist() == [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]


def test_region_attention_ignores_untouched_regions():
    torch.manual_seed(0)
    attn = RegionAwareAttention(16, 2)
    x = torch.randn(1, 3, 16)
    regions = torch.randn(1, 4, 16)
    assign = torch.tensor([[[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.3, 0.7]]])
    out = attn(x, regions, assign)
    changed = regions.clone()
    changed[0, 3] = 100 * torch.randn(16)  # region 3: touched only by token 2
    out2 = attn(x, changed, assign)
    torch.testing.assert_close(out2[0, :2], out[0, :2])  # tokens 0, 1 do not touch region 3
    assert not torch.allclose(out2[0, 2], out[0, 2])
    # A token with a single region gets exactly that region's value, whatever the scores.
    single = attn(x, regions, torch.tensor([[[0, 1.0, 0, 0]] * 3]))
    v_region1 = attn.kv(attn.norm_context(regions))[0, 1, 16:]
    torch.testing.assert_close(single[0, 0], attn.proj(v_region1))
    # No assignment at all: zero message (the output projection's bias only), no NaN.
    empty = attn(x, regions, torch.zeros(1, 3, 4))
    torch.testing.assert_close(empty[0, 0], attn.proj.bias)


def test_hybrid_sum_and_gated():
    torch.manual_seed(0)
    sa, ra = SliceAwareAttention(16, 2, max_slice_distance=2), RegionAwareAttention(16, 2)
    z = token_z_index((2, 1, 2))
    ctx = TokenContext(z, torch.randn(1, 3, 16), torch.softmax(torch.randn(1, 5, 3), -1))
    x = torch.randn(1, 5, 16)
    out = HybridAttention(sa, ra, "sum")(x, ctx)
    torch.testing.assert_close(out, sa(x, z) + ra(x, ctx.region_embed, ctx.assignment))
    gated = HybridAttention(sa, ra, "gated", dim=16, gate_init=0.1)(x, ctx)
    torch.testing.assert_close(gated, sa(x, z) + torch.tanh(torch.tensor(0.1)) * ra(x, ctx.region_embed, ctx.assignment))
    with pytest.raises(ValueError, match="valid choices"):
        HybridAttention(sa, ra, "concat")
    with pytest.raises(ValueError, match="no label map"):
        HybridAttention(sa, ra)(x, TokenContext(z))


def test_anatomical_encoder_absent_region_is_its_table_row():
    torch.manual_seed(0)
    enc = AnatomicalStructureEncoder(32, max_regions=5, channels=(4, 8), mask_stride=(1, 2, 2))
    mask = torch.zeros(2, 8, 16, 16, dtype=torch.uint8)
    mask[:, 2:6, 4:12, 4:12] = 1
    mask[1, :, :4, :4] = 3
    emb = enc(mask, num_regions=3)
    assert emb.shape == (2, 4, 32) and torch.isfinite(emb).all()
    table_only = enc.norm(enc.region_table.weight[2])  # region 2 is absent from both volumes
    torch.testing.assert_close(emb[0, 2], table_only)
    torch.testing.assert_close(emb[1, 2], table_only)
    assert not torch.allclose(emb[0, 3], emb[1, 3])  # region 3 present only in volume 1
    with pytest.raises(ValueError, match="max_regions"):
        enc(mask, num_regions=6)
    with pytest.raises(ValueError, match="id 3"):
        enc(mask, num_regions=2)


def test_block_grad_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    blk = TransformerBlock(16, 2, drop_path=0.2, attn_kwargs={"max_slice_distance": 2, "block_size": 4})
    z = token_z_index((2, 1, 3))
    ctx = TokenContext(z, torch.randn(2, 3, 16, requires_grad=True), torch.softmax(torch.randn(2, 7, 3), -1))
    x = torch.randn(2, 7, 16, requires_grad=True)
    results = []
    for ckpt in (False, True):
        blk.grad_checkpointing = ckpt
        blk.zero_grad()
        torch.manual_seed(1)  # same drop-path draw
        out = blk(x, ctx)
        grads = torch.autograd.grad(out.square().sum(), [x, ctx.region_embed, *blk.parameters()])
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("head_norm", ["batch", "none"])
def test_head_norm_brings_out_the_per_scan_part_and_eval_is_batch_independent(head_norm):
    """Pooled features = one shared anatomy vector + a small per-scan part (a fresh encoder on CT)."""
    from ctprep_train.model import get_model_config
    from ctprep_train.model.vision_encoder import VisionEncoder3D

    torch.manual_seed(0)
    cfg = get_model_config("tiny", **{"vision.head_norm": head_norm})
    enc = VisionEncoder3D(cfg.vision, cfg.embed_dim).train()
    b, p, c = 8, 4, cfg.vision.width
    tokens = 3.0 * torch.randn(1, 1 + p, c) + 0.01 * torch.randn(b, 1 + p, c)
    emb = torch.nn.functional.normalize(enc.forward_head({"tokens": tokens})["global"], dim=-1)
    off_diag = (emb @ emb.T)[~torch.eye(b, dtype=torch.bool)]
    if head_norm == "batch":
        assert off_diag.mean() < 0.3  # the per-scan parts now set the direction
    else:
        assert off_diag.min() > 0.99  # every scan points the same way
    # Evaluation: a scan's embedding must not depend on which scans share its batch.
    enc.eval()
    with torch.no_grad():
        alone = enc.forward_head({"tokens": tokens[:1]})["global"]
        batched = enc.forward_head({"tokens": tokens})["global"][:1]
    torch.testing.assert_close(alone, batched)


def test_label_head_starts_at_a_low_prior():
    from ctprep_train.model import get_model_config
    from ctprep_train.model.vision_encoder import VisionEncoder3D

    cfg = get_model_config("tiny")
    enc = VisionEncoder3D(cfg.vision, cfg.embed_dim)
    prior = torch.sigmoid(enc.head_labels.bias)
    torch.testing.assert_close(prior, torch.full_like(prior, 0.1))


def test_lse_label_pool_keeps_the_prior_and_sends_the_gradient_to_the_finding_patch():
    """Multiple-instance label head: one patch with a finding must raise its scan's logit."""
    from ctprep_train.model import get_model_config
    from ctprep_train.model.vision_encoder import VisionEncoder3D

    torch.manual_seed(0)
    cfg = get_model_config("tiny", **{"vision.label_pool": "lse", "vision.label_lse_r": 5.0})
    enc = VisionEncoder3D(cfg.vision, cfg.embed_dim)
    b, p, c = 2, 64, cfg.vision.width
    with torch.no_grad():
        enc.head_labels.weight.zero_()
        enc.head_labels.weight[0, 0] = 1.0  # label 0 reads channel 0
    tokens = torch.zeros(b, 1 + p, c)
    logits = enc.forward_head({"tokens": tokens})["label_logits"]
    # A constant patch logit pools to itself: the 10% prior of the bias holds for lse too.
    torch.testing.assert_close(torch.sigmoid(logits), torch.full_like(logits, 0.1))
    # Scan 1 has one bright patch (a nodule): its label-0 logit rises, scan 0's does not.
    tokens[1, 1 + 37, 0] = 6.0
    tokens.requires_grad_(True)
    logits = enc.forward_head({"tokens": tokens})["label_logits"]
    assert logits[1, 0] > logits[0, 0] + 0.1
    torch.testing.assert_close(logits[:, 1:], logits[:1, 1:].expand(2, -1))  # other labels unaffected
    (grad,) = torch.autograd.grad(logits[1, 0], tokens)
    g = grad[1, 1:, 0]
    assert g.argmax().item() == 37 and g[37] > 0.9 * g.sum()  # the finding patch gets the gradient
    # Against "global" pooling of the patch mean, which a single patch barely moves.
    cfg_g = get_model_config("tiny", **{"vision.global_pool": "avg"})
    enc_g = VisionEncoder3D(cfg_g.vision, cfg_g.embed_dim)
    enc_g.head_labels.load_state_dict(enc.head_labels.state_dict())
    lg = enc_g.forward_head({"tokens": tokens.detach()})["label_logits"]
    assert logits[1, 0] - logits[0, 0] > 5 * (lg[1, 0] - lg[0, 0])


def test_max_global_pool_is_the_channel_max_over_patches():
    from ctprep_train.model import get_model_config
    from ctprep_train.model.vision_encoder import VisionEncoder3D

    cfg = get_model_config("tiny", **{"vision.global_pool": "max"})
    enc = VisionEncoder3D(cfg.vision, cfg.embed_dim)
    tokens = torch.randn(3, 1 + 10, cfg.vision.width)
    tokens[:, 0] = 100.0  # the CLS token is not a patch
    out = enc.forward_head({"tokens": tokens})["global"]
    torch.testing.assert_close(out, enc.head_global(tokens[:, 1:].amax(1)))


@pytest.mark.parametrize("key, value, match", [
    ("vision.label_pool", "attention", "label_pool"),
    ("vision.label_lse_r", 0.0, "label_lse_r"),
    ("vision.global_pool", "gem", "global_pool"),
])
def test_bad_pool_options_are_refused(key, value, match):
    from ctprep_train.model import get_model_config

    with pytest.raises(ValueError, match=match):
        get_model_config("tiny", **{key: value})
