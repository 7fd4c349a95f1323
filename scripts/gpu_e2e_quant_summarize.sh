#!/usr/bin/env bash
# On the GPU machine: int8/int4 engines of a 7B-shaped random checkpoint against the fp16 engine, the unfused
# fp16 path against the fp32 reference, and summarize.py (engine fp16 vs Hugging Face fp16).
#   bash scripts/gpu_e2e_quant_summarize.sh <qwen.tiktoken> <workdir> <out_dir>
set -uo pipefail
TOK=$1; W=$2; OUT=$3
export PYTHONPATH=${PYTHONPATH:-$PWD}
mkdir -p "$W" "$OUT"
python3 -c "import sys, torch; from qwen_trtllm.checkpoint.random_checkpoint import write_random_checkpoint as w; \
w(sys.argv[1], 'qwen-7b', dtype=torch.float16, device='cuda', tokenizer_file=sys.argv[2])" "$W/hf" "$TOK"
B="python3 examples/qwen/build.py --force --hf_model_dir $W/hf --dtype float16 --max_batch_size 16 --max_input_len 1024 --max_output_len 128"
$B --output_dir "$W/fp16" >/dev/null
time $B --use_weight_only --weight_only_precision int8 --output_dir "$W/int8" >/dev/null
time $B --use_weight_only --weight_only_precision int4 --group_size 128 --output_dir "$W/int4" >/dev/null
du -sh "$W"/fp16 "$W"/int8 "$W"/int4
A="python3 examples/qwen/eval_accuracy.py --num_prompts 64 --steps 32"
$A --engine_dir "$W/int8" --reference_engine_dir "$W/fp16" --min_top1 0.97 --json_output "$OUT/acc_int8.json"
$A --engine_dir "$W/int4" --reference_engine_dir "$W/fp16" --min_top1 0.90 --json_output "$OUT/acc_int4.json"
$A --engine_dir "$W/fp16" --kernels torch --hf_model_dir "$W/hf" --min_top1 0.98 --json_output "$OUT/acc_unfused_fp32.json"
python3 examples/qwen/summarize.py --test_trt_llm --test_hf --hf_model_dir "$W/hf" --engine_dir "$W/fp16" \
    --data_type fp16 --max_ite 5 --batch_size 1 --output_len 100 --check_accuracy --tensorrt_llm_rouge1_threshold 15 \
    --no_progress 2>&1 | grep -v "^\[transformers\]"
