"""Throughput and latency under load (in-flight batching), beside Hugging Face continuous batching:

python3 examples/qwen/benchmark_serving.py --model qwen-7b --num_requests 2048 --dataset 128,128
python3 examples/qwen/benchmark_serving.py --model qwen-7b --num_requests 1000 --dataset chat --compare_hf
python3 examples/qwen/benchmark_serving.py --model qwen-7b --interference --max_num_tokens 512
python3 examples/qwen/benchmark_serving.py --model qwen-7b --dataset chat --request_rates 4,8,16,inf
python3 examples/qwen/benchmark_serving.py --model qwen-7b --dataset chat --request_rates 4,8,16,inf \
    --base_url http://127.0.0.1:8000/v1      # the same workloads sent to `serve.py --model qwen-7b` over HTTP
"""

import json
import sys
from pathlib import Path

try:
    import qwen_trtllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from qwen_trtllm import QWenError  # noqa: E402
from qwen_trtllm.cli import atomic_write, check_output_file, parser, run_cli  # noqa: E402
from qwen_trtllm.dtypes import add_dtype_argument  # noqa: E402
from qwen_trtllm.runtime.runner import add_runtime_args, executor_config_from_args  # noqa: E402


def main() -> int:
    p = parser(__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="qwen-7b", help="random weights of a named shape (created on the GPU)")
    src.add_argument("--engine_dir", default=None, help="an engine directory built by build.py")
    add_dtype_argument(p, "--dtype", default="float16", allowed=("float16", "bfloat16"),
                       help="dtype of the random weights (--model)")
    p.add_argument("--kv_cache_dtype", default="auto", choices=["auto", "int8", "fp8"],
                   help="--model: the KV cache's format (build.py --int8_kv_cache / --fp8_kv_cache)")
    p.add_argument("--quant", default=None, choices=["int8", "int4", "fp8"],
                   help="--model: quantised weights, as build.py --use_weight_only --weight_only_precision int8 / "
                   "int4 (group size 128) or --use_fp8 makes them (default: none)")
    p.add_argument("--quantize_lm_head", action="store_true",
                   help="with --quant: lm_head quantised too, as build.py --quantize_lm_head (default: in --dtype)")
    p.add_argument("--num_requests", type=int, default=1000, help="requests in the workload")
    p.add_argument("--dataset", default="chat", help='"chat" (synthetic chat mix) or "IN,OUT" fixed lengths')
    p.add_argument("--request_rate", type=float, default=float("inf"), help="requests/s, Poisson (inf: all at once)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload")
    p.add_argument("--num_scheduler_steps", type=int, default=8,
                   help="decode steps per host sync when no waiting request can take a batch slot (tokens then "
                   "reach the client in bursts: ITL p50 0, p99 one window)")
    p.add_argument("--compare_hf", action="store_true", help="also run transformers' generate_batch on the same "
                   "requests and weights")
    p.add_argument("--hf_num_requests", type=int, default=200, help="--compare_hf: the first N requests only "
                   "(generate_batch is slow); the engine runs the same N again for the same-run ratio")
    p.add_argument("--interference", action="store_true", help="64 decoding streams + one 2048-token prompt: "
                   "the streams' inter-token latency (run with --num_scheduler_steps 1)")
    p.add_argument("--json_output", default=None, help="write the results here as JSON")
    add_runtime_args(p)
    p.add_argument("--base_url", default=None, help="send the workload to a running OpenAI-compatible server (such "
                   "as http://127.0.0.1:8000/v1 of serve.py) as streaming /v1/completions requests with token-id "
                   "prompts, ignore_eos and greedy sampling, after 64 warm-up requests, instead of running an engine "
                   "here; --model / --engine_dir then only name the model's vocabulary (default: none, in-process)")
    p.add_argument("--request_rates", default=None, help='one run per request rate, each its own workload from '
                   '--seed, on the same engine or server: "4,8:200,inf" (RATE[:N]: N requests, default '
                   '--num_requests); replaces --request_rate (default: none)')
    args = p.parse_args()
    check_output_file(args.json_output, "--json_output")
    for flag, value in (("--quant", args.quant), ("--quantize_lm_head", args.quantize_lm_head),
                        ("--kv_cache_dtype", args.kv_cache_dtype != "auto" or None)):
        if value and (args.engine_dir or args.base_url):
            raise QWenError(f"{flag} applies to --model's random weights; an engine (or a server's) keeps the format "
                            "it was built with (build.py --use_fp8 / --use_weight_only / --quantize_lm_head / "
                            "--fp8_kv_cache): drop it")
    if args.quantize_lm_head and not args.quant:
        raise QWenError("--quantize_lm_head applies to --quant's weights: add --quant int8|int4|fp8 or drop it")
    if args.num_scheduler_steps < 1:
        raise QWenError(f"--num_scheduler_steps must be >= 1, got {args.num_scheduler_steps}")
    if args.request_rates and (args.compare_hf or args.interference):
        raise QWenError("--request_rates does not combine with --compare_hf / --interference: give --request_rate")
    if args.base_url is None and not torch.cuda.is_available() and not args.engine_dir:
        raise QWenError("benchmark_serving.py needs an NVIDIA GPU (without one: --engine_dir runs on the CPU as a "
                        "functional check, its numbers say nothing about a GPU; --base_url loads a server)")
    from qwen_trtllm.evaluation import serving as sv

    rates = sv.parse_rates(args.request_rates, args.num_requests) if args.request_rates else \
        [(args.request_rate, args.num_requests)]
    name = lambda backend, rate: f"{backend} rate={rate:g}" if args.request_rates else backend
    if args.base_url:
        return load_server(args, rates, name)

    from dataclasses import replace

    from qwen_trtllm.evaluation import benchmark as bm
    from qwen_trtllm.runtime.engine import Engine
    from qwen_trtllm.runtime.llm import LLM

    if args.engine_dir:
        engine = Engine.load(args.engine_dir)
    else:
        engine = bm.random_engine(args.model, args.dtype, "cuda", max_batch_size=args.max_batch_size or 512,
                                  max_input_len=2048, max_output_len=1024, kv_cache_dtype=args.kv_cache_dtype)
        if args.quant:  # the fp16 original is dropped before the KV cache is sized from the free memory
            engine = bm.quantized_engine(engine, args.quant, quantize_lm_head=args.quantize_lm_head)
            torch.cuda.empty_cache()
    config = replace(executor_config_from_args(args, engine.build), num_scheduler_steps=args.num_scheduler_steps)
    llm = LLM.from_engine(engine, config=config)
    print(llm.executor.kv_cache_report(), f"max_batch_size {llm.executor.max_batch_size}, max_num_tokens "
          f"{llm.executor.max_num_tokens}", flush=True)
    vocab = engine.config.vocab_size
    print(f"{sv.warm_up(llm)} decode CUDA graphs captured after the warm-up", flush=True)  # + Triton compilation
    report: dict = {"device": torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu",
                    "num_scheduler_steps": args.num_scheduler_steps}
    if args.interference:
        report["interference"] = sv.interference(llm, vocab)
        print(json.dumps(report["interference"], indent=1))
    else:
        rows = []
        for rate, n in rates:
            work = sv.make_workload(args.dataset, n, vocab, rate, args.seed)
            rows.append(sv.run_load(llm, work, name("engine", rate))[0])
            rows[-1].request_rate = rate
            print(sv.format_results(rows[-1:]), flush=True)
        if args.compare_hf:
            n = args.hf_num_requests
            sub = sv.Workload(work.prompts[:n], work.output_lens[:n], [0.0] * min(n, len(work.prompts)))
            sub_hf = sv.Workload(sub.prompts, [max(sub.output_lens)] * len(sub.prompts), sub.arrival_s)
            rows.append(sv.run_load(llm, sub)[0])
            rows[-1].backend = f"engine (first {n})"
            rows.append(sv.run_load(llm, sub_hf)[0])
            rows[-1].backend = f"engine (first {n}, HF lens)"
            bm.release(llm)
            hf = bm.hf_model_sharing_weights(engine)
            try:
                rows.append(sv.run_hf_continuous_batching(hf, sub_hf))
            except Exception as e:  # the peer's API moves between transformers versions: report, carry on
                print(f"transformers generate_batch failed: {type(e).__name__}: {e}")
        if not args.compare_hf:  # (--compare_hf released the engine's KV cache)
            report["batch1"] = sv.batch1_latency(llm, vocab)
            print("batch-1 latency, same executor and weights:", report["batch1"])
        print()
        print(sv.format_results(rows))
        report["rows"] = sv.results_to_json(rows)
    if args.json_output:
        with atomic_write(args.json_output) as f:
            f.write(json.dumps(report, indent=2))
    return 0


