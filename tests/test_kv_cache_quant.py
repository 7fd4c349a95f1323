"""The quantised KV cache (build.py --int8_kv_cache / --fp8_kv_cache): the number format and its error bounds, the
scales' granularity (one per token and head), each kernel against its PyTorch reference on quantised caches
(Triton's interpreter on CPU), and int8 / fp8 engines end to end (teacher-forced agreement with the fp32 engine,
in-flight batching with preemption, run.py, build flags and config.json)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_fused_path import assert_fused_equals_plain
from test_runtime import prompts_and_params

from qwen_trtllm import QWenError
from qwen_trtllm.builder.build import build_engine
from qwen_trtllm.builder.engine_format import read_engine_config
from qwen_trtllm.evaluation.teacher_forced import batched, compare_logits, engine_logits, random_prompts
from qwen_trtllm.kernels import (
    copy_kv_blocks,
    copy_kv_blocks_reference,
    dequantize_kv_reference,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    quantize_kv_reference,
    rotary_kv_write,
    rotary_kv_write_reference,
    triton_available,
)
from qwen_trtllm.runtime import LLM, Engine, Executor, ExecutorConfig, KvCacheConfig, SamplingParams
from qwen_trtllm.runtime.engine import check_kv_cache_supported
from qwen_trtllm.runtime.kv_cache import KVCacheManager

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # as tests/test_kernels.py
FP8_OK = DEVICE == "cpu" or torch.cuda.get_device_capability() >= (8, 9)
needs_triton = pytest.mark.skipif(not triton_available(DEVICE), reason="no CUDA, and qwen_trtllm.kernels was "
                                  "imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it)")
pytestmark = [pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def formats(with_fp8_kernels: bool = True):
    """int8 and fp8 as parameters (fp8 kernels skipped on CUDA GPUs older than sm_89)."""
    fp8_skip = pytest.mark.skipif(with_fp8_kernels and not FP8_OK, reason="fp8 Triton kernels need sm_89+")
    return [pytest.param(torch.int8, id="int8"), pytest.param(torch.float8_e4m3fn, id="fp8", marks=fp8_skip)]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def spread(shape, gen, decades: float = 4.0) -> torch.Tensor:
    """Normal values whose scale differs per vector (last dim) over `decades` powers of ten: each (token, head)
    its own magnitude, which one scale per tensor cannot serve."""
    mag = 10.0 ** (decades * (torch.rand(*shape[:-1], 1, generator=gen) - 0.5))
    return torch.randn(*shape, generator=gen) * mag


def format_bound(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest |dequantised - x| the format allows, elementwise (float64; x the float32 values, scale their
    vector's scale): int8 half a step, scale / 2; e4m3 half an ulp, <= 2^-4 |x| for normal values (|x| / scale
    >= 2^-6), 2^-10 scale for subnormals; times 1 + 1e-4 for float32 rounding of x * (QMAX / amax) and of scale."""
    x, s = x.double(), scale.double()[..., None]
    if dtype == torch.int8:
        bound = s / 2
    else:
        bound = torch.where(x.abs() >= 2.0**-6 * s, 2.0**-4 * x.abs(), 2.0**-10 * s)
    return bound * (1 + 1e-4)


# --- the format -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", formats(with_fp8_kernels=False))
def test_quantize_reference_error_bounds(dtype):
    """Every dequantised value within the format's error of its float32 value; each vector's largest |x| maps to
    the largest code; an all-zero vector gives codes 0 and scale 0."""
    g = torch.Generator().manual_seed(0)
    x = spread((64, 4, 128), g, decades=8)
    x[3, 1] = 0.0
    codes, scale = quantize_kv_reference(x, dtype)
    assert codes.dtype == dtype and scale.dtype == torch.float32 and scale.shape == (64, 4)
    err = (dequantize_kv_reference(codes, scale, torch.float64) - x.double()).abs()
    bound = format_bound(x, scale, dtype)
    assert (err <= bound).all()
    top = x.abs().argmax(dim=-1, keepdim=True)
    assert (codes.float().gather(-1, top).abs()[scale > 0] == QMAX[dtype]).all()
    assert (codes.float()[3, 1] == 0).all() and scale[3, 1] == 0
    assert torch.equal(scale.double(), (x.abs().amax(-1).double() / QMAX[dtype]).float().double())
    # and the bound is tight: the worst element uses at least half of it (a looser format would not pass silently)
    assert (err / bound)[scale > 0].max() > 0.5


