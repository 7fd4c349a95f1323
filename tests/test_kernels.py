"""The decode-step Triton kernels against their PyTorch references (Triton's interpreter on CPU, real kernels on CUDA).

Off CUDA the interpreter must be on before qwen_trtllm.kernels is first imported (triton.jit picks it when a kernel
is defined); this module sets TRITON_INTERPRET itself, and skips with a reason when another module imported the
kernels earlier without it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

from qwen_trtllm.kernels import (  # noqa: E402
    decode_attention,
    decode_attention_reference,
    default_num_splits,
    interpreted,
    rms_norm,
    rms_norm_reference,
    rotary_kv_write,
    rotary_kv_write_reference,
    silu_mul,
    silu_mul_reference,
    triton_available,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Triton 3.6's interpreter truncates float32 -> bf16 (the GPU rounds to nearest): no bitwise checks there in bf16
ROUNDS_BF16 = DEVICE == "cuda"
SENTINEL = 1e4  # what the caches hold before a write: exact in fp16 / bf16, far from any real value

pytestmark = [
    pytest.mark.skipif(not triton_available(DEVICE), reason="no CUDA, and qwen_trtllm.kernels was imported before "
                       "TRITON_INTERPRET=1 was set (set it in tests/conftest.py)"),
    # the interpreter's own noise: 0-d arrays as loop bounds, exp overflow to inf (intended: silu(-100) = -0)
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def randn(*shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def test_triton_available():
    assert triton_available(DEVICE)
    assert interpreted() == (DEVICE == "cpu")
    assert not triton_available("meta")


# --- rms_norm ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [96, 128])  # 96: not a power of two, masked lanes
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, H, with_residual):
    g = torch.Generator().manual_seed(H + 7 * with_residual)
    eps = 1e-6
    x = randn(2, 3, H, gen=g, dtype=dtype, scale=3.0)
    w = (1.0 + 0.1 * torch.randn(H, generator=g)).to(DEVICE, dtype)
    r = randn(2, 3, H, gen=g, dtype=dtype, scale=3.0) if with_residual else None
    out, h = rms_norm(x, w, eps, residual=r)
    ref, ref_h = rms_norm_reference(x.float(), w.float(), eps, None if r is None else r.float())
    assert out.shape == x.shape and out.dtype == dtype and h.shape == x.shape and h.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    if with_residual:
        add = (x.float() + r.float()).to(dtype)  # the add: float32, one rounding
        if ROUNDS_BF16:
            assert torch.equal(h, add)
        else:
            torch.testing.assert_close(h, add, rtol=1e-2, atol=0)
        assert rel_err(h, ref_h) < TOL[dtype]
    else:
        assert h is x
    # same rounding steps as the same-dtype reference (the model's RMSNorm): at most one ulp apart
    same, _ = rms_norm_reference(x, w, eps, r)
    ulp = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out, same, rtol=ulp, atol=ulp)


def test_rms_norm_strided_rows():
    g = torch.Generator().manual_seed(3)
    big, res = randn(5, 2 * 96, gen=g), randn(5, 96, gen=g)
    x = big[:, 96:]  # row stride 192
    w = randn(96, gen=g)
    out, h = rms_norm(x, w, 1e-5, residual=res)
    ref, ref_h = rms_norm_reference(x, w, 1e-5, res)
    assert rel_err(out, ref) < 1e-5 and rel_err(h, ref_h) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_kv_write_prefill_rows(dtype):
    """Prefill: every token of 2 sequences in one call; batch_index picks each token's cache and inv_freq row."""
    g = torch.Generator().manual_seed(3)
    B, T, heads, D, rd = 2, 5, 2, 32, 32
    qkv = randn(B * T, 3 * heads * D, gen=g, dtype=dtype)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, rd, 2) / rd)))[None].repeat(B, 1)
    inv_freq[1] /= 3.0  # the second sequence has its own (NTK) base
    inv_freq = inv_freq.to(DEVICE)
    positions = torch.arange(T, device=DEVICE).repeat(B)
    index = torch.arange(B, device=DEVICE).repeat_interleave(T)
    kc = torch.full((B + 1, heads, 8, D), SENTINEL, dtype=dtype, device=DEVICE)
    vc = kc.clone()
    kc_ref, vc_ref = kc.float(), vc.float()
    q = rotary_kv_write(qkv, inv_freq, positions, kc, vc, heads, D, rd, 3, batch_index=index)
    q_ref = rotary_kv_write_reference(qkv.float(), inv_freq, positions, kc_ref, vc_ref, heads, D, rd, 3,
                                      batch_index=index)
    assert rel_err(q, q_ref) < TOL[dtype]
    assert rel_err(kc, kc_ref) < TOL[dtype] and rel_err(vc, vc_ref) < TOL[dtype]
    assert (kc[B] == SENTINEL).all() and (kc[:, :, T:] == SENTINEL).all()


