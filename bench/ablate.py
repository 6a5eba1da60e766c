"""Ablations: train every configs/train/ablation_*.yaml for several seeds (same data, same step
budget), evaluate each run on the same held-out pool, and tabulate mean +- sd over the seeds.

    python bench/ablate.py --shards demo/shards --out runs/ablate --steps 1600 [--seeds 0,1,2]
    python bench/ablate.py --data-cases 2000 --wording anatomy --out runs/ablate_anatomy --steps 1600

A cell is one (variant, seed): ``python trainer/train.py --config OUT/<variant>/seed_<s>/config.yaml``
(the variant's YAML with the bench settings below written into it; the same DeepSpeed code path as
``deepspeed trainer/train.py``), then ``python -m ctprep_train.eval`` on its ``encoder/`` export.

Resumable: every finished cell is appended as one JSON line to ``OUT/results.jsonl``; a rerun of the
same command skips the cells found there (same steps and shards), so a long table is filled in over
several invocations, and a cell killed midway is trained again from the start. A cell whose
``eval.json`` exists but whose line is missing (killed between evaluation and the append) is
recorded without retraining. ``OUT/ablation.md`` / ``.json`` / ``.png`` are rewritten from all
recorded cells after every cell.

The CoT step head's grounding term and query init (docs/evaluation.md, CoT alignment) are those of
each variant's YAML (demo64.yaml: ``loss.weights.step_grounding`` 0.25,
``vision.evidence_query_std`` 1.0); ``--step-grounding`` / ``--evidence-query-std`` set them for
ablation_full.yaml and every variant that does not switch that key itself (``no_step_grounding``
keeps its own; where the step loss is off, grounding stays 0). ``--data-cases N`` builds the data first (``ctprep demo-data
--cases N --seed 0 --wording W`` + ``ctprep build-shards``, under ``OUT/data``, reused when present)
on `make demo`'s grid (the ``demo64`` preset) and trains on CT-RATE volumes only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from ctprep_train.config import read_config_tree

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs" / "train"
# name -> what it switches off (help text; the table shows the actual YAML difference)
ABLATIONS = {
    "full": "nothing (reference)",
    "no_slice_bias": "slice-distance bias (vision.attention.slice_bias=false)",
    "no_region_attention": "region cross-attention (vision.attention.region_attention=false)",
    "no_anatomy": "anatomical encoder + region attention (it needs the encoder's region embeddings)",
    "no_step_grounding": "CoT step grounding term + randn query init (the contrastive step term stays)",
    "no_step_loss": "CoT step head: step-alignment and grounding terms (loss.weights.step=0)",
}
RESULTS = "results.jsonl"
METRICS = (  # (key in a results line, table heading)
    ("i2t_r5_x", "R@5 i->t (x random)"),
    ("t2i_r5_x", "R@5 t->i (x random)"),
    ("auc", "zero-shot AUC"),
    ("cot_ratio", "CoT mass/chance"),
)


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the repository root with its output in ``log``; seconds it took."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} (tail)\n{tail}")
    return time.time() - t0


# --------------------------------------------------------------------------- configs


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _variant_yaml(name: str) -> dict:
    path = CONFIG_DIR / f"ablation_{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"{path} missing; known ablations: {sorted(ABLATIONS)}")
    return read_config_tree(path)  # the extends chain (ablation_full.yaml -> demo64.yaml) merged


def config_diff(name: str) -> str:
    """The dotted keys in which ablation_<name>.yaml differs from ablation_full.yaml."""
    full, mine = _flatten(_variant_yaml("full")), _flatten(_variant_yaml(name))
    keys = sorted(k for k in set(full) | set(mine) if full.get(k) != mine.get(k) and k != "train.output")
    return ", ".join(f"{k}={mine.get(k)}" for k in keys)


QUERY_STD_KEY = "model.overrides.vision.evidence_query_std"
GROUNDING_KEY = "loss.weights.step_grounding"


def cell_config(name: str, args: argparse.Namespace) -> dict:
    """The variant's YAML tree with the bench's settings (the ``config.yaml`` a cell trains with)."""
    tree = _variant_yaml(name)
    full, mine = _flatten(_variant_yaml("full")), _flatten(tree)
    own = {k for k in (QUERY_STD_KEY, GROUNDING_KEY) if full.get(k) != mine.get(k)}  # keys the variant switches
    model_overrides = tree.setdefault("model", {}).setdefault("overrides", {})
    weights = tree.setdefault("loss", {}).setdefault("weights", {})
    if args.evidence_query_std is not None and QUERY_STD_KEY not in own:
        model_overrides["vision.evidence_query_std"] = args.evidence_query_std
    if args.step_grounding is not None and GROUNDING_KEY not in own:
        weights["step_grounding"] = args.step_grounding
    if not weights.get("step", 0.5):
        weights["step_grounding"] = 0.0  # no step loss: the whole step head is off
    if args.data_cases:
        tree.setdefault("data", {})["sources"] = {"ctrate": 1.0}  # the built data has no OmniAbnorm
    return tree


# --------------------------------------------------------------------------- data


def build_data(args: argparse.Namespace) -> Path:
    """OUT/data/shards from ``--data-cases`` synthetic CT-RATE volumes (reused when already built)."""
    root = Path(args.out) / "data"
    shards = root / "shards"
    if (shards / "index.json").is_file():
        print(f"[ablate] data: reusing {shards}", flush=True)
        return shards
    root.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-c", "from ctprep.cli import app; app()"]
    print(f"[ablate] data: {args.data_cases} synthetic CT-RATE volumes, wording {args.wording} ...", flush=True)
    run([*cli, "demo-data", "--out", str(root / "ctrate"), "--source", "ctrate", "--cases", str(args.data_cases),
         "--grid", "demo", "--seed", "0", "--wording", args.wording], root / "demo_data.log")
    run([*cli, "build-shards", "--src", str(root / "ctrate"), "--out", str(shards), "--config", "demo64", "--no-progress"],
        root / "build_shards.log")
    return shards


# --------------------------------------------------------------------------- cells


def _cell_id(row: dict) -> tuple[str, int]:
    return row["variant"], int(row["seed"])


def load_results(out: Path, steps: int, shards: str) -> dict[tuple[str, int], dict]:
    """Finished cells of this budget and data (later lines win)."""
    path = out / RESULTS
    rows: dict[tuple[str, int], dict] = {}
    if path.is_file():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:  # a line cut by a kill mid-write: skipped, the cell reruns
                print(f"[ablate] {path}:{n}: unreadable line skipped ({e})", flush=True)
                continue
            if row.get("steps") == steps and row.get("shards") == shards:
                rows[_cell_id(row)] = row
    return rows


def summarize_eval(result: dict) -> dict:
    """The figures of one cell from its ``eval.json``."""
    r = result["retrieval"]
    base = r["random_baseline"]["R@5"]
    cot = result.get("cot_alignment", {}).get("overall", {})
    ratio = lambda v: v / base if base else float("nan")  # noqa: E731
    return {
        "pool": r["n_images"],
        "random_r5": base,
        "i2t_r5": r["image_to_text"]["R@5"], "t2i_r5": r["text_to_image"]["R@5"],
        "i2t_r5_x": ratio(r["image_to_text"]["R@5"]), "t2i_r5_x": ratio(r["text_to_image"]["R@5"]),
        "auc": result["zero_shot"]["macro_auc"],
        "cot_ratio": cot.get("mean_ratio", float("nan")),
        "cot_steps": cot.get("steps", 0),
    }


def run_cell(name: str, seed: int, args: argparse.Namespace, shards: str) -> dict:
    """Train and evaluate one (variant, seed); reuses an ``eval.json`` a killed invocation left."""
    out = Path(args.out) / name / f"seed_{seed}"
    result_file = out / "eval" / "eval.json"
    marker = out / "cell.json"  # written last: a finished cell of this budget and data
    budget = {"steps": args.steps, "shards": shards}
    finished = json.loads(marker.read_text()) if marker.is_file() else {}
    if result_file.is_file() and {k: finished.get(k) for k in budget} == budget:
        print(f"[ablate] {name} seed {seed}: recording the finished {result_file}", flush=True)
        train_s = finished["train_s"]
    else:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (marker, result_file):
            stale.unlink(missing_ok=True)
        config = out / "config.yaml"
        config.write_text(yaml.safe_dump(cell_config(name, args), sort_keys=False))
        overrides = [f"train.steps={args.steps}", f"train.seed={seed}", f"data.seed={seed}",
                     "train.val_every=0", "train.ckpt_every=0", "train.progress_bar=false", *args.override]
        train_cmd = [sys.executable, "trainer/train.py", "--config", str(config), "--shards", shards,
                     "--output", str(out), *overrides]
        print(f"[ablate] {name} seed {seed}: training {args.steps} steps ...", flush=True)
        train_s = run(train_cmd, out / "train.log")
        eval_cmd = [sys.executable, "-m", "ctprep_train.eval", "--encoder", str(out / "encoder"), "--shards",
                    shards, "--split", args.split, "--out", str(out / "eval"), "--picture-cases", "1"]
        if args.source:
            eval_cmd += ["--source", args.source]
        if args.max_cases:
            eval_cmd += ["--max-cases", str(args.max_cases)]
        run(eval_cmd, out / "eval.log")
        marker.write_text(json.dumps({**budget, "train_s": train_s}))
    return {"variant": name, "seed": seed, "steps": args.steps, "shards": shards, "train_s": train_s,
            **summarize_eval(json.loads(result_file.read_text()))}


def append_result(out: Path, row: dict) -> None:
    with open(out / RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- table and plot


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for one value) of the finite values."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
    return m, sd


def _fmt(m: float, sd: float, digits: int) -> str:
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if math.isfinite(sd) else "")


def aggregate(rows: list[dict], names: list[str]) -> list[dict]:
    """Per variant (in ``names`` order): seeds, and mean / sd of every metric over them."""
    out = []
    for name in names:
        cells = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["seed"])
        if not cells:
            continue
        agg = {"variant": name, "seeds": [r["seed"] for r in cells], "pool": cells[0]["pool"],
               "random_r5": cells[0]["random_r5"], "train_s": mean_sd([r["train_s"] for r in cells])[0]}
        for key, _ in METRICS:
            agg[key] = mean_sd([r[key] for r in cells])
        out.append(agg)
    return out


def table(summary: list[dict], diffs: dict[str, str]) -> str:
    head = ("| variant | switched off | seeds | pool | random R@5 | "
            + " | ".join(h for _, h in METRICS) + " | train s (mean) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        cells = [_fmt(*s[key], 3 if key == "auc" else 2) for key, _ in METRICS]
        train_s = "n/a" if not math.isfinite(s["train_s"]) else f"{s['train_s']:.0f}"
        lines.append(f"| {s['variant']} | {diffs.get(s['variant']) or 'nothing (reference)'} | "
                     f"{','.join(map(str, s['seeds']))} | {s['pool']} | {100 * s['random_r5']:.1f}% | "
                     + " | ".join(cells) + f" | {train_s} |")
    return "\n".join(lines)


def plot(summary: list[dict], rows: list[dict], path: Path) -> None:
    """One panel per metric: a bar per variant (mean), the sd as an error bar, each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["variant"] for s in summary]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for ax, (key, heading) in zip(axes, METRICS):
        means = [s[key][0] for s in summary]
        sds = [s[key][1] if math.isfinite(s[key][1]) else 0.0 for s in summary]
        ax.bar(range(len(names)), means, yerr=sds, capsize=4, color="#8fb3d9", edgecolor="#2b5d8a")
        for i, name in enumerate(names):
            ys = [r[key] for r in rows if r["variant"] == name]
            ax.plot([i] * len(ys), ys, "o", color="#1b3a57", markersize=3)
        chance = 0.5 if key == "auc" else 1.0
        ax.axhline(chance, color="#c0392b", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(heading, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, rows: list[dict], names: list[str], args: argparse.Namespace, shards: str) -> str:
    summary = aggregate(rows, names)
    diffs = {n: config_diff(n) for n in names}
    text = table(summary, diffs)
    few = [s["variant"] for s in summary if len(s["seeds"]) < 3]
    extra = f" Every run also with: {' '.join(args.override)}." if args.override else ""
    full = _flatten(cell_config("full", args))
    note = f"\n\nFewer than 3 seeds (no spread to speak of): {', '.join(few)}." if few else ""
    (out / "ablation.md").write_text(
        f"Ablations: {args.steps} steps per run, shards {shards}, pool = split {args.split!r} source "
        f"{args.source!r}; loss.weights.step_grounding={full.get(GROUNDING_KEY, 0.0)} and "
        f"vision.evidence_query_std={full.get(QUERY_STD_KEY, 0.02)} in every variant that does not switch them "
        f"(grounding 0 where the step loss is off). Mean ± sd over seeds "
        f"(sample sd); R@5 as a multiple of the random R@5 of the same pool.{extra}\n\n{text}{note}\n\n"
        f"![ablation](ablation.png)\n")
    (out / "ablation.json").write_text(json.dumps({"cells": rows, "summary": summary}, indent=1))
    if summary:
        plot(summary, rows, out / "ablation.png")
    return text


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default=None, help="shards folder (e.g. demo/shards from make demo)")
    p.add_argument("--data-cases", type=int, default=0,
                   help="build OUT/data first: this many synthetic CT-RATE volumes (instead of --shards)")
    p.add_argument("--wording", default="default", help="report wording of --data-cases: default | anatomy")
    p.add_argument("--out", default="runs/ablate")
    p.add_argument("--steps", type=int, default=1600, help="optimizer steps per run (same for all; make demo's 1600 by default)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed = data.seed values per variant")
    p.add_argument("--split", default="valid")
    p.add_argument("--source", default="ctrate", help="evaluation pool source (default ctrate volumes)")
    p.add_argument("--step-grounding", type=float, default=None,
                   help="loss.weights.step_grounding of every variant that does not switch it (default: the YAML's)")
    p.add_argument("--evidence-query-std", type=float, default=None,
                   help="vision.evidence_query_std of every variant that does not switch it (default: the YAML's)")
    p.add_argument("--override", action="append", default=[],
                   help="extra trainer key=value for every run (e.g. data.batch_size=4 for a smoke run)")
    p.add_argument("--max-cases", type=int, default=None, help="cap on evaluated cases (smoke runs)")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(ABLATIONS))
    p.add_argument("--report-only", action="store_true", help="rewrite the table and plot from results.jsonl")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(ABLATIONS)
    for n in names:
        if n not in ABLATIONS:
            p.error(f"unknown ablation {n!r}; valid: {', '.join(ABLATIONS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds:
        p.error("--seeds names no seed")
    if args.wording not in ("default", "anatomy"):
        p.error(f"unknown --wording {args.wording!r}; valid: default, anatomy")
    if bool(args.shards) == bool(args.data_cases):
        p.error("give exactly one of --shards and --data-cases")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shards = str(args.shards) if args.shards else str(build_data(args) if not args.report_only else out / "data" / "shards")
    done = load_results(out, args.steps, shards)
    if not args.report_only:
        for name in names:
            for seed in seeds:
                if (name, seed) in done:
                    print(f"[ablate] {name} seed {seed}: done ({RESULTS})", flush=True)
                    continue
                row = run_cell(name, seed, args, shards)
                append_result(out, row)
                done[(name, seed)] = row
                write_report(out, list(done.values()), names, args, shards)
    rows = [r for r in done.values() if r["variant"] in names]
    print(write_report(out, rows, names, args, shards))
    return rows


if __name__ == "__main__":
    main()
