"""The decode QKV projection with rotary, logn and the paged KV-cache write in its epilogue: one kernel where the
unfused path runs the GEMV (gemv.py) and then rotary_kv_write (rotary.py).

At batch 1 a decode step is a chain of dependent kernels, and the small ones cost their latency (~2-3 us each on
an H200, docs/PERF.md), not their bytes; this removes one per layer. NeoX rotate-half pairs output channel i of a q
or k head with channel i + head_dim / 2, so each rotary program owns PAIRS such pairs (2 x PAIRS weight rows, read
exactly as the GEMV reads its rows): it computes both dot products, adds the bias, rounds to the activation dtype
(the unfused GEMV's output), rotates in float32 (per-sequence inv_freq: dynamic NTK), applies Qwen's logn factor
to q and stores q, or stores k into the cache slot. The remaining programs compute v rows and store them into the
cache. Same roundings as the unfused pair: only the order of a few float32 products may differ (about 1 ulp).

Scope: plain (unquantised) weights, at most gemv.MAX_ROWS tokens, an unquantised cache, rotary over the whole head;
Kernels.qkv_rotary_kv_write in the model picks the unfused pair otherwise.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwen_trtllm.kernels.gemv import MAX_ROWS, PREFETCH_BYTES, _config, row_dots
from qwen_trtllm.kernels.launch import l2_prefetch_bytes, l2_prefetch_rows, pdl_enabled, pdl_start


@triton.jit
def _qkv_rotary_kernel(x_ptr, w_ptr, b_ptr, freq_ptr, pos_ptr, slot_ptr, idx_ptr, kc_ptr, vc_ptr, q_ptr, K,
                       stride_x, stride_freq, stride_pos, stride_slot, stride_idx, kc_sb, kc_sh, kc_ss, vc_sb, vc_sh,
                       vc_ss, logn_len, log_logn_len, M: tl.constexpr, N_HEADS: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_LOGN: tl.constexpr,
                       HAS_INDEX: tl.constexpr, EVEN_K: tl.constexpr, PAIRS: tl.constexpr, BLOCK_K: tl.constexpr,
                       PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0):
    pid = tl.program_id(0)
    HALF: tl.constexpr = HEAD_DIM // 2
    ROT_PROGRAMS: tl.constexpr = 2 * N_HEADS * HALF // PAIRS  # q and k heads, PAIRS pairs per program
    if pid < ROT_PROGRAMS:
        r = tl.arange(0, 2 * PAIRS)  # interleaved rows: (lo, hi) of each pair, one K loop for both
        pair = pid * PAIRS + r // 2
        head = pair // HALF  # 0..N_HEADS-1: q heads; N_HEADS..2 N_HEADS-1: k heads (one per program)
        rows = head * HEAD_DIM + pair % HALF + (r % 2) * HALF
        if PREFETCH > 0:
            l2_prefetch_rows(w_ptr + rows.to(tl.int64) * K, PREFETCH)
        pdl_start(PDL)
        p = pid * PAIRS + tl.arange(0, PAIRS)
        i = p % HALF
        is_q = p // HALF < N_HEADS
        for m in tl.static_range(M):
            y = row_dots(x_ptr + m * stride_x, w_ptr, rows, rows >= 0, K, EVEN_K, BLOCK_K)
            y = y + tl.load(b_ptr + rows).to(tl.float32)
            y_lo, y_hi = tl.split(tl.reshape(y, (PAIRS, 2)))
            y_lo = y_lo.to(q_ptr.dtype.element_ty).to(tl.float32)  # the unfused GEMV's output rounding
            y_hi = y_hi.to(q_ptr.dtype.element_ty).to(tl.float32)
            s = tl.load(idx_ptr + m * stride_idx).to(tl.int64) if HAS_INDEX else m
            pos = tl.load(pos_ptr + m * stride_pos).to(tl.int64)
            angle = pos.to(tl.float32) * tl.load(freq_ptr + s * stride_freq + i)
            cos, sin = tl.cos(angle), tl.sin(angle)
            r_lo = y_lo * cos + y_hi * -sin
            r_hi = y_hi * cos + y_lo * sin
            q_lo, q_hi = r_lo.to(q_ptr.dtype.element_ty), r_hi.to(q_ptr.dtype.element_ty)
            if USE_LOGN:  # rotate and round, then scale in float32 and round again (rotary.py's order)
                p1 = (pos + 1).to(tl.float32)
                scale = tl.where(p1 > logn_len, tl.log(p1) / log_logn_len, 1.0)
                q_lo = (q_lo.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)
                q_hi = (q_hi.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)
            head_p = p // HALF
            q_out = q_ptr + (m * N_HEADS + head_p) * HEAD_DIM + i
            tl.store(q_out, q_lo, mask=is_q)
            tl.store(q_out + HALF, q_hi, mask=is_q)
            slot = tl.load(slot_ptr + m * stride_slot).to(tl.int64)
            k_out = kc_ptr + (slot // BLOCK_SIZE) * kc_sb + (head_p - N_HEADS) * kc_sh + (slot % BLOCK_SIZE) * kc_ss + i
            tl.store(k_out, r_lo.to(kc_ptr.dtype.element_ty), mask=~is_q)
            tl.store(k_out + HALF, r_hi.to(kc_ptr.dtype.element_ty), mask=~is_q)
    else:  # (names distinct from the branch above: Triton requires one type per name across an if)
        v_rows = (pid - ROT_PROGRAMS) * (2 * PAIRS) + tl.arange(0, 2 * PAIRS)  # v channels, 2 x PAIRS per program
        v_ok = v_rows < N_HEADS * HEAD_DIM
        v_n = 2 * N_HEADS * HEAD_DIM + tl.minimum(v_rows, N_HEADS * HEAD_DIM - 1)
        if PREFETCH > 0:
            l2_prefetch_rows(w_ptr + v_n.to(tl.int64) * K, PREFETCH)
        pdl_start(PDL)
        for m in tl.static_range(M):
            v = row_dots(x_ptr + m * stride_x, w_ptr, v_n, v_ok, K, EVEN_K, BLOCK_K)
            v = (v + tl.load(b_ptr + v_n).to(tl.float32)).to(q_ptr.dtype.element_ty)
            v_slot = tl.load(slot_ptr + m * stride_slot).to(tl.int64)
            v_out = vc_ptr + (v_slot // BLOCK_SIZE) * vc_sb + (v_rows // HEAD_DIM) * vc_sh \
                + (v_slot % BLOCK_SIZE) * vc_ss
            tl.store(v_out + v_rows % HEAD_DIM, v.to(vc_ptr.dtype.element_ty), mask=v_ok)


def qkv_rotary_supported(x: Tensor, weight: Tensor, bias: Tensor | None, k_cache: Tensor, head_dim: int,
                         rotary_dim: int) -> bool:
    """Whether qkv_rotary_kv_write takes these inputs (else run the GEMV and rotary_kv_write)."""
    rows = x.numel() // x.shape[-1]
    return (0 < rows <= MAX_ROWS and bias is not None and weight.is_contiguous() and x.stride(-1) == 1
            and rotary_dim == head_dim and head_dim % 2 == 0 and k_cache.dtype == x.dtype == weight.dtype)


def qkv_rotary_kv_write(x: Tensor, weight: Tensor, bias: Tensor, inv_freq: Tensor, positions: Tensor,
                        slot_mapping: Tensor, k_cache: Tensor, v_cache: Tensor, n_heads: int, head_dim: int,
                        logn_seq_length: int = 0, seq_index: Tensor | None = None) -> Tensor:
    """q = rotary_kv_write(x @ weight^T + bias, ...) in one kernel (see the module docstring for the scope).

    x [N, K] (N <= gemv.MAX_ROWS tokens, last dim contiguous), weight [3 * n_heads * head_dim, K] contiguous and
    bias [3 * n_heads * head_dim] in x.dtype ([q heads | k heads | v heads]); the other arguments as
    rotary.rotary_kv_write's (rotary over the whole head, k_cache / v_cache in x.dtype). Writes k and v to the
    caches at slot_mapping; returns q [N, n_heads, head_dim] (contiguous, x.dtype). No host synchronisation."""
    N, K = x.shape
    width = n_heads * head_dim
    assert weight.shape == (3 * width, K) and bias.shape == (3 * width,)
    assert qkv_rotary_supported(x, weight, bias, k_cache, head_dim, head_dim)
    assert k_cache.shape == v_cache.shape and k_cache.shape[1] == n_heads and k_cache.shape[3] == head_dim
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert inv_freq.dtype == torch.float32 and inv_freq.shape[1] == head_dim // 2 and inv_freq.stride(1) == 1
    assert logn_seq_length == 0 or logn_seq_length > 1
    q = torch.empty(N, n_heads, head_dim, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = _config(3 * width, K, x.device)
    pairs = max(1, min(bn // 2, head_dim // 2))
    assert (head_dim // 2) % pairs == 0 and width % (2 * pairs) == 0
    pdl = pdl_enabled(x.device)
    prefetch = l2_prefetch_bytes(x.device, PREFETCH_BYTES, K * weight.element_size(), K * weight.element_size())
    logn = int(logn_seq_length)
    index = positions if seq_index is None else seq_index
    grid = (2 * n_heads * (head_dim // 2) // pairs + width // (2 * pairs),)
    _qkv_rotary_kernel[grid](
        x, weight, bias, inv_freq, positions, slot_mapping, index, k_cache, v_cache, q, K, x.stride(0),
        inv_freq.stride(0), positions.stride(0), slot_mapping.stride(0), index.stride(0), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        max(logn, 1), math.log(max(logn, 2)), M=N, N_HEADS=n_heads, HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[2], USE_LOGN=logn > 0, HAS_INDEX=seq_index is not None, EVEN_K=K % bk == 0,
        PAIRS=pairs, BLOCK_K=bk, PDL=pdl, PREFETCH=prefetch, num_warps=warps, num_stages=stages, launch_pdl=pdl)
    return q