# --- rotary_kv_write -------------------------------------------------------------------------------------------
def _inv_freq(alphas, rotary_dim, base=10000.0):
    a = torch.tensor(alphas, dtype=torch.float64)
    b = base * a ** (rotary_dim / (rotary_dim - 2))
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    return (1.0 / (b.float()[:, None] ** exponent[None, :])).to(DEVICE)


def _check_rotary(dtype, positions, heads, head_dim, rotary_dim, logn, max_seq, alphas, seed):
    g = torch.Generator().manual_seed(seed)
    B = positions.shape[0]
    max_batch = B + 1
    qkv = randn(B, 3 * heads * head_dim, gen=g, dtype=dtype)
    inv_freq = _inv_freq(alphas, rotary_dim)
    kc = torch.full((max_batch, heads, max_seq, head_dim), SENTINEL, dtype=dtype, device=DEVICE)
    vc = torch.full_like(kc, SENTINEL)
    q = rotary_kv_write(qkv, inv_freq, positions, kc, vc, heads, head_dim, rotary_dim, logn)

    kc_ref = torch.full(kc.shape, SENTINEL, dtype=torch.float32, device=DEVICE)
    vc_ref = kc_ref.clone()
    q_ref = rotary_kv_write_reference(qkv.float(), inv_freq, positions, kc_ref, vc_ref, heads, head_dim, rotary_dim,
                                      logn)
    assert q.shape == (B, heads, head_dim) and q.dtype == dtype
    assert rel_err(q, q_ref) < TOL[dtype]

    written = torch.zeros(kc.shape, dtype=torch.bool, device=DEVICE)
    written[torch.arange(B, device=DEVICE), :, positions.long()] = True
    for cache, ref in ((kc, kc_ref), (vc, vc_ref)):
        assert (cache[~written] == SENTINEL).all(), "a cache slot outside positions[b] changed"
        assert not (cache[written] == SENTINEL).any(), "an expected slot was not written"
        assert rel_err(cache[written], ref[written]) < TOL[dtype]
    assert torch.equal(vc[written], qkv.view(B, 3, heads, head_dim)[:, 2].reshape(-1))  # v: raw copy
    return q, kc, q_ref, kc_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rotary_dim", [(32, 32), (32, 16), (24, 16)])  # 24: masked lanes
@pytest.mark.parametrize("logn", [0, 16])
def test_rotary_kv_write(dtype, head_dim, rotary_dim, logn):
    positions = torch.tensor([0, 15, 16, 40], device=DEVICE)  # logn: the last two (p + 1 > 16) are scaled
    _check_rotary(dtype, positions, 2, head_dim, rotary_dim, logn, 48, [1.0, 1.0, 3.0, 7.0], head_dim + logn)


def test_rotary_logn_factor():
    """With logn on, q differs from the logn-off q by exactly ln(p+1)/ln(L) beyond L, and not at all within L."""
    positions = torch.tensor([0, 15, 16, 40], device=DEVICE)
    q_on, *_ = _check_rotary(torch.float32, positions, 2, 32, 32, 16, 48, [1.0] * 4, 5)
    q_off, *_ = _check_rotary(torch.float32, positions, 2, 32, 32, 0, 48, [1.0] * 4, 5)
    factor = (q_on / q_off).flatten(1).median(dim=1).values.cpu()
    expect = torch.tensor([1.0, 1.0, math.log(17) / math.log(16), math.log(41) / math.log(16)])
    assert torch.allclose(factor, expect, rtol=1e-5)


def test_rotary_positions_int32_strided_and_far():
    """int32 positions taken as a strided column, and angles of thousands of radians (range reduction)."""
    pos2d = torch.tensor([[8191, 0], [5000, 0], [1234, 0]], dtype=torch.int32, device=DEVICE)
    _check_rotary(torch.float32, pos2d[:, 0], 2, 64, 64, 4096, 8192, [1.0, 3.0, 15.0], 11)


# --- decode_attention ------------------------------------------------------------------------------------------
def _attention_inputs(dtype, B, H, D, max_seq, seq_lens, seed):
    g = torch.Generator().manual_seed(seed)
    q = randn(B, H, D, gen=g, dtype=dtype)
    kc = randn(B + 1, H, max_seq, D, gen=g, dtype=dtype, scale=2.0)
    vc = randn(B + 1, H, max_seq, D, gen=g, dtype=dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    invalid = torch.arange(max_seq, device=DEVICE)[None, :] >= torch.cat([lens, lens.new_zeros(1)])[:, None]
    kc[invalid[:, None, :, None].expand_as(kc)] = float("nan")  # never read: slots past seq_len, row B
    vc[invalid[:, None, :, None].expand_as(vc)] = float("nan")
    return q, kc, vc, lens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [None, 1, 3, 7])
