#!/usr/bin/env bash
# Issue 13 on the GPU machine: serve.py under the HTTP load generator at several request rates, then the same
# workloads in-process, and the HTTP overhead table (docs/PERF.md, "Serving over HTTP").
#   bash scripts/gpu_serve_bench.sh OUT_DIR
# 1. serve.py --model qwen-7b (random fp16 weights made on the GPU, warmed up, CUDA graphs captured) in the
#    background; wait for /health.
# 2. benchmark_serving.py --base_url: 64 warm-up requests, then for each rate the chat mix (--seed) as streaming
#    /v1/completions (token-id prompts, greedy, ignore_eos) -> OUT_DIR/http.json. Then SIGTERM the server.
# 3. benchmark_serving.py in-process: the same engine settings, rates, workloads -> OUT_DIR/inprocess.json.
# 4. The table: rate | HTTP and in-process output tok/s, overhead % | TTFT p50/p99 | ITL p50/p99 -> overhead.txt.
# Both runs use the same --num_scheduler_steps (STEPS) and --max_batch_size (BATCH); the server logs at warning
# level (no access-log line per request). Settings (environment; the defaults are the H200 run's):
#   MODEL_ARGS="--model qwen-7b --dtype float16"  (or "--engine_dir DIR": any engine, also on a CPU as a dry run)
#   RATES="4:100,8:200,16:320,32:400,inf:400"     (RATE[:N requests]; ~25 s per finite rate)
#   DATASET=chat  SEED=0  STEPS=1  BATCH=256  PORT=8123  HEALTH_TIMEOUT=240 (s)  PHASE_TIMEOUT=250 (s per load run)
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_serve_bench.sh OUT_DIR}
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
MODEL_ARGS=${MODEL_ARGS:---model qwen-7b --dtype float16}
RATES=${RATES:-4:100,8:200,16:320,32:400,inf:400}
DATASET=${DATASET:-chat}
SEED=${SEED:-0}
STEPS=${STEPS:-1}
BATCH=${BATCH:-256}
PORT=${PORT:-8123}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-240}
PHASE_TIMEOUT=${PHASE_TIMEOUT:-250}
mkdir -p "$OUT"
read -r -a MODEL <<< "$MODEL_ARGS"
URL=http://127.0.0.1:$PORT
SERVER_PID=
T0=$SECONDS
say() { echo "[$((SECONDS - T0)) s] $*"; }

stop_server() {  # SIGTERM (drains, exits 0), SIGKILL after 60 s
  [ -n "$SERVER_PID" ] || return 0
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    kill -0 "$SERVER_PID" 2>/dev/null && { echo "the server ignored SIGTERM: SIGKILL"; kill -KILL "$SERVER_PID"; }
  fi
  wait "$SERVER_PID" 2>/dev/null
  local rc=$?
  SERVER_PID=
  return $rc
}
trap stop_server EXIT
trap 'exit 130' INT TERM

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
say "settings: MODEL_ARGS='$MODEL_ARGS' RATES=$RATES DATASET=$DATASET SEED=$SEED STEPS=$STEPS BATCH=$BATCH"

# 1. the server
python3 examples/qwen/serve.py "${MODEL[@]}" --host 127.0.0.1 --port "$PORT" --max_batch_size "$BATCH" \
    --num_scheduler_steps "$STEPS" --log_level warning > "$OUT/server.log" 2>&1 &
SERVER_PID=$!
until python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$URL/health" \
    2>/dev/null; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    wait "$SERVER_PID"; echo "the server exited ($?) before /health answered; its log:"; tail -30 "$OUT/server.log"
    SERVER_PID=; exit 1
  fi
  if [ $((SECONDS - T0)) -ge "$HEALTH_TIMEOUT" ]; then
    echo "no /health after $HEALTH_TIMEOUT s; the server's log:"; tail -30 "$OUT/server.log"; exit 1
  fi
  sleep 2
done
say "server up"; grep -E "KV cache|random|serving" "$OUT/server.log"

# 2. the HTTP load
timeout "$PHASE_TIMEOUT" python3 examples/qwen/benchmark_serving.py "${MODEL[@]}" --base_url "$URL/v1" \
    --dataset "$DATASET" --request_rates "$RATES" --seed "$SEED" --json_output "$OUT/http.json" \
    > "$OUT/http.log" 2>&1
rc=$?
awk 'BEGIN { RS = "" } END { print }' "$OUT/http.log"  # its last table
stop_server; src=$?
say "HTTP load done (exit $rc); server stopped (exit $src)"; tail -3 "$OUT/server.log"
[ "$rc" -eq 0 ] || exit 1

# 3. the same in-process
timeout "$PHASE_TIMEOUT" python3 examples/qwen/benchmark_serving.py "${MODEL[@]}" --max_batch_size "$BATCH" \
    --num_scheduler_steps "$STEPS" --dataset "$DATASET" --request_rates "$RATES" --seed "$SEED" \
    --json_output "$OUT/inprocess.json" > "$OUT/inprocess.log" 2>&1
rc=$?
awk 'BEGIN { RS = "" } END { print }' "$OUT/inprocess.log"
say "in-process done (exit $rc)"
[ "$rc" -eq 0 ] || exit 1

# 4. the table
python3 - "$OUT" "$STEPS" <<'EOF' | tee "$OUT/overhead.txt"
import json, sys
from pathlib import Path

from qwen_trtllm.evaluation import serving as sv

out = Path(sys.argv[1])
http = sv.results_from_json(json.loads((out / "http.json").read_text())["rows"])
engine = json.loads((out / "inprocess.json").read_text())
print(f"{engine['device']}, --num_scheduler_steps {sys.argv[2]} (server and in-process); TTFT, ITL: p50/p99 ms")
print(sv.format_overhead(http, sv.results_from_json(engine["rows"])))
EOF
say "done"