# --- rotary + write + quantise -----------------------------------------------------------------------------------
TIES = {  # values (in code units, the largest first) halfway between two codes, and the even codes they round to
    torch.int8: ([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5], [127.0, 0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 126.0]),
    torch.float8_e4m3fn: ([448.0, 1.0625, 1.1875, 17.0, 19.0, -1.0625, 1.5 * 2**-9, 0.5 * 2**-9, 440.0],
                          [448.0, 1.0, 1.25, 16.0, 20.0, -1.0, 2 * 2**-9, 0.0, 448.0]),
}
def _write(kernel, cache_dtype, qkv, positions, slots, heads, head_dim, num_blocks, block_size,
           seq_index=None, logn=0):
    """Run rotary_kv_write (kernel=True) or its reference into fresh quantised caches: codes full of a sentinel
    (NaN in fp8; -128, no symmetric code, in int8), scales NaN. Returns q, (k codes, v codes, k scales, v scales)."""
    fill = float("nan") if cache_dtype == torch.float8_e4m3fn else -128
    kc = torch.full((num_blocks, heads, block_size, head_dim), fill, dtype=cache_dtype, device=DEVICE)
    vc = kc.clone()
    ks = torch.full((num_blocks, heads, block_size), float("nan"), device=DEVICE)
    vs = ks.clone()
    inv_freq = _inv_freq(positions.shape[0] if seq_index is None else int(seq_index.max()) + 1, head_dim)
    fn = rotary_kv_write if kernel else rotary_kv_write_reference
    q = fn(qkv, inv_freq, positions, slots, kc, vc, heads, head_dim, head_dim, logn, seq_index=seq_index,
           k_scale=ks, v_scale=vs)
    return q, (kc, vc, ks, vs)


def _inv_freq(rows: int, rotary_dim: int) -> torch.Tensor:
    alphas = torch.tensor([1.0 + 2 * (i % 3) for i in range(rows)], dtype=torch.float64)
    base = 10000.0 * alphas ** (rotary_dim / (rotary_dim - 2))
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    return (1.0 / (base.float()[:, None] ** exponent[None, :])).to(DEVICE)


def _true_kv(qkv, positions, heads, head_dim, seq_index=None):
    """The float32 rotated k and v [N, heads, head_dim] that the caches should hold (the unquantised reference)."""
    n_blocks = positions.shape[0] + 1
    kc = torch.zeros(n_blocks, heads, 1, head_dim, device=DEVICE)
    vc = kc.clone()
    slots = torch.arange(positions.shape[0], device=DEVICE)  # block i, offset 0
    inv_freq = _inv_freq(positions.shape[0] if seq_index is None else int(seq_index.max()) + 1, head_dim)
    rotary_kv_write_reference(qkv.float(), inv_freq, positions, slots, kc, vc, heads, head_dim, head_dim,
                              seq_index=seq_index)
    return kc[:-1, :, 0], vc[:-1, :, 0]


@needs_triton
@pytest.mark.parametrize("cache_dtype", formats())
def test_rotary_decode_attention_on_quantised_caches(cache_dtype):
    """Rotary inside the decode kernel quantises the newest k and v as rotary_kv_write does: the same codes, scales
    and output to the bit as rotary_kv_write then paged_decode_attention, and the reference's output."""
    from test_kernels import assert_rotary_decode_equals_two_kernels

    assert_rotary_decode_equals_two_kernels(torch.float16, [1, 64, 200, 37], 2, 32, 16, 32, 0, 4, 7, cache_dtype)


@needs_triton
@pytest.mark.parametrize("cache_dtype", formats())
@pytest.mark.parametrize("dtype,seq_index", [pytest.param(torch.float32, False, id="decode-fp32"),
                                              pytest.param(torch.float16, True, id="prefill-fp16")])
