#!/usr/bin/env bash
# On the GPU machine after a kernel change: GPU kernel tests, the benchmark rows that matter, a profile, and the
# fused fp16 engine against the fp32 reference on a 7B-shaped checkpoint.
#   bash scripts/gpu_recheck.sh <qwen.tiktoken> <workdir> <out_dir>
set -uo pipefail
TOK=$1; W=$2; OUT=$3
export PYTHONPATH=${PYTHONPATH:-$PWD}
mkdir -p "$W" "$OUT"
timeout 150 python3 -m pytest -q -x tests/test_gemv.py tests/test_kernels.py tests/test_fused_path.py 2>&1 | tail -2
python3 examples/qwen/benchmark.py --model qwen-7b --batch_size 1,64 --input_output_len "128,128;2048,128" \
    --runs 3 --json_output "$OUT/bench_recheck.json" 2>&1 | tail -6
python3 scripts/profile_decode.py --steps 32 2>&1 | grep -E "Name|_kernel|nvjet" | head -12 | cut -c1-60,120-175
python3 -c "import sys, torch; from qwen_trtllm.checkpoint.random_checkpoint import write_random_checkpoint as w; \
w(sys.argv[1], 'qwen-7b', dtype=torch.float16, device='cuda', tokenizer_file=sys.argv[2])" "$W/hf" "$TOK"
python3 examples/qwen/build.py --force --hf_model_dir "$W/hf" --dtype float16 --max_batch_size 16 --max_input_len 256 \
    --max_output_len 64 --output_dir "$W/fp16" >/dev/null
python3 examples/qwen/eval_accuracy.py --engine_dir "$W/fp16" --hf_model_dir "$W/hf" --num_prompts 64 --steps 32 \
    --min_top1 0.98 --json_output "$OUT/acc_recheck.json"
