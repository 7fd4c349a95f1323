#!/usr/bin/env bash
# On the GPU machine (issue 17): FP8 weights and the quantised KV cache, checked then timed.
#   bash scripts/gpu_fp8_check.sh
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
python3 -m pytest -q tests/test_fp8.py tests/test_kv_cache_quant.py tests/test_weight_only.py 2>&1 | tail -3
python3 examples/qwen/benchmark.py --model qwen-7b --dtype float16 --batch_size 1,16,64 --input_output_len "128,128" \
    --runs 2 --quant int8,fp8 2>&1 | tail -12
