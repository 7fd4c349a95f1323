"""Symmetric absmax quantisation with one scale per vector (the last dim): the arithmetic shared by the quantised
KV cache (int8 / e4m3 codes per token and head, kernels/kv_quant.py) and the fp8 linears (e4m3 weights per output
channel, activations per token, fp8.py). Pure PyTorch, so the CPU references need no Triton; the kernels'
`quantize_vector` (kernels/kv_quant.py) computes the same bits.

scale = amax(|x|) / QMAX, code = round_to_nearest_even(x * (QMAX / amax)), both quotients the correctly rounded
float32 ones (float64 division rounded once: 53 >= 2 * 24 + 2 bits; PyTorch's own float32 division by a scalar
may multiply by its reciprocal). An all-zero vector: codes 0, scale 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}  # the largest code of each format


def quantize_absmax(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x [..., D] -> (codes [..., D] in dtype (torch.int8 / torch.float8_e4m3fn), scales [...] float32)."""
    qmax = QMAX[dtype]
    xf = x.float()
    amax = xf.abs().amax(dim=-1).double()
    inv = torch.where(amax > 0, qmax / amax.where(amax > 0, 1.0), 0.0).float()
    y = (xf * inv[..., None]).clamp_(-qmax, qmax)
    codes = torch.round(y).to(dtype) if dtype == torch.int8 else y.to(dtype)
    return codes, (amax / qmax).float()
