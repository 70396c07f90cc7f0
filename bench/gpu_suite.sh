#!/usr/bin/env bash
# GPU performance suite: one script, under 8 minutes on one H100/H200, no network.
# Writes OUT_DIR/gpu_suite.json and OUT_DIR/gpu_suite.md. CPU smoke mode: --device cpu.
#   bash bench/gpu_suite.sh [OUT_DIR] [extra args for bench/gpu_suite.py]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_out}; shift || true
export HF_HUB_OFFLINE=1 TIMM_FUSED_ATTN=0 PYTHONUNBUFFERED=1
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} ${PYTHON:-python3} bench/gpu_suite.py --out-dir "$out" "$@"
