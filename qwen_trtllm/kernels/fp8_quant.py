"""Per-token e4m3 quantisation of activations for torch._scaled_mm (quantization/fp8.py's large-batch path): one
program per row of x, one pass over HBM, instead of PyTorch's chain of float / abs / amax / div / clamp / cast
kernels (about eight launches per linear, ~1000 per decode step of the 7B model at batch 64).

The format is quantization/fp8.py's (`quantize_fp8_activation`): scale = max(amax(|x_row|) / 448, 2^-30), codes
= x * (448 / amax) rounded to the nearest e4m3 value (ties to even), both quotients correctly rounded float32 (the
KV cache's quantize_vector, kernels/kv_quant.py), so the kernel's codes and scales equal the reference's bit for
bit. gated=True reads x as the MLP's [gate | up] ([M, 2K]) and quantises SiLU(gate) * up (silu_times: silu_mul's
roundings in x's dtype), so c_proj needs no silu_mul launch. The rounding to the e4m3 grid is done in float32
(Triton's interpreter converts float32 -> fp8 wrongly; values already on the grid convert exactly everywhere).
H200, batch-512 decode step of the 7B model: 1.41 ms for its 128 launches (1.84 when every element was divided).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwen_trtllm.kernels.activation import silu_mul_reference, silu_times
from qwen_trtllm.kernels.kv_quant import native_rint, quantize_vector
from qwen_trtllm.kernels.launch import pdl_enabled, pdl_start
from qwen_trtllm.quantization.fp8 import FP8_MAX, SCALE_MIN, quantize_fp8_activation


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, GATED: tl.constexpr, BLOCK: tl.constexpr,
                          NATIVE: tl.constexpr, FMAX: tl.constexpr, SMIN: tl.constexpr,
                          PDL: tl.constexpr = False):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < K
    xv = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if GATED:
        xv = silu_times(xv, tl.load(x_ptr + row * stride_x + K + cols, mask=ok, other=0.0))
    codes, scale = quantize_vector(xv.to(tl.float32), FMAX, True, NATIVE)
    tl.store(q_ptr + row * stride_q + cols, codes.to(tl.float8e4nv), mask=ok)
    tl.store(s_ptr + row, tl.maximum(scale, SMIN))


def quantize_fp8_rows(x: Tensor, gated: bool = False) -> tuple[Tensor, Tensor]:
    """x [M, K] (fp16 / bf16 / fp32; gated: [M, 2K] = [gate | up], quantising SiLU(gate) * up) -> (codes
    float8_e4m3fn [M, K] contiguous, scales float32 [M]). Equals quantize_fp8_rows_reference bit for bit (gated:
    up to the last bit of SiLU's exp). Never synchronises: CUDA-graph safe."""
    M, KX = x.shape
    assert not gated or KX % 2 == 0, "gated rows are [gate | up]"
    K = KX // 2 if gated else KX
    if x.stride(1) != 1:
        x = x.contiguous()
    codes = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(M, dtype=torch.float32, device=x.device)
    if M and K:
        block = triton.next_power_of_2(K)
        pdl = pdl_enabled(x.device)
        _quantize_rows_kernel[(M,)](x, codes, scales, K, x.stride(0), codes.stride(0), GATED=gated, BLOCK=block,
                                    NATIVE=native_rint(x.device), FMAX=FP8_MAX, SMIN=SCALE_MIN, PDL=pdl,
                                    num_warps=max(1, min(16, block // 512)), launch_pdl=pdl)
    return codes, scales


def quantize_fp8_rows_reference(x: Tensor, gated: bool = False) -> tuple[Tensor, Tensor]:
    """quantize_fp8_rows in PyTorch: x [M, K] (gated: [M, 2K], silu_mul_reference first) -> (e4m3 codes [M, K],
    float32 scales [M]): quantize_fp8_activation."""
    return quantize_fp8_activation(silu_mul_reference(x) if gated else x)
