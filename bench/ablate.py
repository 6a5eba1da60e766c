"""Ablations: train each configs/train/ablation_*.yaml briefly (same seed, same data, same step budget),
evaluate each on the same held-out pool, print one table of retrieval figures.

    python bench/ablate.py --shards demo/shards --out runs/ablate [--steps 150] [--only no_slice_bias,full]

Each run is ``python trainer/train.py --config configs/train/ablation_<name>.yaml`` (one process,
the same DeepSpeed code path as ``deepspeed trainer/train.py``) followed by
``python -m ctprep_train.eval`` on its ``encoder/`` export. The ablation YAMLs differ from
``ablation_full.yaml`` in exactly one switch; the table says which. Results are written to
``OUT/ablation.json`` and ``OUT/ablation.md``. Runs whose ``eval.json`` already exists are
reused (delete the folder to rerun), so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs" / "train"
# name -> what it switches off (help text; the table shows the actual YAML difference)
ABLATIONS = {
    "full": "nothing (reference)",
    "no_slice_bias": "slice-distance bias (vision.attention.slice_bias=false)",
    "no_region_attention": "region cross-attention (vision.attention.region_attention=false)",
    "no_anatomy": "anatomical encoder + region attention (it needs the encoder's region embeddings)",
    "no_step_loss": "CoT step-alignment loss (loss.weights.step=0)",
}


def run(cmd: list[str], log: Path) -> float:
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} (tail)\n{tail}")
    return time.time() - t0


def ablate_one(name: str, args: argparse.Namespace) -> dict:
    cfg = CONFIG_DIR / f"ablation_{name}.yaml"
    out = Path(args.out) / name
    result_file = out / "eval" / "eval.json"
    if result_file.is_file():
        print(f"[ablate] {name}: reusing {result_file}", flush=True)
        result = json.loads(result_file.read_text())
        timing = out / "train_seconds.json"
        train_s = json.loads(timing.read_text())["train_s"] if timing.is_file() else None
        return {"name": name, "result": result, "train_s": train_s}
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"train.steps={args.steps}", f"train.seed={args.seed}", f"data.seed={args.seed}",
                 "train.val_every=0", "train.ckpt_every=0", "train.progress_bar=false", *args.override]
    train_cmd = [sys.executable, "trainer/train.py", "--config", str(cfg), "--shards", str(args.shards),
                 "--output", str(out), *overrides]
    print(f"[ablate] {name}: training {args.steps} steps ...", flush=True)
    train_s = run(train_cmd, out / "train.log")
    (out / "train_seconds.json").write_text(json.dumps({"train_s": train_s}))
    eval_cmd = [sys.executable, "-m", "ctprep_train.eval", "--encoder", str(out / "encoder"), "--shards",
                str(args.shards), "--split", args.split, "--out", str(out / "eval"), "--picture-cases", "1"]
    if args.source:
        eval_cmd += ["--source", args.source]
    if args.max_cases:
        eval_cmd += ["--max-cases", str(args.max_cases)]
    run(eval_cmd, out / "eval.log")
    result = json.loads(result_file.read_text())
    return {"name": name, "result": result, "train_s": train_s}


def table(rows: list[dict]) -> str:
    head = ("| ablation | switched off | pool | i->t R@1 | i->t R@5 | t->i R@1 | t->i R@5 | random R@5 "
            "| i->t R@5 / random | t->i R@5 / random | i->t mean rank | zero-shot AUC | CoT mass/chance | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    ratio = lambda v, base: "n/a" if v is None or not base else f"{v / base:.1f}x"  # noqa: E731
    for row in rows:
        r = row["result"]["retrieval"]
        z = row["result"]["zero_shot"]
        cot = row["result"].get("cot_alignment", {}).get("overall", {})
        lines.append(
            f"| {row['name']} | {row['diff'] or 'nothing (reference)'} | {r['n_images']} | "
            f"{pct(r['image_to_text']['R@1'])} | {pct(r['image_to_text']['R@5'])} | "
            f"{pct(r['text_to_image']['R@1'])} | {pct(r['text_to_image']['R@5'])} | "
            f"{pct(r['random_baseline']['R@5'])} | {ratio(r['image_to_text']['R@5'], r['random_baseline']['R@5'])} | "
            f"{ratio(r['text_to_image']['R@5'], r['random_baseline']['R@5'])} | {r['image_to_text']['mean_rank']:.1f} | "
            f"{z['macro_auc'] if z['macro_auc'] is None else round(z['macro_auc'], 3)} | "
            f"{cot.get('mean_ratio', float('nan')):.2f} | "
            f"{'n/a' if row['train_s'] is None else round(row['train_s'])} |"
        )
    return "\n".join(lines)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def config_diff(name: str) -> str:
    """The dotted keys in which ablation_<name>.yaml differs from ablation_full.yaml."""
    path = CONFIG_DIR / f"ablation_{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"{path} missing; known ablations: {sorted(ABLATIONS)}")
    full = _flatten(yaml.safe_load((CONFIG_DIR / "ablation_full.yaml").read_text()))
    mine = _flatten(yaml.safe_load(path.read_text()))
    keys = sorted(k for k in set(full) | set(mine) if full.get(k) != mine.get(k) and k != "train.output")
    return ", ".join(f"{k}={mine.get(k)}" for k in keys)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="shards folder (e.g. demo/shards from make demo)")
    p.add_argument("--out", default="runs/ablate")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per ablation (same for all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="valid")
    p.add_argument("--source", default="ctrate", help="evaluation pool source (default ctrate volumes)")
    p.add_argument("--override", action="append", default=[],
                   help="extra trainer key=value for every run (e.g. data.batch_size=4 for a smoke run)")
    p.add_argument("--max-cases", type=int, default=None, help="cap on evaluated cases (smoke runs)")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(ABLATIONS))
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(ABLATIONS)
    for n in names:
        if n not in ABLATIONS:
            p.error(f"unknown ablation {n!r}; valid: {', '.join(ABLATIONS)}")
    diffs = {n: config_diff(n) for n in names}
    rows = [{**ablate_one(n, args), "diff": diffs[n]} for n in names]
    text = table(rows)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(
        f"Ablations: {args.steps} steps each, seed {args.seed}, shards {args.shards}, pool = split "
        f"{args.split!r} source {args.source!r}.\n\n{text}\n"
    )
    (out / "ablation.json").write_text(json.dumps(
        [{"name": r["name"], "train_s": r["train_s"], "retrieval": r["result"]["retrieval"],
          "zero_shot_macro_auc": r["result"]["zero_shot"]["macro_auc"],
          "cot_alignment": r["result"].get("cot_alignment", {}).get("overall")} for r in rows], indent=1))
    return rows


if __name__ == "__main__":
    main()
