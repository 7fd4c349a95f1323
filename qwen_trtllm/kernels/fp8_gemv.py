"""The FP8 GEMV of decode: y = x @ (codes * scales)^T (+ bias) for 1-16 rows of x, e4m3 weights [N, K] streamed
once from HBM (1 byte per weight, half of fp16's) with one float32 scale per output channel. The activations are
not quantised (quantization/fp8.py says why). The elementwise kernel also runs weight-only int8 codes (int8_gemv:
fp16 scales per output channel, one row): the same bytes per weight, so the same scheme, with the codes
read as float32 denormals (below): sum q x = 2^85 sum ((q + 128) 2^-149)(x 2^64) - 128 sum x. Every product is
exact (fp16 / bf16 x); float32 accumulation of the offset sum adds a relative error of ~2^-24 |sum (q + 128) x| /
|sum q x| (3e-6 with every activation near 1 against 8e-7 near 0, tests/test_weight_only.py), far under an fp16
output's rounding.
x must stay under 2^64 in magnitude (fp16 activations always do; bf16 / fp32 beyond it give inf), and bf16 / fp32
x under 2^-41 lose relative precision (their products are denormal); every fp16 x is in range.

Two kernels, both giving each program BLOCK_N whole weight rows and walking K in BLOCK_K tiles:
  * `_fp8_gemv_kernel`, one row (decode at batch 1), the fp16 GEMV's scheme (kernels/gemv.py): each
    e4m3 tile [BLOCK_N, BLOCK_K] (BLOCK_K bytes per row) is converted once, straight to float32, multiplied
    elementwise with the activation tile in float32 and accumulated in a [BLOCK_N, BLOCK_K] float32 tile that is
    reduced over K once at the end (config sum_vec > 1: each tile's products are first summed in groups of sum_vec
    adjacent ones, inside a thread, into a [BLOCK_N, BLOCK_K / sum_vec] accumulator: fewer registers, so more
    programs and loads in flight per SM). Only one row: each further row would go through the same per-weight
    instructions again (re-reading the weights from L2), so at 2-4 rows the tensor-core kernels (the tl.dot one
    below for e4m3, kernels/weight_only_gemm.py for int8) are 1.2-2.3x faster per step (H200,
    docs/results/h200_decode5/gemv_rows_ab.txt: int8 batch 4 7.68 -> 3.37 ms, fp8 7.02 -> 3.91).
  * `_fp8_mma_kernel`, 2 to MAX_ROWS rows: tl.dot on 16-row tiles (rows padded with zeros), the codes
    converted straight to x's dtype (exact: e4m3's 3 mantissa bits and exponent range fit fp16 and bf16),
    float32 accumulation; fp32 activations in full IEEE precision; bf16 ones in float32 under the interpreter,
    whose tl.dot misreads bf16.
In both the per-channel scale multiplies the accumulated row once at the end, then the bias is added (float32),
then the row is rounded to x's dtype. gated=True (elementwise kernel only, one row) reads x as
[gate | up] ([M, 2K]) and multiplies with SiLU(gate) * up (silu_times: silu_mul's roundings, never written to
memory), the MLP's c_proj; the tl.dot kernel would recompute SiLU on whole 16-row tiles in every program (13.0 ms
at batch 16 on the H200 against 5.56 without, and a failed GPU test), so above one row silu_mul runs first.
On sm_90+ both launch with programmatic dependent launch and prefetch the first PREFETCH_BYTES of each weight
row into L2 before waiting for the previous kernel (kernels/launch.py). Launch configs come from the GPU model
and static shapes only (`default_config`): CUDA-graph safe. The codes are only loaded and widened, never produced, so
Triton's CPU interpreter (which converts float32 -> fp8 wrongly but loads e4m3 correctly) runs them as the GPU
does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from qwen_trtllm.kernels.activation import silu_times
from qwen_trtllm.kernels.launch import (
    gpu_model,
    l2_prefetch_bytes,
    l2_prefetch_rows,
    pdl_enabled,
    pdl_start,
    runs_ptx,
)

GEMV_ROWS = 1  # rows up to which the elementwise kernel runs (tl.dot above): one, the module docstring says why
MAX_ROWS = 16
PREFETCH_BYTES = 1024  # of each weight row, into L2 before the PDL wait (sm_90+)


# int8_gemv's codes as float32 denormals: the int32 q + 128 (0-255) read as a float32 is exactly (q + 128) 2^-149,
# and times x 2^64 a normal float (q + 128) x 2^-85 for every nonzero fp16 x (no .ftz: the FFMA keeps denormal
# operands exact). Two instructions per weight (the byte's move, the FFMA) instead of the 2^23 trick's four. On
# CUDA inline PTX does four codes per 32-bit register: xor 0x80 per byte gives q + 128, prmt moves each byte to the
# bottom of a zero word; the interpreter computes the same values in Triton.
_I8_TO_DENORMAL_PTX = tl.constexpr("""{
.reg .b32 t;
xor.b32 t, $4, 0x80808080;
prmt.b32 $0, t, 0, 0x4440;
prmt.b32 $1, t, 0, 0x4441;
prmt.b32 $2, t, 0, 0x4442;
prmt.b32 $3, t, 0, 0x4443;
}""")


@triton.jit
def _offset_denormals(codes, ASM: tl.constexpr):
    """int8 codes q -> float32 (q + 128) * 2^-149, exact."""
    if ASM:
        return tl.inline_asm_elementwise(_I8_TO_DENORMAL_PTX, "=r,=r,=r,=r,r", [codes], dtype=tl.float32,
                                         is_pure=True, pack=4)
    return (codes.to(tl.int32) + 128).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GATED: tl.constexpr = False, PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0,
                     VEC: tl.constexpr = 1, INT8: tl.constexpr = False, ASM: tl.constexpr = False):
    pid = tl.program_id(0)
    n0 = pid * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w_blk = w_ptr + n0.to(tl.int64) * K  # the block's first row; offsets inside a block fit int32
    row_off = (tl.minimum(offs_n, N - 1) - n0) * K  # rows past N re-read the last row (their stores are masked)
    if PREFETCH > 0:  # the weights never depend on the previous kernel: start streaming them before the wait
        l2_prefetch_rows(w_blk + row_off, PREFETCH)
    pdl_start(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_K // VEC), tl.float32)
    if INT8:
        xsum = tl.zeros((BLOCK_K,), tl.float32)  # sum x per lane: the offset's correction
    for k0 in tl.range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            codes = tl.load(w_blk + row_off[:, None] + offs_k[None, :])
            xv = tl.load(x_ptr + offs_k)
            if GATED:  # x row = [gate | up]: SiLU(gate) * up with silu_mul's roundings
                xv = silu_times(xv, tl.load(x_ptr + K + offs_k))
        else:
            k_ok = offs_k < K
            codes = tl.load(w_blk + row_off[:, None] + offs_k[None, :], mask=k_ok[None, :], other=0.0)
            xv = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0)
            if GATED:
                xv = silu_times(xv, tl.load(x_ptr + K + offs_k, mask=k_ok, other=0.0))
        xf = xv.to(tl.float32)
        if INT8:  # (q + 128) 2^-149 x 2^64 = (q + 128) x 2^-85, exact and never below 2^-126 (fp16 x)
            prod = _offset_denormals(codes, ASM) * (xf * 18446744073709551616.0)[None, :]
            xsum += xf
        else:  # e4m3 -> float32 exactly, one conversion
            prod = codes.to(tl.float32) * xf[None, :]
        if VEC > 1:
            acc += tl.sum(tl.reshape(prod, (BLOCK_N, BLOCK_K // VEC, VEC)), axis=2)
        else:
            acc += prod
    y = tl.sum(acc, axis=1)
    if INT8:  # sum q x = 2^85 sum (q + 128) x 2^-85 - 128 sum x
        y = y * 38685626227668133590597632.0 - 128.0 * tl.sum(xsum, axis=0)
    y = y * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _fp8_mma_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_y, HAS_BIAS: tl.constexpr,
                    EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
                    PREFETCH: tl.constexpr = 0):
    pid = tl.program_id(0)
    n0 = pid * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    w_blk = w_ptr + n0.to(tl.int64) * K
    row_off = (tl.minimum(offs_n, N - 1) - n0) * K
    if PREFETCH > 0:
        l2_prefetch_rows(w_blk + row_off, PREFETCH)
    pdl_start(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[:, None] * stride_x + offs_k[None, :]
        if EVEN_K:
            codes = tl.load(w_blk + row_off[:, None] + offs_k[None, :])
            xt = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)  # padding rows read nothing
        else:
            k_ok = offs_k < K
            codes = tl.load(w_blk + row_off[:, None] + offs_k[None, :], mask=k_ok[None, :], other=0.0)
            xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # bf16 under the interpreter, whose tl.dot multiplies bf16 operands as raw bits: exact in fp32
            acc = tl.dot(xt.to(tl.float32), tl.trans(codes.to(tl.float32)), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(xt, tl.trans(codes.to(tl.float32)), acc, input_precision="ieee")
        else:  # e4m3 -> fp16 / bf16 exactly, one conversion
            acc = tl.dot(xt, tl.trans(codes.to(xt.dtype)), acc)
    y = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


class Fp8GemvConfig(NamedTuple):
    """Launch parameters of one kernel: BLOCK_N weight rows per program, BLOCK_K codes (bytes) per row tile;
    sum_vec (elementwise kernel): adjacent products summed per tile before accumulating (1: none)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    sum_vec: int = 1


