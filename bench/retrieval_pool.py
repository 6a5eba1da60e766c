"""Does a larger held-out pool flatter the retrieval ratio? R@K / random on random sub-pools.

R@K against the random baseline of the same pool is the demo's learning criterion. A reviewer may
ask whether the ratio grows just because the pool does. This script embeds the split once, then
draws sub-pools of ``--texts`` distinct reports (all volumes of each report kept, as in a smaller
split) and prints the ratio on each sub-pool size next to the full pool's:

    python bench/retrieval_pool.py --encoder demo/run/encoder --shards demo/shards \\
        --split valid --source ctrate --texts 60 120 --draws 50

The metric is the evaluator's own (`ctprep_train.eval.metrics.retrieval_metrics`: dedup of identical
reports, pessimistic ties, analytic random baseline: the larger of the two directions', as in
`make demo`'s check); only the pool differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctprep_train.eval import metrics  # noqa: E402
from ctprep_train.eval.run import EvalConfig, collect, load_encoder  # noqa: E402


def ratios(img: torch.Tensor, txt: torch.Tensor, keys: list[str], k: int) -> tuple[float, float, int, int]:
    r = metrics.retrieval_metrics(img, txt, text_keys=keys, ks=(k,))
    base = r["random_baseline"][f"R@{k}"]
    return (r["image_to_text"][f"R@{k}"] / base, r["text_to_image"][f"R@{k}"] / base,
            r["n_images"], r["n_unique_texts"])


def subpool(group: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices of ``size`` random distinct reports with every volume of each (``group``: report id per row)."""
    pick = rng.choice(int(group.max()) + 1, size, replace=False)
    return np.flatnonzero(np.isin(group, pick))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", type=Path, required=True)
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--split", default="valid")
    p.add_argument("--source", default=None)
    p.add_argument("--texts", type=int, nargs="+", default=[60], help="distinct reports per sub-pool")
    p.add_argument("--draws", type=int, default=50, help="random sub-pools per size")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    cfg = EvalConfig(encoder=a.encoder, shards=a.shards, split=a.split, source=a.source, picture_cases=0)
    col = collect(load_encoder(a.encoder, torch.device("cpu")), cfg)
    img, txt, keys = torch.cat(col.image_emb), torch.cat(col.text_emb), col.report_texts
    first, group = metrics.unique_text_index(keys, len(keys))
    n_texts = len(first)
    rows = []
    i2t, t2i, n_img, n_txt = ratios(img, txt, keys, a.k)
    rows.append({"pool": f"full {n_img} / {n_txt}", "i2t": [i2t], "t2i": [t2i]})
    rng = np.random.default_rng(a.seed)
    for size in a.texts:
        if not 1 < size < n_texts:
            raise SystemExit(f"--texts {size}: must be in 2..{n_texts - 1} (the split has {n_texts} distinct reports)")
        got_i, got_t, sizes = [], [], []
        for _ in range(a.draws):
            sel = subpool(group, size, rng)
            ri, rt, ni, _ = ratios(img[sel], txt[sel], [keys[j] for j in sel], a.k)
            got_i.append(ri)
            got_t.append(rt)
            sizes.append(ni)
        rows.append({"pool": f"~{int(np.median(sizes))} / {size} (x{a.draws})", "i2t": got_i, "t2i": got_t})

    print(f"R@{a.k} / random R@{a.k} on the {a.split} split of {a.shards} (pool = volumes / distinct reports)")
    print("| pool | i->t median | i->t p10-p90 | t->i median | t->i p10-p90 | draws >= 3x both ways |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        gi, gt = np.asarray(r["i2t"]), np.asarray(r["t2i"])
        both = float(np.mean((gi >= 3) & (gt >= 3)))
        print(f"| {r['pool']} | {np.median(gi):.2f}x | {np.percentile(gi, 10):.2f}-{np.percentile(gi, 90):.2f}x | "
              f"{np.median(gt):.2f}x | {np.percentile(gt, 10):.2f}-{np.percentile(gt, 90):.2f}x | {both:.0%} |")
    return rows


if __name__ == "__main__":
    main()