def test_rotary_kv_write_quantised_equals_reference(cache_dtype, dtype, seq_index):
    """The kernel quantises k and v as it writes them, as its reference does: the same codes (k: where the
    kernel's float32 rotation agrees to the last bit; a code at a rounding tie may move one step), the same
    scales (k to float32 rounding), q unchanged; nothing written outside slot_mapping; both within the format's
    error of the float32 values. Decode rows (one per sequence) in float32; prefill chunks (seq_index, a strided
    qkv, logn on) in float16."""
    g = torch.Generator().manual_seed(7 + seq_index)
    heads, head_dim, bs = 2, 32, 16
    if seq_index:
        positions = torch.cat([torch.arange(20), torch.arange(30, 35), torch.tensor([7])]).to(DEVICE)
        index = torch.tensor([0] * 20 + [1] * 5 + [2], dtype=torch.int32, device=DEVICE)
    else:
        positions, index = torch.tensor([0, 15, 16, 40], device=DEVICE), None
    N, width = positions.shape[0], 3 * heads * head_dim
    qkv = spread((N, 3, heads, head_dim), g)
    # head 0's v spans 7 decades inside each vector: codes down to e4m3's subnormals (2^-9) and to 0
    signs = torch.randint(0, 2, (N, head_dim), generator=g) * 2 - 1
    qkv[:, 2, 0] = signs * 10.0 ** -torch.linspace(0, 7, head_dim) * torch.rand(N, 1, generator=g).add(0.5)
    # token 0's v of head 1: exact ties in code units (amax = QMAX x 2^-3), which round to even
    ties, even = TIES[cache_dtype]
    qkv[0, 2, 1] = 0.0
    qkv[0, 2, 1, : len(ties)] = torch.tensor(ties) / 8
    qkv = qkv.reshape(N, width)
    qkv = torch.cat([qkv, torch.randn(N, 8, generator=g)], 1).to(DEVICE, dtype)[:, :width]  # row stride 200
    slots = torch.randperm(6 * bs, generator=g)[:N].to(DEVICE)  # scattered over 6 blocks
    logn = 16 if seq_index else 0
    q, got = _write(True, cache_dtype, qkv, positions, slots, heads, head_dim, 6, bs, index, logn)
    q_ref, want = _write(False, cache_dtype, qkv, positions, slots, heads, head_dim, 6, bs, index, logn)
    assert rel_err(q, q_ref) < TOL[dtype]

    blocks, offs = slots // bs, slots % bs
    written = torch.zeros(6, heads, bs, dtype=torch.bool, device=DEVICE)
    written[blocks, :, offs] = True
    for t in got:
        t = t.float()
        unwritten = t[~written]
        assert (unwritten.isnan() | (unwritten == -128)).all(), "a slot outside slot_mapping changed"
        assert not t[written].isnan().any(), "a slot of slot_mapping was not written"
    kc, vc, ks, vs = got
    kc_ref, vc_ref, ks_ref, vs_ref = want
    assert vc[blocks[0], 1, offs[0], : len(even)].float().tolist() == even  # ties to even
    assert torch.equal(vc[written], vc_ref[written]) and torch.equal(vs[written], vs_ref[written])  # v: exact
    assert rel_err(ks[written], ks_ref[written]) < 1e-6
    a, b = kc[written].float(), kc_ref[written].float()
    moved = a != b
    assert moved.float().mean() <= 0.01, f"{int(moved.sum())} k codes differ"
    one_step = 1.0 if cache_dtype == torch.int8 else torch.maximum(a.abs().maximum(b.abs()) / 8, torch.tensor(2**-9))
    assert ((a - b).abs() <= one_step).all()

    k_true, v_true = _true_kv(qkv, positions, heads, head_dim, index)
    for codes, scales in (got[::2], want[::2], got[1::2], want[1::2]):  # (k), (k ref), (v), (v ref)
        true = k_true if codes is kc or codes is kc_ref else v_true
        s = scales[blocks, :, offs]
        deq = dequantize_kv_reference(codes[blocks, :, offs], s, torch.float64)
        slack = 1e-6 * QMAX[cache_dtype] * s.double()[..., None]  # float32 rotations differ by ulps of amax
        assert ((deq - true.double()).abs() <= format_bound(true, s, cache_dtype) + slack).all()


