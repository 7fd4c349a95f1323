"""The decode GEMV kernel against an fp32 matmul (Triton interpreter on CPU, the real kernel on CUDA)."""

import pytest
import torch

from qwen_trtllm.kernels.gemv import MAX_ROWS, gemv, linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("N,K", [(24, 512), (40, 768), (33, 1000)])  # even K, K % 512 != 0, ragged N and K
@pytest.mark.parametrize("rows", [1, MAX_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gemv_matches_fp32_matmul(N, K, rows, dtype):
    g = torch.Generator().manual_seed(N * K + rows)
    x = torch.randn(rows, 1, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    got = gemv(x, w, b)
    assert got.shape == (rows, 1, N) and got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert ((got.double() - ref).norm() / ref.norm()) < tol
    nob = gemv(x, w)
    ref_nob = torch.nn.functional.linear(x.double(), w.double())
    assert ((nob.double() - ref_nob).norm() / ref_nob.norm()) < tol


def test_linear_falls_back_for_large_batches():
    x, w = torch.randn(MAX_ROWS + 1, 64, device=DEVICE), torch.randn(32, 64, device=DEVICE)
    assert torch.allclose(linear(x, w), x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("K", [512, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_gemv_fuses_silu_mul(K, dtype):
    """c_proj over [gate | up]: the same as silu_mul then the matmul, without the intermediate in memory."""
    from qwen_trtllm.kernels import silu_mul_reference

    g = torch.Generator().manual_seed(K)
    gu = torch.randn(2, 1, 2 * K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(40, K, generator=g) * K**-0.5).to(DEVICE, dtype)
    ref = torch.nn.functional.linear(silu_mul_reference(gu).double(), w.double())
    got = gemv(gu, w, gated=True)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    assert got.shape == (2, 1, 40) and ((got.double() - ref).norm() / ref.norm()) < tol
    gu32, w32 = gu.float().cpu(), w.float().cpu()  # the CPU fallback: silu_mul, then F.linear
    ref32 = torch.nn.functional.linear(silu_mul_reference(gu32), w32)
    assert torch.allclose(linear(gu32, w32, gated=True), ref32, rtol=1e-4, atol=1e-5)
