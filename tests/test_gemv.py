"""The decode GEMV kernel against an fp32 matmul, directly and through linear() (Triton's interpreter on CPU:
tests/conftest.py sets TRITON_INTERPRET; the real kernel on CUDA)."""

import pytest
import torch

import qwen_trtllm.kernels.gemv as gemv_mod
from qwen_trtllm.kernels import triton_available
from qwen_trtllm.kernels.gemv import MAX_ROWS, gemv, linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# even K, K % 512 != 0, ragged N and K; several row blocks (BLOCK_N is 64 in the interpreter, 8 or 16 on CUDA)
@pytest.mark.parametrize("N,K", [(24, 512), (40, 768), (33, 1000), (150, 96)])
@pytest.mark.parametrize("rows", [MAX_ROWS])
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


@pytest.mark.parametrize("config", sorted({c for table in gemv_mod._CONFIGS.values() for c in table}))
@pytest.mark.parametrize("N,K", [(40, 768), (33, 1000)])
def test_gemv_table_configs(config, N, K):
    """Every config of the per-GPU table computes the same product (the tuner's picks are timed, not checked)."""
    g = torch.Generator().manual_seed(N + K)
    x = torch.randn(MAX_ROWS, K, generator=g).to(DEVICE, torch.float16)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(DEVICE, torch.float16)
    ref = torch.nn.functional.linear(x.double(), w.double())
    assert rel_err(gemv(x, w, config=config), ref) < 2e-3


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.fixture
def gemv_calls(monkeypatch) -> list:
    """The row counts of every gemv() call that linear() makes (the kernel itself still runs)."""
    calls, real = [], gemv_mod.gemv
    monkeypatch.setattr(gemv_mod, "gemv", lambda x, *a, **k: calls.append(x.numel() // x.shape[-1]) or real(x, *a, **k))
    return calls


@pytest.mark.parametrize("rows", [MAX_ROWS, MAX_ROWS + 1, 4])
def test_linear_runs_the_kernel_for_decode_rows_only(rows, gemv_calls):
    """One row (batch-1 decode) goes through the GEMV kernel (on CPU in Triton's interpreter), more to F.linear."""
    assert triton_available(DEVICE)  # tests/conftest.py switches the interpreter on off CUDA
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1000, generator=g).to(DEVICE)
    w, b = (torch.randn(40, 1000, generator=g) * 1000**-0.5).to(DEVICE), torch.randn(40, generator=g).to(DEVICE)
    got = linear(x, w, b)
    assert gemv_calls == ([rows] if rows <= MAX_ROWS else [])
    assert rel_err(got, torch.nn.functional.linear(x.double(), w.double(), b.double())) < 1e-5
    none = linear(x[:0], w, b)  # no rows: F.linear's empty product, never the kernel
    assert none.shape == (0, 40) and gemv_calls == ([rows] if rows <= MAX_ROWS else [])


@pytest.mark.parametrize("K", [512, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_gemv_fuses_silu_mul(K, dtype, gemv_calls):
    """c_proj over [gate | up]: the same as silu_mul then the matmul, without the intermediate in memory."""
    from qwen_trtllm.kernels import silu_mul_reference

    g = torch.Generator().manual_seed(K)
    gu = torch.randn(1, 1, 2 * K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(40, K, generator=g) * K**-0.5).to(DEVICE, dtype)
    ref = torch.nn.functional.linear(silu_mul_reference(gu).double(), w.double())
    got = gemv(gu, w, gated=True)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    assert got.shape == (1, 1, 40) and rel_err(got, ref) < tol
    assert rel_err(linear(gu, w, gated=True), ref) < tol and gemv_calls == [1]  # through linear: the kernel
    big = torch.randn(MAX_ROWS + 1, 2 * K, generator=g).to(DEVICE, dtype)  # the fallback: silu_mul, then F.linear
    ref_big = torch.nn.functional.linear(silu_mul_reference(big).double(), w.double())
    assert rel_err(linear(big, w, gated=True), ref_big) < tol and gemv_calls == [1]