@needs_triton
@pytest.mark.parametrize("cache_dtype", formats())
def test_scales_are_per_token_and_head(cache_dtype):
    """Each (token, head) gets the scale of its own values (amax / QMAX), so a head of tiny values keeps its
    relative precision beside a head of large ones; with one scale per tensor (TensorRT-LLM's int8 KV cache) the
    tiny head would be lost (its codes 0 or a few subnormal steps)."""
    g = torch.Generator().manual_seed(3)
    heads, head_dim, N, bs = 2, 32, 8, 16
    x = torch.randn(N, 3, heads, head_dim, generator=g)
    x[:, 1:, 0] *= 100.0  # head 0: k and v ~ 100
    x[:, 1:, 1] *= torch.logspace(-4, -1, N)[:, None, None]  # head 1: 1e-4 .. 1e-1, growing per token
    qkv = x.reshape(N, -1).to(DEVICE)
    positions, slots = torch.arange(N, device=DEVICE), torch.arange(N, device=DEVICE)
    k_true, v_true = _true_kv(qkv, positions, heads, head_dim)
    bound = 0.015 if cache_dtype == torch.int8 else 0.05  # rms error / rms value: ~0.6% (int8), ~2.5% (e4m3)
    for kernel in (True, False):
        _, (kc, vc, ks, vs) = _write(kernel, cache_dtype, qkv, positions, slots, heads, head_dim, 1, bs)
        for codes, scales, true in ((kc, ks, k_true), (vc, vs, v_true)):
            scales = scales[0].transpose(0, 1)[:N]  # [N, heads]
            want = (true.abs().amax(-1).double() / QMAX[cache_dtype]).float()
            assert rel_err(scales, want) < 1e-6 and scales.unique().numel() == N * heads
            deq = dequantize_kv_reference(codes[0].transpose(0, 1)[:N], scales)
            for n, h in itertools.product(range(N), range(heads)):  # every vector keeps its relative precision
                assert rel_err(deq[n, h], true[n, h]) < bound, f"token {n} head {h}"
    # the same values with one scale for the whole tensor: the tiny head's first tokens are lost
    per_tensor = k_true.abs().max() / QMAX[cache_dtype]
    y = (k_true / per_tensor).clamp(-QMAX[cache_dtype], QMAX[cache_dtype])
    coarse = (y.round() if cache_dtype == torch.int8 else y.to(cache_dtype).float()) * per_tensor
    assert rel_err(coarse[0, 1], k_true[0, 1]) > 0.5 and rel_err(coarse[:, 0], k_true[:, 0]) < bound


