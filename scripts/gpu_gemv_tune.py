"""Tune the decode GEMV on the GPU the way it runs: 32 layers' worth of distinct weights back to back in one CUDA
graph (no L2 reuse, no launch gaps), per 7B shape and config. Prints GB/s of weight bytes; best config last.

python3 scripts/gpu_gemv_tune.py [--rows 1]
"""

import argparse
import itertools

import torch
import triton

from qwen_trtllm.kernels import gemv as G
from qwen_trtllm.kernels.launch import l2_prefetch_bytes, pdl_enabled


def time_graph(fn, reps: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def tune(name: str, N: int, K: int, rows: int) -> None:
    copies = 32 if N * K * 2 * 32 <= 8 << 30 else 4  # distinct weights: no L2 reuse between calls
    ws = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
    x = torch.randn(rows, K, device="cuda", dtype=torch.float16)
    y = torch.empty(rows, N, device="cuda", dtype=torch.float16)
    nbytes = copies * N * K * 2
    pdl = pdl_enabled(x.device)
    prefetch = l2_prefetch_bytes(x.device, G.PREFETCH_BYTES, K * 2, K * 2)
    ms = time_graph(lambda: [torch.nn.functional.linear(x, w) for w in ws])
    print(f"{name:<8} cublas                  {ms * 1e3 / copies:7.1f} us {nbytes / ms / 1e6:6.0f} GB/s", flush=True)
    results = []
    for cfg in itertools.product((8, 16), (256, 512, 1024), (4, 8), (2, 3, 4)):
        bn, bk, warps, stages = cfg
        if bn * bk > 16384 or bn * bk < 1024:
            continue

        def run(bn=bn, bk=bk, warps=warps, stages=stages):
            for w in ws:
                G._gemv_kernel[(triton.cdiv(N, bn),)](x, w, w, y, N, K, x.stride(0), y.stride(0), M=rows,
                                                      HAS_BIAS=False, EVEN_K=K % bk == 0, BLOCK_N=bn, BLOCK_K=bk,
                                                      PDL=pdl, PREFETCH=prefetch, num_warps=warps,
                                                      num_stages=stages, launch_pdl=pdl)
        results.append((time_graph(run), cfg))
    results.sort()
    current = G._config(N, K, x.device)
    for ms, cfg in results:
        if cfg == current:
            print(f"{name:<8} current {cfg}  {ms * 1e3 / copies:7.1f} us {nbytes / ms / 1e6:6.0f} GB/s", flush=True)
    for ms, (bn, bk, warps, stages) in results[:3]:
        print(f"{name:<8} bn{bn:<3} bk{bk:<5} w{warps} s{stages}    {ms * 1e3 / copies:7.1f} us "
              f"{nbytes / ms / 1e6:6.0f} GB/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--shapes", default="qkv,dense,gate_up,c_proj,lm_head")
    args = ap.parse_args()
    shapes = {"qkv": (12288, 4096), "dense": (4096, 4096), "gate_up": (22016, 4096), "c_proj": (4096, 11008),
              "lm_head": (151936, 4096)}
    for name in args.shapes.split(","):
        N, K = shapes[name]
        tune(name, N, K, args.rows)


if __name__ == "__main__":
    main()
