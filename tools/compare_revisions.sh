#!/usr/bin/env bash
# Before/after check of a change on one GPU, in one run: the same benchmarks, first in a
# checkout of the old revision, then in this tree, on the same machine.
#
#   git archive <old-rev> | (mkdir -p base && tar -x -C base)     # untracked copy that travels
#   OUT=runs/regress bash tools/compare_revisions.sh base local   # kernels: bench_local_attention.py
#   OUT=runs/regress bash tools/compare_revisions.sh base infer   # one-GPU launch/infer.py --sweep $SWEEP
#
# ROUNDS=N alternates before/after N times (host-bound decode steps vary from call to call:
# alternating shows whether a difference is the code or the machine).
# Results: $OUT/{local,infer}_{before,after}.{md,log,json}. Needs megatron-core, deepspeed and
# pydantic importable (tools/gpu_suite.sh setup installs them into /tmp/site).
set -uo pipefail
BASE=$(cd "$1" && pwd); shift
here=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$here/runs/regress}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
SWEEP=${SWEEP:-8192x1 131040x1}
ROUNDS=${ROUNDS:-1}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 CUDA_VISIBLE_DEVICES=0
rc=0

# the paper dense model on one GPU (pool off), model YAML path made absolute for both trees
cfg=$OUT/paper_dense_one_gpu.json
$PY - "$here/configs/paper_dense_pool.json" "$cfg" <<'EOF'
import json, os, sys
src, dst = sys.argv[1:]
d = json.load(open(src))
d["fapool"]["attention_pool"]["enabled"] = False
d["fapool"]["model_yaml"] = os.path.join(os.path.dirname(os.path.abspath(src)), d["fapool"]["model_yaml"])
json.dump(d, open(dst, "w"), indent=1)
EOF

for what in "$@"; do
  for run in $(seq "$ROUNDS"); do for side in before after; do
    dir=$([ "$side" = before ] && echo "$BASE" || echo "$here")
    [ "$ROUNDS" -gt 1 ] && tag=${side}_$run || tag=$side
    echo "=== $what $tag ($dir, $(date -u +%H:%M:%S)) ==="
    case $what in
      local)
        (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout 280 $PY tools/bench_local_attention.py \
          --markdown "$OUT/local_$tag.md" > "$OUT/local_$tag.log" 2>&1) || rc=1
        grep -E "^\| *(auto|sdpa_cudnn|sdpa_flash)" "$OUT/local_$tag.md" | head -12 ;;
      infer)
        (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout 280 torchrun --nproc_per_node 1 --master_port 29611 \
          launch/infer.py --deepspeed_config "$cfg" --random-weights --sweep $SWEEP --max-new-tokens 32 \
          --warmup --metrics-json "$OUT/infer_$tag.json" > "$OUT/infer_$tag.log" 2>&1) || rc=1
        grep -E "workload|requests, mean TTFT|TPS" "$OUT/infer_$tag.log" | head -12 ;;
      *) echo "unknown benchmark $what (local, infer)"; rc=2 ;;
    esac
  done; done
done
exit $rc
