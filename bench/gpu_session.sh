#!/usr/bin/env bash
# The one prepared GPU run (about 7-8 minutes on one H100/H200, no network): the CUDA tests of
# the capture-safe iteration and of train.cuda_graph (graph replay equal to eager execution,
# no sync under torch.cuda.set_sync_debug_mode("error"), the fused BatchNorm JVP on CUDA),
# then the GPU suite (eager and graph rows, profiler summary) into OUT_DIR.
#   bash bench/gpu_session.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_out}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
${PYTHON:-python3} -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/device.txt"
timeout 150 ${PYTHON:-python3} -m pytest -q -x tests/test_cuda_graph.py tests/test_forward_mode.py \
    -k "cuda or graph_replay or never_syncs or cuda_graph_matches" -p no:cacheprovider 2>&1 | tail -25 | tee "$out/cuda_tests.txt"
echo "cuda tests exit ${PIPESTATUS[0]}" | tee -a "$out/cuda_tests.txt"
bash bench/gpu_suite.sh "$out" --budget-s 290
