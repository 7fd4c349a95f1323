"""Profile the engine on the GPU: per-kernel time of prefill and decode (torch profiler, CUDA graphs included).

python3 scripts/profile_decode.py [--batch 1] [--input_len 128] [--steps 16] [--trace trace.json]

The batch goes through the in-flight batching runtime as one static batch: all prompts in one prefill step, then
decode steps (num_scheduler_steps at a time, as CUDA graphs).
"""

import argparse
import time

import torch

from qwen_trtllm.evaluation.benchmark import random_engine
from qwen_trtllm.runtime import LLM, ExecutorConfig, KvCacheConfig, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen-7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--input_len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--trace", default=None)
    ap.add_argument("--quant", default="", choices=["", "int8", "int4"], help="a weight-only quantised copy")
    args = ap.parse_args()
    engine = random_engine(args.model, "float16", "cuda", max_batch_size=args.batch, max_input_len=args.input_len,
                           max_output_len=args.steps)
    if args.quant:
        from qwen_trtllm.evaluation.benchmark import quantized_engine

        engine = quantized_engine(engine, args.quant)
    seq, bs = args.input_len + args.steps, 64
    kv = KvCacheConfig(max_tokens=args.batch * -(-seq // bs) * bs, tokens_per_block=bs)  # this batch's blocks
    llm = LLM.from_engine(engine, config=ExecutorConfig(max_batch_size=args.batch, max_seq_len=seq, kv_cache=kv,
                                                        max_num_tokens=args.batch * args.input_len))
    ex = llm.executor
    prompts = torch.randint(0, engine.config.vocab_size, (args.batch, args.input_len)).tolist()
    params = SamplingParams(max_tokens=args.steps, top_k=1, ignore_eos=True)

    def run() -> dict:
        for p in prompts:
            ex.add_request(p, params)
        t0 = time.perf_counter()
        ex.step()  # the prefill step (and the first token)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        steps = ex.stats["steps"]
        while ex.has_work:
            ex.step()
        torch.cuda.synchronize()
        return {"prefill_ms": (t1 - t0) * 1e3, "decode_ms": (time.perf_counter() - t1) * 1e3,
                "decode_steps": ex.stats["steps"] - steps}

    run()  # warm-up and capture
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timing = run()
    print(timing)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
