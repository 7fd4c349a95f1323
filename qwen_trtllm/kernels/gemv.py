"""Skinny matmuls for decode: y = x @ W^T (+ bias) for a few rows of x, streaming W [N, K] once from HBM.

At batch 1 a decode step is a chain of matrix-vector products whose time is the weight bytes over memory
bandwidth. cuBLAS reaches 70-85% of the copy bandwidth on the 7B shapes inside a CUDA graph; this kernel gives
each program BLOCK_N whole rows of W, reads them in BLOCK_K-wide 16-byte-vector tiles and reduces in float32,
which measured 10-20% faster (scripts/gpu_gemv_tune.py, docs/PERF.md). Used for one row (batch-1 decode): a second
row would go through every weight again (re-read from L2) with the same per-weight instructions, and cuBLAS, which
reads a weight once for all its rows, is 1.5-2.2x faster per step at 2-4 rows (H200: batch 2 6.79 -> 4.55 ms,
batch 4 10.21 -> 4.59; docs/results/h200_decode5/fp16_rows_ab.txt).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwen_trtllm.kernels.activation import silu_times
from qwen_trtllm.kernels.launch import gpu_model, l2_prefetch_bytes, l2_prefetch_rows, pdl_enabled, pdl_start

MAX_ROWS = 1  # rows up to which the GEMV runs (cuBLAS above): one, the module docstring says why
PREFETCH_BYTES = 1024  # of each weight row, into L2 before the PDL wait (sm_90+)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr = False, PDL: tl.constexpr = False,
                 PREFETCH: tl.constexpr = 0):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if PREFETCH > 0:  # the weights never depend on the previous kernel: start streaming them before the wait
        l2_prefetch_rows(w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64) * K, PREFETCH)
    pdl_start(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        if EVEN_K:
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_ok[:, None], other=0.0)
        else:
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)
        x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0)
        if GATED:  # x row = [gate | up]: SiLU(gate) * up with silu_mul's roundings, never written to memory
            x = silu_times(x, tl.load(x_ptr + K + offs_k, mask=k_ok, other=0.0))
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


# (BLOCK_N, BLOCK_K, num_warps, num_stages) per GPU model for narrow (N <= 4096), medium (N <= 8192) and wide
# outputs: the best of scripts/gpu_gemv_tune.py (in-graph sweep, PDL + prefetch launch as the engine runs it) for
# the Qwen-7B shapes. H200 (2026-12-01): 4 warps; 512-code K tiles for wide outputs (qkv 26.3 us, gate_up 45.1,
# lm_head 292.5: 3.8-4.3 TB/s) and 1 KiB ones for narrow (dense 9.8, c_proj 22.4); medium is tensor parallel 2's
# qkv (N 6144: 15.8 -> 14.0 us with 16-row blocks, `--tp 2`), and also covers shapes not measured with it (qwen-1.8b's
# qkv 6144, qwen-14b's dense and c_proj 5120, tensor parallel 4's gate_up 5504); the H100 table (2026-11-25)
# measured 5-18% slower there. The H100 has no medium row of its own (its wide one).
_CONFIGS = {
    "H200": ((16, 1024, 4, 3), (16, 512, 4, 3), (8, 512, 4, 3)),
    "H100": ((16, 1024, 8, 3), (8, 1024, 8, 3), (8, 1024, 8, 3)),
}


def default_config(N: int, K: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) from the table of the device's GPU model (the H100's for a GPU
    without one: narrow outputs want wider row blocks to keep enough loads in flight). Off CUDA (Triton's
    interpreter, in the tests) programs run one after another: fewer, larger ones, K tiles no wider than K."""
    if device.type != "cuda":
        return 64, min(1024, triton.next_power_of_2(K)), 8, 3
    narrow, medium, wide = _CONFIGS.get(gpu_model(device), _CONFIGS["H100"])
    return narrow if N <= 4096 else medium if N <= 8192 else wide


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None, gated: bool = False,
         config: tuple[int, int, int, int] | None = None) -> Tensor:
    """x [..., K] with MAX_ROWS (one) row in total, weight [N, K] contiguous -> [..., N] in x.dtype.
    gated: x is [..., 2K] = [gate | up] and the product uses SiLU(gate) * up (the MLP's c_proj). config:
    (BLOCK_N, BLOCK_K, num_warps, num_stages), default_config's by default (the tuner passes its own)."""
    N, K = weight.shape
    x2 = x.reshape(-1, 2 * K if gated else K)
    M = x2.shape[0]
    assert 0 < M <= MAX_ROWS and weight.is_contiguous() and x2.stride(1) == 1
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = config or default_config(N, K, x.device)
    pdl = pdl_enabled(x.device)
    row_bytes = K * weight.element_size()
    prefetch = l2_prefetch_bytes(x.device, PREFETCH_BYTES, row_bytes, row_bytes)
    _gemv_kernel[(triton.cdiv(N, bn),)](x2, weight, bias if bias is not None else weight, y, N, K,
                                       HAS_BIAS=bias is not None, EVEN_K=K % bk == 0,
                                       BLOCK_N=bn, BLOCK_K=bk, GATED=gated, PDL=pdl, PREFETCH=prefetch,
                                       num_warps=warps, num_stages=stages, launch_pdl=pdl)
    return y.view(*x.shape[:-1], N)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, gated: bool = False) -> Tensor:
    """F.linear with the GEMV kernel for decode-sized inputs wherever the Triton kernels run (CUDA, or the CPU
    under Triton's interpreter, as in the tests); gated as in gemv()."""
    from qwen_trtllm.kernels import silu_mul, silu_mul_reference, triton_available

    kernels = triton_available(x.device)
    if kernels and x.numel() and x.numel() // x.shape[-1] <= MAX_ROWS and weight.is_contiguous():
        return gemv(x, weight, bias, gated)
    if gated:
        x = silu_mul(x) if kernels else silu_mul_reference(x)
    return torch.nn.functional.linear(x, weight, bias)
