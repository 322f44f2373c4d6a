#!/usr/bin/env bash
# The paper MoE model trained colocated on ONE GPU through launch/train.py (DeepSpeed bf16 ZeRO-1),
# side by side with the paper dense model of the same FLOPs per token, same data and length.
#   bash tools/gpu_moe_train.sh [ITERS] [SEQ]     (after: bash tools/gpu_suite.sh setup corpus)
# The experts' FFN is 8192 (16384 does not fit one H200 with the optimizer: docs/benchmarks.md),
# so top-2 of them cost what the dense model's FFN of 16384 costs. Learning rate 1e-4 with 20 warm-up
# steps for both (at the JSON's 3e-4 / 10 the MoE router collapses onto 2 experts within 6 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${1:-30}
SEQ=${2:-16384}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
tmp=$(mktemp -d)
python3 - "$tmp" <<'PY'
import json, os, sys
tmp = sys.argv[1]
yaml = open("configs/models/paper_moe.yaml").read().replace(
    "  num_moe_experts: 16\n", "  num_moe_experts: 16\n  moe_ffn_hidden_size: 8192\n")
open(os.path.join(tmp, "paper_moe_ffn8k.yaml"), "w").write(yaml)
moe = json.load(open("configs/paper_moe_ma.json"))
moe["fapool"]["model_yaml"] = os.path.join(tmp, "paper_moe_ffn8k.yaml")
moe["fapool"]["ma_separation"]["enabled"] = False  # colocated: all 16 experts on the one GPU
dense = json.load(open("configs/paper_dense_pool.json"))
dense["fapool"]["model_yaml"] = os.path.abspath("configs/models/paper_dense.yaml")
dense["fapool"]["attention_pool"] = {"enabled": False}
for name, d in (("moe", moe), ("dense", dense)):
    d["optimizer"]["params"]["lr"] = 1e-4
    d["scheduler"]["params"]["warmup_num_steps"] = 20
    json.dump(d, open(os.path.join(tmp, name + ".json"), "w"))
PY
for model in moe dense; do
  echo "=== $model ($(date -u +%H:%M:%S)) ==="
  timeout 300 torchrun --nproc_per_node 1 --master_port 29541 launch/train.py --deepspeed_config "$tmp/$model.json" \
    --data-path runs/data/pystdlib --data-mode packed --seq-length "$SEQ" --train-iters "$ITERS" \
    --log-interval 1 --metrics-file "$OUT/train_${model}_metrics.jsonl" 2>&1 | grep -v -i warn \
    | tee "$OUT/train_${model}.log" | grep -E "iteration +[0-9]+/|summary|tokens/s|error|Error" | tail -8
done
