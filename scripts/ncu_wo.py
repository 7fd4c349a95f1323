"""ncu target: one int4 and one int8 decode matmul (qkv and gate_up shapes), after warm-up."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwen_trtllm.kernels.weight_only_gemm import weight_only_matmul  # noqa: E402
from qwen_trtllm.quantization import quantize_weight  # noqa: E402

for p in ("int4", "int8"):
    for K, N in ((4096, 12288), (4096, 22016)):
        d = quantize_weight((torch.randn(N, K, device="cuda") * K**-0.5).half(), p, 128)
        x = torch.randn(1, K, device="cuda").half()
        for _ in range(3):
            weight_only_matmul(x, d["qweight"], d["scales"], p, 128)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push(f"{p}_{N}")
        weight_only_matmul(x, d["qweight"], d["scales"], p, 128)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
