#!/usr/bin/env bash
# The paper dense model (bf16, DeepSpeed ZeRO-1) through the checkpoint converter on ONE GPU machine:
# 2 iterations of launch/train.py on the GPU, then export-hf and import-hf back (the conversions run on
# CPU worker processes; the verification's probes on the GPU: our bf16 model and HF's), and a verify of
# the original against the round trip. Every command's time, peak host memory and verification table
# land in $OUT/convert_*.log.
#   bash tools/gpu_convert.sh [SEQ]      (after: bash tools/gpu_suite.sh setup corpus)
set -euo pipefail
cd "$(dirname "$0")/.."
SEQ=${1:-1024}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
work=$(mktemp -d)
python3 - "$work" <<'PY'
import json, os, sys
d = json.load(open("configs/paper_dense_pool.json"))
d["fapool"]["model_yaml"] = os.path.abspath("configs/models/paper_dense.yaml")
d["fapool"]["attention_pool"] = {"enabled": False}
json.dump(d, open(os.path.join(sys.argv[1], "paper_dense.json"), "w"))
PY
cfg=$work/paper_dense.json
echo "=== train 2 iterations, bf16 ZeRO-1, 1 GPU ($(date -u +%H:%M:%S)) ==="
timeout 300 torchrun --nproc_per_node 1 --master_port 29543 launch/train.py --deepspeed_config "$cfg" \
  --data-path runs/data/pystdlib --data-mode packed --seq-length "$SEQ" --train-iters 2 --log-interval 1 \
  --save "$work/ckpt" 2>&1 | grep -v -i warn | grep -E "iteration +[0-9]+/|saved|error|Error" | tail -4
run() {  # name, then the converter's arguments
  local name=$1; shift
  echo "=== $name ($(date -u +%H:%M:%S)) ==="
  timeout 900 python3 tools/convert_checkpoint.py "$@" \
    2>&1 | grep -v -i warn | tee "$OUT/convert_$name.log" | grep -v "^decoder\.\|^embedding\.\|^output_layer" | tail -14
}
run inspect inspect "$work/ckpt" --no-tensors
run export_hf export-hf --load "$work/ckpt" --save "$work/hf" --probe-device cuda
ls -la "$work/hf" | tee -a "$OUT/convert_export_hf.log"
run import_hf import-hf --hf "$work/hf" --deepspeed_config "$cfg" --save "$work/back" --probe-device cuda
run verify_round_trip verify "$work/ckpt" "$work/back" --probe-tokens ""   # tensors (the probes ran above)
rm -rf "$work"
