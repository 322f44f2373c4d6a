#!/usr/bin/env bash
# Where the host time of inference goes: launch/infer.py on one GPU (no pool) with
# --profile-out (cProfile of the timed pass), then the functions with the most own
# time. Diagnostic, not a benchmark.
#   bash tools/profile_inference.sh [CONFIG] [PROMPT_LEN] [NEW_TOKENS] [TOP]
# The config's model runs on 1 GPU (TP 1, PP 1, pool off), random weights, warm-up pass first.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/paper_dense_pool.json}
LEN=${2:-8192}
NEW=${3:-128}
TOP=${4:-30}
PY=${PY:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
single=$(PYTHONPATH="tools${PYTHONPATH:+:$PYTHONPATH}" $PY -c "
import sys; from _strategies import STRATEGIES, write_strategy_config
print(write_strategy_config(sys.argv[1], STRATEGIES['single'], sys.argv[2], 'single'))" "$CONFIG" "$WORK")
torchrun --nproc_per_node 1 --master_port 29519 launch/infer.py --profile-out "$WORK/prof" \
  --deepspeed_config "$single" --random-weights --prompt-lengths "$LEN" --max-new-tokens "$NEW" --warmup \
  2>&1 | grep -E "TPOT|TPS" || true
$PY -c "
import pstats, sys
pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(int(sys.argv[2]))" "$WORK/prof" "$TOP" | tail -n +8
