"""Attention over the paged KV cache: flash decoding (one query token per sequence) and chunked-prefill flash
attention (packed variable-length query chunks after cached tokens), each next to its PyTorch reference.

Cache layout (one layer): k_cache and v_cache [num_blocks, n_heads, block_size, head_dim]. The token at position
p of sequence b lives in block block_tables[b, p // block_size] at offset p % block_size; block_size (TensorRT-LLM's
tokens_per_block) is a power of two in 16..128. Entries of a block table past a sequence's last block are never
read; block 0 is the runtime's dummy block (padding rows of CUDA-graph batches point there), which the kernels
read like any other.

Decode, stage 1 (grid B x heads x num_splits): split s of sequence b covers keys [s * chunk, (s + 1) * chunk)
clipped to seq_lens[b], with chunk = ceil(seq_lens[b] / num_splits) rounded up to whole blocks, so the work spreads
over all splits whatever the context length while the grid stays static (CUDA-graph friendly). It walks its keys
in tiles of KEY_TILE (16) keys, each a slice of one block found through one block-table load, requesting the K and
V tiles together (pipelined, 3 stages). Each of the 16 key lanes keeps its own running max, sum and accumulator in
float32 (base-2 exponent), so the loop has no reduction across the key axis; the lanes are merged once at the end.
(Measured on an H200, fp16, head_dim 128: 4.1-4.6 TB/s for 256-512 sequences of 200-2048 keys, as fast as SDPA on
contiguous keys; whole-block tiles with a per-tile softmax reached 2.7-3.7 TB/s.) The split writes the normalised
partial output and its log-sum-exp to a float32 workspace; a split with no keys writes the neutral partial
(lse = -inf, output 0). Stage 2 (grid B x heads) merges the splits with the log-sum-exp rule. With one split stage
1 writes the output. rotary_paged_decode_attention runs rotary_kv_write's work inside stage 1 (its docstring).

Prefill (grid P * ceil(max_query_len / BLOCK_M) x heads): a program takes BLOCK_M query rows of one sequence and
runs the flash-attention loop (tl.dot, online softmax in float32, exp2) over the blocks of that sequence: first
the blocks wholly before its first query row's position (no mask), then the blocks up to its last row's position
(causal mask). Programs past their sequence's query length return at once.

Quantised caches (int8 / fp8 e4m3 codes with one float32 scale per token and head, kv_quant.py): both kernels load
the codes and the tile's scales (k_scale / v_scale [num_blocks, n_heads, block_size], contiguous per tile) and
dequantise in registers: decode multiplies each key's q.k by its K scale and each probability by its V scale;
prefill multiplies the score columns by the K scales (codes are exact in q.dtype) and the V tile by its scales
before the P.V product. The references dequantise the gathered cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwen_trtllm.kernels.kv_quant import check_scales, is_quantized
from qwen_trtllm.kernels.launch import pdl_enabled, pdl_start, sm_count
from qwen_trtllm.kernels.rotary import rotary_args, rotary_kv_write_reference, rotary_q_kv_write

_LOG2E = 1.4426950408889634
_STAGE_BYTES = 160 * 1024  # shared memory the prefill K/V pipeline may take (an H200 SM has 227 KiB)


def _num_stages(block_size: int, head_dim: int, dtype: torch.dtype) -> int:
    """Prefill loop pipelining depth: 3 where three K and V tiles fit in _STAGE_BYTES, else 2, else 1."""
    tile_pair = 2 * block_size * head_dim * torch.empty((), dtype=dtype).element_size()
    return max(1, min(3, _STAGE_BYTES // tile_pair))


def _check_cache(k_cache: Tensor, v_cache: Tensor, n_heads: int, head_dim: int, k_scale: Tensor | None = None,
                 v_scale: Tensor | None = None) -> int:
    assert head_dim & (head_dim - 1) == 0 and 16 <= head_dim <= 128, "head_dim must be a power of two in [16, 128]"
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4, "caches: [num_blocks, n_heads, block_size, head_dim]"
    assert k_cache.shape[1] == n_heads and k_cache.shape[3] == head_dim
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    block_size = k_cache.shape[2]
    assert block_size & (block_size - 1) == 0 and 16 <= block_size <= 128, "block_size: a power of two in [16, 128]"
    check_scales(k_cache, v_cache, k_scale, v_scale)
    return block_size


def _scale_args(k_cache: Tensor, k_scale: Tensor | None, v_scale: Tensor | None) -> tuple:
    """The kernels' scale arguments: pointers and (block, head) strides; unused stand-ins without scales."""
    if k_scale is None:
        return k_cache, k_cache, 0, 0
    return k_scale, v_scale, k_scale.stride(0), k_scale.stride(1)


