#!/usr/bin/env bash
# GPU measurement runs, in stages, on a lent 2 x H200 machine (or any CUDA host).
#   bash tools/gpu_suite.sh STAGE [STAGE ...]      (results under ${OUT:-runs/gpu})
# Stages: setup kernels-test kernels-bench pool-bench calibrate dilated-bench corpus train-bench train-demo
#         infer-test decode-bench infer-profile infer-bench mixed-bench moe-train convert serving-test serving-bench
# `setup` installs the wheels that ../shared/tools/device-wheels.sh put in .whl/
# (megatron-core, deepspeed, pydantic) for an image that lacks them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
PY=${PY:-python3}
rc=0
stage() { echo "=== $1 ($(date -u +%H:%M:%S)) ==="; }
for s in "$@"; do
  case $s in
    setup)
      stage setup
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || rc=1
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.txt"
      $PY -c "import torch, megatron.core, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" ;;
    kernels-test)
      stage kernels-test
      timeout 150 $PY -m pytest tests/attention/kernels -q -m gpu -rs -x -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/kernels_test.txt" || rc=1 ;;
    kernels-bench)
      stage kernels-bench
      CUDA_VISIBLE_DEVICES=0 timeout 240 $PY tools/bench_local_attention.py --markdown "$OUT/bench_local_attention.md" 2>&1 | tail -40 || rc=1 ;;
    pool-bench)
      stage pool-bench
      timeout 400 torchrun --nproc_per_node 2 --master_port 29512 tools/bench_pool_attention.py --markdown "$OUT/bench_pool_attention.md" 2>&1 | tee "$OUT/pool_bench.log" | grep -v -i warn | tail -60 || rc=1 ;;
    calibrate)
      stage calibrate
      timeout 150 torchrun --nproc_per_node 2 --master_port 29511 tools/calibrate_pool.py --deepspeed_config configs/paper_dense_pool.json --output "$OUT/pool_calibration.json" 2>&1 | tee "$OUT/calibrate.log" | grep -v -i warn | tail -40 || rc=1 ;;
    dilated-bench)
      stage dilated-bench
      CUDA_VISIBLE_DEVICES=0 timeout 480 $PY tools/bench_dilated.py --markdown "$OUT/bench_dilated.md" 2>&1 | tee "$OUT/dilated_bench.log" | grep -v -i warn | tail -60 || rc=1 ;;
    corpus)
      stage corpus
      $PY tools/preprocess_data.py --output-prefix runs/data/pystdlib --max-files 400 \
        --input "$($PY -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" 2>&1 | grep -v -i warn | tail -12 || rc=1 ;;
    train-bench)
      stage train-bench
      timeout 590 $PY tools/bench_training.py --deepspeed_config configs/paper_dense_pool.json \
        --data-path runs/data/pystdlib --seq-lengths ${TRAIN_SEQS:-16384 65536} --train-iters ${TRAIN_ITERS:-5} --warmup 2 \
        --timeout 240 --markdown "$OUT/bench_training.md" --log-dir "$OUT/train_logs" 2>&1 | tee "$OUT/train_bench.log" || rc=1 ;;
    train-demo)
      stage train-demo
      timeout 400 bash tools/gpu_train_demo.sh ${TRAIN_DEMO_ITERS:-80} || rc=1 ;;
    infer-test)
      stage infer-test
      timeout 240 $PY -m pytest tests/inference/test_generate_gpu.py tests/attention/pool/test_decode.py -q -rs -x -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/infer_test.txt" || rc=1 ;;
    decode-bench)
      stage decode-bench
      CUDA_VISIBLE_DEVICES=0 timeout 240 $PY tools/bench_decode_attention.py ${DECODE_ARGS:---backends sdpa_cudnn sdpa_flash sdpa_efficient flex --splits 1 auto 4 16} --markdown "$OUT/bench_decode_attention.md" 2>&1 | grep -v -i warn | tail -60 || rc=1 ;;
    infer-profile)
      stage infer-profile
      CUDA_VISIBLE_DEVICES=0 timeout 200 bash tools/profile_inference.sh configs/paper_dense_pool.json ${PROFILE_LEN:-8192} 64 40 2>&1 | tee "$OUT/infer_profile.txt" | grep -v -i warn | tail -45 || rc=1 ;;
    infer-bench)
      stage infer-bench
      timeout 590 $PY tools/bench_inference.py --deepspeed_config configs/paper_dense_pool.json \
        --lengths ${INFER_LENGTHS:-512 2048 8192 16384 32768 65536 131072} --batch-sizes ${INFER_BATCHES:-1 4} \
        --new-tokens ${INFER_NEW:-32} --timeout ${INFER_TIMEOUT:-200} --strategies ${INFER_STRATEGIES:-single tp2 pp2 pool} \
        --calibration configs/calibration/h200x2_paper_dense.json --plot "$OUT/bench_inference.png" \
        --output "$OUT/bench_inference.json" --log-dir "$OUT/infer_logs" 2>&1 | tee "$OUT/infer_bench.log" || rc=1 ;;
    mixed-bench)
      stage mixed-bench
      timeout 590 $PY tools/bench_mixed_workload.py --deepspeed_config configs/paper_dense_pool.json \
        --requests ${MIXED_REQUESTS:-40} --strategies ${MIXED_STRATEGIES:-single tp2 pool} --timeout 200 \
        --markdown "$OUT/bench_mixed.md" --output "$OUT/bench_mixed.json" --log-dir "$OUT/mixed_logs" 2>&1 | grep -v -i warn | tail -12 || rc=1 ;;
    moe-train)
      stage moe-train
      timeout 650 bash tools/gpu_moe_train.sh ${MOE_TRAIN_ITERS:-30} ${MOE_TRAIN_SEQ:-16384} || rc=1 ;;
    convert)
      stage convert
      timeout 1500 bash tools/gpu_convert.sh ${CONVERT_SEQ:-1024} || rc=1 ;;
    serving-test)
      stage serving-test
      CUDA_VISIBLE_DEVICES=0 timeout 300 $PY -m pytest tests/inference/test_engine_gpu.py tests/inference/test_rope_append.py tests/attention/kernels/test_slots.py -q -rs -x -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/serving_test.txt" || rc=1 ;;
    serving-bench)
      stage serving-bench
      CUDA_VISIBLE_DEVICES=0 timeout 590 $PY tools/bench_serving.py --deepspeed_config configs/paper_dense_pool.json \
        ${SERVING_ARGS:-} --markdown "$OUT/bench_serving.md" --output "$OUT/bench_serving.json" --plot "$OUT/bench_serving.svg" 2>&1 | grep -v -i warn | tail -25 || rc=1 ;;
    *) echo "unknown stage $s"; rc=2 ;;
  esac
done
exit $rc