def test_decode_attention(dtype, num_splits):
    B, H, D, max_seq = 4, 2, 64, 200  # max_seq not a multiple of the 64-key tile
    q, kc, vc, lens = _attention_inputs(dtype, B, H, D, max_seq, [1, 200, 77, 130], 17 + (num_splits or 0))
    scale = 1.0 / math.sqrt(D)
    out = decode_attention(q, kc, vc, lens, scale, num_splits=num_splits)
    ref = decode_attention_reference(q.double(), kc.double(), vc.double(), lens, scale)
    assert out.shape == (B, H, D) and out.dtype == dtype
    assert torch.isfinite(out).all()
    for b in range(B):  # per sequence, so a short one cannot hide behind a long one
        assert rel_err(out[b], ref[b]) < TOL[dtype], f"sequence {b}"


@pytest.mark.parametrize("num_splits", [None, 2])
def test_decode_attention_head_dim_128_and_empty(num_splits):
    """head_dim 128, int64 seq_lens, and a sequence with no keys (zeros, not NaN)."""
    B, H, D, max_seq = 3, 2, 128, 130
    q, kc, vc, lens = _attention_inputs(torch.float32, B, H, D, max_seq, [130, 0, 65], 29)
    out = decode_attention(q, kc, vc, lens.long(), 0.1, num_splits=num_splits)
    ref = decode_attention_reference(q, kc, vc, lens, 0.1)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel_err(out, ref) < 1e-5


def test_default_num_splits():
    assert default_num_splits(64, 32, 4096, "cpu") == 1
    assert default_num_splits(1, 2, 100, "cpu") == 1  # at least 64 keys per split
    s = default_num_splits(1, 32, 4096, DEVICE)
    assert 1 <= s <= 4096 // 64
    if DEVICE == "cuda":
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert s * 32 >= 2 * sms


# --- silu_mul ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 40), (2, 1, 1500)])  # 1500: two column blocks, the second masked
def test_silu_mul(dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    gu = randn(*shape[:-1], 2 * shape[-1], gen=g, dtype=dtype, scale=4.0)
    out = silu_mul(gu)
    ref = silu_mul_reference(gu.double())
    assert out.shape == (*shape[:-1], shape[-1]) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    if dtype != torch.bfloat16 or ROUNDS_BF16:  # the same rounding steps as the model's up * F.silu(gate)
        rtol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]  # <= 2 ulps
        torch.testing.assert_close(out, silu_mul_reference(gu), rtol=rtol, atol=1e-6)


def test_silu_mul_extremes():
    gu = torch.tensor([[-100.0, -20.0, 0.0, 20.0, 100.0, 2.0, 2.0, 2.0, 2.0, 2.0]], device=DEVICE)
    out = silu_mul(gu)
    assert torch.isfinite(out).all()
    assert rel_err(out, silu_mul_reference(gu.double())) < 1e-6


# --- CUDA graphs ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need CUDA")
def test_cuda_graph_replay():
    """Capture all four kernels once, then replay on new inputs (positions, seq_lens, activations) in place."""
    g = torch.Generator().manual_seed(0)
    B, H, D, max_seq, dtype = 2, 4, 128, 256, torch.float16
    x, res, w = randn(B, H * D, gen=g, dtype=dtype), randn(B, H * D, gen=g, dtype=dtype), randn(H * D, gen=g)
    w = w.to(dtype)
    qkv, gu = randn(B, 3 * H * D, gen=g, dtype=dtype), randn(B, 2 * 256, gen=g, dtype=dtype)
    inv_freq = _inv_freq([1.0, 3.0], D)
    pos = torch.tensor([5, 100], device=DEVICE)
    kc = randn(B, H, max_seq, D, gen=g, dtype=dtype)
    vc = randn(B, H, max_seq, D, gen=g, dtype=dtype)

    def step():
        n, h = rms_norm(x, w, 1e-6, residual=res)
        q = rotary_kv_write(qkv, inv_freq, pos, kc, vc, H, D, D, 64)
        o = decode_attention(q, kc, vc, (pos + 1).to(torch.int32), D**-0.5)
        return n, h, o, silu_mul(gu)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for new_pos in ([7, 200], [0, 255]):
        pos.copy_(torch.tensor(new_pos, device=DEVICE))
        for t in (x, res, qkv, gu):
            t.copy_(torch.randn(t.shape, generator=g).to(DEVICE, dtype))
        kc_eager, vc_eager = kc.clone(), vc.clone()
        graph.replay()
        n_ref, h_ref = rms_norm_reference(x, w, 1e-6, res)
        q_ref = rotary_kv_write_reference(qkv, inv_freq, pos, kc_eager, vc_eager, H, D, D, 64)
        o_ref = decode_attention_reference(q_ref, kc_eager, vc_eager, pos + 1, D**-0.5)
        torch.cuda.synchronize()
        assert rel_err(outs[0], n_ref) < 2e-3 and torch.equal(outs[1], h_ref)
        assert rel_err(kc, kc_eager) < 2e-3 and torch.equal(vc, vc_eager)
        assert rel_err(outs[2], o_ref) < 2e-3
        assert rel_err(outs[3], silu_mul_reference(gu)) < 2e-3