# --- decode ----------------------------------------------------------------------------------------------------
KEY_TILE = 16  # keys per decode tile (a slice of one block): measured best on an H200 for block_size 16..128


@triton.jit
def _paged_decode_split_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr, freq_ptr,
                               pos_ptr, slot_ptr, qk_scale, max_seq, stride_qb, stride_qh, stride_bt, stride_freq,
                               k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, s_sb, s_sh, logn_len, log_logn_len,
                               N_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                               BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, DIRECT: tl.constexpr,
                               NUM_STAGES: tl.constexpr, QUANT: tl.constexpr = False,
                               ROTARY: tl.constexpr = False, ROT_DIM: tl.constexpr = 0, USE_LOGN: tl.constexpr = False,
                               QMAX: tl.constexpr = 127.0, FP8: tl.constexpr = False,
                               NATIVE_RINT: tl.constexpr = False, PDL: tl.constexpr = False):
    pdl_start(PDL, EARLY=True)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    seq_len = tl.minimum(tl.load(lens_ptr + b).to(tl.int32), max_seq)
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_SIZE) * BLOCK_SIZE  # whole blocks
    start = s * chunk
    end = tl.minimum(start + chunk, seq_len)

    d = tl.arange(0, HEAD_DIM)
    offs = tl.arange(0, TILE)
    if ROTARY:  # q_ptr: the fused QKV rows. The split holding the newest key writes its k and v first
        owner = s == tl.maximum(seq_len - 1, 0) // tl.maximum(chunk, 1)
        q = rotary_q_kv_write(q_ptr + b * stride_qb, freq_ptr + b * stride_freq, tl.load(pos_ptr + b).to(tl.int64),
                              tl.load(slot_ptr + b).to(tl.int64), h, owner, k_ptr, v_ptr, ks_ptr, vs_ptr, k_sb, k_sh,
                              k_ss, v_sb, v_sh, v_ss, s_sb, s_sh, logn_len, log_logn_len, N_HEADS, HEAD_DIM, ROT_DIM,
                              BLOCK_SIZE, USE_LOGN, HEAD_DIM, QUANT, QMAX, FP8, NATIVE_RINT)
        tl.debug_barrier()  # the newest k and v are in the cache before any thread of the program reads keys
        q = q.to(tl.float32) * qk_scale  # log2 units
    else:
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * qk_scale
    table = bt_ptr + b * stride_bt
    k_head = k_ptr + h * k_sh + offs[:, None] * k_ss + d[None, :]
    v_head = v_ptr + h * v_sh + offs[:, None] * v_ss + d[None, :]
    ks_head, vs_head = ks_ptr + h * s_sh + offs, vs_ptr + h * s_sh + offs  # QUANT: the keys' scales
    # Each of the TILE key lanes keeps its own running max, sum and accumulator (flash decoding per lane), so
    # the loop needs no reduction across the key axis (across warps); the lanes merge once after the loop.
    run_max = tl.full([TILE], -float("inf"), dtype=tl.float32)
    denom = tl.zeros([TILE], dtype=tl.float32)
    acc = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
    for n0 in tl.range(start, end, TILE, num_stages=NUM_STAGES):
        block = tl.load(table + n0 // BLOCK_SIZE).to(tl.int64)  # TILE divides BLOCK_SIZE: one block per tile
        row = n0 % BLOCK_SIZE
        valid = n0 + offs < end
        # both tiles are requested before any arithmetic, so their memory latencies overlap
        k = tl.load(k_head + block * k_sb + row * k_ss, mask=valid[:, None], other=0.0)
        v = tl.load(v_head + block * v_sb + row * v_ss, mask=valid[:, None], other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        if QUANT:  # dequantise: q.(code * s) = (q.code) * s, one multiply per key
            scores = scores * tl.load(ks_head + block * s_sb + row, mask=valid, other=0.0)
        scores = tl.where(valid, scores, -float("inf"))
        new_max = tl.maximum(run_max, scores)
        ref_max = tl.where(new_max == -float("inf"), 0.0, new_max)  # a lane with no key yet: weights 0, not NaN
        alpha = tl.exp2(run_max - ref_max)
        p = tl.exp2(scores - ref_max)
        pv = p
        if QUANT:  # p (code * s) = (p s) code
            pv = p * tl.load(vs_head + block * s_sb + row, mask=valid, other=0.0)
        acc = acc * alpha[:, None] + pv[:, None] * v.to(tl.float32)
        denom = denom * alpha + p
        run_max = new_max

    top = tl.max(run_max, axis=0)
    top = tl.where(top == -float("inf"), 0.0, top)  # no key in this split
    w = tl.exp2(run_max - top)
    total = tl.sum(denom * w, axis=0)
    has_keys = total > 0.0
    total = tl.where(has_keys, total, 1.0)
    out = tl.sum(acc * w[:, None], axis=0) / total
    if DIRECT:
        tl.store(o_ptr + (b * N_HEADS + h) * HEAD_DIM + d, out.to(o_ptr.dtype.element_ty))
    else:
        slot = (b * N_HEADS + h) * NUM_SPLITS + s
        tl.store(o_ptr + slot * HEAD_DIM + d, out)
        tl.store(lse_ptr + slot, tl.where(has_keys, top + tl.log2(total), -float("inf")))


@triton.jit
def _paged_decode_merge_kernel(o_ws_ptr, lse_ptr, out_ptr, N_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr,
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


PROGRAMS_PER_SM = 8  # decode programs (2 warps each) per SM that default_num_splits aims for


def default_num_splits(batch: int, n_heads: int, max_seq: int, device: torch.device | str, block_size: int) -> int:
    """Splits of paged_decode_attention for >= PROGRAMS_PER_SM (8) programs per SM (4 'SMs' off CUDA), each
    split at least one block of max_seq (the block table's capacity in tokens); 1 once batch x n_heads reaches
    that (batch >= 33 at 32 heads on an H200). Measured there (fp16, head_dim 128, CUDA graphs): batch 1 x 2048
    keys 20.1 us with the 9 splits of 2 programs per SM, 10.6 us with these 33; batch 4 x 8192 keys 187 -> 134 us;
    at 128 keys 7.2 -> 7.6 us (batch 1) and 6.3 -> 8.3 us (batch 4), where one split takes 5.4 and 10.9 us."""
    device = torch.device(device)
    sms = sm_count(device, 4)
    splits = triton.cdiv(PROGRAMS_PER_SM * sms, max(batch * n_heads, 1))
    return max(1, min(splits, max_seq // block_size))


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                           scale: float, num_splits: int | None = None, k_scale: Tensor | None = None,
                           v_scale: Tensor | None = None) -> Tensor:
    """softmax(q k^T * scale) v over keys 0..seq_lens[b]-1 of each sequence, read through its block table.

    q [B, n_heads, head_dim] (fp32 / fp16 / bf16, last dim contiguous); k_cache / v_cache [num_blocks, n_heads,
    block_size, head_dim] (any of those dtypes, or int8 / float8_e4m3fn codes with their float32 k_scale / v_scale
    [num_blocks, n_heads, block_size], one per token and head; last dim contiguous); block_tables [B, max_blocks] int32
    (or int64), last dim contiguous: entries 0..ceil(seq_lens[b] / block_size)-1 are read, later ones never; seq_lens
    [B] int32 (or int64), the valid keys, this step's included (clipped to max_blocks * block_size). scale multiplies
    q.k (1/sqrt(head_dim) for Qwen). num_splits defaults to default_num_splits, from static shapes only: no host
    synchronisation, grid fixed by the shapes (CUDA-graph safe). Returns [B, n_heads, head_dim] in q.dtype; float32
    accumulation; a sequence with seq_lens 0 gets zeros. head_dim and block_size must be powers of two in [16, 128]
    (AssertionError otherwise).
    """
    B, H, D = q.shape
    assert q.stride(2) == 1
    return _decode(q, q.stride(0), q.stride(1), H, D, k_cache, v_cache, block_tables, seq_lens, scale, num_splits,
                   k_scale, v_scale)


def rotary_paged_decode_attention(qkv: Tensor, inv_freq: Tensor, positions: Tensor, slot_mapping: Tensor,
                                  k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                                  n_heads: int, head_dim: int, rotary_dim: int, scale: float, logn_seq_length: int = 0,
                                  num_splits: int | None = None, k_scale: Tensor | None = None,
                                  v_scale: Tensor | None = None) -> Tensor:
    """rotary_kv_write then paged_decode_attention for decode tokens (token b = sequence b), in one launch, as
    TensorRT-LLM's attention plugin applies rotary to the new token inside its decode kernel: every split program
    rotates its head's q (and applies logn) itself, and the split that holds the newest key (position seq_lens[b] - 1)
    first writes the rotated k and v at slot_mapping[b] (quantised for int8 / fp8 caches), so no q is written to
    memory and no rotary kernel runs. Arguments as the two functions' (qkv [B, 3 * n_heads * head_dim], inv_freq
    [>= B, rotary_dim // 2] one row per token, positions [B] = seq_lens - 1, slot_mapping [B]); the same caches
    written and the same output to the bit as the two kernels. Returns [B, n_heads, head_dim] in qkv.dtype.
    Contract (not checked: no host synchronisation): slot_mapping[b] is the cache slot of position seq_lens[b] - 1
    through block_tables[b], and seq_lens[b] <= block_tables.shape[1] * block_size; otherwise another split may read
    the slot while it is written. Rows that share a slot (CUDA-graph padding rows on the dummy block 0) race, as in
    rotary_kv_write: their outputs are not meant to be read."""
    logn, rotary = rotary_args(qkv, inv_freq, positions, slot_mapping, k_cache, n_heads, head_dim, rotary_dim,
                               logn_seq_length)
    assert positions.stride(0) == 1 and slot_mapping.stride(0) == 1
    return _decode(qkv, qkv.stride(0), 0, n_heads, head_dim, k_cache, v_cache, block_tables, seq_lens, scale,
                   num_splits, k_scale, v_scale, freq=inv_freq, positions=positions, slots=slot_mapping,
                   stride_freq=inv_freq.stride(0), logn=logn, ROTARY=True, **rotary)


def _decode(q: Tensor, stride_qb: int, stride_qh: int, H: int, D: int, k_cache: Tensor, v_cache: Tensor,
            block_tables: Tensor, seq_lens: Tensor, scale: float, num_splits: int | None, k_scale: Tensor | None,
            v_scale: Tensor | None, freq: Tensor | None = None, positions: Tensor | None = None,
            slots: Tensor | None = None, stride_freq: int = 0, logn: tuple[int, float] = (1, 0.0),
            **rotary) -> Tensor:
    """The decode launch of both functions above; q: their q, or the QKV rows (rotary)."""
    B = q.shape[0]
    block_size = _check_cache(k_cache, v_cache, H, D, k_scale, v_scale)
    assert seq_lens.shape == (B,)
    assert block_tables.dim() == 2 and block_tables.shape[0] == B and block_tables.stride(1) == 1
    assert not block_tables.is_floating_point() and not seq_lens.is_floating_point()
    max_seq = block_tables.shape[1] * block_size
    splits = num_splits or default_num_splits(B, H, max_seq, q.device, block_size)
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    if splits == 1:
        o_ws, lse_ws = out, out
    else:
        o_ws = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
        lse_ws = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    pdl = pdl_enabled(q.device)
    ks, vs, s_sb, s_sh = _scale_args(k_cache, k_scale, v_scale)
    unused = seq_lens  # pointer stand-ins without rotary
    _paged_decode_split_kernel[(B, H, splits)](
        q, k_cache, v_cache, ks, vs, block_tables, seq_lens, o_ws, lse_ws, unused if freq is None else freq,
        unused if positions is None else positions, unused if slots is None else slots, scale * _LOG2E, max_seq,
        stride_qb, stride_qh, block_tables.stride(0), stride_freq, k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), s_sb, s_sh, *logn, N_HEADS=H,
        NUM_SPLITS=splits, HEAD_DIM=D, BLOCK_SIZE=block_size, TILE=KEY_TILE, DIRECT=splits == 1, NUM_STAGES=3,
        QUANT=k_scale is not None, PDL=pdl, num_warps=2, launch_pdl=pdl, **rotary)
    if splits > 1:
        block_s = triton.next_power_of_2(splits)
        _paged_decode_merge_kernel[(B, H)](o_ws, lse_ws, out, N_HEADS=H, NUM_SPLITS=splits, HEAD_DIM=D,
                                           BLOCK_S=block_s, PDL=pdl, num_warps=1 if block_s <= 8 else 4,
                                           launch_pdl=pdl)
    return out


def rotary_paged_decode_attention_reference(qkv: Tensor, inv_freq: Tensor, positions: Tensor,
                                            slot_mapping: Tensor, k_cache: Tensor, v_cache: Tensor,
                                            block_tables: Tensor, seq_lens: Tensor, n_heads: int, head_dim: int,
                                            rotary_dim: int, scale: float, logn_seq_length: int = 0,
                                            num_splits: int | None = None, k_scale: Tensor | None = None,
                                            v_scale: Tensor | None = None) -> Tensor:
    """Plain PyTorch rotary_paged_decode_attention: rotary_kv_write_reference, then paged_decode_attention_reference
    (num_splits unused)."""
    q = rotary_kv_write_reference(qkv, inv_freq, positions, slot_mapping, k_cache, v_cache, n_heads, head_dim,
                                  rotary_dim, logn_seq_length, k_scale=k_scale, v_scale=v_scale)
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale=k_scale,
                                            v_scale=v_scale)


def _gather_blocks(cache: Tensor, blocks: Tensor, dtype: torch.dtype, scale: Tensor | None = None) -> Tensor:
    """cache [num_blocks, H, bs, D] gathered by blocks [..., n] -> [..., H, n * bs, D] in dtype; with scale
    [num_blocks, H, bs] (int8 / fp8 codes), dequantised: code * scale."""
    g = cache[blocks.long()]  # [..., n, H, bs, D]
    g = g.movedim(-3, -4)  # [..., H, n, bs, D]
    g = g.reshape(*g.shape[:-3], g.shape[-3] * g.shape[-2], g.shape[-1]).to(dtype)
    if scale is None:
        return g
    s = scale[blocks.long()].movedim(-2, -3)  # [..., H, n, bs]
    return g * s.reshape(*s.shape[:-2], -1, 1).to(dtype)


def paged_decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                     seq_lens: Tensor, scale: float, num_splits: int | None = None,
                                     k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> Tensor:
    """Plain PyTorch paged_decode_attention: gather each sequence's blocks (dequantised with their scales for int8 / fp8
    caches), float32 softmax over its valid keys (float64 for float64 inputs; num_splits unused). No host
    synchronisation (CUDA-graph safe); slots past seq_lens[b] and table entries past its last block are never used,
    whatever they hold (NaN, any index). Memory: B x n_heads x max_blocks x block_size x head_dim float32 for each of K
    and V.
    """
    B, max_blocks = block_tables.shape
    bs = k_cache.shape[2]
    n = max_blocks * bs
    cdt = torch.promote_types(q.dtype, torch.float32)
    lens = seq_lens.to(q.device).long().clamp(max=n)
    used = torch.arange(max_blocks, device=q.device)[None, :] * bs < lens[:, None]  # [B, max_blocks]
    tables = torch.where(used, block_tables.to(q.device).long(), 0)  # unused entries: any value, read block 0
    valid = torch.arange(n, device=q.device)[None, :] < lens[:, None]  # [B, n]
    k = _gather_blocks(k_cache, tables, cdt, k_scale).masked_fill(~valid[:, None, :, None], 0.0)  # [B, H, n, D]
    v = _gather_blocks(v_cache, tables, cdt, v_scale).masked_fill(~valid[:, None, :, None], 0.0)
    scores = torch.einsum("bhd,bhnd->bhn", q.to(cdt), k) * scale
    probs = torch.softmax(scores.masked_fill(~valid[:, None, :], -float("inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhn,bhnd->bhd", probs, v).to(q.dtype)


# --- prefill ---------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot in float32 accumulation; UPCAST: operands widened to float32 first (Triton 3.6's interpreter
    multiplies bf16 operands as their raw uint16 bits)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _dequant_tile(k, v, ks_ptrs, vs_ptrs, key_ok, q, UPCAST: tl.constexpr):
    """A quantised K / V tile for the dot products: K codes in q's dtype (exact: int8 and e4m3 values fit fp16 and
    bf16), their scales [BLOCK_N] (to multiply the scores' columns), V dequantised (code * scale) in q's dtype;
    UPCAST (bf16 in the interpreter, see _dot): both in float32."""
    k_s = tl.load(ks_ptrs, mask=key_ok, other=0.0)
    v_s = tl.load(vs_ptrs, mask=key_ok, other=0.0)
    v = v.to(tl.float32) * v_s[:, None]
    if UPCAST:
        return k.to(tl.float32), v, k_s
    return k.to(q.dtype), v.to(q.dtype), k_s


@triton.jit
def _paged_prefill_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, o_ptr, bt_ptr, qsl_ptr, ctx_ptr, qk_scale, max_seq,
                          m_tiles, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, k_sb, k_sh, k_ss, v_sb,
                          v_sh, v_ss, s_sb, s_sh, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          NUM_STAGES: tl.constexpr, QUANT: tl.constexpr = False, PDL: tl.constexpr = False):
    pdl_start(PDL, EARLY=True)
    pid = tl.program_id(0)
    seq = (pid // m_tiles).to(tl.int64)
    m_start = (pid % m_tiles) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    q_start = tl.load(qsl_ptr + seq).to(tl.int32)
    q_len = tl.load(qsl_ptr + seq + 1).to(tl.int32) - q_start
    if m_start >= q_len:
        return
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)

    d = tl.arange(0, HEAD_DIM)
    offs = tl.arange(0, BLOCK_N)
    i = m_start + tl.arange(0, BLOCK_M)  # query rows of this tile, within the sequence's chunk
    row_ok = i < q_len
    pos = ctx + i  # their positions: row i attends to keys 0..pos[i]
    rows = (q_start + i).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    kv_end = tl.minimum(ctx + tl.minimum(m_start + BLOCK_M, q_len), max_seq)  # past the last row's position
    full_end = tl.minimum((ctx + m_start) // BLOCK_N * BLOCK_N, kv_end)  # keys every row sees: no mask needed
    table = bt_ptr + seq * stride_bt
    k_head = k_ptr + h * k_sh + offs[:, None] * k_ss + d[None, :]
    v_head = v_ptr + h * v_sh + offs[:, None] * v_ss + d[None, :]
    ks_head, vs_head = ks_ptr + h * s_sh + offs, vs_ptr + h * s_sh + offs  # QUANT: the keys' scales

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for n0 in tl.range(0, full_end, BLOCK_N, num_stages=NUM_STAGES):
        block = tl.load(table + n0 // BLOCK_N).to(tl.int64)
        k = tl.load(k_head + block * k_sb)
        v = tl.load(v_head + block * v_sb)
        if QUANT:
            k, v, k_s = _dequant_tile(k, v, ks_head + block * s_sb, vs_head + block * s_sb, offs < BLOCK_N, q, UPCAST)
        s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale
        if QUANT:
            s = s * k_s[None, :]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
        m_i = m_new
    # the diagonal: key full_end <= every row's position, so each row has a finite max from the first tile on
    for n0 in tl.range(full_end, kv_end, BLOCK_N, num_stages=NUM_STAGES):
        block = tl.load(table + n0 // BLOCK_N).to(tl.int64)
        n = n0 + offs
        key_ok = n < kv_end  # never read a slot past the last row's position (not written yet)
        k = tl.load(k_head + block * k_sb, mask=key_ok[:, None], other=0.0)
        v = tl.load(v_head + block * v_sb, mask=key_ok[:, None], other=0.0)
        if QUANT:
            k, v, k_s = _dequant_tile(k, v, ks_head + block * s_sb, vs_head + block * s_sb, key_ok, q, UPCAST)
        s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale
        if QUANT:
            s = s * k_s[None, :]
        s = tl.where(n[None, :] <= pos[:, None], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o = o_ptr + rows[:, None] * stride_ot + h * stride_oh + d[None, :]
    tl.store(o, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def default_block_m(device: torch.device | str) -> int:
    """Query rows per prefill program: 64 on CUDA, 16 under the interpreter (fewer wasted rows for short chunks)."""
    return 64 if torch.device(device).type == "cuda" else 16


def paged_prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                            query_start_loc: Tensor, context_lens: Tensor, scale: float, max_query_len: int,
                            block_m: int | None = None, k_scale: Tensor | None = None,
                            v_scale: Tensor | None = None) -> Tensor:
    """Causal attention of packed prefill chunks over the paged cache (chunked context / chunked prefill).

    q [T, n_heads, head_dim] (fp32 / fp16 / bf16, last dim contiguous): the query tokens of P sequences back to back.
    query_start_loc [P+1] int32: cumulative offsets into q (query_start_loc[0] = 0), so sequence p's chunk is
    q[query_start_loc[p]:query_start_loc[p+1]] (qlen_p rows, possibly 0). context_lens [P] int32: tokens of sequence p
    already cached before this chunk. Query row i of sequence p sits at position context_lens[p] + i and attends to keys
    0..context_lens[p]+i, all of which must already be in the cache (rotary_kv_write wrote the chunk's own keys first),
    so context_lens[p] + qlen_p <= max_blocks * block_size. block_tables [P, max_blocks] int32 (or int64), last dim
    contiguous; k_cache / v_cache [num_blocks, n_heads, block_size, head_dim] in q.dtype (tl.dot takes one dtype), or
    int8 / float8_e4m3fn codes with float32 k_scale / v_scale [num_blocks, n_heads, block_size] (one per token and head;
    dequantised in registers). max_query_len: a host int >= every qlen_p; it and P fix the grid (no host
    synchronisation). block_m: query rows per program (power of two >= 16; default_block_m). Returns [T, n_heads,
    head_dim] in q.dtype (float32 softmax and accumulation; fp16 / bf16 probabilities enter the P.V product in q.dtype,
    as in flash attention; fp32 in full IEEE precision).
    """
    T, H, D = q.shape
    block_size = _check_cache(k_cache, v_cache, H, D, k_scale, v_scale)
    assert is_quantized(k_cache.dtype) or k_cache.dtype == q.dtype, "prefill: caches in q.dtype, int8 or fp8"
    assert q.stride(2) == 1
    P = context_lens.shape[0]
    assert query_start_loc.shape == (P + 1,) and block_tables.dim() == 2 and block_tables.shape[0] == P
    assert block_tables.stride(1) == 1 and not block_tables.is_floating_point()
    block_m = block_m or default_block_m(q.device)
    assert block_m & (block_m - 1) == 0 and block_m >= 16, "block_m: a power of two >= 16"
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if T == 0 or P == 0 or max_query_len <= 0:
        return out
    m_tiles = triton.cdiv(max_query_len, block_m)
    pdl = pdl_enabled(q.device)
    ks, vs, s_sb, s_sh = _scale_args(k_cache, k_scale, v_scale)
    _paged_prefill_kernel[(P * m_tiles, H)](
        q, k_cache, v_cache, ks, vs, out, block_tables, query_start_loc, context_lens, scale * _LOG2E,
        block_tables.shape[1] * block_size, m_tiles, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), s_sb, s_sh, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=q.dtype == torch.bfloat16 and q.device.type != "cuda",
        NUM_STAGES=_num_stages(block_size, D, k_cache.dtype), QUANT=k_scale is not None, PDL=pdl, num_warps=4,
        launch_pdl=pdl)
    return out


def paged_prefill_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                      query_start_loc: Tensor, context_lens: Tensor, scale: float,
                                      max_query_len: int | None = None, block_m: int | None = None,
                                      k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> Tensor:
    """Plain PyTorch paged_prefill_attention: per sequence, gather its keys and values into contiguous
    [n_heads, L, head_dim] tensors (float32, float64 for float64 q; int8 / fp8 caches dequantised), mask causally
    at the context offset, softmax, cast back to q.dtype. Reads query_start_loc and context_lens on the host (a
    synchronisation: not for CUDA-graph capture); max_query_len and block_m unused. Rows of q outside every chunk
    are left 0.
    """
    T, H, D = q.shape
    bs = k_cache.shape[2]
    cdt = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(T, H, D, dtype=q.dtype, device=q.device)
    starts, ctxs = query_start_loc.tolist(), context_lens.tolist()
    for p, ctx in enumerate(ctxs):
        t0, t1 = starts[p], starts[p + 1]
        if t1 <= t0:
            continue
        n_keys = ctx + t1 - t0
        blocks = block_tables[p, :triton.cdiv(n_keys, bs)]
        k = _gather_blocks(k_cache, blocks, cdt, k_scale)[:, :n_keys]  # [H, L, D]
        v = _gather_blocks(v_cache, blocks, cdt, v_scale)[:, :n_keys]
        qp = q[t0:t1].transpose(0, 1).to(cdt)  # [H, qlen, D]
        scores = torch.matmul(qp, k.transpose(1, 2)) * scale  # [H, qlen, L]
        pos = ctx + torch.arange(t1 - t0, device=q.device)
        allowed = torch.arange(n_keys, device=q.device)[None, :] <= pos[:, None]
        probs = torch.softmax(scores.masked_fill(~allowed, -float("inf")), dim=-1)
        out[t0:t1] = torch.matmul(probs, v).transpose(0, 1).to(q.dtype)
    return out
