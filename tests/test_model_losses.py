"""Losses: InfoNCE == naive full matrix (1 rank and 2 gloo ranks), masks and padding never leak."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.model_helpers import make_batch
from ctprep_train.losses import (
    LossConfig, MultiTaskLoss, clip_loss, label_loss, region_text_loss, step_alignment_loss, text_keys,
)


def naive_clip_loss(image, text, scale):
    """The textbook full-matrix CLIP loss over the whole (global) batch."""
    logits = scale * image @ text.T
    target = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def naive_dedup_clip_loss(image, text, keys, scale, eps=0.0):
    """Row by row: the softmax runs over the own pair plus every column with a different report."""
    n, total = image.shape[0], 0.0
    for logits in (scale * image @ text.T, scale * text @ image.T):
        for i in range(n):
            cols = [j for j in range(n) if j == i or keys[j] != keys[i]]
            logp = torch.log_softmax(logits[i, cols], dim=0)
            own = cols.index(i)
            total = total + (1 - eps) * -logp[own] + eps * -logp.mean()
    return total / (2 * n)


def _features(n=8, e=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1),
            F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1))


def test_clip_loss_equals_naive_single_rank():
    image, text = _features()
    scale = torch.tensor(14.3, dtype=torch.float64)
    torch.testing.assert_close(clip_loss(image, text, scale), naive_clip_loss(image, text, scale))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, image, text, scale, out_dir, keys=None):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        b = image.shape[0] // world
        img = image[rank * b:(rank + 1) * b].clone().requires_grad_()
        txt = text[rank * b:(rank + 1) * b].clone().requires_grad_()
        s = scale.clone().requires_grad_()
        key = None if keys is None else keys[rank * b:(rank + 1) * b]
        loss = clip_loss(img, txt, s, text_key=key)
        # Data parallel averages gradients over ranks: the per-rank objective is loss / world.
        (loss / world).backward()
        torch.save((loss.detach(), img.grad, txt.grad, s.grad), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_clip_loss_two_gloo_ranks_equals_naive_loss_and_grads(tmp_path):
    world = 2
    image, text = _features(n=6)
    scale = torch.tensor(7.0, dtype=torch.float64)
    mp.spawn(_rank_worker, args=(world, _free_port(), image, text, scale, str(tmp_path)), nprocs=world, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    img, txt, s = (t.clone().requires_grad_() for t in (image, text, scale))
    full = naive_clip_loss(img, txt, s)
    full.backward()
    torch.testing.assert_close(sum(g[0] for g in got) / world, full.detach())
    torch.testing.assert_close(torch.cat([g[1] for g in got]), img.grad)
    torch.testing.assert_close(torch.cat([g[2] for g in got]), txt.grad)
    # The temperature is replicated: data parallel sums the per-rank (loss / world) grads.
    torch.testing.assert_close(sum(g[3] for g in got), s.grad)


def test_clip_loss_drops_identical_reports_from_the_negatives():
    image, text = _features(n=6)
    scale = torch.tensor(9.0, dtype=torch.float64)
    keys = torch.tensor([5, 1, 5, 2, 1, 5])  # three volumes share report 5, two share report 1
    for eps in (0.0, 0.1):
        torch.testing.assert_close(clip_loss(image, text, scale, label_smoothing=eps, text_key=keys),
                                   naive_dedup_clip_loss(image, text, keys, scale, eps))
    # all reports distinct: exactly the plain loss (also with smoothing)
    distinct = torch.arange(6)
    torch.testing.assert_close(clip_loss(image, text, scale, text_key=distinct), naive_clip_loss(image, text, scale))
    torch.testing.assert_close(clip_loss(image, text, scale, label_smoothing=0.1, text_key=distinct),
                               clip_loss(image, text, scale, label_smoothing=0.1))
    # duplicates change the loss (they were false negatives)
    assert not torch.allclose(clip_loss(image, text, scale, text_key=keys), clip_loss(image, text, scale))


def test_text_keys_equal_exactly_for_identical_token_sequences():
    ids = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 7, 8, 102, 0, 0], [101, 7, 9, 102, 0, 0],
                        [101, 7, 8, 102, 0, 0], [101, 7, 8, 102, 5, 3]])
    lens = torch.tensor([4, 4, 4, 5, 4])  # row 3 has a real token id 0 after [SEP]; row 4 junk in padding
    attn = torch.arange(6)[None] < lens[:, None]
    k = text_keys(ids, attn)
    assert k[0] == k[1] == k[4]  # padding ignored, whatever it holds
    assert k[0] != k[2] and k[0] != k[3]  # one token differs / one more (id 0) token
    # independent of the padded width (ranks pad to their own batch maximum)
    torch.testing.assert_close(text_keys(ids[:, :4], attn[:, :4])[:3], k[:3])


def test_multitask_loss_masks_duplicate_reports_only_when_asked():
    batch = make_batch(batch_size=4)
    batch["report_ids"][2] = batch["report_ids"][0]
    batch["report_attn"][2] = batch["report_attn"][0]
    g = torch.Generator().manual_seed(3)
    out = {"image_embed": F.normalize(torch.randn(4, 8, generator=g), dim=-1),
           "text_embed": F.normalize(torch.randn(4, 8, generator=g), dim=-1), "logit_scale": torch.tensor(10.0)}
    keys = text_keys(batch["report_ids"], batch["report_attn"])
    on = MultiTaskLoss({"clip": 1.0, "region": 0, "step": 0, "labels": 0}).terms(out, batch)["clip"]
    off = MultiTaskLoss({"clip": 1.0, "region": 0, "step": 0, "labels": 0, "dedup_reports": False}).terms(out, batch)["clip"]
    torch.testing.assert_close(on, naive_dedup_clip_loss(out["image_embed"], out["text_embed"], keys, 10.0))
    torch.testing.assert_close(off, naive_clip_loss(out["image_embed"], out["text_embed"], 10.0))


@pytest.mark.timeout(180)
def test_clip_loss_dedup_across_two_gloo_ranks(tmp_path):
    world = 2
    image, text = _features(n=6)
    scale = torch.tensor(7.0, dtype=torch.float64)
    keys = torch.tensor([0, 1, 2, 0, 4, 1])  # duplicates sit on different ranks
    mp.spawn(_rank_worker, args=(world, _free_port(), image, text, scale, str(tmp_path), keys), nprocs=world, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    img, txt = (t.clone().requires_grad_() for t in (image, text))
    full = naive_dedup_clip_loss(img, txt, keys, scale)
    full.backward()
    torch.testing.assert_close(sum(g[0] for g in got) / world, full.detach())
    torch.testing.assert_close(torch.cat([g[1] for g in got]), img.grad)
    torch.testing.assert_close(torch.cat([g[2] for g in got]), txt.grad)


def _region_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, r, e, length = 3, 4, 8, 5
    vis = F.normalize(torch.randn(b, r, e, generator=g), dim=-1)
    txt = F.normalize(torch.randn(b, r, e, generator=g), dim=-1)
    present = torch.ones(b, r, dtype=torch.bool)
    valid = torch.ones(b, r, dtype=torch.bool)
    has_text = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    ids = torch.randint(100, 200, (b, r, length), generator=g)
    attn = torch.ones(b, r, length, dtype=torch.bool)
    return [vis, present, txt, valid, has_text, ids, attn, torch.tensor(10.0)]


def test_region_loss_matches_hand_written_rule():
    vis, present, txt, valid, has_text, ids, attn, scale = _region_inputs()
    loss = region_text_loss(vis, present, txt, valid, has_text, ids, attn, scale)
    v, t = vis.reshape(12, -1), txt.reshape(12, -1)
    anchors = has_text.reshape(-1).nonzero().squeeze(1)
    expected = 0.5 * (F.cross_entropy(scale * v[anchors] @ t.T, anchors)
                      + F.cross_entropy(scale * t[anchors] @ v.T, anchors))
    torch.testing.assert_close(loss, expected)


def test_region_loss_default_sentences_and_padding_do_not_leak():
    vis, present, txt, valid, has_text, ids, attn, scale = _region_inputs()
    base = region_text_loss(vis, present, txt, valid, has_text, ids, attn, scale)
    # An absent region / invalid sentence is selected out: its values cannot matter.
    present2, valid2 = present.clone(), valid.clone()
    present2[0, 1] = False
    valid2[1, 0] = False
    ref = region_text_loss(vis, present2, txt, valid2, has_text, ids, attn, scale)
    vis2, txt2 = vis.clone(), txt.clone()
    vis2[0, 1] = 123.0
    txt2[1, 0] = -7.0
    torch.testing.assert_close(region_text_loss(vis2, present2, txt2, valid2, has_text, ids, attn, scale), ref)
    # Padding tokens of the ids are ignored by the duplicate rule.
    ids2 = ids.clone()
    attn2 = attn.clone()
    attn2[..., -1] = False
    ids2[..., -1] = 0
    a = region_text_loss(vis, present, txt, valid, has_text, ids, attn2, scale)
    torch.testing.assert_close(region_text_loss(vis, present, txt, valid, has_text, ids2, attn2, scale), a)
    assert torch.isfinite(base)
    # No region with its own text: zero, still attached to the graph.
    vis.requires_grad_()
    zero = region_text_loss(vis, present, txt, valid, torch.zeros_like(has_text), ids, attn, scale)
    assert zero.item() == 0.0 and zero.requires_grad


def test_region_loss_identical_finding_text_is_not_a_negative():
    vis, present, txt, valid, has_text, ids, attn, scale = _region_inputs()
    ids[2, 0] = ids[0, 0]  # volume 2 region 0 has the same finding sentence as volume 0 region 0
    loss = region_text_loss(vis, present, txt, valid, has_text, ids, attn, scale)
    v, t = vis.reshape(12, -1), txt.reshape(12, -1)
    anchors = has_text.reshape(-1).nonzero().squeeze(1)  # [0, 2, 6, 7, 8]
    li, lt = scale * v[anchors] @ t.T, scale * t[anchors] @ v.T
    li[0, 8] = li[2 * 0 + 4, 0] = float("-inf")  # anchors 0 and 8 mask each other
    lt[0, 8] = lt[4, 0] = float("-inf")
    expected = 0.5 * (F.cross_entropy(li, anchors) + F.cross_entropy(lt, anchors))
    torch.testing.assert_close(loss, expected)


def test_step_loss_padded_steps_never_leak_and_matches_naive():
    g = torch.Generator().manual_seed(0)
    b, s, k, e = 3, 4, 5, 8
    steps = F.normalize(torch.randn(b, s, e, generator=g), dim=-1)
    evidence = F.normalize(torch.randn(b, k, e, generator=g), dim=-1)
    valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    scale = torch.tensor(10.0)
    loss = step_alignment_loss(steps, valid, evidence, scale, pool_scale=5.0)
    steps2 = steps.clone()
    steps2[~valid] = 99.0  # garbage in padded slots
    torch.testing.assert_close(step_alignment_loss(steps2, valid, evidence, scale, pool_scale=5.0), loss)
    rows, targets = [], []
    for bi in range(b):
        for si in range(s):
            if valid[bi, si]:
                t = steps[bi, si]
                scores = []
                for vi in range(b):
                    w = torch.softmax(5.0 * evidence[vi] @ t, 0)
                    scores.append(scale * F.normalize(w @ evidence[vi], dim=0) @ t)
                rows.append(torch.stack(scores))
                targets.append(bi)
    torch.testing.assert_close(loss, F.cross_entropy(torch.stack(rows), torch.tensor(targets)))
    evidence.requires_grad_()
    zero = step_alignment_loss(steps, torch.zeros_like(valid), evidence, scale)
    assert zero.item() == 0.0 and zero.requires_grad


def test_step_loss_drops_volumes_with_an_identical_step():
    g = torch.Generator().manual_seed(1)
    b, s, k, e = 4, 3, 5, 8
    steps = F.normalize(torch.randn(b, s, e, generator=g), dim=-1)
    evidence = F.normalize(torch.randn(b, k, e, generator=g), dim=-1)
    valid = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    # 7: a step three volumes share; volume 1's third step is padding whose key (2) equals volume 0's
    # third step's key: padding must not drop volume 1 from that row (the brute force below says so)
    keys = torch.tensor([[7, 1, 2], [7, 3, 2], [7, 9, 9], [4, 5, 6]])
    scale = torch.tensor(10.0)
    rows = []
    for bi in range(b):
        for si in range(s):
            if not valid[bi, si]:
                continue
            t = steps[bi, si]
            cols = [vi for vi in range(b) if vi == bi or not any(
                valid[vi, sj] and keys[vi, sj] == keys[bi, si] for sj in range(s))]
            scores = torch.stack([scale * F.normalize(torch.softmax(5.0 * evidence[vi] @ t, 0) @ evidence[vi], dim=0) @ t
                                  for vi in cols])
            rows.append(-torch.log_softmax(scores, 0)[cols.index(bi)])
    want = torch.stack(rows).mean()
    got = step_alignment_loss(steps, valid, evidence, scale, pool_scale=5.0, step_key=keys)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, step_alignment_loss(steps, valid, evidence, scale, pool_scale=5.0))
    # unique keys everywhere: the plain loss
    uniq = torch.arange(b * s).reshape(b, s)
    torch.testing.assert_close(step_alignment_loss(steps, valid, evidence, scale, pool_scale=5.0, step_key=uniq),
                               step_alignment_loss(steps, valid, evidence, scale, pool_scale=5.0))


def test_label_loss_ignores_unknown():
    logits = torch.randn(2, 18)
    labels = torch.randint(0, 2, (2, 18))
    labels[:, :5] = -1
    loss = label_loss(logits, labels)
    logits2 = logits.clone()
    logits2[:, :5] = 1e4
    torch.testing.assert_close(label_loss(logits2, labels), loss)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits[:, 5:], labels[:, 5:].float()))


def test_multitask_weights_terms_and_padding_invariance():
    from ctprep_train.model import create_model

    torch.manual_seed(0)
    model = create_model("tiny", **{"text.freeze_layers": -1}).eval()
    batch = make_batch()
    loss_fn = MultiTaskLoss({"clip": 1.0, "region": 0.5, "step": 0.25, "labels": 0.0})
    with torch.no_grad():
        total, terms = loss_fn(model(batch), batch)
    assert set(terms) == {"clip", "region", "step"}
    torch.testing.assert_close(total, terms["clip"] + 0.5 * terms["region"] + 0.25 * terms["step"])
    # Change everything that is padding: padded step, padded report tokens, unknown labels.
    padded = dict(batch)
    padded["steps_ids"] = batch["steps_ids"].clone()
    padded["steps_ids"][0, -1] = 4242
    padded["steps_ids"][..., 6:] = 777
    padded["report_ids"] = batch["report_ids"].clone()
    padded["report_ids"][0, 9:] = 555
    padded["labels"] = batch["labels"].clone()
    padded["labels"][batch["labels"] < 0] = -1
    with torch.no_grad():
        total2, terms2 = MultiTaskLoss({"labels": 1.0})(model(padded), padded)
        total1, terms1 = MultiTaskLoss({"labels": 1.0})(model(batch), batch)
    for name in terms1:
        torch.testing.assert_close(terms2[name], terms1[name], msg=name)
    with pytest.raises(ValueError, match="valid choices"):
        MultiTaskLoss({"clipp": 1.0})
    assert LossConfig().clip == 1.0


def test_step_grounding_loss_matches_hand_computation_and_skips_what_it_must():
    from ctprep_train.losses import step_grounding_loss, step_patch_attention

    g = torch.Generator().manual_seed(3)
    b, s, k, e, p, r = 2, 3, 4, 8, 6, 2
    steps = F.normalize(torch.randn(b, s, e, generator=g), dim=-1)
    evidence = F.normalize(torch.randn(b, k, e, generator=g), dim=-1)
    attn = torch.softmax(torch.randn(b, k, p, generator=g), dim=-1)
    regions = torch.zeros(b, p, r + 1)
    regions[:, :, 0] = 1.0
    regions[:, :2, 0], regions[:, :2, 1] = 0.0, 1.0  # region 0: patches 0-1
    regions[0, 2:4, 0], regions[0, 2:4, 2] = 0.5, 0.5  # region 1: half of patches 2-3, volume 0 only
    valid = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    named = torch.tensor([[0, 1, -1], [1, 0, 0]])  # (1, 0): region 1 absent in volume 1; (1, 2): padding
    maps = step_patch_attention(steps, evidence, attn, 5.0)
    torch.testing.assert_close(maps.sum(-1), torch.ones(b, s))
    want = []
    for bi, si in ((0, 0), (0, 1), (1, 1)):
        w = torch.softmax(5.0 * evidence[bi] @ steps[bi, si], 0)
        col = regions[bi, :, named[bi, si] + 1]
        want.append(-torch.log((w @ attn[bi]) @ col))
    got = step_grounding_loss(steps, valid, evidence, attn, named, regions, pool_scale=5.0)
    torch.testing.assert_close(got, torch.stack(want).mean())
    garbage = steps.clone()
    garbage[1, 2] = float("nan")  # padding and unnamed steps cannot reach the arithmetic
    garbage[0, 2] = 99.0
    torch.testing.assert_close(step_grounding_loss(garbage, valid, evidence, attn, named, regions, pool_scale=5.0), got)
    evidence.requires_grad_()
    none = step_grounding_loss(steps, valid, evidence, attn, torch.full_like(named, -1), regions)
    assert none.item() == 0.0 and none.requires_grad
    # off by default: the multitask loss adds it only when its weight is set
    assert LossConfig().step_grounding == 0.0


def _grounding_batch(n: int, seed: int) -> dict:
    """Volumes (16, 64, 64) with a left (1) and right (2) region; one bright block on one side;
    the single CoT step names that side (step_regions) and says where the block is (its text id)."""
    from ctprep_train.model.anatomical_encoder import patch_region_fraction

    g = torch.Generator().manual_seed(seed)
    image = (torch.randn(n, 16, 64, 64, generator=g) * 30 - 800).to(torch.int16)
    mask = torch.zeros(n, 16, 64, 64, dtype=torch.uint8)
    mask[:, :, 8:56, :32], mask[:, :, 8:56, 32:] = 1, 2
    text = torch.zeros(n, dtype=torch.long)
    named = torch.zeros(n, 1, dtype=torch.long)
    for i in range(n):
        side, zb, yb, xb = (int(torch.randint(m, (1,), generator=g)) for m in (2, 4, 2, 2))
        image[i, 4 * zb:4 * zb + 4, 16 + 16 * yb:32 + 16 * yb, 32 * side + 16 * xb:32 * side + 16 * xb + 16] = 300
        text[i], named[i, 0] = side * 16 + zb * 4 + yb * 2 + xb, side
    return {"image": image, "mask": mask, "regions": patch_region_fraction(mask, (4, 16, 16), 2),
            "text": text, "step_regions": named}


@pytest.mark.parametrize("query_std, grounding, low, high", [
    (1.0, 1.0, 1.6, 2.7),  # both fixes: well above chance (all mass in the named side = 2.67)
    (1.0, 0.0, 1.05, 1.6),  # the contrastive step term alone: some, because here the text says where
    (0.02, 1.0, 0.9, 1.1),  # the old query init: the evidence attention has not moved off uniform
])
def test_step_losses_teach_the_step_head_to_look_where_a_step_names(query_std, grounding, low, high):
    """15 optimisation steps on a tiny vision encoder: the CoT alignment of held-out volumes (the
    evaluation's metric, through the evaluation's step map) rises well above chance with the
    grounding term and randn-scale evidence queries, and not without them (docs/evaluation.md)."""
    from ctprep_train.eval.metrics import CoTAlignment
    from ctprep_train.losses import step_patch_attention
    from ctprep_train.model import get_model_config
    from ctprep_train.model.vision_encoder import VisionEncoder3D

    torch.manual_seed(0)
    cfg = get_model_config("tiny", **{
        "vision.width": 32, "vision.depth": 1, "vision.num_heads": 2, "vision.out_indices": [0],
        "vision.patch.stem_channels": [], "vision.anatomy.cnn_channels": [4, 8, 8], "vision.num_labels": 0,
        "vision.num_evidence_tokens": 4, "vision.evidence_query_std": query_std}).vision
    visual = VisionEncoder3D(cfg, embed_dim=16)
    words = torch.nn.Embedding(32, 16)  # the step text tower, reduced to one vector per step text
    params = list(visual.parameters()) + list(words.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    loss_fn = MultiTaskLoss({"clip": 0.0, "region": 0.0, "labels": 0.0, "step": 1.0, "step_grounding": grounding})

    def outputs(batch):
        vis = visual(batch["image"], batch["mask"], batch["regions"])
        n = batch["image"].shape[0]
        return {"step_embed": F.normalize(words(batch["text"]), dim=-1)[:, None],
                "step_valid": torch.ones(n, 1, dtype=torch.bool),
                "step_evidence": F.normalize(vis["evidence"], dim=-1), "evidence_attn": vis["evidence_attn"],
                "step_logit_scale": torch.tensor(10.0)}

    def alignment(batch):
        with torch.no_grad():
            out = outputs(batch)
            maps = step_patch_attention(out["step_embed"], out["step_evidence"], out["evidence_attn"])
        cot = CoTAlignment(["left", "right"])
        for i in range(maps.shape[0]):
            cot.add(maps[i].numpy(), batch["step_regions"][i].tolist(), batch["regions"][i].numpy())
        return cot.summary()["overall"]["mean_ratio"]

    train, held_out = _grounding_batch(8, 0), _grounding_batch(8, 1)
    before = alignment(held_out)
    for _ in range(15):
        total, terms = loss_fn(outputs(train), train)
        opt.zero_grad()
        total.backward()
        assert visual.evidence.queries.grad.abs().sum() > 0 and words.weight.grad.abs().sum() > 0
        opt.step()
    assert set(terms) == ({"step", "step_grounding"} if grounding else {"step"})
    after = alignment(held_out)
    print(f"query_std {query_std} grounding {grounding}: CoT mass/chance {before:.3f} -> {after:.3f}")
    assert 0.9 < before < 1.1 and low < after < high, (before, after)