# Configs per GPU model (launch.gpu_model): "gemv" (the elementwise kernel, one row) and "mma" (the tl.dot
# kernel, above) as (narrow, wide): narrow for N <= 4096 (Qwen-7B's dense and c_proj), wide above (qkv, gate_up);
# "gated": c_proj with SiLU*mul fused (the elementwise kernel). H200: the bests of
# `scripts/gpu_gemv_tune.py --format fp8 --rows 1 | --rows 1 --shapes c_proj --gated | --rows 8 | --rows 16`
# (docs/PERF.md, 2026-12-01): 4-row blocks (more programs in flight) beat the fp16 GEMV's 8-16 for 1-byte codes,
# 512-code tiles with 2 warps and 2 stages for the wide shapes (gate_up 25.0 us vs 29.5 with 8 x 1024, 4 warps);
# the tl.dot kernel wants 32-64-row blocks (gate_up at 16 rows 27.8 us vs 56.2 with 16 x 512). sum_vec 16 for
# the wide shapes (qkv 15.9 -> 14.3 us, gate_up 24.8 -> 23.8, e4m3 lm_head 162 -> 146; dense and the gated c_proj
# are as fast or slower with it): batch 1 2.73 -> 2.65 ms (docs/PERF.md). The H100's
# elementwise configs are unmeasured guesses (the fp16 GEMV's H100 table), its tl.dot ones the H200's.
# "int8" (int8_gemv's codes, one row, not gated; gated takes "gated"): H200 from the 22-config sweep of
# the denormal codes at batch 1 (docs/results/h200_decode5/int8_denormal.txt; `scripts/gpu_gemv_tune.py --format
# int8 --rows 1` sweeps the same kernel): dense 5.6 us with (4, 2048, 2, 3, 16), gate_up 24.2 with (4, 1024, 2,
# 3, 16) (qkv 15.2 with it, 14.8 with dense's); the gated c_proj keeps "gated" (15.5). H100: the e4m3 entries. A
# GPU without an entry takes the H100's.
_CONFIGS: dict[str, dict[str, tuple[Fp8GemvConfig, ...]]] = {
    "H200": {"gemv": (Fp8GemvConfig(4, 1024, 4, 3), Fp8GemvConfig(4, 512, 2, 2, 16)),
             "gated": (Fp8GemvConfig(8, 1024, 4, 3),),
             "mma": (Fp8GemvConfig(32, 512, 4, 4), Fp8GemvConfig(64, 256, 4, 4)),
             "int8": (Fp8GemvConfig(4, 2048, 2, 3, 16), Fp8GemvConfig(4, 1024, 2, 3, 16))},
    "H100": {"gemv": (Fp8GemvConfig(16, 1024, 8, 3), Fp8GemvConfig(8, 1024, 8, 3)),
             "int8": (Fp8GemvConfig(16, 1024, 8, 3), Fp8GemvConfig(8, 1024, 8, 3)),
             "gated": (Fp8GemvConfig(16, 1024, 8, 3),),
             "mma": (Fp8GemvConfig(32, 512, 4, 4), Fp8GemvConfig(64, 256, 4, 4))},
}


