"""Profile the engine on the GPU: per-kernel time of prefill and decode (torch profiler, CUDA graphs included).

python3 scripts/profile_decode.py [--batch 1] [--input_len 128] [--steps 16] [--trace trace.json]
"""

import argparse

import torch

from qwen_trtllm.evaluation.benchmark import random_engine
from qwen_trtllm.runtime import GenerationSession, SamplingConfig


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
    session = GenerationSession(engine)
    prompts = torch.randint(0, engine.config.vocab_size, (args.batch, args.input_len)).tolist()
    session.generate(prompts, args.steps, SamplingConfig(top_k=1), stop_ids=[-1])  # warm-up and capture
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        session.generate(prompts, args.steps, SamplingConfig(top_k=1), stop_ids=[-1])
        torch.cuda.synchronize()
    print(session.last_timing)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
