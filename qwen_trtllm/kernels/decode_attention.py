"""Flash-decoding attention for one query token per sequence over a static KV cache.

Stage 1 (grid B x heads x num_splits): split s of sequence b covers keys [s * chunk, (s + 1) * chunk) clipped to
seq_lens[b], with chunk = ceil(seq_lens[b] / num_splits) rounded up to whole BLOCK_N tiles, so the work spreads
over all splits whatever the context length while the grid stays static (CUDA-graph friendly). It keeps a running
max, sum and accumulator in float32 (base-2 exponent) and writes the normalised partial output and its
log-sum-exp to a float32 workspace; a split with no keys writes the neutral partial (lse = -inf, output 0).
Stage 2 (grid B x heads) merges the splits with the log-sum-exp rule. With one split stage 1 writes the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwen_trtllm.kernels.launch import pdl_enabled, pdl_start, sm_count

BLOCK_N = 64  # keys per tile; also the smallest chunk a split handles
_LOG2E = 1.4426950408889634


@triton.jit
def _decode_attn_split_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, o_ptr, lse_ptr, qk_scale, max_seq,
                              stride_qb, stride_qh, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss,
                              N_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, NUM_STAGES: tl.constexpr,
                              PDL: tl.constexpr = False):
    pdl_start(PDL, EARLY=True)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    seq_len = tl.minimum(tl.load(lens_ptr + b).to(tl.int32), max_seq)
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = s * chunk
    end = tl.minimum(start + chunk, seq_len)

    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * qk_scale  # log2 units
    k_base = k_ptr + b * k_sb + h * k_sh
    v_base = v_ptr + b * v_sb + h * v_sh
    run_max = -float("inf")
    denom = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for n0 in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        # both tiles are requested before any arithmetic, so their memory latencies overlap
        k = tl.load(k_base + n[:, None].to(tl.int64) * k_ss + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + n[:, None].to(tl.int64) * v_ss + d[None, :], mask=valid[:, None], other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        scores = tl.where(valid, scores, -float("inf"))
        new_max = tl.maximum(run_max, tl.max(scores, axis=0))  # finite: every tile holds a valid key
        alpha = tl.exp2(run_max - new_max)
        p = tl.exp2(scores - new_max)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        denom = denom * alpha + tl.sum(p, axis=0)
        run_max = new_max

    has_keys = denom > 0.0
    denom = tl.where(has_keys, denom, 1.0)
    out = acc / denom
    if DIRECT:
        tl.store(o_ptr + (b * N_HEADS + h) * HEAD_DIM + d, out.to(o_ptr.dtype.element_ty))
    else:
        slot = (b * N_HEADS + h) * NUM_SPLITS + s
        tl.store(o_ptr + slot * HEAD_DIM + d, out)
        tl.store(lse_ptr + slot, tl.where(has_keys, run_max + tl.log2(denom), -float("inf")))


@triton.jit
def _decode_attn_merge_kernel(o_ws_ptr, lse_ptr, out_ptr, N_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr,
                              HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL, EARLY=True)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    row = b * N_HEADS + h
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(lse_ptr + row * NUM_SPLITS + s, mask=s_ok, other=-float("inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == -float("inf"), 0.0, top)  # no keys at all (seq_len 0): every weight is 0
    w = tl.exp2(lse - top)
    o = tl.load(o_ws_ptr + (row * NUM_SPLITS + s)[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    num = tl.sum(w[:, None] * o, axis=0)
    den = tl.sum(w, axis=0)
    out = num / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def default_num_splits(batch: int, n_heads: int, max_seq: int, device: torch.device | str) -> int:
    """Splits for >= 2 programs per SM (4 'SMs' off CUDA), each split at least BLOCK_N keys of max_seq."""
    device = torch.device(device)
    sms = sm_count(device, 4)
    splits = triton.cdiv(2 * sms, max(batch * n_heads, 1))
    return max(1, min(splits, max_seq // BLOCK_N))


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor, scale: float,
                     num_splits: int | None = None) -> Tensor:
    """softmax(q k^T * scale) v over keys 0..seq_lens[b]-1 of each sequence; returns [B, n_heads, head_dim].

    q [B, n_heads, head_dim]; k_cache / v_cache [max_batch, n_heads, max_seq, head_dim] (rows 0..B-1 used);
    seq_lens [B] integer. num_splits defaults to default_num_splits (static shapes only). The output has
    q.dtype; a sequence with seq_lens 0 gets zeros.
    """
    B, H, D = q.shape
    assert D & (D - 1) == 0 and 16 <= D <= 128, "head_dim must be a power of two in [16, 128]"
    assert q.stride(2) == 1 and seq_lens.shape == (B,)
    for c in (k_cache, v_cache):
        assert c.dim() == 4 and c.shape[0] >= B and c.shape[1] == H and c.shape[3] == D and c.stride(3) == 1
    max_seq = k_cache.shape[2]
    assert v_cache.shape[2] == max_seq
    splits = num_splits or default_num_splits(B, H, max_seq, q.device)
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    if splits == 1:
        o_ws, lse_ws = out, out
    else:
        o_ws = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
        lse_ws = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    pdl = pdl_enabled(q.device)
    _decode_attn_split_kernel[(B, H, splits)](
        q, k_cache, v_cache, seq_lens, o_ws, lse_ws, scale * _LOG2E, max_seq, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), N_HEADS=H, NUM_SPLITS=splits, HEAD_DIM=D, BLOCK_N=BLOCK_N, DIRECT=splits == 1,
        NUM_STAGES=2, PDL=pdl, num_warps=4, launch_pdl=pdl)
    if splits > 1:
        _decode_attn_merge_kernel[(B, H)](o_ws, lse_ws, out, N_HEADS=H, NUM_SPLITS=splits, HEAD_DIM=D,
                                          BLOCK_S=triton.next_power_of_2(splits), PDL=pdl, num_warps=1,
                                          launch_pdl=pdl)
    return out


def decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor, scale: float,
                               num_splits: int | None = None) -> Tensor:
    """Plain PyTorch decode_attention: a float32 softmax over each sequence's valid keys (num_splits unused).

    No host synchronisation; slots past seq_lens[b] are never used, whatever they hold (NaN included).
    """
    B, n = q.shape[0], k_cache.shape[2]
    valid = torch.arange(n, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]  # [B, n]
    k = k_cache[:B].float().masked_fill(~valid[:, None, :, None], 0.0)
    v = v_cache[:B].float().masked_fill(~valid[:, None, :, None], 0.0)
    scores = torch.einsum("bhd,bhnd->bhn", q.float(), k) * scale
    probs = torch.softmax(scores.masked_fill(~valid[:, None, :], -float("inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhn,bhnd->bhd", probs, v).to(q.dtype)