def default_config(N: int, K: int, device: torch.device, rows: int = 1, gated: bool = False,
                   int8: bool = False) -> Fp8GemvConfig:
    """The launch config for x [rows, K] (gated: [rows, 2K]) @ W [N, K]^T (int8: int8_gemv's codes) on `device`:
    its GPU model's table entry on CUDA (K tiles no wider than K, at least 16 for tl.dot). Off CUDA (Triton's
    interpreter, in tests) few, large programs and 256-wide K tiles, so small test shapes cross several tiles."""
    if device.type != "cuda":
        return Fp8GemvConfig(64, max(16, min(256, triton.next_power_of_2(K))), 4, 1)
    table = _CONFIGS.get(gpu_model(device), _CONFIGS["H100"])
    if gated:
        cfg = table["gated"][0]
    else:
        narrow, wide = table["mma" if rows > GEMV_ROWS else "int8" if int8 else "gemv"]
        cfg = narrow if N <= 4096 else wide
    return cfg._replace(block_k=min(cfg.block_k, max(16, triton.next_power_of_2(K))))


def fp8_gemv(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None, gated: bool = False,
             config: Fp8GemvConfig | None = None) -> Tensor:
    """x [M, K] (M <= 16; fp16/bf16/fp32) @ (qweight e4m3 [N, K] * scales float32 [N])^T (+ bias [N]) -> [M, N]
    in x.dtype. gated (M = 1): x is [M, 2K] = [gate | up] and the product uses SiLU(gate) * up. config:
    the launch parameters (default_config's by default; the tuner passes its own). ValueError naming each
    problem for other shapes or dtypes, or a bias that is not [N]."""
    return _code_gemv(x, qweight, scales, bias, gated, config, torch.float8_e4m3fn, torch.float32, MAX_ROWS)


