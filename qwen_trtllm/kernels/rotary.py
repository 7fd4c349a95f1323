"""Decode-step rotary embedding fused with the KV-cache write.

One program per (sequence, head) reads that head's q, k and v from the fused QKV projection of the new token,
rotates q and k (NeoX rotate-half over the first rotary_dim dims, float32, per-sequence inv_freq for dynamic NTK),
applies Qwen's logn factor to q, writes k and v into the cache slot positions[b] and returns q.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwen_trtllm.kernels.launch import pdl_enabled, pdl_start


@triton.jit
def _rotary_kv_kernel(qkv_ptr, freq_ptr, pos_ptr, idx_ptr, kc_ptr, vc_ptr, q_ptr, stride_qkv, stride_freq, stride_pos,
                      kc_sb, kc_sh, kc_ss, vc_sb, vc_sh, vc_ss, logn_len, log_logn_len,
                      N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr, USE_LOGN: tl.constexpr,
                      HAS_INDEX: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL, EARLY=True)
    b = tl.program_id(0).to(tl.int64)  # the token's row in qkv
    h = tl.program_id(1).to(tl.int64)
    s = tl.load(idx_ptr + b).to(tl.int64) if HAS_INDEX else b  # its sequence: cache row and inv_freq row
    HALF: tl.constexpr = ROT_DIM // 2
    d = tl.arange(0, BLOCK_D)
    in_head = d < HEAD_DIM
    rotated = d < ROT_DIM
    first = d < HALF
    partner = tl.where(first, d + HALF, d - HALF)  # out[j] = x[j] c - x[j+half] s; out[j+half] = x[j+half] c + x[j] s
    pos = tl.load(pos_ptr + b * stride_pos).to(tl.int64)
    freq = tl.load(freq_ptr + s * stride_freq + tl.where(first, d, d - HALF), mask=rotated, other=0.0)
    angle = pos.to(tl.float32) * freq  # the float32 product PyTorch forms; tl.cos / tl.sin lower to libdevice
    cos, sin = tl.cos(angle), tl.sin(angle)  # __nv_cosf / __nv_sinf on CUDA (full range reduction, ~1 ulp)
    sin = tl.where(first, -sin, sin)

    row = qkv_ptr + b * stride_qkv
    q_in = row + h * HEAD_DIM
    q = tl.load(q_in + d, mask=in_head, other=0.0).to(tl.float32)
    q_p = tl.load(q_in + partner, mask=rotated, other=0.0).to(tl.float32)
    q = tl.where(rotated, q * cos + q_p * sin, q).to(q_ptr.dtype.element_ty)
    if USE_LOGN:  # the model's order: rotate and round, then scale in float32 and round again
        p1 = (pos + 1).to(tl.float32)
        scale = tl.where(p1 > logn_len, tl.log(p1) / log_logn_len, 1.0)
        q = (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + (b * N_HEADS + h) * HEAD_DIM + d, q, mask=in_head)

    k_in = row + (N_HEADS + h) * HEAD_DIM
    k = tl.load(k_in + d, mask=in_head, other=0.0).to(tl.float32)
    k_p = tl.load(k_in + partner, mask=rotated, other=0.0).to(tl.float32)
    k = tl.where(rotated, k * cos + k_p * sin, k)
    tl.store(kc_ptr + s * kc_sb + h * kc_sh + pos * kc_ss + d, k.to(kc_ptr.dtype.element_ty), mask=in_head)

    v = tl.load(row + (2 * N_HEADS + h) * HEAD_DIM + d, mask=in_head, other=0.0)
    tl.store(vc_ptr + s * vc_sb + h * vc_sh + pos * vc_ss + d, v.to(vc_ptr.dtype.element_ty), mask=in_head)


def rotary_kv_write(qkv: Tensor, inv_freq: Tensor, positions: Tensor, k_cache: Tensor, v_cache: Tensor,
                    n_heads: int, head_dim: int, rotary_dim: int, logn_seq_length: int = 0,
                    batch_index: Tensor | None = None) -> Tensor:
    """Rotate the new tokens' q and k, write k and v into the caches at positions[b]; return q.

    qkv [B, 3 * n_heads * head_dim] ([q heads | k heads | v heads]), inv_freq [B, rotary_dim // 2] float32,
    positions [B] integer (the slot written), k_cache / v_cache [max_batch, n_heads, max_seq, head_dim] (rows
    0..B-1 used). q is logn-scaled when logn_seq_length > 0. Returns q [B, n_heads, head_dim] in qkv.dtype.
    For a prefill, the B rows are all tokens of several sequences and batch_index [B] names each token's
    sequence (its cache row and inv_freq row).
    """
    B = qkv.shape[0]
    assert qkv.shape == (B, 3 * n_heads * head_dim) and qkv.stride(1) == 1
    assert rotary_dim % 2 == 0 and 0 < rotary_dim <= head_dim
    rows = B if batch_index is None else inv_freq.shape[0]
    assert inv_freq.shape == (rows, rotary_dim // 2) and inv_freq.stride(1) == 1 and inv_freq.dtype == torch.float32
    assert batch_index is None or (batch_index.shape == (B,) and batch_index.is_contiguous())
    assert positions.shape == (B,) and not positions.is_floating_point()
    assert logn_seq_length == 0 or logn_seq_length > 1
    for c in (k_cache, v_cache):
        assert c.dim() == 4 and c.shape[0] >= rows and c.shape[1] == n_heads and c.shape[3] == head_dim
        assert c.stride(3) == 1
    q = torch.empty(B, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if B == 0:
        return q
    logn = int(logn_seq_length)
    pdl = pdl_enabled(qkv.device)
    _rotary_kv_kernel[(B, n_heads)](
        qkv, inv_freq, positions, positions if batch_index is None else batch_index, k_cache, v_cache, q,
        qkv.stride(0), inv_freq.stride(0), positions.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), max(logn, 1), math.log(max(logn, 2)),
        N_HEADS=n_heads, HEAD_DIM=head_dim, ROT_DIM=rotary_dim, USE_LOGN=logn > 0, HAS_INDEX=batch_index is not None,
        BLOCK_D=triton.next_power_of_2(head_dim), PDL=pdl, num_warps=1 if head_dim <= 128 else 2, launch_pdl=pdl)
    return q


def apply_rotary_reference(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int) -> Tensor:
    """NeoX rotate-half of x [..., D] over its first rotary_dim dims in float32, cast back to x.dtype.

    cos and sin [..., rotary_dim // 2] broadcast against x's leading dims.
    """
    half = rotary_dim // 2
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1).to(x.dtype)


def logn_scale_reference(positions: Tensor, logn_seq_length: int) -> Tensor:
    """Qwen's logn factor [B] (float32) for 0-based positions: ln(p+1)/ln(L) where p+1 > L, else 1."""
    p1 = (positions + 1).float()
    if logn_seq_length <= 0:
        return torch.ones_like(p1)
    return torch.where(p1 > logn_seq_length, torch.log(p1) / math.log(logn_seq_length), torch.ones_like(p1))


def rotary_kv_write_reference(qkv: Tensor, inv_freq: Tensor, positions: Tensor, k_cache: Tensor, v_cache: Tensor,
                              n_heads: int, head_dim: int, rotary_dim: int, logn_seq_length: int = 0,
                              batch_index: Tensor | None = None) -> Tensor:
    """Plain PyTorch rotary_kv_write (same in-place cache writes, same returned q)."""
    B = qkv.shape[0]
    rows = torch.arange(B, device=qkv.device) if batch_index is None else batch_index.long()
    q, k, v = qkv.view(B, 3, n_heads, head_dim).unbind(1)  # each [B, n_heads, head_dim]
    angles = positions.float()[:, None] * inv_freq.float()[rows]  # [B, rotary_dim // 2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    q, k = apply_rotary_reference(q, cos, sin, rotary_dim), apply_rotary_reference(k, cos, sin, rotary_dim)
    if logn_seq_length > 0:
        q = (q.float() * logn_scale_reference(positions, logn_seq_length)[:, None, None]).to(q.dtype)
    pos = positions.long()
    k_cache[rows, :, pos] = k.to(k_cache.dtype)
    v_cache[rows, :, pos] = v.to(v_cache.dtype)
    return q.contiguous()
