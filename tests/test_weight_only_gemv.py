"""The decode-sized int8 / int4 GEMV against an fp32 matmul with the dequantised weights."""

import pytest
import torch

from qwen_trtllm.kernels.weight_only_gemv import weight_only_gemv
from qwen_trtllm.quantization import dequantize_weight, quantize_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("precision,group", [("int8", 128), ("int4", 16), ("int4", 64)])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("N,K", [(40, 256), (33, 1088)])  # ragged N; K not a multiple of the int8 tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weight_only_gemv(precision, group, rows, N, K, dtype):
    if precision == "int4" and K % group:
        pytest.skip("group must divide K")
    g = torch.Generator().manual_seed(N + K + rows)
    w = torch.randn(N, K, generator=g) * K**-0.5
    q = {k: v.to(DEVICE) for k, v in quantize_weight(w, precision, group).items() if v is not None}
    x = torch.randn(rows, 1, K, generator=g).to(DEVICE, dtype)
    bias = torch.randn(N, generator=g).to(DEVICE, dtype)
    deq = dequantize_weight(q["qweight"], q["scales"], precision, group, torch.float64)
    ref = torch.nn.functional.linear(x.double(), deq, bias.double())
    got = weight_only_gemv(x, q["qweight"], q["scales"], precision, group, bias)
    assert got.shape == (rows, 1, N) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert ((got.double() - ref).norm() / ref.norm()) < tol
