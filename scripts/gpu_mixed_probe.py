"""GPU probe: is an eager mixed step (64 decode rows + a 192-token prefill chunk) bound by the host's kernel
launches or by the GPU? Times the launch (host) and the whole step (synchronised), against a decode-only step
replayed from its CUDA graph and the same decode step run eagerly."""

import time

import torch

from qwen_trtllm.evaluation import benchmark as bm
from qwen_trtllm.runtime import LLM, ExecutorConfig, SamplingParams
from qwen_trtllm.runtime.model_runner import StepPlan

eng = bm.random_engine("qwen-7b", "float16", "cuda", max_batch_size=128, max_input_len=2048, max_output_len=512)
llm = LLM.from_engine(eng, config=ExecutorConfig(max_num_tokens=256, num_scheduler_steps=1))
ex, runner = llm.executor, llm.executor.runner
g = torch.Generator().manual_seed(0)
reqs = [ex.add_request(torch.randint(0, 151936, (128,), generator=g).tolist(),
                       SamplingParams(max_tokens=300, ignore_eos=True)) for _ in range(64)]
while any(r.in_prefill for r in reqs):
    ex.step()
long = ex.add_request(torch.randint(0, 151936, (2048,), generator=g).tolist(), SamplingParams(max_tokens=4))
sched = ex.scheduler.schedule()
plan, _, _ = ex._plan(sched)
dec = StepPlan(plan.input_ids[:64], plan.positions[:64], [1] * 64, plan.context_lens[:64], plan.block_tables[:64],
               plan.ntk_alphas[:64], [0] * 64, 64)


def timed(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    launch, total = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        launch.append((t1 - t0) * 1e3)
        total.append((t2 - t0) * 1e3)
    return sorted(launch)[n // 2], sorted(total)[n // 2]


with torch.inference_mode():
    rows = [(f"mixed 64 decode + {len(plan.input_ids) - 64} prefill, eager",
             timed(lambda: runner.forward_plan(plan))),
            ("decode 64, CUDA graph", timed(lambda: runner.logits(dec))),
            ("decode 64, eager", timed(lambda: runner.forward_plan(dec)))]
for name, (launch, total) in rows:
    print(f"{name:<40} host launch {launch:7.2f} ms   step {total:7.2f} ms")
