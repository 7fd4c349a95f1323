"""Decode-sized (<= MAX_ROWS rows) weight-only matmuls in the style of kernels/gemv.py: each program streams
BLOCK_N whole rows of the int8 / packed-int4 weight and dequantises them in registers, accumulating in float32.

int8: per-output-channel scale applied once at the end. int4: two values a byte (low nibble = even input index,
value - 8), one fp16 scale per row and group; a tile spans exactly one group so its scale is one load per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwen_trtllm.kernels.gemv import MAX_ROWS


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_x, stride_y, M: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    scale = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    for m in tl.static_range(M):
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            x = tl.load(x_ptr + m * stride_x + offs_k, mask=k_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1) * scale
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_y + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, n_groups, stride_x, stride_y, M: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    HALF: tl.constexpr = GROUP // 2  # packed bytes per group and row
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    kb = tl.arange(0, HALF)
    for m in tl.static_range(M):
        acc = tl.zeros((BLOCK_N, HALF), tl.float32)
        for g in tl.range(0, n_groups):
            b = tl.load(w_ptr + offs_n[:, None] * (K // 2) + g * HALF + kb[None, :], mask=n_ok[:, None], other=0)
            s = tl.load(s_ptr + offs_n * n_groups + g, mask=n_ok, other=0.0).to(tl.float32)
            xe = tl.load(x_ptr + m * stride_x + g * GROUP + 2 * kb).to(tl.float32)
            xo = tl.load(x_ptr + m * stride_x + g * GROUP + 2 * kb + 1).to(tl.float32)
            lo = (b & 0xF).to(tl.float32) - 8.0
            hi = (b >> 4).to(tl.float32) - 8.0
            acc += (lo * xe[None, :] + hi * xo[None, :]) * s[:, None]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_y + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def usable(x: Tensor, precision: str, group_size: int) -> bool:
    """Whether the GEMV path applies: CUDA (or the interpreter), at most MAX_ROWS rows, int4 groups of 16-512."""
    rows = x.numel() // x.shape[-1]
    ok_group = precision == "int8" or (group_size % 16 == 0 and 16 <= group_size <= 512)
    return rows <= MAX_ROWS and ok_group


def weight_only_gemv(x: Tensor, qweight: Tensor, scales: Tensor, precision: str, group_size: int = 128,
                     bias: Tensor | None = None, block_n: int | None = None) -> Tensor:
    """x [..., K] (<= MAX_ROWS rows) times the dequantised weight [N, K] transposed (+ bias) -> [..., N]."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], qweight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    b = bias if bias is not None else scales
    if precision == "int8":
        bn = block_n or 16
        _int8_gemv_kernel[(triton.cdiv(N, bn),)](x2, qweight, scales, b, y, N, K, x2.stride(0), y.stride(0), M=M,
                                                 HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=1024, num_warps=8,
                                                 num_stages=3)
    else:
        bn = block_n or 32
        _int4_gemv_kernel[(triton.cdiv(N, bn),)](x2, qweight, scales, b, y, N, K, K // group_size, x2.stride(0),
                                                 y.stride(0), M=M, HAS_BIAS=bias is not None, BLOCK_N=bn,
                                                 GROUP=group_size, num_warps=4, num_stages=4)
    return y.view(*x.shape[:-1], N)
