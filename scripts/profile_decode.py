"""Where a decode step's time goes, on the GPU: torch profiler over decode steps of the in-flight batching executor
(kernels inside CUDA graphs included), GPU time per kernel per step, against the step's wall time.

python3 scripts/profile_decode.py [--batch 1] [--context 128] [--steps 32] [--quant int8|int4|fp8]

--ablate rms_norm,attention,rotary replaces those kernels with no-ops (wrong numbers, right timing): the wall
time saved is what each costs in the step's chain of dependent kernels, which the per-kernel times (inflated by
PDL's early launch: a kernel's time includes its wait for the previous one) do not show.

Prints one line per kernel (us per step, launches per step, share) and a last line: wall ms/step, kernel ms/step,
launches per step; the difference is time the GPU sat idle between kernels (launch gaps, host work).
"""

import contextlib
import functools
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from qwen_trtllm.cli import parser, require_cuda
from qwen_trtllm.evaluation.benchmark import quantized_engine, random_engine, static_batch_llm
from qwen_trtllm.runtime.request import SamplingParams

ABLATIONS = ("rms_norm", "attention", "one_split", "rotary")


def ablate(ops, names: list[str]) -> None:
    """Replace the named kernels of a model's Kernels with shape-correct no-ops (launch nothing). Decode steps run
    rotary + KV write + attention as one kernel (rotary_paged_decode_attention, since the seventh session of
    issue 16: the ablations recorded in docs/PERF.md before it timed the two kernels apart): attention drops all of
    it, rotary only its rotary and KV write (ops.decode_attention on the unrotated q)."""

    def q_of(qkv, heads, head_dim):
        return qkv[:, :heads * head_dim].unflatten(1, (heads, head_dim))

    for name in names:
        if name == "rms_norm":
            ops.rms_norm = lambda x, w, eps, residual=None: (x, x if residual is None else residual)
        elif name == "attention":
            ops.rotary_decode_attention = lambda qkv, f, p, s, kc, vc, bt, lens, heads, head_dim, *a, **kw: \
                q_of(qkv, heads, head_dim)
        elif name == "one_split":  # real numbers: single-pass decode attention (no merge kernel)
            ops.rotary_decode_attention = functools.partial(ops.rotary_decode_attention, num_splits=1)
            ops.decode_attention = functools.partial(ops.decode_attention, num_splits=1)
        elif name == "rotary":
            ops.rotary_decode_attention = lambda qkv, f, p, s, kc, vc, bt, lens, heads, head_dim, rd, scale, logn, \
                **kw: ops.decode_attention(q_of(qkv, heads, head_dim), kc, vc, bt, lens, scale, **kw)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="qwen-7b", help="random weights of a named shape: tiny, qwen-1.8b, qwen-7b, "
                   "qwen-14b (made on the GPU)")
    p.add_argument("--batch", type=int, default=1, help="requests decoded together")
    p.add_argument("--context", type=int, default=128, help="prompt tokens before the profiled steps")
    p.add_argument("--steps", type=int, default=32, help="decode steps profiled")
    p.add_argument("--quant", default="", choices=["", "int8", "int4", "fp8"],
                   help="int8, int4 or fp8 (default: the fp16 engine)")
    p.add_argument("--kv_cache_dtype", default="auto", choices=["auto", "int8", "fp8"])
    p.add_argument("--top", type=int, default=14, help="kernels listed (the most GPU time first)")
    p.add_argument("--ablate", default="", help="comma-separated: rms_norm, attention, rotary (no-ops: timing "
                   "only), one_split (real kernels)")
    a = p.parse_args()
    unknown = [n for n in a.ablate.split(",") if n and n not in ABLATIONS]
    if unknown:  # before the GPU check and the 7B model: argument errors show on any machine, at once
        p.error(f"--ablate {','.join(unknown)}: expected {', '.join(ABLATIONS)}")
    require_cuda("profile_decode.py")
    engine = random_engine(a.model, max_batch_size=max(a.batch, 1), max_input_len=a.context,
                           max_output_len=2 * a.steps + 64, kv_cache_dtype=a.kv_cache_dtype)
    if a.quant:
        engine = quantized_engine(engine, a.quant)
    ablate(engine.model.ops, [n for n in a.ablate.split(",") if n])
    llm = static_batch_llm(engine, a.batch, a.context, 2 * a.steps + 64)
    ex = llm.executor
    prompts = torch.randint(0, engine.config.vocab_size, (a.batch, a.context)).tolist()
    for run in range(2):  # warm-up (graphs, compilation), then the timed and profiled run
        reqs = [ex.add_request(pr, SamplingParams(max_tokens=2 * a.steps + 32, ignore_eos=True)) for pr in prompts]
        ex.step()  # prefill
        while len(reqs[0].output_token_ids) < 16:
            ex.step()
        n0 = len(reqs[0].output_token_ids)
        torch.cuda.synchronize()
        t0 = time.perf_counter()  # wall time without the profiler
        while len(reqs[0].output_token_ids) - n0 < a.steps:
            ex.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / (len(reqs[0].output_token_ids) - n0)
        n0 = len(reqs[0].output_token_ids)
        with profile(activities=[ProfilerActivity.CUDA]) if run else contextlib.nullcontext() as prof:
            while len(reqs[0].output_token_ids) - n0 < a.steps:
                ex.step()
            torch.cuda.synchronize()
        positions = len(reqs[0].output_token_ids) - n0  # decode positions (a host step may run several)
        while ex.has_work:
            ex.step()
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            rec = per_name[ev.name[:70]]
            rec[0] += ev.time_range.elapsed_us()
            rec[1] += 1
    kernel_us = sum(t for t, _ in per_name.values())
    launches = sum(n for _, n in per_name.values())
    print(f"{'kernel':<72}{'us/step':>9}{'launch/step':>12}{'share':>7}")
    for name, (t, n) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:a.top]:
        print(f"{name:<72}{t / positions:9.1f}{n / positions:12.1f}{100 * t / kernel_us:6.1f}%")
    what = f"{a.quant or engine.build.dtype} ablate [{a.ablate}]"
    print(f"batch {a.batch} context {a.context} {what}: wall {wall * 1e3:.3f} "
          f"ms/step, kernels {kernel_us / 1e3 / positions:.3f} ms/step, {launches / positions:.0f} launches/step "
          f"({positions} steps)")


if __name__ == "__main__":
    main()
