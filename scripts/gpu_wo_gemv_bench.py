"""int8 / int4 decode matmuls on the GPU, inside CUDA graphs over 32 distinct weights per 7B shape (batch 1):
the tensor-core kernel (kernels/weight_only_gemm.py) against the streaming GEMV (kernels/weight_only_gemv.py).

python3 scripts/gpu_wo_gemv_bench.py
"""

import torch

from qwen_trtllm.kernels.weight_only_gemm import weight_only_matmul
from qwen_trtllm.kernels.weight_only_gemv import weight_only_gemv
from qwen_trtllm.quantization import dequantize_weight, quantize_weight


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
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def bench(name: str, N: int, K: int, precision: str) -> None:
    qs = [quantize_weight(torch.randn(N, K, device="cuda") * K**-0.5, precision, 128) for _ in range(32)]
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    deq = dequantize_weight(qs[0]["qweight"], qs[0]["scales"], precision, 128, torch.float32)
    ref = x.float() @ deq.t()
    nbytes = sum(q["qweight"].numel() + q["scales"].numel() * 2 for q in qs)
    rows = [("tensor-core kernel", lambda: [weight_only_matmul(x, q["qweight"], q["scales"], precision, 128)
                                            for q in qs])]
    for bn in (8, 16, 32):
        rows.append((f"gemv bn{bn}", lambda bn=bn: [weight_only_gemv(x, q["qweight"], q["scales"], precision, 128,
                                                                     block_n=bn) for q in qs]))
    err = ((weight_only_gemv(x, qs[0]["qweight"], qs[0]["scales"], precision, 128).float() - ref).norm()
           / ref.norm()).item()
    for label, fn in rows:
        ms = time_graph(fn)
        print(f"{precision} {name:<8} {label:<20} {ms * 1e3 / 32:7.1f} us {nbytes / ms / 1e6:6.0f} GB/s  "
              f"(gemv rel err {err:.1e})", flush=True)


def main() -> None:
    shapes = {"qkv": (12288, 4096), "dense": (4096, 4096), "gate_up": (22016, 4096), "c_proj": (4096, 11008)}
    for precision in ("int8", "int4"):
        for name, (N, K) in shapes.items():
            bench(name, N, K, precision)


if __name__ == "__main__":
    main()
