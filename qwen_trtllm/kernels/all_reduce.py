"""Tensor-parallel all-reduce of decode-sized tensors in one kernel over NVLink peer memory (one-shot).

At batch 1 a tensor-parallel decode step sums 64 partial outputs of 8 KB (two per layer): latency, not bandwidth.
NCCL's ring all-reduce spends several NVLink round trips and protocol steps on each. The one-shot all-reduce
(TensorRT-LLM's ONESHOT custom all-reduce strategy, vLLM's custom all-reduce) spends one: every rank copies its
partial into a buffer its peers can read, the ranks meet at a barrier, and every rank reads all the partials and
sums them itself.

The buffers and the barrier's signal pads are PyTorch symmetric memory (`torch.distributed._symmetric_memory.empty`
and `rendezvous`: the same allocation on every rank, each rank holding device pointers to its peers' copies).
The kernel's barrier is per program: program p of each rank sets its flag in every rank's signal pad (an atomic
compare-and-swap 0 -> 1 with release semantics at system scope, after a CTA barrier so the whole program's
copy is ordered before it) and waits until every rank's program p has set its flag in its own pad (swap 1 -> 0,
acquire): the flags reset themselves, so the kernel can be captured in a CUDA graph and replayed. Every program
of a rank must be resident at once for that barrier: at most MAX_PROGRAMS (128) programs of 4-8 warps, which one
H100 or H200 holds many times over (132 SMs, up to 64 warps each).

Two buffers (slots) alternate between consecutive all-reduces: a rank that reaches all-reduce k + 1 has finished
all-reduce k (stream order; this kernel is launched without programmatic dependent launch), so a rank writing
slot s at all-reduce k + 2 knows every peer finished reading slot s at all-reduce k once it passed the barrier of
k + 1. Callers give the slot: the model's attention all-reduce uses slot 0, its MLP all-reduce slot 1, which
alternate in every forward. The partials are summed in float32 in rank order, so every rank gets the same bits.
`OneShotAllReduce.rms_norm` fuses the sum with the residual add + RMSNorm that follows it in the model.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch import Tensor

from qwen_trtllm import QWenError
from qwen_trtllm.kernels.rmsnorm import rms_norm_row
from qwen_trtllm.logger import LOGGER

# scripts/gpu_all_reduce_bench.py on two H200s (64 all-reduces per CUDA graph, us each, NCCL -> one-shot):
# 8 KB 10.5 -> 5.9, 128 KB 12.1 -> 6.8, 512 KB 15.5 -> 7.8, 1 MB 19.4 -> 9.7 with 128 programs of 2048-element
# chunks (32 programs of 1024: 1 MB 24.2, slower than NCCL: too few loads in flight over NVLink). In the model
# (tp 2 decode) only the 128 KB threshold with 32 x 1024 was measured: batch 1 3.43 -> 3.23-3.27 ms (docs/PERF.md).
# 63 of the model's 64 all-reduces per step run the fused kernel (a program per row), whose time at 17-128 rows
# was not measured: `gpu_all_reduce_bench.py --fused` times it.
MAX_BYTES = 1 << 20  # per slot: up to 128 rows of hidden 4096 in fp16; NCCL above (prefill)
MAX_PROGRAMS = 128  # programs per all-reduce (each loops over its chunks), fewer where signal pads are small
BLOCK = 2048  # elements per chunk: 4 KB of fp16, 16 per thread at 4 warps


@triton.jit
def _barrier(signal_pad_ptrs, pid, rank, WORLD: tl.constexpr):
    """Wait until program `pid` of every rank reached this point; everything this program wrote before it is
    visible to every rank's program `pid` after it."""
    tl.debug_barrier()
    for r in tl.static_range(WORLD):
        pad = tl.load(signal_pad_ptrs + r).to(tl.pointer_type(tl.int32))
        while tl.atomic_cas(pad + pid * WORLD + rank, 0, 1, sem="release", scope="sys") != 0:
            pass
    own = tl.load(signal_pad_ptrs + rank).to(tl.pointer_type(tl.int32))
    for r in tl.static_range(WORLD):
        while tl.atomic_cas(own + pid * WORLD + r, 1, 0, sem="acquire", scope="sys") != 1:
            pass
    tl.debug_barrier()


