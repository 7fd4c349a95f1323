"""Rotary embedding fused with the paged KV-cache write, for decode tokens and prefill chunks alike.

One program per (token, head) reads that head's q, k and v from the fused QKV projection of the token, rotates q
and k (NeoX rotate-half over the first rotary_dim dims, float32, per-sequence inv_freq for dynamic NTK), applies
Qwen's logn factor to q, writes k and v into the paged caches at the token's slot (block * block_size + offset)
and returns q. With an int8 / fp8 cache (kv_quant.py) the program quantises its k and v vectors as it writes them:
float32 rotated k and v, one scale per (token, head) each, stored beside the codes.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwen_trtllm.kernels.kv_quant import QMAX, check_scales, native_rint, quantize_kv_reference, quantize_vector
from qwen_trtllm.kernels.launch import pdl_enabled, pdl_start


@triton.jit
def rotary_q_kv_write(row, freq_row, pos, slot, h, write_kv, kc_ptr, vc_ptr, ks_ptr, vs_ptr, kc_sb, kc_sh, kc_ss,
                      vc_sb, vc_sh, vc_ss, s_sb, s_sh, logn_len, log_logn_len, N_HEADS: tl.constexpr,
                      HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      USE_LOGN: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
                      FP8: tl.constexpr, NATIVE_RINT: tl.constexpr):
    """Head h of one token: its rotated (and logn-scaled) q [BLOCK_D] in the qkv dtype; when write_kv, its rotated
    k and its v written to the caches at `slot` (quantised with their scales when QUANT). row: the token's qkv row,
    freq_row: its sequence's inv_freq row, pos: its position (int64)."""
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    HALF: tl.constexpr = ROT_DIM // 2
    d = tl.arange(0, BLOCK_D)
    in_head = d < HEAD_DIM
    rotated = d < ROT_DIM
    first = d < HALF
    partner = tl.where(first, d + HALF, d - HALF)  # out[j] = x[j] c - x[j+half] s; out[j+half] = x[j+half] c + x[j] s
    freq = tl.load(freq_row + tl.where(first, d, d - HALF), mask=rotated, other=0.0)
    angle = pos.to(tl.float32) * freq  # the float32 product PyTorch forms; tl.cos / tl.sin lower to libdevice
    cos, sin = tl.cos(angle), tl.sin(angle)  # __nv_cosf / __nv_sinf on CUDA (full range reduction, ~1 ulp)
    sin = tl.where(first, -sin, sin)

    q_in = row + h * HEAD_DIM
    q = tl.load(q_in + d, mask=in_head, other=0.0).to(tl.float32)
    q_p = tl.load(q_in + partner, mask=rotated, other=0.0).to(tl.float32)
    q = tl.where(rotated, q * cos + q_p * sin, q).to(row.dtype.element_ty)
    if USE_LOGN:  # the model's order: rotate and round, then scale in float32 and round again
        p1 = (pos + 1).to(tl.float32)
        scale = tl.where(p1 > logn_len, tl.log(p1) / log_logn_len, 1.0)
        q = (q.to(tl.float32) * scale).to(row.dtype.element_ty)

    kv = in_head & write_kv
    k_in = row + (N_HEADS + h) * HEAD_DIM
    k = tl.load(k_in + d, mask=kv, other=0.0).to(tl.float32)
    k_p = tl.load(k_in + partner, mask=rotated & write_kv, other=0.0).to(tl.float32)
    k = tl.where(rotated, k * cos + k_p * sin, k)
    v = tl.load(row + (2 * N_HEADS + h) * HEAD_DIM + d, mask=kv, other=0.0)
    k_codes = kc_ptr + block * kc_sb + h * kc_sh + offset * kc_ss + d
    v_codes = vc_ptr + block * vc_sb + h * vc_sh + offset * vc_ss + d
    if QUANT:  # float32 k and v -> codes (values on the format's grid) + one scale each for this (token, head)
        if write_kv:  # the amax reductions only where the vectors are written
            k_q, k_scale = quantize_vector(k, QMAX, FP8, NATIVE_RINT)
            v_q, v_scale = quantize_vector(v.to(tl.float32), QMAX, FP8, NATIVE_RINT)
            tl.store(ks_ptr + block * s_sb + h * s_sh + offset, k_scale)
            tl.store(vs_ptr + block * s_sb + h * s_sh + offset, v_scale)
            tl.store(k_codes, k_q.to(kc_ptr.dtype.element_ty), mask=in_head)
            tl.store(v_codes, v_q.to(vc_ptr.dtype.element_ty), mask=in_head)
    else:
        tl.store(k_codes, k.to(kc_ptr.dtype.element_ty), mask=kv)
        tl.store(v_codes, v.to(vc_ptr.dtype.element_ty), mask=kv)
    return q


