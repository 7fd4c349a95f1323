#!/usr/bin/env bash
# On the GPU machine, one call: GPU tests of the kernels and engines (PDL on), the chained-matmul race check,
# then benchmark.py at batch 1 and 16, fp16 / int8 / int4, with PDL off and on.
#   bash scripts/gpu_pdl_e2e.sh <out_dir>
set -uo pipefail
OUT=$1
for w in .whl/*.whl; do python3 -m zipfile -e "$w" /tmp/site; done  # pure-Python wheels, no pip there
export PYTHONPATH=$PWD:/tmp/site
mkdir -p "$OUT"
python3 -m pytest -q -x tests/test_fused_path.py tests/test_kernels.py tests/test_weight_only.py tests/test_gemv.py \
    tests/test_quantized_engine.py tests/test_engine.py > "$OUT/pytest.txt" 2>&1; tail -3 "$OUT/pytest.txt"
python3 scripts/gpu_quant_bench.py --layers 32 --ms --impls int8 int4 > "$OUT/chain.txt" 2>&1; tail -14 "$OUT/chain.txt"
for pdl in 0 1; do
    QWEN_TRTLLM_PDL=$pdl python3 examples/qwen/benchmark.py --model qwen-7b --batch_size 1,16 \
        --input_output_len "128,128" --quant int8,int4 --runs 3 --json_output "$OUT/bench_pdl$pdl.json" \
        > "$OUT/bench_pdl$pdl.txt" 2>&1
    echo "PDL=$pdl"; tail -9 "$OUT/bench_pdl$pdl.txt"
done
