"""The paged KV cache: a pool of fixed-size KV cache blocks and the block tables of the requests that use them.

As TensorRT-LLM's KV cache manager and vLLM's block manager: the cache of every layer is one tensor of
`num_blocks` blocks of `tokens_per_block` tokens, `[layers, num_blocks, heads, tokens_per_block, head_dim]` for
K and the same for V. A request owns a block table (list of block ids); the token at position p lives in block
`table[p // tokens_per_block]` at offset `p % tokens_per_block`. Blocks carry reference counts, so that beam
search and shared prompt prefixes can share them; a block goes back to the free list when its count drops to 0.
Block 0 is never handed out: padding rows of CUDA-graph batches write and read it.

The cache's number format is the engine's `kv_cache_dtype` (build.py --int8_kv_cache / --fp8_kv_cache): "auto"
stores K and V in the model's dtype; "int8" / "fp8" store int8 / float8_e4m3fn codes plus one float32 scale per
token and head for each of K and V, `k_scale` / `v_scale` `[layers, num_blocks, heads, tokens_per_block]`,
computed as each token is written (qwen_trtllm/kernels/kv_quant.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from qwen_trtllm import QWenError

NULL_BLOCK = 0
KV_CACHE_STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}  # kv_cache_dtype -> code dtype ("auto": model's)
SCALE_BYTES = 4  # float32 scale per (token, head) of K and of V in a quantised cache


def kv_cache_storage(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The cache tensors' dtype for the engine's kv_cache_dtype ("auto" = the model's dtype, "int8", "fp8")."""
    if kv_cache_dtype != "auto" and kv_cache_dtype not in KV_CACHE_STORAGE:
        raise QWenError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of auto, int8, fp8")
    return KV_CACHE_STORAGE.get(kv_cache_dtype, dtype)


@dataclass(frozen=True)
class KvCacheConfig:
    """How big the pool is (TensorRT-LLM's KvCacheConfig names).

    free_gpu_memory_fraction: share of the device memory free after the weights that the pool takes (CUDA).
    max_tokens: a cap on the pool in tokens (on the CPU, where there is no free-memory reading, the default is
    room for the engine's max_batch_size sequences of max_input_len + max_output_len tokens).
    tokens_per_block: tokens per KV cache block (a power of two, 16..128).
    """

    free_gpu_memory_fraction: float = 0.9
    max_tokens: int | None = None
    tokens_per_block: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.free_gpu_memory_fraction <= 1:
            raise QWenError(f"--kv_cache_free_gpu_mem_fraction {self.free_gpu_memory_fraction} must be in (0, 1]")
        if self.tokens_per_block not in (16, 32, 64, 128):
            raise QWenError(f"--tokens_per_block {self.tokens_per_block} must be 16, 32, 64 or 128")
        if self.max_tokens is not None and self.max_tokens < self.tokens_per_block:
            raise QWenError(f"--max_tokens_in_paged_kv_cache {self.max_tokens} must hold at least one block "
                            f"({self.tokens_per_block} tokens)")


