#!/usr/bin/env bash
# One-command GPU check (environment, encoder samples/s + MFU + memory per micro-batch, reference
# attention memory gap, a 50-step DeepSpeed ZeRO-2 run). Prints one table. Target: < 8 min, 1 x H200.
#
#   bash bench/gpu_check.sh                      # on a GPU machine
#   bash bench/gpu_check.sh --dry-run            # on CPU: tiny sizes, checks the wiring only
#   bash bench/gpu_check.sh --json gpu_check.json --sections env,encoder
#
# Extra arguments go to bench/gpu_check.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The script keeps its own budget (--budget-s, default 420 s) and skips what does not fit;
# this outer limit only stops a hang (e.g. a stuck NCCL init) from running forever.
exec timeout --signal=INT --kill-after=30 "${GPU_CHECK_TIMEOUT:-475}" "$PY" bench/gpu_check.py "$@"
