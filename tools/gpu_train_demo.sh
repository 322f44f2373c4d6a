#!/usr/bin/env bash
# The paper's dense model trained on real text with 1 base + 1 pool GPU, documents of
# mixed lengths (short ones stay on the base GPU, long ones use the pool).
#   bash tools/gpu_train_demo.sh [ITERS]     (after: bash tools/gpu_suite.sh setup corpus)
# Learning rate 1e-4 with 20 warm-up steps (a variant of configs/paper_dense_pool.json).
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${1:-80}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
cfg=$(mktemp --suffix .json)
python3 - "$cfg" <<'PY'
import json, os, sys
d = json.load(open("configs/paper_dense_pool.json"))
d["fapool"]["model_yaml"] = os.path.abspath("configs/models/paper_dense.yaml")
d["optimizer"]["params"]["lr"] = 1e-4
d["scheduler"]["params"]["warmup_num_steps"] = 20
json.dump(d, open(sys.argv[1], "w"))
PY
torchrun --nproc_per_node 2 --master_port 29533 launch/train.py --deepspeed_config "$cfg" \
  --data-path runs/data/pystdlib --data-mode documents --seq-length 16384 --train-iters "$ITERS" \
  --log-interval 10 --metrics-file "$OUT/train_demo_metrics.jsonl" 2>&1 | grep -v -i warn | tee "$OUT/train_demo.log" | grep -E "iteration|summary|^[a-z ]{4,16}  |served"