class BlockPool:
    """Reference-counted block ids 1..num_blocks-1 (block 0 is the null block); host-side bookkeeping only."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self.free)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (reference count 1); raises QWenError when fewer are free (callers check first)."""
        if n > len(self.free):
            raise QWenError(f"KV cache pool exhausted: {n} blocks wanted, {len(self.free)} free")
        out = [self.free.popleft() for _ in range(n)]
        for b in out:
            self.ref_counts[b] = 1
        return out

    def share(self, blocks: list[int]) -> None:
        """One more owner for each block (a beam or a request sharing a prefix)."""
        for b in blocks:
            assert self.ref_counts[b] > 0, f"block {b} is not allocated"
            self.ref_counts[b] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one owner of each block; blocks nobody owns return to the free list."""
        for b in blocks:
            assert self.ref_counts[b] > 0, f"block {b} released twice"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free.append(b)


class KVCacheManager:
    """The K and V cache tensors of one rank and the block pool that hands their blocks to requests."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, num_blocks: int, tokens_per_block: int,
                 dtype: torch.dtype, device: torch.device, triton_kernels: bool = False, kv_cache_dtype: str = "auto"):
        if num_blocks < 2:
            raise QWenError("the KV cache has room for no block: lower --max_batch_size or the model's memory "
                            "use, or raise --kv_cache_free_gpu_mem_fraction")
        self.tokens_per_block = tokens_per_block
        self.triton_kernels = triton_kernels  # copy_blocks through the Triton kernel, else its PyTorch reference
        self.pool = BlockPool(num_blocks)
        self.kv_cache_dtype = kv_cache_dtype
        storage = kv_cache_storage(kv_cache_dtype, dtype)
        shape = (num_layers, num_blocks, num_heads, tokens_per_block, head_dim)
        self.k_cache = torch.zeros(shape, dtype=storage, device=device)
        self.v_cache = torch.zeros(shape, dtype=storage, device=device)
        # quantised caches: one float32 scale per (token, head) of K and of V, written with the codes
        quantised = kv_cache_dtype != "auto"
        self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device) if quantised else None
        self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device) if quantised else None

    @staticmethod
    def bytes_per_block(num_layers: int, num_heads: int, head_dim: int, tokens_per_block: int,
                        dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        """K + V bytes of one block over all layers, a quantised cache's scales included."""
        per_head = head_dim * kv_cache_storage(kv_cache_dtype, dtype).itemsize
        if kv_cache_dtype != "auto":
            per_head += SCALE_BYTES
        return 2 * num_layers * num_heads * tokens_per_block * per_head

    @property
    def nbytes(self) -> int:
        """Bytes of the pool's tensors (K, V and any scales)."""
        return sum(t.numel() * t.element_size() for t in (self.k_cache, self.v_cache, self.k_scale, self.v_scale)
                   if t is not None)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def max_tokens(self) -> int:
        """Tokens the pool can hold (the null block excluded)."""
        return (self.pool.num_blocks - 1) * self.tokens_per_block

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_block)

    def can_grow(self, blocks: list[int], num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(blocks) <= self.pool.num_free

    def grow(self, blocks: list[int], num_tokens: int) -> None:
        """Append blocks to a block table until it holds num_tokens tokens (call can_grow first)."""
        need = self.blocks_for(num_tokens) - len(blocks)
        if need > 0:
            blocks.extend(self.pool.allocate(need))

    def append_cost(self, blocks: list[int], num_tokens: int) -> int:
        """Free blocks that `append(blocks, num_tokens)` takes: new blocks, or one copy of a shared last block."""
        need = self.blocks_for(num_tokens) - len(blocks)
        if need > 0:
            return need
        return int(self.pool.ref_counts[blocks[(num_tokens - 1) // self.tokens_per_block]] > 1)

    def append(self, blocks: list[int], num_tokens: int) -> list[tuple[int, int, int]]:
        """Make the block table hold num_tokens tokens with the last one writable (call append_cost first):
        new blocks as needed, and copy-on-write of the block that receives token num_tokens - 1 when another
        table shares it (beam search). Returns the block copies to make on the device before the step writes:
        (source, destination, number of leading tokens to copy)."""
        self.grow(blocks, num_tokens)
        i, used = divmod(num_tokens - 1, self.tokens_per_block)
        src = blocks[i]
        if self.pool.ref_counts[src] == 1:
            return []
        blocks[i] = self.pool.allocate(1)[0]
        self.pool.release([src])
        return [(src, blocks[i], used)] if used else []

    def copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """The first n tokens' K and V (and scales) of each (source, destination, n) block copy, every layer, in
        one launch."""
        if not copies:
            return
        from qwen_trtllm.kernels import copy_kv_blocks, copy_kv_blocks_reference

        rows = torch.tensor(copies, dtype=torch.int64)
        if self.triton_kernels:
            copy_kv_blocks(self.k_cache, self.v_cache, rows.to(self.k_cache.device, non_blocking=True), self.k_scale,
                           self.v_scale)
        else:
            copy_kv_blocks_reference(self.k_cache, self.v_cache, rows, self.k_scale, self.v_scale)

    def free(self, blocks: list[int]) -> None:
        """Return a block table's blocks to the pool and empty it."""
        self.pool.release(blocks)
        blocks.clear()


def pool_size_in_blocks(config: KvCacheConfig, bytes_per_block: int, device: torch.device,
                        default_tokens: int, reserve: int = 0) -> int:
    """Blocks for the pool: free_gpu_memory_fraction of the device memory free now (CUDA, after the weights
    are loaded, with PyTorch's cached unused memory given back first) less `reserve` bytes for the steps'
    activations, capped by max_tokens; default_tokens off CUDA. One extra block is the null block."""
    cap = None if config.max_tokens is None else -(-config.max_tokens // config.tokens_per_block)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        blocks = max(int((free - reserve) * config.free_gpu_memory_fraction), 0) // bytes_per_block
        if cap is not None:
            blocks = min(blocks, cap)
    else:
        blocks = cap if cap is not None else -(-default_tokens // config.tokens_per_block)
    return blocks + 1
