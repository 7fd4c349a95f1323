#!/usr/bin/env bash
# The seed's workflow on a 7B-shaped random checkpoint on the GPU machine, then accuracy against the reference.
#   bash scripts/gpu_e2e_7b.sh <qwen.tiktoken> <workdir> <out_dir>
# Writes the checkpoint (fp16, sharded safetensors) to local disk, converts, builds fp16, chats, then
# teacher-forced accuracy: fused fp16 engine vs the fp32 reference and vs the unfused (plain PyTorch) fp16 path.
set -euo pipefail
TOK=$1; W=$2; OUT=$3
export PYTHONPATH=${PYTHONPATH:-$PWD}
mkdir -p "$W" "$OUT"
python3 - "$TOK" "$W" <<'PY'
import sys, time, torch
from qwen_trtllm.checkpoint.random_checkpoint import write_random_checkpoint
t = time.perf_counter()
write_random_checkpoint(f"{sys.argv[2]}/hf", "qwen-7b", dtype=torch.float16, device="cuda", tokenizer_file=sys.argv[1])
print(f"random 7B checkpoint written in {time.perf_counter() - t:.1f} s")
PY
time python3 examples/qwen/hf_qwen_convert.py -i "$W/hf" -o "$W/c-model" --tensor-parallelism 1 --storage-type float16 -p 4
time python3 examples/qwen/build.py --force --model_dir "$W/c-model/1-gpu" --use_gpt_attention_plugin float16 --dtype float16 --use_layernorm_plugin float16 --use_gemm_plugin float16 --max_batch_size 16 --max_input_len 1024 --max_output_len 128 --output_dir "$W/engine"
rm -rf "$W/c-model"
python3 examples/qwen/run.py --engine_dir "$W/engine" --max_output_len 64 --top_k 1
python3 examples/qwen/eval_accuracy.py --engine_dir "$W/engine" --hf_model_dir "$W/hf" --reference_dtype float32 --num_prompts 64 --steps 32 --min_top1 0.98 --json_output "$OUT/acc_fp16_vs_fp32.json" || true
python3 examples/qwen/eval_accuracy.py --engine_dir "$W/engine" --reference_engine_dir "$W/engine" --reference_kernels torch --num_prompts 64 --steps 32 --min_top1 0.995 --json_output "$OUT/acc_fused_vs_unfused.json" || true