def load_server(args, rates: list[tuple[float, int]], name) -> int:
    """--base_url: the same workloads over HTTP (qwen_trtllm/evaluation/http_load.py), after a warm-up."""
    from qwen_trtllm.evaluation import http_load
    from qwen_trtllm.evaluation import serving as sv

    if args.compare_hf or args.interference:
        raise QWenError("--compare_hf and --interference run an engine in this process: leave out --base_url")
    if args.engine_dir:
        from qwen_trtllm.runtime.engine import read_engine_config

        vocab = read_engine_config(args.engine_dir)[0].vocab_size
    else:
        from qwen_trtllm.checkpoint.random_checkpoint import PRESETS

        if args.model not in PRESETS:
            raise QWenError(f"--model {args.model}: choose one of {', '.join(PRESETS)}")
        vocab = PRESETS[args.model]["vocab_size"]
    warm, results = http_load.run_http_load(args.base_url, sv.make_workload("128,16", 64, vocab, seed=99), "warm-up")
    if warm.errors == warm.requests:
        raise QWenError(f"{args.base_url}: every warm-up request failed, the first with {results[0].error}")
    print(sv.format_results([warm]), flush=True)
    rows = []
    for rate, n in rates:
        row, results = http_load.run_http_load(args.base_url, sv.make_workload(args.dataset, n, vocab, rate,
                                                                               args.seed), name("http", rate))
        row.request_rate = rate
        rows.append(row)
        print(sv.format_results([row]), flush=True)
        if row.errors:
            print(f"{row.errors} of {n} requests failed, the first with: {http_load.first_error(results)}", flush=True)
    print()
    print(sv.format_results(rows))
    if args.json_output:
        report = {"base_url": args.base_url, "warm_up": sv.results_to_json([warm])[0],
                  "rows": sv.results_to_json(rows)}
        with atomic_write(args.json_output) as f:
            f.write(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