def int8_gemv(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None, gated: bool = False,
              config: Fp8GemvConfig | None = None) -> Tensor:
    """Weight-only int8 (quantization/weight_only.py's layout) through the elementwise kernel: x [M, K] (M =
    GEMV_ROWS = 1; fp16/bf16/fp32) @ (qweight int8 [N, K] * scales fp16 [N])^T (+ bias [N]) -> [M, N] in x.dtype,
    float32 products and accumulation, the scale once per row. The same bytes per weight as e4m3, so the same
    configs. gated, config and the ValueError as in fp8_gemv."""
    return _code_gemv(x, qweight, scales, bias, gated, config, torch.int8, torch.float16, GEMV_ROWS)


def _check_codes(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, gated: bool,
                 code_dtype: torch.dtype, scale_dtype: torch.dtype, max_rows: int) -> tuple[int, int, int]:
    """(M, N, K) of a code GEMV's operands; ValueError naming every problem otherwise."""
    kind, codes, scale = ("fp8" if code_dtype == torch.float8_e4m3fn else "int8"), str(code_dtype)[6:], \
        str(scale_dtype)[6:]
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{kind} GEMV: x must be 2-D float16 / bfloat16 / float32, got {tuple(x.shape)} {x.dtype}")
    M, KX = x.shape
    K = KX // 2 if gated else KX
    N = qweight.shape[0] if qweight.dim() == 2 else -1
    most = GEMV_ROWS if gated else max_rows
    problems = []
    if not 0 < M <= most:
        takes = f"1-{most}" if most > 1 else "1"
        problems.append(f"x has {M} rows, the kernel takes {takes}{' with gated' if gated else ''}")
    if gated and KX % 2:
        problems.append(f"gated x [{M}, {KX}] must be [gate | up], an even width")
    if qweight.dtype != code_dtype or qweight.dim() != 2 or qweight.shape[1] != K or not qweight.is_contiguous():
        problems.append(f"qweight must be contiguous {codes} [N, {K}], got {qweight.dtype} {tuple(qweight.shape)}")
    if scales.dtype != scale_dtype or scales.shape != (N,) or not scales.is_contiguous():
        problems.append(f"scales must be contiguous {scale} [{N}], got {scales.dtype} {tuple(scales.shape)}")
    if bias is not None and bias.shape != (N,):
        problems.append(f"bias must be [{N}], got {tuple(bias.shape)}")
    if problems:
        raise ValueError(f"{kind} GEMV: " + "; ".join(problems))
    return M, N, K


def _code_gemv(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, gated: bool,
               config: Fp8GemvConfig | None, code_dtype: torch.dtype, scale_dtype: torch.dtype,
               max_rows: int) -> Tensor:
    M, N, K = _check_codes(x, qweight, scales, bias, gated, code_dtype, scale_dtype, max_rows)
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    cfg = config or default_config(N, K, x.device, M, gated, code_dtype == torch.int8)
    pdl = pdl_enabled(x.device)
    common = dict(HAS_BIAS=bias is not None, EVEN_K=K % cfg.block_k == 0, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  PDL=pdl, PREFETCH=l2_prefetch_bytes(x.device, PREFETCH_BYTES, K, K),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl)
    args = (x, qweight, scales, bias if bias is not None else scales, y)
    grid = (triton.cdiv(N, cfg.block_n),)
    if M <= GEMV_ROWS:
        _fp8_gemv_kernel[grid](*args, N, K, GATED=gated, VEC=cfg.sum_vec,
                               INT8=code_dtype == torch.int8, ASM=runs_ptx(x.device), **common)
    else:
        _fp8_mma_kernel[grid](*args, M, N, K, x.stride(0), y.stride(0), IEEE=x.dtype == torch.float32,
                              UPCAST=x.dtype == torch.bfloat16 and not x.is_cuda, BLOCK_M=16, **common)
    return y


def fp8_gemv_reference(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None,
                       gated: bool = False) -> Tensor:
    """fp8_gemv's product in PyTorch: x [M, K] (gated: [M, 2K] = [gate | up], silu_mul_reference first) @
    dequantised weights (float32 [N, K]) in float32, unquantised activations (+ bias) -> [M, N] in x.dtype."""
    from qwen_trtllm.kernels.activation import silu_mul_reference
    from qwen_trtllm.quantization.fp8 import fp8_linear_reference

    return fp8_linear_reference(silu_mul_reference(x) if gated else x, qweight, scales, bias,
                                quantize_activations=False)