# --- attention over a quantised cache ----------------------------------------------------------------------------
def _quantised_paged_kv(cache_dtype, n_keys, H, D, block_size, gen, k_decades: float = 4.0):
    """Quantised caches holding n_keys[b] keys / values of each sequence (spread magnitudes: keys over k_decades
    powers of ten, values over 4) through shuffled block tables; every other slot holds garbage codes and NaN
    scales (the dummy block 0 included). Returns k codes, v codes, k scales, v scales, block tables.
    Keys over 4 decades make decode's softmax one-hot (the largest key wins whatever the score scale: doubling
    every score moves the output by < 1e-6), so the decode tests take k_decades=1, where a 1e-4 relative error in
    the scores moves it by ~1e-4."""
    max_blocks = max(math.ceil(n / block_size) for n in n_keys) + 1
    num_blocks = len(n_keys) * max_blocks + 3
    perm = torch.randperm(num_blocks - 1, generator=gen)[: len(n_keys) * max_blocks] + 1
    tables = perm.view(len(n_keys), max_blocks).to(DEVICE, torch.int32)
    garbage = torch.randint(-127, 128, (num_blocks, H, block_size, D), generator=gen).float()
    kc, vc = garbage.to(DEVICE, cache_dtype), garbage.flip(0).to(DEVICE, cache_dtype)
    ks = torch.full((num_blocks, H, block_size), float("nan"), device=DEVICE)
    vs = ks.clone()
    for b, n in enumerate(n_keys):
        tables[b, math.ceil(n / block_size):] = 0
        pos = torch.arange(n, device=DEVICE)
        blk, off = tables[b, pos // block_size].long(), pos % block_size
        for cache, scales, mult, decades in ((kc, ks, 2.0, k_decades), (vc, vs, 1.0, 4.0)):
            codes, s = quantize_kv_reference(spread((n, H, D), gen, decades).to(DEVICE) * mult, cache_dtype)
            cache[blk, :, off], scales[blk, :, off] = codes, s
    return kc, vc, ks, vs, tables


@needs_triton
@pytest.mark.parametrize("cache_dtype", formats())
@pytest.mark.parametrize("dtype,block_size,num_splits", [pytest.param(torch.float32, 16, 1, id="fp32-bs16-1split"),
                                                         pytest.param(torch.float32, 16, 4, id="fp32-bs16-4splits"),
                                                         pytest.param(torch.float16, 16, 3, id="fp16-bs16-3splits"),
                                                         pytest.param(torch.float16, 64, 1, id="fp16-bs64-1split"),
                                                         pytest.param(torch.bfloat16, 64, 2, id="bf16-bs64-2splits")])
def test_paged_decode_attention_quantised(cache_dtype, dtype, block_size, num_splits):
    """The decode kernel on int8 / fp8 codes + per-(token, head) scales equals its reference (the dequantised
    cache, float64) to the dtype's rounding: lengths 1, 64, 200, 37 and 0 (zeros) over 16- and 64-token blocks,
    and a padding row on the dummy block 0 (NaN scales: must not fault)."""
    g = torch.Generator().manual_seed(11 + num_splits + block_size)
    lens_list, H, D = [1, 64, 200, 37, 0], 2, 32
    kc, vc, ks, vs, tables = _quantised_paged_kv(cache_dtype, lens_list, H, D, block_size, g, k_decades=1.0)
    tables = torch.cat([tables, tables.new_zeros(1, tables.shape[1])])
    lens = torch.tensor(lens_list + [1], dtype=torch.int32, device=DEVICE)
    q = torch.randn(6, H, D, generator=g).to(DEVICE, dtype)
    out = paged_decode_attention(q, kc, vc, tables, lens, D**-0.5, num_splits=num_splits, k_scale=ks, v_scale=vs)
    ref = paged_decode_attention_reference(q.double(), kc, vc, tables, lens, D**-0.5, k_scale=ks, v_scale=vs)
    assert out.dtype == dtype and torch.isfinite(out[:5]).all()
    assert torch.equal(out[4], torch.zeros_like(out[4])), "seq_len 0: zeros"
    for b in range(4):
        assert rel_err(out[b], ref[b]) < TOL[dtype], f"sequence {b}"


@needs_triton
@pytest.mark.parametrize("cache_dtype", formats())
def test_paged_decode_reference_dequantises(cache_dtype):
    """The reference against a plain softmax over each sequence's dequantised contiguous keys and values (its
    gather and dequantisation are right), and the kernel against it at head_dim 128 with 64-token blocks."""
    g = torch.Generator().manual_seed(5)
    lens, H, D, bs = [3, 130], 2, 128, 64
    kc, vc, ks, vs, tables = _quantised_paged_kv(cache_dtype, lens, H, D, bs, g, k_decades=1.0)
    q = torch.randn(2, H, D, generator=g).to(DEVICE)
    seq_lens = torch.tensor(lens, device=DEVICE)
    ref = paged_decode_attention_reference(q, kc, vc, tables, seq_lens, 0.1, k_scale=ks, v_scale=vs)
    for b, n in enumerate(lens):
        pos = torch.arange(n, device=DEVICE)
        blk, off = tables[b, pos // bs].long(), pos % bs
        k = dequantize_kv_reference(kc[blk, :, off], ks[blk, :, off]).transpose(0, 1)  # [H, n, D]
        v = dequantize_kv_reference(vc[blk, :, off], vs[blk, :, off]).transpose(0, 1)
        probs = torch.softmax(torch.einsum("hd,hnd->hn", q[b], k) * 0.1, dim=-1)
        assert rel_err(ref[b], torch.einsum("hn,hnd->hd", probs, v)) < 1e-6
    out = paged_decode_attention(q, kc, vc, tables, seq_lens, 0.1, num_splits=2, k_scale=ks, v_scale=vs)
    assert rel_err(out, ref) < 1e-5


@needs_triton
@pytest.mark.parametrize("cache_dtype", formats())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_paged_prefill_attention_quantised(cache_dtype, dtype):
    """The prefill kernel over a quantised cached prefix and the chunk's own keys: chunks of 1, 5, 0, 37, 16
    query tokens after 30, 0, 3, 19, 64 cached tokens, equal to the reference (dequantised cache) to the dtype's
    rounding; and a whole prompt's last row equals decode attention over the same cache."""
    g = torch.Generator().manual_seed(13)
    qlens, ctx_lens, H, D = [1, 5, 0, 37, 16], [30, 0, 3, 19, 64], 2, 32
    kc, vc, ks, vs, tables = _quantised_paged_kv(cache_dtype, [c + n for c, n in zip(ctx_lens, qlens, strict=True)],
                                                 H, D, 16, g)
    q = torch.randn(sum(qlens), H, D, generator=g).to(DEVICE, dtype)
    qsl = torch.tensor([0, *itertools.accumulate(qlens)], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    out = paged_prefill_attention(q, kc, vc, tables, qsl, ctx, D**-0.5, max(qlens), k_scale=ks, v_scale=vs)
    ref = paged_prefill_attention_reference(q.double(), kc, vc, tables, qsl, ctx, D**-0.5, k_scale=ks, v_scale=vs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    for p in range(len(qlens)):
        rows = slice(qsl[p].item(), qsl[p + 1].item())
        assert rel_err(out[rows], ref[rows]) < TOL[dtype], f"sequence {p}"
    if dtype == torch.float32:  # sequence 3's last row (position 55) as a decode step
        last = paged_decode_attention(q[42:43], kc, vc, tables[3:4], torch.tensor([56], device=DEVICE), D**-0.5,
                                      num_splits=2, k_scale=ks, v_scale=vs)
        assert rel_err(out[42:43], last) < 1e-5


# --- block copies (beam search) -------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("cache_dtype", formats())
def test_copy_kv_blocks_copies_the_scales(cache_dtype):
    """Beam search's copy-on-write kernel copies the first n tokens' codes and scales, K and V, every layer and
    head, and nothing else, as its reference; the KV cache manager hands its scales to both."""
    g = torch.Generator().manual_seed(0)
    mgr = KVCacheManager(2, 3, 16, 7, 16, torch.float32, torch.device(DEVICE),
                         kv_cache_dtype="int8" if cache_dtype == torch.int8 else "fp8")
    tensors = lambda: (mgr.k_cache, mgr.v_cache, mgr.k_scale, mgr.v_scale)
    assert mgr.k_cache.dtype == cache_dtype and mgr.k_scale.shape == mgr.v_scale.shape == (2, 7, 3, 16)
    for t in tensors():
        t.copy_(torch.randint(-127, 128, t.shape, generator=g).float().to(DEVICE, t.dtype))
    before = [t.clone() for t in tensors()]
    copies = [(1, 4, 5), (2, 5, 16), (6, 3, 1)]
    want = [t.clone() for t in before]
    copy_kv_blocks_reference(*want[:2], torch.tensor(copies), *want[2:])
    got = [t.clone() for t in before]
    copy_kv_blocks(*got[:2], torch.tensor(copies, device=DEVICE), *got[2:])
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.float(), b.float())
    for triton in (True, False):  # through the manager, as the executor calls it
        for t, b in zip(tensors(), before, strict=True):
            t.copy_(b)
        mgr.triton_kernels = triton
        mgr.copy_blocks(copies)
        for a, b in zip(tensors(), want, strict=True):
            assert torch.equal(a.float(), b.float())
    k, ks = want[0].float(), want[2]
    assert torch.equal(ks[:, 4, :, :5], ks[:, 1, :, :5]) and not torch.equal(ks[:, 4, :, 5:], ks[:, 1, :, 5:])
    assert torch.equal(k[:, 5], k[:, 2]) and torch.equal(want[3][:, 5], want[3][:, 2])
    assert torch.equal(ks[:, 3, :, :1], ks[:, 6, :, :1]) and torch.equal(ks[:, 3, :, 1:], before[2][:, 3, :, 1:])


# --- engines ---------------------------------------------------------------------------------------------------
def cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples/qwen" / script), *args], capture_output=True,
                          text=True, timeout=600)


BUILD = ["--dtype", "float32", "--max_batch_size", "4", "--max_input_len", "32", "--max_output_len", "16"]


@pytest.fixture(scope="module")
def engine_dirs(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint as fp32 engines: KV cache in float32 ("auto"), int8 (built by build.py
    --int8_kv_cache) and fp8."""
    d = tmp_path_factory.mktemp("kv_quant")
    common = dict(hf_dir=tiny_checkpoint, dtype="float32", max_batch_size=4, max_input_len=32, max_output_len=16)
    r = cli("build.py", "--hf_model_dir", str(tiny_checkpoint), *BUILD, "--int8_kv_cache", "--output_dir",
            str(d / "int8"))
    assert r.returncode == 0, r.stderr
    return {"auto": build_engine(d / "auto", **common), "int8": d / "int8",
            "fp8": build_engine(d / "fp8", kv_cache_dtype="fp8", **common)}


@pytest.fixture(scope="module")
def engines(engine_dirs):
    return {k: Engine.load(v, device=DEVICE) for k, v in engine_dirs.items() if k != "fp8" or FP8_OK}


def make_llm(engine, **kw) -> LLM:
    kv = KvCacheConfig(tokens_per_block=16, max_tokens=kw.pop("max_tokens", None))
    return LLM.from_engine(engine, config=ExecutorConfig(kv_cache=kv, **kw))


def test_build_flags_are_recorded_and_exclusive(engine_dirs, tiny_checkpoint, tmp_path):
    for name, path in engine_dirs.items():
        assert read_engine_config(path)[1].kv_cache_dtype == name
    assert json.loads((engine_dirs["int8"] / "config.json").read_text())["build"]["kv_cache_dtype"] == "int8"
    old = tmp_path / "old"  # an engine written before the field existed loads with the model's dtype
    shutil.copytree(engine_dirs["auto"], old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["build"]["kv_cache_dtype"]
    (old / "config.json").write_text(json.dumps(cfg))
    assert Engine.load(old, device="cpu").build.kv_cache_dtype == "auto"
    cfg["build"]["kv_cache_dtype"] = "int4"
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QWenError, match="kv_cache_dtype 'int4'"):
        read_engine_config(old)
    r = cli("build.py", "--hf_model_dir", str(tiny_checkpoint), "--int8_kv_cache", "--fp8_kv_cache", "--output_dir",
            str(tmp_path / "both"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "mutually exclusive" in r.stderr and not (tmp_path / "both").exists()


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_kv_cache_pool_counts_codes_and_scales(engine_dirs, name):
    """The pool holds int8 / e4m3 codes and float32 scales per (token, head); bytes_per_block, from which the
    pool is sized on a GPU, counts both: (head_dim x 1 + 4) bytes per token, head and layer for each of K and V."""
    engine = Engine.load(engine_dirs[name], device="cpu")  # the PyTorch references: fp8 too
    llm = make_llm(engine, max_tokens=64)
    kv, cfg = llm.executor.kv_cache, engine.config
    L, H, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.kv_channels
    assert kv.k_cache.dtype == FORMATS[name] and kv.v_cache.dtype == FORMATS[name]
    assert kv.k_scale.shape == kv.v_scale.shape == (L, kv.num_blocks, H, 16) and kv.k_scale.dtype == torch.float32
    per_block = KVCacheManager.bytes_per_block(L, H, D, 16, torch.float32, name)
    assert per_block == 2 * L * H * 16 * (D + 4) and kv.nbytes == kv.num_blocks * per_block
    assert KVCacheManager.bytes_per_block(L, H, D, 16, torch.float32) == 2 * L * H * 16 * D * 4
    assert f"{name} + a scale per token and head" in llm.executor.kv_cache_report()
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, top_k=1, ignore_eos=True))[0].token_ids
    assert len(out) == 3 and kv.k_scale[:, 1:].abs().sum() > 0  # the scales were written (block 1 onwards)


def test_fp8_is_refused_on_gpus_older_than_sm89(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    gpu = torch.device("cuda", 0)
    with pytest.raises(QWenError, match="sm_89") as e:
        check_kv_cache_supported("fp8", gpu, triton=True)
    assert "sm_80" in str(e.value) and "--int8_kv_cache" in str(e.value) and "\n" not in str(e.value)
    check_kv_cache_supported("fp8", gpu, triton=False)  # the PyTorch references convert fp8 anywhere
    check_kv_cache_supported("int8", gpu, triton=True)
    check_kv_cache_supported("fp8", torch.device("cpu"), triton=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_kv_cache_supported("fp8", gpu, triton=True)


@pytest.fixture(scope="module")
def teacher_forced(engines):
    """Teacher-forced logits of every engine: 48 random prompts of 16 tokens, 24 forced tokens each (1152
    positions), one prefill then decode steps over the KV cache."""
    vocab = engines["auto"].config.vocab_size
    prompts, forced = random_prompts(vocab, 48, 16, 24, seed=0)
    out = {}
    for name, engine in engines.items():
        ex = Executor(engine, ExecutorConfig(max_batch_size=16, max_seq_len=40,
                                             kv_cache=KvCacheConfig(tokens_per_block=16, max_tokens=16 * 48)))
        out[name] = batched(lambda p, f, ex=ex: engine_logits(ex, p, f), prompts, forced, 16)
    return out


@pytest.mark.parametrize("name", ["int8", pytest.param("fp8", marks=pytest.mark.skipif(not FP8_OK, reason="sm_89+"))])
def test_teacher_forced_agreement_with_the_fp32_engine(teacher_forced, name):
    """The tiny fp32 model with its KV cache quantised agrees with the fp32 cache on >= 95% of teacher-forced
    top-1 tokens (measured on CPU: int8 99.65%, rel. error 3.1e-3; fp8 97.1%, 1.5e-2); the logits do differ (the
    cache really is quantised). A bug in a scale gives chance-level agreement (~0.1% for a 1024-token vocab)."""
    stats = compare_logits(teacher_forced[name], teacher_forced["auto"])
    print(f"{name} KV cache vs fp32: {stats}")
    assert stats["top1_agreement"] >= 0.95, stats
    assert 1e-4 < stats["rel_err"] < (0.01 if name == "int8" else 0.05), stats


@needs_triton
def test_fused_triton_path_equals_plain_path_with_int8_cache(engines):
    """The int8-KV engine through its Triton kernels (the interpreter on CPU) against its PyTorch references:
    the same teacher-forced logits to float32 rounding and the same greedy tokens."""
    engine = engines["int8"]
    llm = make_llm(engine, max_tokens=4 * 48, cuda_graphs=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, engine.config.vocab_size, (n,), generator=g).tolist() for n in (17, 4)]
    forced = torch.randint(0, engine.config.vocab_size, (2, 3), generator=g)  # the first crosses a block boundary
    assert_fused_equals_plain(engine, llm, prompts, forced, max_tokens=4)


@pytest.mark.parametrize("config", [
    {"max_num_tokens": 7},  # chunked prefill: prompts split over steps, decodes beside them
    {"max_num_tokens": 9, "max_tokens": 64, "num_scheduler_steps": 3},  # 4 blocks: preemption and recompute
])
def test_in_flight_batching_with_int8_cache_equals_each_request_alone(engines, config):
    """Quantisation is per token and head, so a request's cache does not depend on what shares its batch or on
    how its prompt was chunked or recomputed: in flight equals alone, token for token."""
    engine = engines["int8"]
    prompts, params = prompts_and_params(engine.config.vocab_size)
    alone = [make_llm(engine).generate([p], sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    llm = make_llm(engine, **config)
    assert [o.token_ids for o in llm.generate(prompts, params)] == alone
    if config.get("max_tokens") == 64:
        assert llm.executor.stats["preemptions"] > 0
    pool = llm.executor.kv_cache.pool
    assert pool.num_free == pool.num_blocks - 1


def test_run_py_on_an_int8_kv_engine(engine_dirs, engines, tmp_path):
    tokens, out_csv = tmp_path / "t.csv", tmp_path / "o.csv"
    tokens.write_text("1,2,3,4\n5,6\n")
    r = cli("run.py", "--engine_dir", str(engine_dirs["int8"]), "--input_tokens", str(tokens), "--max_output_len",
            "5", "--top_k", "1", "--output_csv", str(out_csv))
    assert r.returncode == 0 and r.stdout.count("Output:") == 2, r.stderr
    assert "int8 + a scale per token and head" in r.stderr  # the KV cache report
    want = make_llm(engines["int8"]).generate([[1, 2, 3, 4], [5, 6]], SamplingParams(max_tokens=5, top_k=1))
    got = [[int(t) for t in row.split(",")] for row in out_csv.read_text().split()]
    assert got == [o.token_ids for o in want]
