"""The FP8 GEMV of decode: y = x @ (codes * scales)^T (+ bias) for 1-16 rows of x, e4m3 weights [N, K] streamed
once from HBM (1 byte per weight, half of fp16's) with one float32 scale per output channel.

Each program owns BLOCK_N whole weight rows and walks K in BLOCK_K tiles: the e4m3 codes are converted in
registers to x's dtype (exact: e4m3's 3 mantissa bits and exponent range fit fp16 and bf16) and multiplied with
the activation tile by tl.dot (rows padded to 16, float32 accumulation; fp32 activations in full IEEE
precision; bf16 ones in float32 under the interpreter, whose tl.dot misreads bf16); the per-channel scale
multiplies the accumulated row once at the end. The activations are not quantised (quantization/fp8.py says
why). The codes are only loaded and widened, never produced, so Triton's CPU interpreter (which converts
float32 -> fp8 wrongly but loads e4m3 correctly) runs it as the GPU does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_ROWS = 16


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_y, HAS_BIAS: tl.constexpr,
                     EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        if EVEN_K:
            w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], mask=n_ok[:, None], other=0.0)
        else:
            w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = w.to(tl.float32).to(x.dtype)  # e4m3 -> the activations' dtype, exactly
        if UPCAST:  # bf16 under the interpreter, whose tl.dot multiplies bf16 operands as raw bits: exact in fp32
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    y = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _config(N: int, K: int, on_cuda: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages). On CUDA 16-row blocks (256 programs for N = 4096, enough for
    132 SMs) and 512-byte K tiles: a first guess, to be tuned on the H200 (scripts/gpu_gemv_tune.py's method).
    Off CUDA (the interpreter, in tests) few, large programs."""
    if not on_cuda:
        return 64, min(256, triton.next_power_of_2(K)), 4, 1
    return 16, min(512, max(16, triton.next_power_of_2(K))), 4, 4


def fp8_gemv(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [M, K] (M <= 16; fp16/bf16/fp32) @ (qweight e4m3 [N, K] * scales float32 [N])^T (+ bias [N]) -> [M, N]
    in x.dtype."""
    M, K = x.shape
    N = qweight.shape[0]
    if not (0 < M <= MAX_ROWS) or qweight.shape != (N, K) or qweight.dtype != torch.float8_e4m3fn \
            or scales.shape != (N,) or scales.dtype != torch.float32:
        raise ValueError(f"fp8 GEMV: x [{M}, {K}] (1-{MAX_ROWS} rows) needs qweight float8_e4m3fn [N, {K}] and "
                         f"float32 scales [N]; got {qweight.dtype} {tuple(qweight.shape)}, {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    assert qweight.is_contiguous() and scales.is_contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = _config(N, K, x.is_cuda)
    _fp8_gemv_kernel[(triton.cdiv(N, bn),)](x, qweight, scales, bias if bias is not None else scales, y, M, N, K,
                                           x.stride(0), y.stride(0), HAS_BIAS=bias is not None,
                                           EVEN_K=K % bk == 0, IEEE=x.dtype == torch.float32,
                                           UPCAST=x.dtype == torch.bfloat16 and not x.is_cuda, BLOCK_M=16,
                                           BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return y


def fp8_gemv_reference(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """The GEMV's product in float32 with unquantised activations -> [M, N] in x.dtype."""
    from qwen_trtllm.quantization.fp8 import fp8_linear_reference

    return fp8_linear_reference(x, qweight, scales, bias, quantize_activations=False)
