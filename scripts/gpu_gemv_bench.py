"""GPU microbenchmark: cuBLAS (F.linear) vs a Triton GEMV for the decode-step matmuls of a 7B-shaped Qwen.

Weights rotate over enough copies (> 4x the 50 MB L2) that every call streams from HBM. Prints GB/s of weight
bytes per call. Run on the GPU machine: python3 scripts/gpu_gemv_bench.py
"""

import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=offs_n[:, None] < N, other=0.0)
        x = tl.load(x_ptr + offs_k)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + offs_n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=offs_n < N)


def triton_gemv(x, w, y, bn, bk, warps, stages):
    N, K = w.shape
    gemv_kernel[(triton.cdiv(N, bn),)](x, w, y, N, K, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return y


def bench_shape(name: str, N: int, K: int, dev: str = "cuda", dt: torch.dtype = torch.float16) -> None:
    nbytes = N * K * 2
    copies = max(2, (256 << 20) // nbytes + 1)
    ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
    x = torch.randn(1, K, device=dev, dtype=dt)
    y = torch.empty(1, N, device=dev, dtype=dt)
    ref = F.linear(x.float(), ws[0].float())
    it = itertools.cycle(range(copies))
    t = triton.testing.do_bench(lambda: F.linear(x, ws[next(it)]), warmup=50, rep=300, return_mode="median")
    print(f"{name:<8} {'cublas':<28} {t * 1e3:8.1f} {nbytes / t / 1e6:7.0f}", flush=True)
    best = None
    for cfg in itertools.product((8, 16, 32), (256, 512), (4, 8), (2, 3)):
        if cfg[0] * cfg[1] > 16384:
            continue
        triton_gemv(x, ws[0], y, *cfg)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        t = triton.testing.do_bench(lambda cfg=cfg: triton_gemv(x, ws[next(it)], y, *cfg), warmup=50, rep=300,
                                    return_mode="median")
        if best is None or t < best[0]:
            best = (t, "triton bn{} bk{} w{} s{}".format(*cfg), err)
    t, label, err = best
    print(f"{name:<8} {label:<28} {t * 1e3:8.1f} {nbytes / t / 1e6:7.0f}  err {err:.1e}", flush=True)


def main() -> None:
    shapes = {"qkv": (12288, 4096), "dense": (4096, 4096), "gate_up": (22016, 4096), "c_proj": (4096, 11008),
              "lm_head": (151936, 4096)}
    print(f"{'shape':<8} {'impl':<28} {'us':>8} {'GB/s':>7}")
    for name, (N, K) in shapes.items():
        bench_shape(name, N, K)


if __name__ == "__main__":
    main()
