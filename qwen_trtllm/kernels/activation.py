"""SwiGLU activation of the fused gate/up projection: out = silu(gate) * up.

gate_up [M, 2F] holds the gated branch (Qwen's w2) in its first F columns and the up branch (w1) in the last F.
silu is computed in float32 and rounded to the input dtype before the product, the same rounding steps as
PyTorch's up * F.silu(gate) on half-precision tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from qwen_trtllm.kernels.launch import pdl_enabled, pdl_start

BLOCK_F = 1024


@triton.jit
def silu_times(gate, up):
    """SiLU(gate) * up with PyTorch's roundings (SiLU in float32, rounded to the input dtype, then the product)."""
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, F, stride_gu, stride_out, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL, EARLY=True)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * stride_gu + F + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, silu_times(gate, up), mask=mask)


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate_up[..., :F]) * gate_up[..., F:] for gate_up [..., 2F]; returns [..., F] in gate_up.dtype."""
    two_f = gate_up.shape[-1]
    assert two_f % 2 == 0
    f = two_f // 2
    gu = gate_up.reshape(-1, two_f)
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    M = gu.shape[0]
    out = torch.empty(*gate_up.shape[:-1], f, dtype=gate_up.dtype, device=gate_up.device)
    block = min(BLOCK_F, triton.next_power_of_2(max(f, 1)))
    if M and f:
        pdl = pdl_enabled(gate_up.device)
        _silu_mul_kernel[(M, triton.cdiv(f, block))](gu, out, f, gu.stride(0), f, BLOCK=block, PDL=pdl,
                                                      num_warps=4 if block >= 512 else 2, launch_pdl=pdl)
    return out


def silu_mul_reference(gate_up: Tensor) -> Tensor:
    """Plain PyTorch silu_mul."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate.float()).to(gate_up.dtype) * up
