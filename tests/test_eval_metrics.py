"""ctprep_train.eval.metrics against brute-force computations (ties, duplicate texts, AUC)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ctprep_train.eval.metrics import (
    auc_mann_whitney,
    expected_random_recall,
    retrieval_metrics,
    simulated_random_baseline,
    unique_text_index,
    youden_threshold,
    zero_shot_metrics,
)


def brute_force_ranks(img: np.ndarray, txt: np.ndarray, keys: list) -> tuple[np.ndarray, np.ndarray]:
    """Sort every query's candidates explicitly; ties are placed *before* the positive."""
    uniq: list = []
    for k in keys:
        if k not in uniq:
            uniq.append(k)
    first = [keys.index(k) for k in uniq]
    tu = txt[first]
    r_i2t = []
    for i in range(len(img)):
        scores = [float(img[i] @ tu[u]) for u in range(len(uniq))]
        pos = uniq.index(keys[i])
        # pessimistic order: descending score, negatives before positives among equal scores
        order = sorted(range(len(uniq)), key=lambda u: (-scores[u], u == pos))
        r_i2t.append(order.index(pos) + 1)
    r_t2i = []
    for u in range(len(uniq)):
        scores = [float(tu[u] @ img[j]) for j in range(len(img))]
        positive = [keys[j] == uniq[u] for j in range(len(img))]
        order = sorted(range(len(img)), key=lambda j: (-scores[j], positive[j]))
        r_t2i.append(min(order.index(j) for j in range(len(img)) if positive[j]) + 1)
    return np.array(r_i2t), np.array(r_t2i)


def _check(img, txt, keys, ks=(1, 2, 5, 10), chunk=3):
    out = retrieval_metrics(img, txt, text_keys=keys, ks=ks, chunk=chunk, normalize=False)
    r1, r2 = brute_force_ranks(img, txt, list(keys) if keys is not None else list(range(len(img))))
    for k in ks:
        assert out["image_to_text"][f"R@{k}"] == pytest.approx(np.mean(r1 <= k))
        assert out["text_to_image"][f"R@{k}"] == pytest.approx(np.mean(r2 <= k))
    assert out["image_to_text"]["mean_rank"] == pytest.approx(r1.mean())
    assert out["text_to_image"]["median_rank"] == pytest.approx(np.median(r2))
    return out, r1, r2


def test_random_embeddings_match_brute_force():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(23, 8))
    txt = img + rng.normal(scale=1.5, size=img.shape)
    out, _, _ = _check(img, txt, None)
    assert out["pool_size"] == 23 and out["n_unique_texts"] == 23


def test_ties_count_against_the_query():
    # Integer embeddings: dot products are exact, so ties are real ties.
    rng = np.random.default_rng(1)
    img = rng.integers(-1, 2, size=(17, 3)).astype(np.float64)
    txt = rng.integers(-1, 2, size=(17, 3)).astype(np.float64)
    _check(img, txt, None)
    # A fully collapsed model gets the worst rank, not the best.
    const = np.ones((6, 4))
    out = retrieval_metrics(const, const, ks=(1, 6), normalize=False)
    assert out["image_to_text"]["R@1"] == 0.0
    assert out["image_to_text"]["mean_rank"] == 6.0
    assert out["text_to_image"]["R@6"] == 1.0


def test_duplicate_texts_are_merged():
    rng = np.random.default_rng(2)
    keys = ["a", "b", "a", "c", "b", "a", "d", "e", "c", "f", "g", "a"]
    # identical reports give identical text embeddings, as a deterministic text encoder would
    base = {k: rng.integers(-2, 3, size=4).astype(np.float64) for k in set(keys)}
    txt = np.stack([base[k] for k in keys])
    img = rng.integers(-2, 3, size=(len(keys), 4)).astype(np.float64)
    out, _, _ = _check(img, txt, keys)
    assert out["n_unique_texts"] == 7
    assert out["image_to_text"]["pool_size"] == 7 and out["image_to_text"]["queries"] == 12
    assert out["text_to_image"]["pool_size"] == 12 and out["text_to_image"]["queries"] == 7
    # image paired with a duplicate report whose twin image scores higher is not a false negative
    first, group = unique_text_index(keys, len(keys))
    assert list(first) == [0, 1, 3, 6, 7, 9, 10] and group[5] == 0


