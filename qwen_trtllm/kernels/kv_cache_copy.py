"""Copy-on-write of paged KV cache blocks (beam search): the first n tokens of a source block into a destination
block, K and V, every layer and head, for a batch of copies in one launch.

The caches are `[layers, num_blocks, heads, tokens_per_block, head_dim]`, so the n tokens of one (layer, block,
head) are one contiguous run of n * head_dim values: one program copies that run for one copy and one
(layer, head), only the tokens the source holds (vLLM's copy_blocks kernel copies whole blocks). A quantised
cache's scales (`[layers, num_blocks, heads, tokens_per_block]`, kv_quant.py) go along: the same program copies
the run of n scales of K and of V.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

_CHUNK = 1024


@triton.jit
def _copy_blocks_kernel(k_ptr, v_ptr, ks_ptr, vs_ptr, copies_ptr, NUM_BLOCKS, HEADS: tl.constexpr,
                        BLOCK_ELEMS: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
                        TOKENS: tl.constexpr, SCALES: tl.constexpr):
    c = tl.program_id(0)
    lh = tl.program_id(1).to(tl.int64)  # layer * HEADS + head
    src = tl.load(copies_ptr + 3 * c).to(tl.int64)
    dst = tl.load(copies_ptr + 3 * c + 1).to(tl.int64)
    n_tokens = tl.load(copies_ptr + 3 * c + 2).to(tl.int64)
    n = n_tokens * HEAD_DIM
    layer, head = lh // HEADS, lh % HEADS
    if SCALES:
        t = tl.arange(0, TOKENS)  # (own names: the compiler keeps one type per name across the loop below)
        held = t < n_tokens
        src_s = ((layer * NUM_BLOCKS + src) * HEADS + head) * TOKENS + t
        dst_s = ((layer * NUM_BLOCKS + dst) * HEADS + head) * TOKENS + t
        tl.store(ks_ptr + dst_s, tl.load(ks_ptr + src_s, mask=held), mask=held)
        tl.store(vs_ptr + dst_s, tl.load(vs_ptr + src_s, mask=held), mask=held)
    src_off = ((layer * NUM_BLOCKS + src) * HEADS + head) * BLOCK_ELEMS
    dst_off = ((layer * NUM_BLOCKS + dst) * HEADS + head) * BLOCK_ELEMS
    for start in range(0, BLOCK_ELEMS, CHUNK):
        i = start + tl.arange(0, CHUNK)
        m = i < n
        tl.store(k_ptr + dst_off + i, tl.load(k_ptr + src_off + i, mask=m), mask=m)
        tl.store(v_ptr + dst_off + i, tl.load(v_ptr + src_off + i, mask=m), mask=m)


def copy_kv_blocks(k_cache: Tensor, v_cache: Tensor, copies: Tensor, k_scale: Tensor | None = None,
                   v_scale: Tensor | None = None) -> None:
    """copies [C, 3] int64 on the caches' device: (source block, destination block, leading tokens) rows; the
    destination's tokens past n are left as they are. k_cache / v_cache contiguous
    [layers, num_blocks, heads, tokens_per_block, head_dim]; k_scale / v_scale (int8 / fp8 caches) contiguous
    [layers, num_blocks, heads, tokens_per_block], copied alike."""
    layers, num_blocks, heads, tokens, head_dim = k_cache.shape
    scales = k_scale is not None
    assert not scales or (k_scale.shape == v_scale.shape == k_cache.shape[:-1] and k_scale.is_contiguous()
                          and v_scale.is_contiguous())
    if copies.shape[0]:
        _copy_blocks_kernel[(copies.shape[0], layers * heads)](
            k_cache, v_cache, k_scale if scales else k_cache, v_scale if scales else v_cache, copies, num_blocks,
            HEADS=heads, BLOCK_ELEMS=tokens * head_dim, HEAD_DIM=head_dim,
            CHUNK=min(_CHUNK, triton.next_power_of_2(tokens * head_dim)), TOKENS=tokens, SCALES=scales)


def copy_kv_blocks_reference(k_cache: Tensor, v_cache: Tensor, copies: Tensor, k_scale: Tensor | None = None,
                             v_scale: Tensor | None = None) -> None:
    """copy_kv_blocks in PyTorch: one slice copy per copy and cache (and scale tensor)."""
    tensors = [t for t in (k_cache, v_cache, k_scale, v_scale) if t is not None]
    for src, dst, n in copies.tolist():
        for t in tensors:
            t[:, dst, :, :n].copy_(t[:, src, :, :n])