@triton.jit
def _sum_rows(b0, b1, b2, b3, b4, b5, b6, b7, offs, mask, WORLD: tl.constexpr):
    """The ranks' chunks at offs summed in float32, in rank order (the same bits on every rank)."""
    acc = tl.load(b0 + offs, mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(b1 + offs, mask=mask, other=0.0).to(tl.float32)
    if WORLD > 2:
        acc += tl.load(b2 + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(b3 + offs, mask=mask, other=0.0).to(tl.float32)
    if WORLD > 4:
        acc += tl.load(b4 + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(b5 + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(b6 + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(b7 + offs, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _one_shot_all_reduce_kernel(x_ptr, out_ptr, own_ptr, b0, b1, b2, b3, b4, b5, b6, b7, signal_pad_ptrs,
                                slot_offset, n, rank, WORLD: tl.constexpr, BLOCK: tl.constexpr):
    """own_ptr: this rank's buffer; b0..b{WORLD-1}: every rank's buffer (mapped here), the rest unused."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    for start in range(pid * BLOCK, n, programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(own_ptr + slot_offset + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
    _barrier(signal_pad_ptrs, pid, rank, WORLD)
    for start in range(pid * BLOCK, n, programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        acc = _sum_rows(b0, b1, b2, b3, b4, b5, b6, b7, slot_offset + offs, mask, WORLD)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _one_shot_all_reduce_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, h_ptr, own_ptr, b0, b1, b2, b3, b4, b5, b6,
                                         b7, signal_pad_ptrs, slot_offset, M, N, eps, rank, WORLD: tl.constexpr,
                                         BLOCK: tl.constexpr):
    """The all-reduce of x [M, N] fused with the residual add + RMSNorm after it (kernels/rmsnorm.py): rows of
    contiguous x, residual, out and h; a program per row (looping when M exceeds the grid)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    for row in range(pid, M, programs):
        offs = row * N + cols  # < 2^31: at most max_bytes per slot
        tl.store(own_ptr + slot_offset + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
    _barrier(signal_pad_ptrs, pid, rank, WORLD)
    for row in range(pid, M, programs):
        offs = row * N + cols  # < 2^31: at most max_bytes per slot
        a = _sum_rows(b0, b1, b2, b3, b4, b5, b6, b7, slot_offset + offs, mask, WORLD).to(x_ptr.dtype.element_ty)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0)
        h = (a.to(tl.float32) + r.to(tl.float32)).to(a.dtype)  # as rms_norm(all_reduce(x), w, eps, residual)
        tl.store(h_ptr + offs, h, mask=mask)
        tl.store(out_ptr + offs, rms_norm_row(h, w_ptr, cols, mask, N, eps).to(out_ptr.dtype.element_ty), mask=mask)


class OneShotAllReduce:
    """The one-shot all-reduce of one process group on one CUDA device (see the module docstring).

    Construction is collective (every rank of `group` must construct it, in the same order) and allocates
    2 x max_bytes of symmetric memory. Raises RuntimeError where symmetric memory cannot be set up (no peer
    access between the GPUs, a backend without it)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_bytes: int = MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        self.world, self.rank, self.max_bytes = group.size(), group.rank(), max_bytes
        if self.world not in (2, 4, 8):
            raise RuntimeError(f"the one-shot kernel sums 2, 4 or 8 ranks, not {self.world}")
        self.buffer = symm_mem.empty(2 * max_bytes, dtype=torch.uint8, device=device)
        self._handle = handle = symm_mem.rendezvous(self.buffer, group)  # keeps the peers' mappings alive
        # programs per launch: each needs a 4-byte flag per rank in every signal pad
        self.max_programs = min(MAX_PROGRAMS, handle.signal_pad_size // (4 * self.world))
        if self.max_programs < 1:
            raise RuntimeError(f"symmetric memory signal pads of {handle.signal_pad_size} bytes hold no flags")
        peers = [handle.get_buffer(r, (2 * max_bytes,), torch.uint8) for r in range(self.world)]
        self._peers = {dt: [b.view(dt) for b in peers] for dt in (torch.float16, torch.bfloat16, torch.float32)}
        self.signal_pad_ptrs = torch.tensor(handle.signal_pad_ptrs, dtype=torch.int64, device=device)

    def fits(self, x: Tensor) -> bool:
        """Whether x can go through this all-reduce: float16 / bfloat16 / float32, contiguous, a multiple of 16
        bytes and at most max_bytes."""
        nbytes = x.numel() * x.element_size()
        return x.dtype in self._peers and x.is_contiguous() and nbytes <= self.max_bytes and nbytes % 16 == 0

    def _check(self, x: Tensor, slot: int) -> tuple[list[Tensor], int]:
        """The buffers' pointer arguments for x (this rank's, then b0..b7; unused ones repeat rank 0's) and the
        slot's offset in them, in elements."""
        if not self.fits(x):
            raise ValueError(f"one-shot all-reduce takes contiguous float16/bfloat16/float32 tensors of a multiple "
                             f"of 16 bytes up to {self.max_bytes}, got {tuple(x.shape)} {x.dtype}: use NCCL "
                             "(dist.all_reduce)")
        if slot not in (0, 1):
            raise ValueError(f"slot must be 0 or 1, got {slot}")
        peers = self._peers[x.dtype]
        return [peers[self.rank], *peers, *[peers[0]] * (8 - self.world)], slot * self.max_bytes // x.element_size()

    def __call__(self, x: Tensor, slot: int) -> Tensor:
        """The sum of x over the ranks, a new tensor like x (summed in float32, rounded to x.dtype).
        slot: 0 or 1, alternating between consecutive calls (the module docstring says why). Raises ValueError
        for a tensor that `fits` refuses."""
        buffers, offset = self._check(x, slot)
        out = torch.empty_like(x)
        n = x.numel()
        _one_shot_all_reduce_kernel[(min(triton.cdiv(n, BLOCK), self.max_programs),)](
            x, out, *buffers, self.signal_pad_ptrs, offset, n, self.rank, WORLD=self.world, BLOCK=BLOCK, num_warps=4)
        return out

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, residual: Tensor, slot: int) -> tuple[Tensor, Tensor]:
        """rms_norm(self(x, slot), weight, eps, residual) in one kernel, with the same bits: (RMSNorm(h) * weight,
        h) for h = sum over ranks of x [M, N] + residual [M, N] (contiguous, x's dtype); weight [N] contiguous.
        Raises ValueError where `fits` refuses x, for a residual of another shape, dtype or layout, or a weight
        that is not [N] and contiguous."""
        buffers, offset = self._check(x, slot)
        N = x.shape[-1]
        if not self.takes_residual(x, residual):
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must be contiguous and match x "
                             f"{tuple(x.shape)} {x.dtype}")
        if weight.shape != (N,) or not weight.is_contiguous():
            raise ValueError(f"weight {tuple(weight.shape)} must be contiguous of shape ({N},)")
        M = x.numel() // N
        out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        h = torch.empty_like(x)
        block = triton.next_power_of_2(N)
        _one_shot_all_reduce_rms_norm_kernel[(min(M, self.max_programs),)](
            x, residual, weight, out, h, *buffers, self.signal_pad_ptrs, offset, M, N, eps, self.rank,
            WORLD=self.world, BLOCK=block, num_warps=4 if block <= 1024 else 8)
        return out, h

    @staticmethod
    def takes_residual(x: Tensor, residual: Tensor) -> bool:
        return residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous()


_ONE_SHOT: dict[torch.device, OneShotAllReduce | None] = {}
STRATEGIES = ("auto", "nccl")  # QWEN_TRTLLM_ALL_REDUCE


def all_reduce_strategy() -> str:
    """QWEN_TRTLLM_ALL_REDUCE: "auto" (the default: one-shot where it fits) or "nccl" (NCCL for every all-reduce).
    Raises QWenError for another value."""
    strategy = os.environ.get("QWEN_TRTLLM_ALL_REDUCE", "auto")
    if strategy not in STRATEGIES:
        raise QWenError(f"QWEN_TRTLLM_ALL_REDUCE={strategy} is not one of {', '.join(STRATEGIES)}: unset it (auto) "
                        "or set nccl")
    return strategy


def one_shot_all_reduce(device: torch.device) -> OneShotAllReduce | None:
    """The default process group's one-shot all-reduce on a CUDA device, set up once per device; None without a
    process group of more than one NCCL rank. Collective: every rank calls this at the same point, and the ranks
    agree, so either all of them use the one-shot kernel or none does (none when any rank has
    QWEN_TRTLLM_ALL_REDUCE=nccl or cannot set up symmetric memory; NCCL then does every all-reduce).
    Raises QWenError for a QWEN_TRTLLM_ALL_REDUCE other than auto or nccl."""
    strategy = all_reduce_strategy()
    if device.type != "cuda" or not dist.is_initialized() or dist.get_world_size() == 1 or \
            dist.get_backend() != "nccl":
        return None
    if device not in _ONE_SHOT:
        from qwen_trtllm.runtime.distributed import min_over_ranks  # here: the runtime package loads the model

        one_shot = None
        if min_over_ranks(strategy == "auto", device):
            try:
                one_shot = OneShotAllReduce(dist.group.WORLD, device)
            except Exception as e:  # any failure: this rank says no, and the ranks agree on it below
                LOGGER.warning(f"one-shot all-reduce unavailable ({type(e).__name__}: {e}): NCCL does every "
                               "all-reduce")
            if not min_over_ranks(one_shot is not None, device):
                one_shot = None
        _ONE_SHOT[device] = one_shot
    return _ONE_SHOT[device]


class AllReduce:
    """Sum of the row-parallel layers' partial outputs over the tensor-parallel ranks: the one-shot kernel for
    tensors it fits (decode steps), torch.distributed (NCCL, gloo on CPU) for the rest; the identity at tp 1.

    one_shot_device: the CUDA device whose one-shot all-reduce to use (None: never). It is set up at the first
    all-reduce, which every rank reaches at the same step (a forward outside CUDA-graph capture: graphs are
    captured after warm-up runs), not when the engine loads: a rank that fails to load then stops every rank
    with its error instead of leaving the others in the set-up's collective.
    norm: the model's residual add + RMSNorm (kernels.rms_norm or its reference), which `rms_norm` runs after
    the sum, or fused with it where the one-shot kernel takes x."""

    def __init__(self, tp: int, one_shot_device: torch.device | None = None, norm=None):
        self.tp, self.norm, self._device = tp, norm, one_shot_device if tp > 1 else None
        if self._device is not None:
            all_reduce_strategy()  # a bad QWEN_TRTLLM_ALL_REDUCE fails when the engine loads
        self._one_shot: OneShotAllReduce | None = None

    @property
    def one_shot(self) -> OneShotAllReduce | None:
        """The one-shot all-reduce, set up on first use (collective); None where NCCL does every all-reduce.
        Raises RuntimeError when first used inside CUDA-graph capture."""
        if self._device is not None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("run a forward outside CUDA-graph capture first: the one-shot all-reduce is set "
                                   "up at the first all-reduce")
            self._one_shot, self._device = one_shot_all_reduce(self._device), None
        return self._one_shot

    def __call__(self, x: Tensor, slot: int) -> Tensor:
        """x [..., H] -> the sum over ranks (x itself, reduced in place, when NCCL does it). slot: 0 or 1,
        alternating between consecutive calls (OneShotAllReduce)."""
        if self.tp == 1:
            return x
        one_shot = self.one_shot
        if one_shot is not None and one_shot.fits(x):
            return one_shot(x, slot)
        dist.all_reduce(x)
        return x

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, residual: Tensor, slot: int) -> tuple[Tensor, Tensor]:
        """norm(self(x, slot), weight, eps, residual): (RMSNorm(h) * weight, h) for h = the sum of x over ranks +
        residual, both [..., H]."""
        one_shot = self.one_shot  # None at tp 1
        if one_shot is not None and one_shot.fits(x) and one_shot.takes_residual(x, residual):
            return one_shot.rms_norm(x, weight, eps, residual, slot)
        return self.norm(self(x, slot), weight, eps, residual=residual)