def test_perfect_embeddings_and_chunking_invariance():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 16))
    out = retrieval_metrics(x, x, ks=(1,))
    assert out["image_to_text"]["R@1"] == 1.0 and out["text_to_image"]["R@1"] == 1.0
    y = x + rng.normal(size=x.shape)
    a = retrieval_metrics(x, y, chunk=1)
    b = retrieval_metrics(x, y, chunk=1000)
    assert a["image_to_text"] == b["image_to_text"] and a["text_to_image"] == b["text_to_image"]


def test_random_baseline_analytic_vs_simulation():
    assert expected_random_recall(100, 1, 5) == pytest.approx(0.05)
    assert expected_random_recall(10, 3, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))
    assert expected_random_recall(10, 1, 50) == 1.0
    keys = [i // 2 for i in range(60)]  # every report shared by two images
    _, group = unique_text_index(keys, 60)
    out = retrieval_metrics(np.eye(60), np.eye(60), text_keys=keys, ks=(5,))
    rb = out["random_baseline"]
    assert rb["image_to_text"]["R@5"] == pytest.approx(5 / 30)
    assert rb["text_to_image"]["R@5"] == pytest.approx(1 - math.comb(58, 5) / math.comb(60, 5))
    assert rb["R@5"] == max(rb["image_to_text"]["R@5"], rb["text_to_image"]["R@5"])
    sim = simulated_random_baseline(60, group, (5,), repeats=40)
    assert sim["image_to_text"]["R@5"] == pytest.approx(5 / 30, abs=0.04)
    assert sim["text_to_image"]["R@5"] == pytest.approx(rb["text_to_image"]["R@5"], abs=0.05)


def pairwise_auc(scores, labels):
    pos = [s for s, t in zip(scores, labels) if t]
    neg = [s for s, t in zip(scores, labels) if not t]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def test_auc_matches_sklearn_and_pairwise_with_ties():
    rng = np.random.default_rng(4)
    for trial in range(5):
        s = rng.integers(0, 6, size=50).astype(float)  # many ties
        t = rng.random(50) < 0.4
        assert auc_mann_whitney(s, t) == pytest.approx(roc_auc_score(t, s))
        assert auc_mann_whitney(s, t) == pytest.approx(pairwise_auc(s, t))
    assert math.isnan(auc_mann_whitney(np.ones(4), np.zeros(4)))


def test_youden_threshold_brute_force():
    rng = np.random.default_rng(5)
    s = rng.normal(size=40).round(1)
    t = rng.random(40) < 0.5
    thr = youden_threshold(s, t)
    j = lambda th: ((s >= th) & t).sum() / t.sum() - ((s >= th) & ~t).sum() / (~t).sum()  # noqa: E731
    assert j(thr) == pytest.approx(max(j(x) for x in np.unique(s)))


def test_zero_shot_excludes_unknown_labels():
    rng = np.random.default_rng(6)
    n, d, c = 30, 8, 3
    img = rng.normal(size=(n, d))
    pos = rng.normal(size=(c, d))
    neg = rng.normal(size=(c, d))
    labels = rng.integers(-1, 2, size=(n, c))
    labels[:, 2] = -1  # a label never known: excluded from the macro
    out = zero_shot_metrics(img, pos, neg, labels, ["a", "b", "c"])
    imgn = img / np.linalg.norm(img, axis=1, keepdims=True)
    score = imgn @ (pos / np.linalg.norm(pos, axis=1, keepdims=True)).T - imgn @ (
        neg / np.linalg.norm(neg, axis=1, keepdims=True)
    ).T
    for ci, name in enumerate("ab"):
        known = labels[:, ci] >= 0
        assert out["per_label"][name]["auc"] == pytest.approx(roc_auc_score(labels[known, ci] == 1, score[known, ci]))
        assert out["per_label"][name]["n_pos"] + out["per_label"][name]["n_neg"] == known.sum()
    assert math.isnan(out["per_label"]["c"]["auc"])
    assert out["labels_evaluated"] == 2
    assert out["macro_auc"] == pytest.approx(np.mean([out["per_label"][k]["auc"] for k in "ab"]))


def test_brute_force_oracle_itself_on_a_hand_case():
    # 3 images, scores chosen by hand: image 0's own text ties with another -> rank 2.
    img = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = np.array([[1.0, 1.0], [0.0, 1.0], [2.0, 2.0]])
    r1, r2 = brute_force_ranks(img, txt, [0, 1, 2])
    # image 0: scores 1,0,2 -> own (1) has one above -> rank 2
    assert r1[0] == 2


def test_cot_alignment_mass_and_chance():
    from ctprep_train.eval.metrics import CoTAlignment

    # 4 patches, 2 regions; region "a" (index 0) fills patch 0 fully and half of patch 1.
    regions = np.array([[0, 1, 0], [0.5, 0.5, 0], [0, 0, 1], [1, 0, 0]], dtype=np.float32)
    attn = np.array([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0, 0, 0, 1]])
    cot = CoTAlignment(["a", "b"])
    cot.add(attn, [0, 0, -1], regions)
    out = cot.summary()
    chance = 1.5 / 4
    assert out["per_region"]["a"]["steps"] == 2
    assert out["per_region"]["a"]["mean_mass"] == pytest.approx((1.0 + chance) / 2)
    assert out["per_region"]["a"]["mean_chance"] == pytest.approx(chance)
    assert out["per_region"]["a"]["frac_above_chance"] == 0.5  # uniform attention is not above chance
    assert out["overall"]["steps"] == 2 and "b" not in out["per_region"]


