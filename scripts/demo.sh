#!/usr/bin/env bash
# `make demo`: synthetic data -> shards -> short CPU training -> evaluation -> learning check.
#
#   bash scripts/demo.sh [OUT]            (default OUT=demo; everything is written under it)
#
# Knobs (environment): DEMO_CASES (CT-RATE volumes, default 2000: ~20% land in the held-out
# `valid` split: a pool of ~390 volumes / ~230 distinct reports), DEMO_STEPS (optimizer steps),
# DEMO_BATCH (samples per step), DEMO_THREADS (torch threads of the one training process),
# DEMO_SEED (train.seed = data.seed: weight init and data order; the data set is always seed 0).
# The last step checks that image->text and text->image R@5 on the held-out split are both at
# least 3x the random baseline for the same pool, prints the verdict with the figures and exits 1
# on a miss (DEMO_REQUIRE_LEARNING=0: report only, for runs too small to learn). Measured figures:
# docs/demo.md and docs/experiments.md.
set -euo pipefail
OUT=${1:-demo}
VPY=.venv/bin
CASES=${DEMO_CASES:-2000}
STEPS=${DEMO_STEPS:-1600}
BATCH=${DEMO_BATCH:-16}
SEED=${DEMO_SEED:-0}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
THREADS=${DEMO_THREADS:-2}
export OMP_NUM_THREADS=$THREADS
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# ~2.7 MB on disk per CT-RATE case (volume, masks, zarr, shards) + the run: 2,000 cases ~ 6 GB.
bash scripts/check_disk.sh "$OUT" $(( CASES * 3 + 1000 )) "make demo with $CASES cases"
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - t0 ))s] $*"; }

stamp "1/5 synthetic data: $CASES CT-RATE volumes (with broken cases) + 2 OmniAbnorm batches"
$VPY/ctprep demo-data --out "$OUT/ctrate" --source ctrate --cases "$CASES" --grid demo --seed 0 --faults
$VPY/ctprep demo-data --out "$OUT/omniabnorm/batch1" --source omniabnorm --cases 12 --seed 1
$VPY/ctprep demo-data --out "$OUT/omniabnorm/batch2" --source omniabnorm --cases 12 --seed 2

stamp "2/5 build shards on the demo64 grid, 32 x 64 x 64 (broken cases are quarantined, the rest go on)"
$VPY/ctprep build-shards --src "$OUT/ctrate" --src "$OUT/omniabnorm/batch1" --src "$OUT/omniabnorm/batch2" \
    --out "$OUT/shards" --config demo64 --no-progress

stamp "3/5 train: tiny model, $STEPS steps x $BATCH samples on CPU"
# Training settings: configs/train/demo64.yaml (also the base of the ablations and the demo sweep);
# here only steps, batch, threads and seed. Why each setting: docs/demo.md#settings.
$VPY/python trainer/train.py --config configs/train/demo64.yaml --shards "$OUT/shards" --output "$OUT/run" \
    train.steps="$STEPS" data.batch_size="$BATCH" train.cpu_threads="$THREADS" \
    train.seed="$SEED" data.seed="$SEED" \
    train.val_every=$((STEPS / 2)) train.ckpt_every=$((STEPS / 2)) train.progress_bar=false

stamp "4/5 evaluate on the held-out CT-RATE volumes"
$VPY/python -m ctprep_train.eval --encoder "$OUT/run/encoder" --shards "$OUT/shards" --split valid \
    --source ctrate --out "$OUT/run/eval"

stamp "5/5 learning check"
$VPY/python - "$OUT/run/eval/eval.json" "${DEMO_REQUIRE_LEARNING:-1}" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["retrieval"]
base = r["random_baseline"]["R@5"]
i2t, t2i = r["image_to_text"]["R@5"], r["text_to_image"]["R@5"]
print(f"held-out pool: {r['n_images']} volumes, {r['n_unique_texts']} distinct reports")
print(f"R@5 image->text {i2t:.3f} ({i2t / base:.1f}x random), text->image {t2i:.3f} ({t2i / base:.1f}x random); "
      f"random R@5 {base:.3f}")
ok = i2t >= 3 * base and t2i >= 3 * base
print("the demo learns: R@5 >= 3x random both ways" if ok else "NOT LEARNED: R@5 below 3x random")
sys.exit(0 if ok or sys.argv[2] != "1" else 1)
EOF
stamp "done: report at $OUT/run/eval/report.md"