@triton.jit
def _rotary_kv_kernel(qkv_ptr, freq_ptr, pos_ptr, slot_ptr, idx_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, q_ptr,
                      stride_qkv, stride_freq, stride_pos, stride_slot, stride_idx, kc_sb, kc_sh, kc_ss, vc_sb, vc_sh,
                      vc_ss, s_sb, s_sh, logn_len, log_logn_len, N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      ROT_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_LOGN: tl.constexpr,
                      HAS_INDEX: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr = False,
                      QMAX: tl.constexpr = 127.0, FP8: tl.constexpr = False, NATIVE_RINT: tl.constexpr = False,
                      PDL: tl.constexpr = False):
    pdl_start(PDL, EARLY=True)
    b = tl.program_id(0).to(tl.int64)  # the token's row in qkv
    h = tl.program_id(1).to(tl.int64)
    s = tl.load(idx_ptr + b * stride_idx).to(tl.int64) if HAS_INDEX else b  # its sequence: inv_freq row
    slot = tl.load(slot_ptr + b * stride_slot).to(tl.int64)  # where its k and v go
    pos = tl.load(pos_ptr + b * stride_pos).to(tl.int64)
    q = rotary_q_kv_write(qkv_ptr + b * stride_qkv, freq_ptr + s * stride_freq, pos, slot, h, True, kc_ptr, vc_ptr,
                          ks_ptr, vs_ptr, kc_sb, kc_sh, kc_ss, vc_sb, vc_sh, vc_ss, s_sb, s_sh, logn_len,
                          log_logn_len, N_HEADS, HEAD_DIM, ROT_DIM, BLOCK_SIZE, USE_LOGN, BLOCK_D, QUANT, QMAX, FP8,
                          NATIVE_RINT)
    d = tl.arange(0, BLOCK_D)
    tl.store(q_ptr + (b * N_HEADS + h) * HEAD_DIM + d, q, mask=d < HEAD_DIM)