def test_cot_alignment_on_constructed_step_and_evidence_embeddings():
    """Where the right answer is known: evidence token k attends only to region k and a step's
    embedding is the token of the region it names -> all its mass there (ratio = 1 / chance);
    pointed at another region's token -> none; random attention maps -> chance."""
    import torch
    import torch.nn.functional as F

    from ctprep_train.eval.metrics import CoTAlignment
    from ctprep_train.losses import step_patch_attention

    rng = np.random.default_rng(0)
    r, p, e = 3, 40, 8
    names = ["a", "b", "c"]
    aligned, wrong, rand = CoTAlignment(names), CoTAlignment(names), CoTAlignment(names)
    basis = torch.eye(e)[:r]  # evidence token k = unit vector k
    for _ in range(50):
        region_of = rng.integers(0, r + 1, size=p)  # 0 = background
        region_of[: r + 1] = np.arange(r + 1)  # every region present
        frac = np.eye(r + 1)[region_of]  # (P, R+1) one-hot fractions
        attn = torch.tensor(frac[:, 1:].T / frac[:, 1:].sum(0)[:, None], dtype=torch.float32)  # (K=R, P)
        named = rng.integers(0, r, size=4)
        steps = basis[named]  # (S, E): each step is its region's evidence token
        maps = step_patch_attention(steps[None], basis[None], attn[None])[0].numpy()
        aligned.add(maps, named.tolist(), frac)
        maps_wrong = step_patch_attention(basis[(named + 1) % r][None], basis[None], attn[None])[0].numpy()
        wrong.add(maps_wrong, named.tolist(), frac)
        random_attn = torch.softmax(torch.randn(r, p) * 2, dim=-1)
        random_steps = F.normalize(torch.randn(4, e), dim=-1)
        rand.add(step_patch_attention(random_steps[None], basis[None], random_attn[None])[0].numpy(), named.tolist(), frac)
    a, w, x = (c.summary()["overall"] for c in (aligned, wrong, rand))
    assert a["steps"] == w["steps"] == x["steps"] == 200
    assert a["mean_mass"] > 0.999 and a["frac_above_chance"] == 1.0
    assert a["mean_ratio"] == pytest.approx(np.mean([1 / c for c in [rec[2] for rec in aligned.records]]), rel=1e-3)
    assert a["mean_ratio"] > 3.0
    assert w["mean_mass"] < 0.001 and w["frac_above_chance"] == 0.0
    assert 0.85 < x["mean_ratio"] < 1.15
