"""The quantised KV cache's number format (build.py --int8_kv_cache / --fp8_kv_cache), shared by the kernels that
write it (rotary_kv_write), read it (paged decode / prefill attention) and copy it (copy_kv_blocks).

K and V are stored as 8-bit codes, int8 (symmetric, round to nearest even) or fp8 e4m3 (torch.float8_e4m3fn,
round to nearest even), with one float32 scale per (token, head) computed when the token is written:
scale = amax(|x|) over head_dim / QMAX (127 for int8, 448 for e4m3), code = round(x * QMAX / amax), x ~ code *
scale (all codes 0 and scale 0 for an all-zero vector). No calibration set: each token's K and V of each head get
their own range, so a head or token with small values keeps its relative precision (TensorRT-LLM's int8 KV cache
has one calibrated scale per tensor). The scales live beside the caches, `[layers, num_blocks, heads,
tokens_per_block]` float32: 4 bytes per token and head for each of K and V, +3.1% over 128 int8 values.

Readers dequantise in registers: decode multiplies each key's q.k score by its K scale and each probability by
its V scale (one multiply per key instead of one per element); prefill multiplies the scores' columns by the K
scales and dequantises the V tile before the P.V product. The references dequantise the gathered cache first.

Triton's CPU interpreter (Triton 3.6) loads fp8 e4m3 correctly but converts float32 -> fp8 wrongly (rounding
carries into the exponent are dropped: 7.95 -> 4.0; ~13% of random values differ from torch's conversion), so
the kernels round to the e4m3 grid themselves in float32 (exact, the same on the GPU) and convert values that are
already representable; libdevice.rint is not available in the interpreter, which rounds with the 1.5 * 2^23 trick.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from qwen_trtllm.quantization.absmax import QMAX, quantize_absmax

SCALE_DTYPE = torch.float32


def is_quantized(dtype: torch.dtype) -> bool:
    """Whether caches of this dtype hold codes with per-(token, head) scales."""
    return dtype in QMAX


def check_scales(k_cache: Tensor, v_cache: Tensor, k_scale: Tensor | None, v_scale: Tensor | None) -> None:
    """Scales are given exactly for int8 / fp8 caches: float32 [*cache.shape[:-1]] (per layer: [num_blocks,
    heads, block_size]), last dim contiguous, K and V alike (AssertionError otherwise)."""
    assert k_cache.dtype == v_cache.dtype, "K and V caches of one dtype"
    if not is_quantized(k_cache.dtype):
        assert k_scale is None and v_scale is None, f"{k_cache.dtype} caches take no scales"
        return
    assert k_scale is not None and v_scale is not None, f"{k_cache.dtype} caches need k_scale and v_scale"
    assert k_scale.shape == v_scale.shape == k_cache.shape[:-1], "scales: the caches' shape without head_dim"
    assert k_scale.dtype == v_scale.dtype == SCALE_DTYPE and k_scale.stride() == v_scale.stride()
    assert k_scale.stride(-1) == 1


def quantize_kv_reference(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x [..., head_dim] -> (codes [..., head_dim] in dtype (torch.int8 / torch.float8_e4m3fn), scales [...]
    float32): one scale per vector, amax / QMAX; codes = round_to_nearest_even(x * (QMAX / amax))
    (quantization/absmax.py)."""
    return quantize_absmax(x, dtype)


def dequantize_kv_reference(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """codes [..., head_dim] x scale [...] -> values [..., head_dim] in dtype."""
    return codes.to(dtype) * scale.to(dtype)[..., None]


@triton.jit
def _rint(x, NATIVE: tl.constexpr):
    """Round to the nearest integer, ties to even: libdevice on CUDA; elsewhere (Triton's interpreter) adding and
    subtracting 1.5 * 2^23, exact for |x| < 2^22."""
    if NATIVE:
        return libdevice.rint(x)
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _round_e4m3(y, NATIVE: tl.constexpr):
    """float32 y (|y| <= 448) rounded to the nearest e4m3 value (ties to even), as float32: the step is
    2^(e - 3) for y in [2^e, 2^(e+1)), 2^-9 below 2^-6 (subnormals); all powers of two built from their bits."""
    e = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((e + 124) << 23).to(tl.float32, bitcast=True)
    inv_step = ((130 - e) << 23).to(tl.float32, bitcast=True)
    return _rint(y * inv_step, NATIVE) * step


@triton.jit
def quantize_vector(x, QMAX: tl.constexpr, FP8: tl.constexpr, NATIVE: tl.constexpr):
    """One (token, head) vector x [BLOCK_D] float32 (lanes past head_dim 0) -> (its codes as float32 values on
    the format's grid, exactly representable in it; its scale): quantize_kv_reference's arithmetic."""
    amax = tl.max(tl.abs(x), axis=0)
    qmax = tl.full([], QMAX, tl.float32)
    inv = tl.where(amax > 0.0, tl.math.div_rn(qmax, tl.where(amax > 0.0, amax, 1.0)), 0.0)  # IEEE division
    y = tl.minimum(tl.maximum(x * inv, -QMAX), QMAX)
    if FP8:
        y = _round_e4m3(y, NATIVE)
    else:
        y = _rint(y, NATIVE)
    return y, tl.math.div_rn(amax, qmax)


def native_rint(device: torch.device) -> bool:
    """Whether quantize_vector may use libdevice (compiled kernels on CUDA, not the interpreter)."""
    return device.type == "cuda" and not _interpreted()


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_rint, InterpretedFunction)


__all__ = ["QMAX", "SCALE_DTYPE", "check_scales", "dequantize_kv_reference", "is_quantized", "native_rint",
           "quantize_kv_reference", "quantize_vector"]