def rotary_kv_write(qkv: Tensor, inv_freq: Tensor, positions: Tensor, slot_mapping: Tensor, k_cache: Tensor,
                    v_cache: Tensor, n_heads: int, head_dim: int, rotary_dim: int, logn_seq_length: int = 0,
                    seq_index: Tensor | None = None, k_scale: Tensor | None = None,
                    v_scale: Tensor | None = None) -> Tensor:
    """Rotate the tokens' q and k, write k and v into the paged caches at slot_mapping; return q.

    qkv [N, 3 * n_heads * head_dim] ([q heads | k heads | v heads]; the row stride may exceed the width, the last dim is
    contiguous), fp32 / fp16 / bf16. inv_freq [S, rotary_dim // 2] float32, one row per sequence (dynamic NTK differs
    per sequence). positions [N] integer: each token's position in its sequence (the rotary angle and the logn factor).
    slot_mapping [N] int64: where its k and v go, slot = block * block_size + offset, written to cache[block, :,
    offset]. k_cache / v_cache [num_blocks, n_heads, block_size, head_dim] (last dim contiguous; stored in their own
    dtype; int8 / float8_e4m3fn: quantised as kv_quant.py says, the float32 rotated k and v, each (token, head)'s scale
    written to k_scale / v_scale [num_blocks, n_heads, block_size] float32 at the same slot; None for other dtypes).
    seq_index [N] int32 / int64 names each token's inv_freq row; None: token i uses row i (decode, one token per
    sequence; S >= N). q is rotated and then, when logn_seq_length > 0, scaled by ln(p+1)/ln(logn_seq_length) where p+1
    > logn_seq_length (rounded to the dtype after each step). Returns q [N, n_heads, head_dim], contiguous, in
    qkv.dtype. Tokens that share a slot (padding rows on the dummy block 0) race: one of them wins. No host
    synchronisation (CUDA-graph safe).
    """
    N = qkv.shape[0]
    logn, rotary = rotary_args(qkv, inv_freq, positions, slot_mapping, k_cache, n_heads, head_dim, rotary_dim,
                               logn_seq_length, seq_index)
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4, "caches: [num_blocks, n_heads, block_size, head_dim]"
    assert k_cache.shape[1] == n_heads and k_cache.shape[3] == head_dim
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    check_scales(k_cache, v_cache, k_scale, v_scale)
    q = torch.empty(N, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if N == 0:
        return q
    index = positions if seq_index is None else seq_index
    pdl = pdl_enabled(qkv.device)
    quant = k_scale is not None
    ks, vs = (k_scale, v_scale) if quant else (k_cache, v_cache)  # unused pointers without scales
    _rotary_kv_kernel[(N, n_heads)](
        qkv, inv_freq, positions, slot_mapping, index, k_cache, v_cache, ks, vs, q, qkv.stride(0),
        inv_freq.stride(0), positions.stride(0), slot_mapping.stride(0), index.stride(0), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        ks.stride(0) if quant else 0, ks.stride(1) if quant else 0, *logn, N_HEADS=n_heads, HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[2], HAS_INDEX=seq_index is not None, BLOCK_D=triton.next_power_of_2(head_dim),
        QUANT=quant, PDL=pdl, num_warps=1 if head_dim <= 128 else 2, launch_pdl=pdl, **rotary)
    return q


def rotary_args(qkv: Tensor, inv_freq: Tensor, positions: Tensor, slot_mapping: Tensor, k_cache: Tensor,
                n_heads: int, head_dim: int, rotary_dim: int, logn_seq_length: int,
                seq_index: Tensor | None = None) -> tuple[tuple[int, float], dict]:
    """The checks on the rotary arguments shared by rotary_kv_write and the decode attention kernel that runs its
    work (paged_attention.rotary_paged_decode_attention), and what both kernels take for rotary_q_kv_write:
    ((logn_len, log_logn_len), {ROT_DIM, USE_LOGN, QMAX, FP8, NATIVE_RINT}). AssertionError on bad arguments."""
    N = qkv.shape[0]
    assert qkv.dim() == 2 and qkv.shape[1] == 3 * n_heads * head_dim and qkv.stride(1) == 1
    assert rotary_dim % 2 == 0 and 0 < rotary_dim <= head_dim
    assert inv_freq.dim() == 2 and inv_freq.shape[1] == rotary_dim // 2 and inv_freq.stride(1) == 1
    assert inv_freq.dtype == torch.float32 and (seq_index is not None or inv_freq.shape[0] >= N)
    assert seq_index is None or (seq_index.shape == (N,) and not seq_index.is_floating_point())
    assert positions.shape == (N,) and not positions.is_floating_point()
    assert slot_mapping.shape == (N,) and not slot_mapping.is_floating_point()
    assert logn_seq_length == 0 or logn_seq_length > 1
    logn = int(logn_seq_length)
    return (max(logn, 1), math.log(max(logn, 2))), dict(
        ROT_DIM=rotary_dim, USE_LOGN=logn > 0, QMAX=QMAX.get(k_cache.dtype, 127.0),
        FP8=k_cache.dtype == torch.float8_e4m3fn, NATIVE_RINT=native_rint(qkv.device))


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


def rotary_kv_write_reference(qkv: Tensor, inv_freq: Tensor, positions: Tensor, slot_mapping: Tensor,
                              k_cache: Tensor, v_cache: Tensor, n_heads: int, head_dim: int, rotary_dim: int,
                              logn_seq_length: int = 0, seq_index: Tensor | None = None,
                              k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> Tensor:
    """Plain PyTorch rotary_kv_write (same in-place cache writes, same returned q; no host synchronisation);
    int8 / fp8 caches: quantize_kv_reference of the float32 rotated k and of v."""
    N = qkv.shape[0]
    rows = torch.arange(N, device=qkv.device) if seq_index is None else seq_index.long()
    q, k, v = qkv.unflatten(1, (3, n_heads, head_dim)).unbind(1)  # each [N, n_heads, head_dim]
    angles = positions.float()[:, None] * inv_freq.float()[rows]  # [N, rotary_dim // 2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    quant = k_scale is not None
    q = apply_rotary_reference(q, cos, sin, rotary_dim)
    k = apply_rotary_reference(k.float() if quant else k, cos, sin, rotary_dim)
    if logn_seq_length > 0:
        q = (q.float() * logn_scale_reference(positions, logn_seq_length)[:, None, None]).to(q.dtype)
    slot, bs = slot_mapping.long(), k_cache.shape[2]
    blocks, offsets = slot // bs, slot % bs
    for cache, scales, x in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
        if quant:
            x, s = quantize_kv_reference(x, cache.dtype)
            scales[blocks, :, offsets] = s  # [N, n_heads] at scales[block, :, offset]
        cache[blocks, :, offsets] = x.to(cache.dtype)  # [N, n_heads, head_dim] at cache[block, :, offset]
    return q.contiguous()
