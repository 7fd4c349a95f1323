export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pytest -q tests/test_kv_cache_quant.py 2>&1 | tail -2
for KV in auto int8 fp8; do
  timeout 100 python3 examples/qwen/benchmark_serving.py --num_requests 2048 --dataset 128,128 --max_batch_size 512 --kv_cache_dtype $KV 2>&1 | grep -E "^engine|KV cache" | sed "s/^/$KV: /"
done
