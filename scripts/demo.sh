#!/usr/bin/env bash
# `make demo`: synthetic data -> shards -> short CPU training -> evaluation.
set -euo pipefail
OUT=${1:-demo}
VPY=.venv/bin
mkdir -p "$OUT"
$VPY/ctprep demo-data --out "$OUT/ctrate" --source ctrate --cases 40 --grid demo --seed 0 --faults
