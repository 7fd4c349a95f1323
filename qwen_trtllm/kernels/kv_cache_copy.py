"""Copy-on-write of paged KV cache blocks (beam search): the first n tokens of a source block into a destination
block, K and V, every layer and head, for a batch of copies in one launch.

The caches are `[layers, num_blocks, heads, tokens_per_block, head_dim]`, so the n tokens of one (layer, block,
head) are one contiguous run of n * head_dim values: one program copies that run for one copy and one
(layer, head), only the tokens the source holds (vLLM's copy_blocks kernel copies whole blocks).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

_CHUNK = 1024


@triton.jit
def _copy_blocks_kernel(k_ptr, v_ptr, copies_ptr, NUM_BLOCKS, HEADS: tl.constexpr, BLOCK_ELEMS: tl.constexpr,
                        HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    lh = tl.program_id(1).to(tl.int64)  # layer * HEADS + head
    src = tl.load(copies_ptr + 3 * c).to(tl.int64)
    dst = tl.load(copies_ptr + 3 * c + 1).to(tl.int64)
    n = tl.load(copies_ptr + 3 * c + 2).to(tl.int64) * HEAD_DIM
    layer, head = lh // HEADS, lh % HEADS
    src_off = ((layer * NUM_BLOCKS + src) * HEADS + head) * BLOCK_ELEMS
    dst_off = ((layer * NUM_BLOCKS + dst) * HEADS + head) * BLOCK_ELEMS
    for start in range(0, BLOCK_ELEMS, CHUNK):
        i = start + tl.arange(0, CHUNK)
        m = i < n
        tl.store(k_ptr + dst_off + i, tl.load(k_ptr + src_off + i, mask=m), mask=m)
        tl.store(v_ptr + dst_off + i, tl.load(v_ptr + src_off + i, mask=m), mask=m)


def copy_kv_blocks(k_cache: Tensor, v_cache: Tensor, copies: Tensor) -> None:
    """copies [C, 3] int64 on the caches' device: (source block, destination block, leading tokens) rows; the
    destination's tokens past n are left as they are. k_cache / v_cache contiguous
    [layers, num_blocks, heads, tokens_per_block, head_dim]."""
    layers, num_blocks, heads, tokens, head_dim = k_cache.shape
    if copies.shape[0]:
        _copy_blocks_kernel[(copies.shape[0], layers * heads)](
            k_cache, v_cache, copies, num_blocks, HEADS=heads, BLOCK_ELEMS=tokens * head_dim, HEAD_DIM=head_dim,
            CHUNK=min(_CHUNK, triton.next_power_of_2(tokens * head_dim)))


def copy_kv_blocks_reference(k_cache: Tensor, v_cache: Tensor, copies: Tensor) -> None:
    """copy_kv_blocks in PyTorch: one slice copy per copy and cache."""
    for src, dst, n in copies.tolist():
        for cache in (k_cache, v_cache):
            cache[:, dst, :, :n].copy_(cache[:, src, :, :n])
