#!/usr/bin/env bash
# On the GPU machine: bash scripts/gpu_ifb.sh check|bench|serve <out_dir>
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
MODE=$1; OUT=$2; mkdir -p "$OUT"
if [ "$MODE" = check ]; then
  python3 -m pytest -q -x tests/test_kernels.py 2>&1 | tail -5
  python3 scripts/gpu_ifb_check.py qwen-7b 2>&1 | tee "$OUT/check.log" | tail -5
  python3 examples/qwen/benchmark.py --model qwen-7b --batch_size 1,64 --input_output_len "128,128" --runs 2 \
      --json_output "$OUT/bench_static.json" 2>&1 | tail -5
  python3 examples/qwen/benchmark_serving.py --num_requests 256 --dataset 128,128 2>&1 | tail -3
fi
if [ "$MODE" = serve ]; then
  python3 examples/qwen/benchmark_serving.py --num_requests 2048 --dataset 128,128 --max_batch_size 512 \
      --json_output "$OUT/load_2048.json" 2>&1 | tail -3
  python3 examples/qwen/benchmark_serving.py --num_requests 1000 --dataset chat --max_batch_size 512 --compare_hf \
      --json_output "$OUT/load_chat.json" 2>&1 | grep -v "^\[transformers\]" | tail -5
  for T in 256 512; do
    python3 examples/qwen/benchmark_serving.py --interference --num_scheduler_steps 1 --max_num_tokens $T \
        --max_batch_size 128 --json_output "$OUT/interference_$T.json" 2>&1 | tail -14
  done
fi
if [ "$MODE" = final ]; then
  python3 -m pytest -q -x tests/test_runtime.py tests/test_kernels.py 2>&1 | tail -2
  python3 examples/qwen/benchmark.py --model qwen-7b --batch_size 1,64 --input_output_len "128,128" --runs 2 \
      --json_output "$OUT/bench_static.json" 2>&1 | tail -3
  python3 examples/qwen/benchmark_serving.py --interference --num_scheduler_steps 1 --max_num_tokens 256 \
      --max_batch_size 128 --json_output "$OUT/interference_256.json" 2>&1 | tail -12
  python3 examples/qwen/benchmark_serving.py --num_requests 2048 --dataset 128,128 --max_batch_size 512 \
      --json_output "$OUT/load_2048.json" 2>&1 | tail -1
fi
