"""CoT grounding on pipeline shards: does the step head learn to look where a step's text names?

    python bench/cot_grounding.py --shards runs/ablate_anatomy/data/shards [--train-cases 32]
        [--valid-cases 16] [--steps 40] [--batch-size 8]

For each setting of ``SETTINGS`` (``vision.evidence_query_std``, ``loss.weights.step_grounding``)
it builds the ``tiny`` CTCLIP with a reduced vision tower (``--width``, ``--depth``) and the frozen
MiniLM text tower (features cached), trains it in-process (AdamW, same seed) on the step terms only
(``step`` + ``step_grounding``; no DeepSpeed) over the first ``--train-cases`` training volumes,
and scores the CoT alignment of the first ``--valid-cases`` held-out volumes before and after with
the evaluation's metric and step map (``CoTAlignment``, ``step_patch_attention``). A quick check
of the fix in docs/evaluation.md ("CoT alignment") on real shards; the full model at the demo's
budget is ``bench/ablate.py``'s CoT column.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ctprep_train.eval.data import batches_by_shape, iter_split
from ctprep_train.eval.metrics import CoTAlignment
from ctprep_train.losses import MultiTaskLoss, step_patch_attention
from ctprep_train.model import create_model

# (evidence_query_std, step_grounding): the old defaults, the query init alone, both
SETTINGS = ((0.02, 0.0), (0.02, 1.0), (1.0, 0.0), (1.0, 1.0))


def load(shards: str, split: str, cases: int, batch_size: int) -> tuple[list[dict], list[str]]:
    samples = list(iter_split(shards, split, cases, "ctrate", skipped=[]))
    if not samples:
        raise SystemExit(f"{shards}: no CT-RATE samples in split {split!r}")
    names = list(samples[0]["meta"]["region_names"])
    return list(batches_by_shape(samples, batch_size)), names


@torch.no_grad()
def alignment(model, batches: list[dict], region_names: list[str]) -> dict:
    model.eval()
    cot = CoTAlignment(region_names)
    for batch in batches:
        out = model(batch)
        maps = step_patch_attention(out["step_embed"], out["step_evidence"], out["evidence_attn"])
        for i in range(maps.shape[0]):
            valid = out["step_valid"][i]
            cot.add(maps[i][valid].numpy(), batch["step_regions"][i][valid].tolist(), batch["regions"][i].float().numpy())
    model.train()
    return cot.summary()["overall"]


def run_setting(std: float, grounding: float, train: list[dict], valid: list[dict], names: list[str],
                args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = create_model("tiny", **{
        "vision.width": args.width, "vision.depth": args.depth, "vision.num_heads": 2, "vision.out_indices": [0],
        "vision.num_labels": 0, "vision.evidence_query_std": std,
        "text.freeze_layers": -1, "text.feature_cache": 100000})
    loss_fn = MultiTaskLoss({"clip": 0.0, "region": 0.0, "labels": 0.0, "step": 1.0, "step_grounding": grounding})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    before = alignment(model, valid, names)
    t0 = time.time()
    for step in range(args.steps):
        batch = train[step % len(train)]
        total, terms = loss_fn(model(batch), batch)
        opt.zero_grad()
        total.backward()
        opt.step()
    after = alignment(model, valid, names)
    return {"evidence_query_std": std, "step_grounding": grounding, "train_s": round(time.time() - t0, 1),
            "last_terms": {k: round(float(v), 4) for k, v in terms.items()},
            "before": before, "after": after}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--train-cases", type=int, default=32)
    p.add_argument("--valid-cases", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    train, names = load(args.shards, "train", args.train_cases, args.batch_size)
    valid, _ = load(args.shards, "valid", args.valid_cases, args.batch_size)
    rows = []
    print("| evidence_query_std | step_grounding | steps | held-out CoT mass/chance before -> after | "
          "frac above chance after | train s |\n|---|---|---|---|---|---|", flush=True)
    for std, grounding in SETTINGS:
        row = run_setting(std, grounding, train, valid, names, args)
        rows.append(row)
        print(f"| {std} | {grounding} | {args.steps} | {row['before']['mean_ratio']:.2f} -> "
              f"{row['after']['mean_ratio']:.2f} | {row['after']['frac_above_chance']:.2f} | {row['train_s']} |",
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
