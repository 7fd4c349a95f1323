#!/usr/bin/env bash
# On the GPU machine, one call: the benchmark table (engine, fp16), gpt-fast-style compiled baseline beside it,
# and summarize.py on a 7B-shaped random checkpoint (engine fp16 vs Hugging Face fp16).
#   bash scripts/gpu_final.sh <carry_dir> <workdir> <out_dir>   (carry_dir: qwen.tiktoken, baseline script)
set -uo pipefail
C=$1; W=$2; OUT=$3
export PYTHONPATH=${PYTHONPATH:-$PWD}
mkdir -p "$W" "$OUT"
python3 examples/qwen/benchmark.py --model qwen-7b --batch_size 1,8,64 --input_output_len "128,128;1024,2;2048,128" \
    --runs 3 --json_output "$OUT/bench_final.json" 2>&1 | tail -12
(cd "$OUT" && COMPILE=1 BS=1,64 OUT="$OUT" timeout 240 python3 "$OLDPWD/$C/plain_cuda_graph_decode.py" 2>&1 | tail -3)
python3 -c "import sys, torch; from qwen_trtllm.checkpoint.random_checkpoint import write_random_checkpoint as w; \
w(sys.argv[1], 'qwen-7b', dtype=torch.float16, device='cuda', tokenizer_file=sys.argv[2])" "$W/hf" "$C/qwen.tiktoken"
python3 examples/qwen/build.py --force --hf_model_dir "$W/hf" --dtype float16 --max_batch_size 1 --max_input_len 1024 \
    --max_output_len 128 --output_dir "$W/fp16" >/dev/null
python3 examples/qwen/summarize.py --test_trt_llm --test_hf --hf_model_dir "$W/hf" --engine_dir "$W/fp16" \
    --data_type fp16 --max_ite 5 --batch_size 1 --output_len 100 --check_accuracy --tensorrt_llm_rouge1_threshold 15 \
    --no_progress 2>&1 | grep -v "^\[transformers\]"
