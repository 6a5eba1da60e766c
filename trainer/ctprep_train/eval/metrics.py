"""Retrieval and zero-shot classification metrics for the CT encoder.

Everything here works on plain embeddings (no model, no DeepSpeed), so the
trainer can call :func:`retrieval_metrics` during validation and the tests can
check it against brute force.

Retrieval protocol (also returned as text in ``protocol`` so every report
states it):

* **Pools.** ``N`` images, each paired with one report. Reports that are
  textually identical (``text_keys`` equal; several reconstructions of one scan
  share one report) are merged into one *unique text*, whose embedding is the
  first occurrence's. Image->text ranks each image against the ``U`` unique
  texts (pool = U); text->image ranks each unique text against all ``N``
  images (pool = N) and every image carrying that report is a positive.
* **Rank.** 1-based rank of the (best) positive. A negative whose similarity
  is *greater than or equal to* the positive's counts ahead of it: ties are
  broken against the query (pessimistic rank), so a collapsed model that
  gives every candidate the same score gets the worst rank, never the best.
* **Recall@K** = fraction of queries whose rank <= K (K larger than the pool
  is reported as 1.0 and flagged by ``pool_size``).
* **Memory.** Similarities are computed ``chunk`` queries at a time, so peak
  memory is ``chunk x pool`` scores, never ``pool x pool``.
* **Random baseline.** Expected Recall@K of scores that order the pool
  uniformly at random, for the same pools and positive counts: image->text
  K/U; text->image with m positives among N: 1 - C(N-m, K) / C(N, K). A
  simulated baseline (Gaussian embeddings, fixed seed, same code path) is
  available through :func:`simulated_random_baseline`.

Zero-shot protocol: per label, score = sim(image, "{label} is present.") -
sim(image, "{label} is not present.") (the softmax over the two prompts is a
monotone function of this difference, so AUC is the same). Cases with label
-1 are excluded per label. AUC is the Mann-Whitney statistic with tied scores
counted 1/2 (same as scikit-learn). The operating threshold maximises Youden's
J = TPR - FPR over the ROC points (a case is positive when score >= threshold;
among equal J the higher threshold wins); F1 and accuracy are taken there.
Macro averages are over labels with both classes present.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10, 50, 100)

RETRIEVAL_PROTOCOL = (
    "Image->text: each image ranked against the unique report texts (textually identical reports "
    "merged; pool = number of unique texts). Text->image: each unique text ranked against all images; "
    "every image with that report is a positive and the best-ranked positive counts (pool = number of "
    "images). Rank is 1-based; a candidate with a score >= the positive's counts ahead of it (ties "
    "against the query, pessimistic). Recall@K = fraction of queries with rank <= K. Random baseline = "
    "expected Recall@K of a uniformly random ordering of the same pools (image->text K/U; text->image "
    "1 - C(N-m,K)/C(N,K) for m positives among N)."
)

ZERO_SHOT_PROTOCOL = (
    "Per label, score = cos(image, '<label> is present.') - cos(image, '<label> is not present.'); "
    "cases with label -1 excluded; AUC = Mann-Whitney with ties counted 1/2; threshold = Youden's J "
    "maximum over ROC points (positive if score >= threshold), F1 and accuracy at that threshold; macro = "
    "mean over labels with both classes present."
)


# --------------------------------------------------------------------------- helpers


def _as_tensor(x: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x.detach()
    t = t.cpu()
    if not torch.is_floating_point(t):
        t = t.double()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t


def unique_text_index(text_keys: Sequence[Any] | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Group identical texts.

    Returns:
        first: (U,) index of each unique text's first occurrence, in order of appearance.
        group: (n,) unique-text index of every item.
    """
    if text_keys is None:
        return np.arange(n), np.arange(n)
    if len(text_keys) != n:
        raise ValueError(f"text_keys has {len(text_keys)} entries, expected {n} (one per image)")
    seen: dict[Any, int] = {}
    first: list[int] = []
    group = np.empty(n, dtype=np.int64)
    for i, key in enumerate(text_keys):
        g = seen.get(key)
        if g is None:
            g = seen[key] = len(first)
            first.append(i)
        group[i] = g
    return np.asarray(first, dtype=np.int64), group


