"""Throughput and latency under load (in-flight batching), beside Hugging Face continuous batching:

python3 examples/qwen/benchmark_serving.py --model qwen-7b --num_requests 2048 --dataset 128,128
python3 examples/qwen/benchmark_serving.py --model qwen-7b --num_requests 1000 --dataset chat --compare_hf
python3 examples/qwen/benchmark_serving.py --model qwen-7b --interference --max_num_tokens 512
"""

import argparse
import json
import sys
from pathlib import Path

try:
    import qwen_trtllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from qwen_trtllm import QWenError  # noqa: E402
from qwen_trtllm.cli import run_cli  # noqa: E402
from qwen_trtllm.runtime.runner import add_runtime_args, executor_config_from_args  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="qwen-7b", help="random weights of a named shape (created on the GPU)")
    src.add_argument("--engine_dir", default=None, help="an engine directory built by build.py")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--kv_cache_dtype", default="auto", choices=["auto", "int8", "fp8"],
                   help="--model: the KV cache's format (build.py --int8_kv_cache / --fp8_kv_cache)")
    p.add_argument("--num_requests", type=int, default=1000)
    p.add_argument("--dataset", default="chat", help='"chat" (synthetic chat mix) or "IN,OUT" fixed lengths')
    p.add_argument("--request_rate", type=float, default=float("inf"), help="requests/s, Poisson (inf: all at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_scheduler_steps", type=int, default=8, help="decode steps per host sync when none wait")
    p.add_argument("--compare_hf", action="store_true", help="also run transformers' generate_batch on the same "
                   "requests and weights")
    p.add_argument("--hf_num_requests", type=int, default=200, help="--compare_hf: the first N requests only "
                   "(generate_batch is slow); the engine runs the same N again for the same-run ratio")
    p.add_argument("--interference", action="store_true", help="64 decoding streams + one 2048-token prompt: "
                   "the streams' inter-token latency (run with --num_scheduler_steps 1)")
    p.add_argument("--json_output", default=None)
    add_runtime_args(p)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise QWenError("benchmark_serving.py needs an NVIDIA GPU")
    if args.json_output:
        Path(args.json_output).parent.mkdir(parents=True, exist_ok=True)

    from dataclasses import replace

    from qwen_trtllm.evaluation import benchmark as bm
    from qwen_trtllm.evaluation import serving as sv
    from qwen_trtllm.runtime.engine import Engine
    from qwen_trtllm.runtime.llm import LLM

    if args.engine_dir:
        engine = Engine.load(args.engine_dir)
    else:
        engine = bm.random_engine(args.model, args.dtype, "cuda", max_batch_size=args.max_batch_size or 512,
                                  max_input_len=2048, max_output_len=1024, kv_cache_dtype=args.kv_cache_dtype)
    config = replace(executor_config_from_args(args, engine.build), num_scheduler_steps=args.num_scheduler_steps)
    llm = LLM.from_engine(engine, config=config)
    print(llm.executor.kv_cache_report(), f"max_batch_size {llm.executor.max_batch_size}, max_num_tokens "
          f"{llm.executor.max_num_tokens}", flush=True)
    vocab = engine.config.vocab_size
    sv.run_load(llm, sv.make_workload("128,16", 64, vocab, seed=99))  # warm-up: Triton compilation
    print(f"{llm.executor.runner.capture_graphs()} decode CUDA graphs captured", flush=True)
    report: dict = {"device": torch.cuda.get_device_name()}
    if args.interference:
        report["interference"] = sv.interference(llm, vocab)
        print(json.dumps(report["interference"], indent=1))
    else:
        work = sv.make_workload(args.dataset, args.num_requests, vocab, args.request_rate, args.seed)
        rows = [sv.run_load(llm, work)[0]]
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
        Path(args.json_output).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
