"""GPU (issue 14): beam search, 8 prompts x 4 beams, beside greedy batch 32, 128 in / 128 out, random 7B fp16.

PYTHONPATH=$PWD python3 scripts/gpu_beam_bench.py [OUT_JSON]     (or: bash scripts/gpu_check_bench.sh beam)

Run from the repository root; the package is found through PYTHONPATH, not installed. Kept as a tool of its own
(not a CLI flag, not library code): it drives the executor step by step to read the KV pool's occupancy and the
block-copy count after every step, and checks the beams against their reference before timing them.

Both runs compute 32 rows x 128 positions. Each is timed end to end (prefill included) after a warm-up that
compiles the kernels and captures the CUDA graphs; KV blocks in use are read after every step. Greedy runs twice:
16 decode steps per host sync (the default) and 1 (what beam search does: the host picks the beams each step).
A check first: one prompt's beams alone equal its beams in the batch of 8.
"""

from __future__ import annotations

import json
import os
import time

import torch

from qwen_trtllm.cli import atomic_write, check_output_file, parser, require_cuda
from qwen_trtllm.evaluation.benchmark import random_engine
from qwen_trtllm.runtime import LLM, ExecutorConfig, SamplingParams

IN, OUT = int(os.environ.get("BENCH_IN", 128)), int(os.environ.get("BENCH_OUT", 128))
PROMPTS, BEAMS = 8, 4
PRESET, DEVICE = os.environ.get("PRESET", "qwen-7b"), os.environ.get("DEVICE", "cuda")  # a CPU dry run: tiny, cpu


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict:
    ex = llm.executor
    requests = [ex.add_request(p, params) for p in prompts]
    ex.stats["block_copies"] = 0
    blocks = []
    sync()
    t0 = time.perf_counter()
    while ex.has_work:
        ex.step()
        blocks.append(ex.kv_cache.pool.num_used)
    sync()
    dt = time.perf_counter() - t0
    rows = len(prompts) * params.beam_width
    out = {"seconds": dt, "ms_per_position": 1e3 * dt / OUT, "row_tokens_per_s": rows * OUT / dt,
           "returned_tokens_per_s": sum(len(b) for r in requests for b in (r.snapshot().beams or [r.output_token_ids]))
           / dt, "kv_blocks_max": max(blocks), "kv_blocks_after_first_decode": blocks[1] if len(blocks) > 1 else None,
           "kv_blocks_last": blocks[-2] if len(blocks) > 1 else None, "host_syncs": len(blocks),
           "block_copies": ex.stats["block_copies"]}
    assert ex.kv_cache.pool.num_used == 0, "blocks leaked"
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("out_json", nargs="?", default=None, help="also write the report here as JSON")
    args = ap.parse_args()
    check_output_file(args.out_json, "OUT_JSON")
    if DEVICE == "cuda":
        require_cuda("gpu_beam_bench.py")
    engine = random_engine(PRESET, "float16" if DEVICE == "cuda" else "float32", DEVICE, max_batch_size=64,
                           max_input_len=2048, max_output_len=1024,
                           kernels="triton" if DEVICE == "cuda" else "torch")
    vocab = engine.config.vocab_size
    prompts = torch.randint(0, vocab, (32, IN), generator=torch.Generator().manual_seed(0)).tolist()
    beam = SamplingParams(max_tokens=OUT, use_beam_search=True, n=BEAMS, end_id=None)
    greedy = SamplingParams(max_tokens=OUT, ignore_eos=True)
    llms = {s: LLM.from_engine(engine, config=ExecutorConfig(max_batch_size=64, num_scheduler_steps=s))
            for s in (16, 1)}
    for llm in llms.values():  # warm-up: Triton compilation, CUDA graphs
        llm.generate(prompts[:8], SamplingParams(max_tokens=8, ignore_eos=True))
        llm.executor.runner.capture_graphs(64)
    llm = llms[16]
    short = SamplingParams(max_tokens=32, use_beam_search=True, n=BEAMS, end_id=None)
    alone = llm.generate([prompts[0]], short)[0]
    together = llm.generate(prompts[:PROMPTS], short)
    kv, built = llms[1].executor.kv_cache, llms[1].executor.kv_cache.triton_kernels
    kv.triton_kernels = False  # block copies through the PyTorch reference
    reference_copies = llms[1].generate(prompts[:PROMPTS], short)
    kv.triton_kernels = built
    same_with_reference_copies = [a.beams == b.beams for a, b in zip(together, reference_copies, strict=True)]
    together = together[0]
    check = {"beams_alone_equal_batched": alone.beams == together.beams,
             "copy kernel = reference copies": f"{sum(same_with_reference_copies)}/{PROMPTS}",
             "max_score_diff": max(abs(a - b) for a, b in zip(alone.beam_scores, together.beam_scores, strict=True))}
    print(json.dumps(check), flush=True)
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "check": check,
              "kv_tokens_per_block": llm.executor.kv_cache.tokens_per_block,
              "beam 8x4": run(llm, prompts[:PROMPTS], beam),
              "greedy 32 (16 steps/sync)": run(llm, prompts, greedy),
              "greedy 32 (1 step/sync)": run(llms[1], prompts, greedy)}
    print(f"{'run':28s} {'s':>6s} {'ms/pos':>7s} {'row tok/s':>10s} {'kv max':>7s} {'kv 1st':>7s} {'syncs':>6s} "
          f"{'copies':>7s}")
    for name, r in report.items():
        if isinstance(r, dict) and "seconds" in r:
            print(f"{name:28s} {r['seconds']:6.3f} {r['ms_per_position']:7.2f} {r['row_tokens_per_s']:10.0f} "
                  f"{r['kv_blocks_max']:7d} {r['kv_blocks_after_first_decode']!s:>7s} {r['host_syncs']:6d} "
                  f"{r['block_copies']:7d}")
    if os.environ.get("PROFILE"):  # where a beam step's time goes: 16 prompts' first 16 positions
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts[:PROMPTS], SamplingParams(max_tokens=16, use_beam_search=True, n=BEAMS, end_id=None))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    if args.out_json:
        with atomic_write(args.out_json) as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