def _recalls(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    return {f"R@{k}": float(np.mean(ranks <= k)) if ranks.size else float("nan") for k in ks}


def _rank_summary(ranks: np.ndarray, ks: Sequence[int], pool: int) -> dict[str, Any]:
    out: dict[str, Any] = _recalls(ranks, ks)
    out["mean_rank"] = float(ranks.mean()) if ranks.size else float("nan")
    out["median_rank"] = float(np.median(ranks)) if ranks.size else float("nan")
    out["queries"] = int(ranks.size)
    out["pool_size"] = int(pool)
    return out


# --------------------------------------------------------------------------- ranks


@torch.no_grad()
def image_to_text_ranks(
    image_emb: torch.Tensor, text_emb_unique: torch.Tensor, group: np.ndarray, chunk: int = 1024
) -> np.ndarray:
    """1-based pessimistic rank of each image's own (unique) text among all unique texts."""
    n = image_emb.shape[0]
    target = torch.as_tensor(group, dtype=torch.long)
    ranks = np.empty(n, dtype=np.int64)
    for s in range(0, n, chunk):
        sim = image_emb[s : s + chunk] @ text_emb_unique.T  # (c, U)
        pos = sim.gather(1, target[s : s + chunk, None])  # (c, 1): same matrix, so pos >= pos exactly
        # count of candidates scoring >= the positive, the positive itself included.
        ranks[s : s + chunk] = (sim >= pos).sum(1).numpy()
    return ranks


@torch.no_grad()
def text_to_image_ranks(
    text_emb_unique: torch.Tensor, image_emb: torch.Tensor, group: np.ndarray, chunk: int = 1024
) -> np.ndarray:
    """1-based pessimistic rank of the best-ranked positive image for each unique text."""
    u = text_emb_unique.shape[0]
    g = torch.as_tensor(group, dtype=torch.long)
    ranks = np.empty(u, dtype=np.int64)
    for s in range(0, u, chunk):
        sim = text_emb_unique[s : s + chunk] @ image_emb.T  # (c, N)
        q = torch.arange(s, min(s + chunk, u))
        is_pos = g[None, :] == q[:, None]  # (c, N)
        best = sim.masked_fill(~is_pos, float("-inf")).amax(1, keepdim=True)
        ranks[s : s + chunk] = ((sim >= best) & ~is_pos).sum(1).numpy() + 1
    return ranks


# --------------------------------------------------------------------------- baselines


def expected_random_recall(pool: int, positives: np.ndarray | int, k: int) -> float:
    """Expected Recall@K when the pool is ordered uniformly at random.

    Args:
        pool: number of candidates per query.
        positives: number of positives per query (int or array over queries).
        k: cut-off.
    """
    m = np.atleast_1d(np.asarray(positives, dtype=np.int64))
    if k >= pool:
        return 1.0
    # P(no positive in the first k) = C(pool-m, k) / C(pool, k), computed in log space.
    def p_miss(mi: int) -> float:
        if pool - mi < k:
            return 0.0
        return math.exp(
            math.lgamma(pool - mi + 1) - math.lgamma(pool - mi - k + 1) - math.lgamma(pool + 1) + math.lgamma(pool - k + 1)
        )

    cache: dict[int, float] = {}
    vals = [1.0 - cache.setdefault(int(mi), p_miss(int(mi))) for mi in m]
    return float(np.mean(vals))


def expected_random_baseline(n_images: int, group: np.ndarray, ks: Sequence[int]) -> dict[str, Any]:
    n_unique = int(group.max()) + 1 if group.size else 0
    positives = np.bincount(group, minlength=n_unique)
    i2t = {f"R@{k}": expected_random_recall(n_unique, 1, k) for k in ks}
    t2i = {f"R@{k}": expected_random_recall(n_images, positives, k) for k in ks}
    # One figure per K for the "3x the baseline" test: the larger of the two directions, so a model
    # must beat the harder-to-beat pool in both directions.
    both = {f"R@{k}": max(i2t[f"R@{k}"], t2i[f"R@{k}"]) for k in ks}
    return {**both, "image_to_text": i2t, "text_to_image": t2i, "method": "analytic"}


def simulated_random_baseline(
    n_images: int, group: np.ndarray, ks: Sequence[int], dim: int = 64, seed: int = 0, repeats: int = 5
) -> dict[str, Any]:
    """Recall of random Gaussian embeddings through the same ranking code (fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    n_unique = int(group.max()) + 1
    acc_i2t = np.zeros(len(ks))
    acc_t2i = np.zeros(len(ks))
    for _ in range(repeats):
        img = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=gen), dim=-1)
        txt = torch.nn.functional.normalize(torch.randn(n_unique, dim, generator=gen), dim=-1)
        r1 = image_to_text_ranks(img, txt, group)
        r2 = text_to_image_ranks(txt, img, group)
        acc_i2t += [np.mean(r1 <= k) for k in ks]
        acc_t2i += [np.mean(r2 <= k) for k in ks]
    return {
        "image_to_text": {f"R@{k}": float(v / repeats) for k, v in zip(ks, acc_i2t)},
        "text_to_image": {f"R@{k}": float(v / repeats) for k, v in zip(ks, acc_t2i)},
        "method": f"simulated: {repeats} draws of {dim}-d Gaussian embeddings, seed {seed}",
    }


# --------------------------------------------------------------------------- public API


def retrieval_metrics(
    image_emb: Any,
    text_emb: Any,
    text_keys: Sequence[Any] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    chunk: int = 1024,
    normalize: bool = True,
    simulate_baseline: bool = False,
) -> dict[str, Any]:
    """Image<->text retrieval on the full pool (see the module docstring for the protocol).

    Args:
        image_emb: (N, D) one embedding per image (tensor or array).
        text_emb: (N, D) the paired report embedding of each image (row i belongs to image i).
        text_keys: N hashable keys (e.g. the report text); equal keys = one unique text. None = all
            texts distinct.
        ks: Recall@K cut-offs.
        chunk: queries per similarity block (memory = chunk x pool scores).
        normalize: L2-normalise embeddings first (cosine similarity).
        simulate_baseline: also run the Gaussian-embedding baseline (slower; analytic is always given).

    Returns a JSON-able dict: pool_size, n_images, n_unique_texts, image_to_text / text_to_image
    (R@K, mean_rank, median_rank, queries, pool_size), random_baseline, protocol.
    """
    img = _as_tensor(image_emb)
    txt = _as_tensor(text_emb)
    if img.ndim != 2 or txt.ndim != 2 or img.shape != txt.shape:
        raise ValueError(f"expected two (N, D) arrays of equal shape, got {tuple(img.shape)} and {tuple(txt.shape)}")
    dtype = torch.promote_types(img.dtype, txt.dtype)
    img, txt = img.to(dtype), txt.to(dtype)
    if normalize:
        img = torch.nn.functional.normalize(img, dim=-1)
        txt = torch.nn.functional.normalize(txt, dim=-1)
    n = img.shape[0]
    first, group = unique_text_index(text_keys, n)
    txt_u = txt[torch.as_tensor(first, dtype=torch.long)]
    ks = tuple(int(k) for k in ks)
    r_i2t = image_to_text_ranks(img, txt_u, group, chunk)
    r_t2i = text_to_image_ranks(txt_u, img, group, chunk)
    out: dict[str, Any] = {
        "pool_size": int(n),
        "n_images": int(n),
        "n_unique_texts": int(len(first)),
        "image_to_text": _rank_summary(r_i2t, ks, len(first)),
        "text_to_image": _rank_summary(r_t2i, ks, n),
        "random_baseline": expected_random_baseline(n, group, ks),
        "dedup": "textually identical reports merged" if text_keys is not None else "none (all texts distinct)",
        "tie_rule": "pessimistic: candidates with score >= the positive's rank ahead of it",
        "protocol": RETRIEVAL_PROTOCOL,
    }
    if simulate_baseline and n > 0:
        out["random_baseline_simulated"] = simulated_random_baseline(n, group, ks)
    return out


# --------------------------------------------------------------------------- zero-shot


def auc_mann_whitney(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC as P(score_pos > score_neg) + 1/2 P(equal); NaN if one class is absent. O(n log n)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = int(labels.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average ranks over runs of equal scores (1-based)
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = 0.5 * (i + j) + 1.0
        i = j + 1
    r = np.empty_like(ranks)
    r[order] = ranks
    u = r[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold maximising TPR - FPR (positive if score >= threshold); highest threshold on ties."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    cand = np.unique(scores)[::-1]  # descending: first maximum found = highest threshold
    n_pos = max(int(labels.sum()), 1)
    n_neg = max(int((~labels).sum()), 1)
    best_j, best_t = -np.inf, float(cand[0]) if cand.size else 0.0
    for t in cand:
        pred = scores >= t
        j = (pred & labels).sum() / n_pos - (pred & ~labels).sum() / n_neg
        if j > best_j + 1e-12:
            best_j, best_t = j, float(t)
    return best_t


def binary_scores_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) >= threshold
    tp = int((pred & labels).sum())
    fp = int((pred & ~labels).sum())
    fn = int((~pred & labels).sum())
    tn = int((~pred & ~labels).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    acc = (tp + tn) / max(labels.size, 1)
    return {"f1": float(f1), "accuracy": float(acc), "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def zero_shot_metrics(
    image_emb: Any,
    pos_prompt_emb: Any,
    neg_prompt_emb: Any,
    labels: Any,
    label_names: Sequence[str],
) -> dict[str, Any]:
    """Per-label and macro zero-shot AUC / F1 / accuracy.

    Args:
        image_emb: (N, D) image embeddings.
        pos_prompt_emb / neg_prompt_emb: (C, D) embeddings of "{label} is present." / "... not present.".
        labels: (N, C) ints, 1/0, -1 = unknown (excluded).
        label_names: C names.
    """
    img = torch.nn.functional.normalize(_as_tensor(image_emb).double(), dim=-1)
    pos = torch.nn.functional.normalize(_as_tensor(pos_prompt_emb).double(), dim=-1)
    neg = torch.nn.functional.normalize(_as_tensor(neg_prompt_emb).double(), dim=-1)
    score = (img @ pos.T - img @ neg.T).numpy()  # (N, C)
    y = np.asarray(labels)
    per_label: dict[str, dict[str, Any]] = {}
    aucs, f1s, accs = [], [], []
    for c, name in enumerate(label_names):
        known = y[:, c] >= 0
        s, t = score[known, c], y[known, c] == 1
        entry: dict[str, Any] = {"n_pos": int(t.sum()), "n_neg": int((~t).sum())}
        auc = auc_mann_whitney(s, t)
        entry["auc"] = auc
        if not math.isnan(auc):
            thr = youden_threshold(s, t)
            entry["threshold"] = thr
            entry.update(binary_scores_at(s, t, thr))
            aucs.append(auc)
            f1s.append(entry["f1"])
            accs.append(entry["accuracy"])
        per_label[name] = entry
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {
        "macro_auc": mean(aucs),
        "macro_f1": mean(f1s),
        "macro_accuracy": mean(accs),
        "labels_evaluated": len(aucs),
        "per_label": per_label,
        "threshold_rule": "Youden's J (max TPR - FPR), positive if score >= threshold",
        "protocol": ZERO_SHOT_PROTOCOL,
    }


# --------------------------------------------------------------------------- CoT alignment

COT_PROTOCOL = (
    "For every CoT step whose text names an anatomy (meta.json step_regions >= 0): mass = the step's "
    "attention over patches (sums to 1) weighted by each patch's fraction of voxels in that region "
    "(regions.npy); chance = the region's voxel fraction in that volume (mean of the same fractions, "
    "i.e. the mass a uniform attention would put there). Reported per region and overall: mean mass, "
    "mean chance, mean ratio mass/chance, and the fraction of steps with mass > chance."
)


class CoTAlignment:
    """Accumulates, per named region, how much of a step's attention lands in that region vs chance."""

    def __init__(self, region_names: Sequence[str]):
        self.region_names = list(region_names)
        self.records: list[tuple[int, float, float]] = []  # (region index, mass, chance)

    def add(self, step_attn: Any, step_regions: Sequence[int], regions: Any) -> None:
        """Add one case.

        Args:
            step_attn: (S, P) attention of each step over the P patches (rows sum to 1).
            step_regions: (S,) index into region_names named by each step, -1 = none (skipped).
            regions: (P, R + 1) per-patch region fractions, column 0 = background.
        """
        attn = np.asarray(step_attn, dtype=np.float64)
        frac = np.asarray(regions, dtype=np.float64)
        for s, r in enumerate(step_regions):
            r = int(r)
            if r < 0 or s >= attn.shape[0] or r + 1 >= frac.shape[1]:
                continue
            chance = float(frac[:, r + 1].mean())
            if chance <= 0:  # region absent from this volume: nothing to align with
                continue
            a = attn[s] / max(attn[s].sum(), 1e-12)
            self.records.append((r, float(a @ frac[:, r + 1]), chance))

    def summary(self) -> dict[str, Any]:
        def stats(rows: list[tuple[int, float, float]]) -> dict[str, float]:
            mass = np.array([m for _, m, _ in rows])
            chance = np.array([c for _, _, c in rows])
            return {
                "steps": int(len(rows)),
                "mean_mass": float(mass.mean()),
                "mean_chance": float(chance.mean()),
                "mean_ratio": float(np.mean(mass / chance)),
                "frac_above_chance": float(np.mean(mass > chance)),
            }

        per_region = {}
        for r, name in enumerate(self.region_names):
            rows = [rec for rec in self.records if rec[0] == r]
            if rows:
                per_region[name] = stats(rows)
        overall = stats(self.records) if self.records else {"steps": 0}
        return {"overall": overall, "per_region": per_region, "protocol": COT_PROTOCOL}
