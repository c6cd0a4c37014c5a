#!/usr/bin/env bash
# Issue 17's GPU suite in one command, for the device tool's GPU machine (see docs/gpu-suite.md):
#   bash scripts/gpu_suite.sh [--budget_s 480] [--sections tuning,kernels,decode] [--dry_run]
# Tables go to $OUT (the device tool's return folder), else /tmp/gpu_suite_out. Wheels: .gpu_wheels/ (carried).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
exec "$PY" scripts/gpu_suite.py --out "${OUT:-/tmp/gpu_suite_out}" "$@"
