"""Fused residual add + RMSNorm, one program per row.

Qwen's RMSNorm as transformers computes it: h32 = h.float(); n = h32 * rsqrt(mean(h32^2) + eps);
out = weight * n.to(h.dtype). With a residual, h = (x + residual) (added in float32, rounded to x.dtype) is both
the normalised input and the new residual stream, so a decode layer reads each activation once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwen_trtllm.kernels.launch import pdl_enabled, pdl_start


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, h_ptr, N, eps, stride_x, stride_r, stride_out, stride_h,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL, EARLY=True)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    else:
        h = x
    tl.store(out_ptr + row * stride_out + cols, rms_norm_row(h, w_ptr, cols, mask, N, eps).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def rms_norm_row(h, w_ptr, cols, mask, N, eps):
    """weight * RMSNorm(h) of one row h [BLOCK] (model dtype, zero where ~mask), in float32: normalised in float32,
    rounded to h's dtype, then scaled (the HF order)."""
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / N
    n = (hf * tl.rsqrt(var + eps)).to(h.dtype).to(tl.float32)
    return tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * n


def _rows(t: Tensor, n: int) -> Tensor:
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(RMSNorm(h) * weight, h) for h = x + residual (or h = x); x, residual [..., H], weight [H].

    The output has dtype promote(weight, x) (x.dtype when the weight is in the model dtype) and x's shape; h is
    in x.dtype (x itself when residual is None).
    """
    H = x.shape[-1]
    assert weight.shape == (H,) and weight.is_contiguous()
    x2 = _rows(x, H)
    M = x2.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is not None:
        assert residual.shape == x.shape
        r2 = _rows(residual, H)
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        r2, h = x2, x
    h2 = h.view(-1, H) if residual is not None else x2
    block = triton.next_power_of_2(H)
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    if M:
        pdl = pdl_enabled(x.device)
        _rms_norm_kernel[(M,)](x2, r2, weight, out, h2, H, eps, x2.stride(0), r2.stride(0), H, h2.stride(0),
                               HAS_RESIDUAL=residual is not None, BLOCK=block, PDL=pdl, num_warps=warps,
                               launch_pdl=pdl)
    return out, h


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Plain PyTorch rms_norm: the same rounding steps as the kernel and as transformers' Qwen2RMSNorm."""
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(x.dtype), h
