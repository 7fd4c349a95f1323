"""Tensor-parallel all-reduce latency: NCCL (dist.all_reduce) against the one-shot kernel (kernels/all_reduce.py),
each as a decode step issues them (64 in a row, in one CUDA graph), per message size. Checks both against each
other first. Run on a machine with N GPUs, from the repository root:

    PYTHONPATH=$PWD python3 -m torch.distributed.run --nproc-per-node 2 scripts/gpu_all_reduce_bench.py \
        [--rows 1,8,16,32,64,128] [--hidden 4096] [--calls 64] [--programs 32,128] [--block 1024] [--fused]
        [--json_output FILE]

Prints (rank 0) one row per size and one-shot launch config (--programs: kernels/all_reduce.py's MAX_PROGRAMS,
--block: its BLOCK; the module's values by default): microseconds per all-reduce for each, and the one-shot's
speed-up.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from qwen_trtllm.kernels import all_reduce as A
from qwen_trtllm.kernels import rms_norm


def graph_us(fn, x: torch.Tensor, calls: int, reps: int = 20) -> float:
    """Microseconds per call of fn, `calls` dependent calls captured in one CUDA graph (median of reps)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(calls):
            fn(x, i)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x
        for i in range(calls):
            y = fn(y, i)
    times = []
    for _ in range(reps + 3):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return sorted(times[3:])[reps // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.epilog = "defaults: --rows 1,8,16,32,64,128 --hidden 4096 --calls 64, --programs / --block the module's"
    p.add_argument("--rows", default="1,8,16,32,64,128", help="tokens per all-reduce, comma-separated")
    p.add_argument("--hidden", type=int, default=4096, help="elements per row (Qwen-7B's hidden size)")
    p.add_argument("--calls", type=int, default=64, help="all-reduces per graph (a decode step: 2 per layer)")
    p.add_argument("--programs", default=str(A.MAX_PROGRAMS), help="one-shot grid caps to sweep, comma-separated")
    p.add_argument("--block", default=str(A.BLOCK), help="one-shot chunk sizes (elements) to sweep, comma-separated")
    p.add_argument("--fused", action="store_true", help="each all-reduce with the residual add + RMSNorm after it, "
                   "as the model runs 63 of its 64: NCCL + the rms_norm kernel against the fused one-shot kernel "
                   "(a program per row: --block does not apply)")
    p.add_argument("--json_output", default=None, help="also write the rows here as JSON (rank 0)")
    a = p.parse_args()
    if "RANK" not in os.environ:
        p.error("run it under python3 -m torch.distributed.run --nproc-per-node N (one rank per GPU)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    dev = torch.device("cuda", rank)
    sizes = [int(r) for r in a.rows.split(",")]
    configs = [(int(p), int(b)) for p in a.programs.split(",") for b in a.block.split(",")]
    A.MAX_PROGRAMS = max(p for p, _ in configs)  # the grid cap the signal pads allow, for the largest config
    one_shot = A.OneShotAllReduce(dist.group.WORLD, dev, max_bytes=max(sizes) * a.hidden * 2)  # beyond MAX_BYTES
    cap = one_shot.max_programs
    weight = torch.rand(a.hidden, device=dev, dtype=torch.float16) + 0.5

    def nccl(x: torch.Tensor, i: int) -> torch.Tensor:
        dist.all_reduce(x)
        return x if not a.fused else rms_norm(x, weight, 1e-6, residual=residual)[1]

    def one(x: torch.Tensor, i: int) -> torch.Tensor:
        return one_shot(x, i % 2) if not a.fused else one_shot.rms_norm(x, weight, 1e-6, residual, i % 2)[1]

    rows = []
    for m in sizes:
        x = torch.randn(m, a.hidden, device=dev, dtype=torch.float16) / world
        residual = torch.randn_like(x)
        ref = nccl(x.clone(), 0)
        n_us = graph_us(nccl, x.clone(), a.calls)
        for programs, block in configs:
            A.BLOCK, one_shot.max_programs = block, min(programs, cap)
            ok = all([torch.allclose(one(x, s).float(), ref.float(), rtol=1e-3, atol=1e-3) for s in (0, 1)])
            o_us = graph_us(one, x, a.calls)
            rows.append(dict(rows=m, bytes=x.numel() * 2, programs=programs, block=block, nccl_us=n_us,
                             one_shot_us=o_us, equal=bool(ok)))
    if rank == 0:
        what = "all-reduces + residual add + RMSNorm" if a.fused else "all-reduces"
        print(f"{world} ranks, {torch.cuda.get_device_name()}, {a.calls} {what} per graph")
        print(f"{'rows':>5} {'bytes':>9} {'programs':>8} {'block':>6} {'NCCL us':>8} {'one-shot us':>12} "
              f"{'speed-up':>9}  check")
        for r in rows:
            print(f"{r['rows']:>5} {r['bytes']:>9} {r['programs']:>8} {r['block']:>6} {r['nccl_us']:>8.2f} "
                  f"{r['one_shot_us']:>12.2f} "
                  f"{r['nccl_us'] / r['one_shot_us']:>8.2f}x  {'equal' if r['equal'] else 'DIFFERENT'}")
        if a.json_output:
            with open(a.json_output, "w") as f:
                json.dump({"world": world, "device": torch.cuda.get_device_name(), "fused": a.fused, "rows": rows}, f,
                          indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
