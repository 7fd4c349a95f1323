"""Weight-only quantised matmuls: y = x @ dequant(W)^T (+ bias), W int8 per channel or int4 per group (symmetric,
fp16 scales; layouts in qwen_trtllm/quantization/weight_only.py). Weights are dequantised in registers, never in
memory; accumulation is fp32; the output has x's dtype (fp16, bf16 or fp32).

`_wo_mma_kernel` does every M: BLOCK_M x BLOCK_N tiles on the tensor cores (16-row tiles for decode, where only
the weight bytes matter), the int tile converted to x's dtype in registers after a pipelined (cp.async) load.
(The engine's int8 layers at one row run kernels/fp8_gemv.py's int8_gemv instead: WeightOnlyLinear.forward.)
int8: one dot chain per tile, the per-channel scale applied at the end. int4: per K tile (BLOCK_K divides the
group) two dots, even k against the low nibbles and odd k against the high ones, scaled by the group's scale in
fp32. `_wo_gemv_kernel` (CUDA-core products, ROWS rows of x per program) serves int4 groups under 32 columns.
Both split K over a second grid axis when there are too few output tiles to fill the GPU: the fp32 partials go
to a workspace, and the program that finishes a tile last (an atomic arrival counter per tile) sums them in a
fixed order (deterministic) and adds the bias, so a split matmul is one launch. On sm_90+ the kernels launch
with PDL and prefetch the first bytes of their weight rows into L2 before waiting for the previous kernel
(qwen_trtllm/kernels/launch.py).
Launch configs come from static shapes only (select_config): no host sync, no autotuning, CUDA-graph safe.

Integer -> float conversion never uses the slow I2F unit: or-ing a small unsigned integer into the mantissa of
2^23 (fp32) or 2^10 (fp16) and subtracting the constant is exact. For fp16 x on CUDA this runs as inline PTX on
four weights per 32-bit register (the interpreter and bf16 / fp32 x take the plain Triton version).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwen_trtllm.kernels.launch import (
    arrival_counters,
    l2_prefetch_bytes,
    l2_prefetch_rows,
    pdl_enabled,
    pdl_start,
    runs_ptx,
    sm_count,
)

_XKIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def int8_to_float(q, XKIND: tl.constexpr):
    """int8 tensor -> exact float of x's dtype (fp16 via the 2^10 trick, else fp32 via the 2^23 trick)."""
    if XKIND == 1:
        r = (q.to(tl.int16) + 0x6480).to(tl.int16).to(tl.float16, bitcast=True) - 1152.0
        r = r.to(tl.float16)
    else:
        r = (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        if XKIND == 2:
            r = r.to(tl.bfloat16)
    return r


@triton.jit
def _nibble_to_float(v, XKIND: tl.constexpr):
    """uint8 tensor of unsigned nibbles u in [0, 15] -> exact float u - 8 (fp16 for fp16 x, else fp32)."""
    if XKIND == 1:
        r = (v.to(tl.int16) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0
        r = r.to(tl.float16)
    else:
        r = (v.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    return r


# fp16 converters in inline PTX, four weights per 32-bit register (fp16 x on CUDA).
# int8: xor 0x80 makes q + 128 unsigned; prmt puts each byte under an fp16 exponent byte 0x64 (1024 + byte);
# subtracting 1152 leaves q exactly. 1.25 instructions per weight.
_I8_TO_F16_PTX = tl.constexpr("""{
.reg .b32 t, c;
xor.b32 t, $2, 0x80808080;
mov.b32 c, 0x64806480;
prmt.b32 $0, t, 0x64646464, 0x4140;
prmt.b32 $1, t, 0x64646464, 0x4342;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
}""")
# int4: prmt spreads bytes 0,1 (2,3) into the low bytes of the two halves; lop3 (a & b) | c or-s the low nibble
# (1024 + u: minus 1032) or the high nibble in place (1024 + 16u: times 1/16 minus 72) into fp16 1024.
_U4_TO_F16_PTX = tl.constexpr("""{
.reg .b32 t0, t1, c, s, o;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $2, t0, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 $3, t1, 0x00F000F0, 0x64006400, 0xEA;
mov.b32 c, 0x64086408;
mov.b32 s, 0x2C002C00;
mov.b32 o, 0xD480D480;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
fma.rn.f16x2 $2, $2, s, o;
fma.rn.f16x2 $3, $3, s, o;
}""")


@triton.jit
def _int8_to_f16_asm(q):
    return tl.inline_asm_elementwise(_I8_TO_F16_PTX, "=r,=r,r", [q], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _uint4x2_to_f16_asm(b):
    """uint8 bytes -> (low nibble - 8, high nibble - 8) as two fp16 tensors of b's shape."""
    return tl.inline_asm_elementwise(_U4_TO_F16_PTX, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                     is_pure=True, pack=4)


@triton.jit
def _epilogue(acc, offs_m, offs_n, n_ld, b_ptr, y_ptr, p_ptr, cnt_ptr, tile, M, N, stride_ym, pid_k,
              HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, WIDE: tl.constexpr):
    """Store the tile; with SPLIT_K > 1 store the fp32 partial instead, and let the program that finishes a tile
    last sum all its partials in split order (deterministic) and reset the tile's counter: no second kernel."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    rows = offs_m[:, None]
    if WIDE:  # int64 offsets: a prefill chunk's M x N can pass 2^31 (131072 tokens x 22016 for gate_up)
        rows = rows.to(tl.int64)
    y_ptrs = y_ptr + rows * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n_ld).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        plane = M * N  # one split's partial [M, N]
        if WIDE:
            plane = tl.cast(M, tl.int64) * N
        p_ptrs = p_ptr + rows * N + offs_n[None, :]
        tl.store(p_ptrs + pid_k * plane, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:
            total = tl.zeros(acc.shape, tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(p_ptrs + s * plane, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + n_ld).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _wo_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, p_ptr, cnt_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                    n_groups, k_per_split, ROWS: tl.constexpr, INT4: tl.constexpr, GROUP: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, PDL: tl.constexpr, WIDE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pdl_start(PDL)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ld = offs_n % N  # loads stay in bounds; stores are masked
    offs_r = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    r_ld = tl.minimum(offs_r, M - 1)
    if WIDE:
        r_ld = r_ld.to(tl.int64)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if INT4:
        KW: tl.constexpr = BLOCK_K // 2
        acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            offs_kw = tl.max_contiguous(tl.multiple_of(k // 2 + tl.arange(0, KW), KW), KW)
            b = tl.load(w_ptr + n_ld[:, None] * stride_wn + offs_kw[None, :], eviction_policy="evict_first")
            lo = _nibble_to_float(b & 0xF, 0)
            hi = _nibble_to_float(b >> 4, 0)
            offs_k = k + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + r_ld[:, None] * stride_xm + offs_k[None, :]).to(tl.float32)
            xe, xo = tl.split(tl.reshape(x, (ROWS, KW, 2)))
            part = tl.sum(xe[:, None, :] * lo[None, :, :] + xo[:, None, :] * hi[None, :, :], axis=2)
            s = tl.load(s_ptr + n_ld * n_groups + k // GROUP).to(tl.float32)
            acc += part * s[None, :]
    else:
        acc3 = tl.zeros((ROWS, BLOCK_N, BLOCK_K), tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            offs_k = tl.max_contiguous(tl.multiple_of(k + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
            w_ptrs = w_ptr + n_ld[:, None] * stride_wn + offs_k[None, :]
            x_ptrs = x_ptr + r_ld[:, None] * stride_xm + offs_k[None, :]
            if EVEN_K:
                q = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                q = tl.load(w_ptrs, mask=offs_k[None, :] < K, other=0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=offs_k[None, :] < K, other=0.0)
            acc3 += x.to(tl.float32)[:, None, :] * int8_to_float(q, 0)[None, :, :]
        acc = tl.sum(acc3, axis=2) * tl.load(s_ptr + n_ld).to(tl.float32)[None, :]
    tile = tl.program_id(2) * tl.num_programs(0) + pid_n
    _epilogue(acc, offs_r, offs_n, n_ld, b_ptr, y_ptr, p_ptr, cnt_ptr, tile, M, N, stride_ym, pid_k, HAS_BIAS,
              SPLIT_K, WIDE)


@triton.jit
def _wo_mma_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, p_ptr, cnt_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                   n_groups, k_per_split, INT4: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, XKIND: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   USE_ASM: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, WIDE: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n  # GROUP_M row blocks in a row share each weight tile through L2
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ld = offs_m % M
    if WIDE:  # x's row offsets in int64, as the epilogue's
        m_ld = m_ld.to(tl.int64)
    n_ld = offs_n % N
    m_ok = offs_m < M
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if PREFETCH > 0:  # the weights never depend on the previous kernel: start streaming them before the wait
        if INT4:
            l2_prefetch_rows(w_ptr + n_ld * stride_wn + k_lo // 2, PREFETCH)
        else:
            l2_prefetch_rows(w_ptr + n_ld * stride_wn + k_lo, PREFETCH)
    pdl_start(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if INT4:  # the group scales are prefetched one K tile ahead: their tiny loads are not pipelined otherwise
        s_next = tl.load(s_ptr + n_ld * n_groups + k_lo // GROUP)
    for k in range(k_lo, k_hi, BLOCK_K):
        offs_k = tl.max_contiguous(tl.multiple_of(k + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
        x_ptrs = x_ptr + m_ld[:, None] * stride_xm + offs_k[None, :]
        if INT4:
            s = s_next.to(tl.float32)
            s_next = tl.load(s_ptr + n_ld * n_groups + tl.minimum((k + BLOCK_K) // GROUP, n_groups - 1))
            KW: tl.constexpr = BLOCK_K // 2
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)  # padding rows of a decode tile read nothing
            offs_kw = tl.max_contiguous(tl.multiple_of(k // 2 + tl.arange(0, KW), KW), KW)
            b = tl.load(w_ptr + n_ld[:, None] * stride_wn + offs_kw[None, :], eviction_policy="evict_first")
            if USE_ASM:
                lo, hi = _uint4x2_to_f16_asm(b)
            else:
                lo = _nibble_to_float(b & 0xF, XKIND).to(x.dtype)
                hi = _nibble_to_float(b >> 4, XKIND).to(x.dtype)
            xe, xo = tl.split(tl.reshape(x, (BLOCK_M, KW, 2)))  # even k pair with the low nibbles
            if XKIND == 0:
                part = tl.dot(xe, tl.trans(lo), input_precision="ieee")
                part = tl.dot(xo, tl.trans(hi), part, input_precision="ieee")
            else:
                part = tl.dot(xe, tl.trans(lo))
                part = tl.dot(xo, tl.trans(hi), part)
            acc += part * s[None, :]
        else:
            w_ptrs = w_ptr + n_ld[:, None] * stride_wn + offs_k[None, :]
            if EVEN_K:
                x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
                q = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                x = tl.load(x_ptrs, mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
                q = tl.load(w_ptrs, mask=offs_k[None, :] < K, other=0, eviction_policy="evict_first")
            if USE_ASM:
                w = _int8_to_f16_asm(q)
            else:
                w = int8_to_float(q, XKIND)
            if XKIND == 0:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
    if not INT4:
        acc = acc * tl.load(s_ptr + n_ld).to(tl.float32)[None, :]
    _epilogue(acc, offs_m, offs_n, n_ld, b_ptr, y_ptr, p_ptr, cnt_ptr, pid, M, N, stride_ym, pid_k, HAS_BIAS,
              SPLIT_K, WIDE)


@dataclass(frozen=True)
class WOConfig:
    """Launch parameters. kernel 'gemv': block_m is ROWS (a power of two >= M); 'mma': the tensor-core tile."""

    kernel: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    asm: bool = True  # mma kernel, fp16 x: the inline-PTX converters
    pdl: bool = True  # programmatic dependent launch where the GPU has it (sm_90+)
    prefetch: int = 0  # mma kernel on sm_90+: bytes of each weight row to prefetch into L2 before the PDL wait
    maxnreg: int | None = None  # register cap per thread (more programs per SM), None = the compiler's choice


def _low_pow2(n: int) -> int:
    return n & -n


def _split_for(tiles: int, k_tiles: int, max_programs: int) -> int:
    """The largest power-of-two split of the K tiles (at most 8) that keeps tiles * split <= max_programs."""
    split = 1
    while split < 8 and split * 2 <= k_tiles and tiles * split * 2 <= max_programs:
        split *= 2
    return split


def select_config(M: int, N: int, K: int, precision: str, group_size: int = 128,
                  device: torch.device | None = None) -> WOConfig:
    """The launch configuration for a static shape: the same choice for the same shapes, no autotuning.

    Picked from sweeps on an H100 over Qwen-7B's shapes (now: scripts/gpu_gemv_tune.py --format int8|int4
    --rows M; int8 at 1 row sweeps int8_gemv, which the engine runs there): decode (M <= 16) streams the
    weights with 16-row tensor-core tiles split over K until about 3 (int4
    with N <= 4096: 4) programs per SM are in flight, each prefetching the first 256 bytes of its weight rows into
    L2 before its PDL wait; M <= 64 uses 32/64-row tiles and about 1.5 programs per SM (int8 at 33-64 rows with
    N <= 4096: 5 stages, H200 2026-12-01); prefill uses large tiles and no split.
    """
    sms = sm_count(device, 132) if device is not None else 132
    int4 = precision == "int4"
    gk = _low_pow2(group_size) if int4 else 1 << 30  # int4: block_k must divide the group
    if int4 and gk < 32:  # groups too small for the mma kernel's split-x dots: the gemv kernel, in row tiles
        cfg, programs = WOConfig("gemv", min(triton.next_power_of_2(M), 8), 16, gk, num_warps=4), 3 * sms
    elif M <= 16 and int4:
        narrow = N <= 4096
        cfg = WOConfig("mma", 16, 64 if narrow else 128, 128, num_warps=4, num_stages=3, group_m=1, prefetch=256)
        programs = (4 if narrow else 3) * sms
    elif M <= 16:  # int8: narrow outputs take 3 stages, or with a long K (c_proj) wide tiles, 1 program per SM
        narrow, long_k = N <= 4096, K > 4096
        cfg = WOConfig("mma", 16, 128 if narrow and long_k else 64, 256, num_warps=4,
                       num_stages=3 if narrow and not long_k else 4, group_m=1, prefetch=256, maxnreg=128)
        programs = sms if narrow and long_k else 3 * sms
    elif M <= 64:  # int8's narrow outputs (dense, c_proj) at 33-64 rows: 5 stages (the H200 sweep at 64 rows)
        stages = 5 if not int4 and N <= 4096 and M > 32 else 3
        cfg = WOConfig("mma", triton.next_power_of_2(M), 128, 128, num_warps=4, num_stages=stages, group_m=1)
        programs = 3 * sms // 2
    elif int4:
        cfg, programs = WOConfig("mma", 64, 128, 128, num_warps=4, num_stages=3, group_m=8), 3 * sms // 2
    else:
        cfg, programs = WOConfig("mma", 128, 128, 64, num_warps=8, num_stages=3, group_m=8), 3 * sms // 2
    if int4:
        cfg = replace(cfg, block_k=min(cfg.block_k, gk))
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    return replace(cfg, split_k=_split_for(tiles, triton.cdiv(K, cfg.block_k), programs))


def _check(x: Tensor, qweight: Tensor, scales: Tensor, precision: str, group_size: int) -> tuple[int, int, int]:
    if x.dim() != 2 or x.dtype not in _XKIND:
        raise ValueError(f"x must be 2-D float32/float16/bfloat16, got {tuple(x.shape)} {x.dtype}")
    M, K = x.shape
    N = qweight.shape[0]
    if precision == "int8":
        if qweight.dtype != torch.int8 or qweight.shape != (N, K) or scales.shape != (N,):
            raise ValueError(f"int8 weight-only matmul: x [{M}, {K}] needs qweight int8 [N, {K}] and scales [N]; "
                             f"got {qweight.dtype} {tuple(qweight.shape)} and {tuple(scales.shape)}")
    elif precision == "int4":
        if K % group_size or group_size % 2:
            raise ValueError(f"int4 weight-only matmul: group_size {group_size} must be even and divide K={K}")
        if qweight.dtype != torch.uint8 or qweight.shape != (N, K // 2) or scales.shape != (N, K // group_size):
            raise ValueError(f"int4 weight-only matmul: x [{M}, {K}] with group {group_size} needs qweight uint8 "
                             f"[N, {K // 2}] and scales [N, {K // group_size}]; got {qweight.dtype} "
                             f"{tuple(qweight.shape)} and {tuple(scales.shape)}")
    else:
        raise ValueError(f"precision {precision!r} is not int8 or int4")
    if not (qweight.is_contiguous() and scales.is_contiguous()):
        raise ValueError("qweight and scales must be contiguous")
    return M, N, K


def weight_only_matmul(x: Tensor, qweight: Tensor, scales: Tensor, precision: str, group_size: int = 128,
                       bias: Tensor | None = None, config: WOConfig | None = None) -> Tensor:
    """x [M, K] @ dequant(qweight)^T (+ bias) -> [M, N] in x.dtype; precision 'int8' or 'int4'."""
    M, N, K = _check(x, qweight, scales, precision, group_size)
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    int4 = precision == "int4"
    cfg = config or select_config(M, N, K, precision, group_size, x.device)
    bk = cfg.block_k
    if int4 and group_size % bk:
        raise ValueError(f"block_k {bk} must divide the int4 group size {group_size}")
    k_per_split = triton.cdiv(triton.cdiv(K, bk), cfg.split_k) * bk
    split = triton.cdiv(K, k_per_split)
    partial = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else y
    b = bias if bias is not None else y
    n_groups = K // group_size if int4 else 1
    if cfg.kernel == "gemv":
        grid = (triton.cdiv(N, cfg.block_n), split, triton.cdiv(M, cfg.block_m))
        tiles = grid[0] * grid[2]
    else:
        if int4 and bk < 32:
            raise ValueError(f"the int4 mma kernel needs block_k >= 32 (group_size {group_size}): use gemv")
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
        tiles = grid[0]
    counters = arrival_counters(x.device, tiles) if split > 1 else y
    pdl = cfg.pdl and pdl_enabled(x.device)
    wide = max(M * x.stride(0), split * M * N) >= 2**31  # x's rows, y and the partials: int64 row offsets past 2^31
    common = dict(INT4=int4, GROUP=group_size if int4 else 1, HAS_BIAS=bias is not None, SPLIT_K=split, WIDE=wide,
                  EVEN_K=K % bk == 0, BLOCK_N=cfg.block_n, BLOCK_K=bk, PDL=pdl,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl,
                  **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and x.is_cuda else {}))
    args = (x, qweight, scales, b, y, partial, counters, M, N, K, x.stride(0), qweight.stride(0), y.stride(0),
            n_groups, k_per_split)
    if cfg.kernel == "gemv":
        _wo_gemv_kernel[grid](*args, ROWS=cfg.block_m, **common)
    else:
        use_asm = cfg.asm and x.dtype == torch.float16 and runs_ptx(x.device)
        row_bytes = (K - (split - 1) * k_per_split) // (2 if int4 else 1)  # the shortest (last) split's slice
        prefetch = l2_prefetch_bytes(x.device, cfg.prefetch, row_bytes, qweight.stride(0) * qweight.element_size())
        _wo_mma_kernel[grid](*args, XKIND=_XKIND[x.dtype], BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m,
                             USE_ASM=use_asm, PREFETCH=prefetch, **common)
    return y


def int8_weight_only_matmul(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [M, K] (fp16/bf16/fp32) @ (int8 [N, K] * fp16 scales [N])^T (+ bias) -> [M, N] in x.dtype."""
    return weight_only_matmul(x, qweight, scales, "int8", bias=bias)


def int4_weight_only_matmul(x: Tensor, qweight_packed: Tensor, scales: Tensor, group_size: int,
                            bias: Tensor | None = None) -> Tensor:
    """x [M, K] @ int4 weights (uint8 [N, K/2], fp16 scales [N, K/group_size])^T (+ bias) -> [M, N] in x.dtype."""
    return weight_only_matmul(x, qweight_packed, scales, "int4", group_size, bias)
