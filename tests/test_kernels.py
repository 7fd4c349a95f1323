"""The Triton kernels against their PyTorch references (Triton's interpreter on CPU, real kernels on CUDA).

Off CUDA the interpreter must be on before qwen_trtllm.kernels is first imported (triton.jit picks it when a kernel
is defined); tests/conftest.py sets TRITON_INTERPRET, and this module skips with a reason when the kernels were
imported earlier without it.
"""


import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import triton

from qwen_trtllm.kernels import (
    default_num_splits,
    interpreted,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    rms_norm,
    rms_norm_reference,
    rotary_kv_write,
    rotary_kv_write_reference,
    rotary_paged_decode_attention,
    rotary_paged_decode_attention_reference,
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


# --- paged KV cache helpers ------------------------------------------------------------------------------------
def _block_tables(n_seqs, max_blocks, num_blocks, gen):
    """[n_seqs, max_blocks] int32 of distinct blocks 1..num_blocks-1 in random order (block 0: the dummy block)."""
    assert n_seqs * max_blocks < num_blocks
    perm = torch.randperm(num_blocks - 1, generator=gen)[: n_seqs * max_blocks] + 1
    return perm.view(n_seqs, max_blocks).to(DEVICE, torch.int32)


def _slots(tables, seq, positions, block_size):
    """int64 slot of each token: block tables[seq, p // block_size], offset p % block_size."""
    seq, positions = seq.long(), positions.long()
    return tables[seq, positions // block_size].long() * block_size + positions % block_size


def _paged_kv(dtype, n_keys, H, D, block_size, gen, spare_blocks=2):
    """Caches holding n_keys[b] random keys / values of each sequence through shuffled block tables, NaN in every
    other slot (the rest of each last block, the blocks of no sequence, the dummy block 0). Table entries past a
    sequence's last block are 0. Returns k_cache, v_cache, block_tables, and each sequence's contiguous
    [H, n_keys[b], D] keys and values."""
    max_blocks = max(triton.cdiv(n, block_size) for n in n_keys) + 1  # one entry past the longest
    num_blocks = len(n_keys) * max_blocks + 1 + spare_blocks
    tables = _block_tables(len(n_keys), max_blocks, num_blocks, gen)
    kc = torch.full((num_blocks, H, block_size, D), float("nan"), dtype=dtype, device=DEVICE)
    vc = torch.full_like(kc, float("nan"))
    ks, vs = [], []
    for b, n in enumerate(n_keys):
        tables[b, triton.cdiv(n, block_size):] = 0
        k, v = randn(H, n, D, gen=gen, dtype=dtype, scale=2.0), randn(H, n, D, gen=gen, dtype=dtype)
        slot = _slots(tables, torch.full((n,), b, device=DEVICE), torch.arange(n, device=DEVICE), block_size)
        kc[slot // block_size, :, slot % block_size] = k.transpose(0, 1)
        vc[slot // block_size, :, slot % block_size] = v.transpose(0, 1)
        ks.append(k)
        vs.append(v)
    return kc, vc, tables, ks, vs


# --- rotary_kv_write -------------------------------------------------------------------------------------------
def _inv_freq(alphas, rotary_dim, base=10000.0):
    a = torch.tensor(alphas, dtype=torch.float64)
    b = base * a ** (rotary_dim / (rotary_dim - 2))
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    return (1.0 / (b.float()[:, None] ** exponent[None, :])).to(DEVICE)


def _check_rotary(dtype, positions, heads, head_dim, rotary_dim, logn, alphas, seed, block_size=16,
                  seq_index=None, row_pad=0):
    """rotary_kv_write against its reference on one paged cache; each inv_freq row (alphas) is one sequence
    with its own shuffled block table; row_pad widens qkv's row stride."""
    g = torch.Generator().manual_seed(seed)
    N, S = positions.shape[0], len(alphas)
    seq = torch.arange(N, device=DEVICE) if seq_index is None else seq_index
    width = 3 * heads * head_dim
    qkv = randn(N, width + row_pad, gen=g, dtype=dtype)[:, :width]
    inv_freq = _inv_freq(alphas, rotary_dim)
    max_blocks = int(positions.max()) // block_size + 1
    tables = _block_tables(S, max_blocks, S * max_blocks + 3, g)
    slots = _slots(tables, seq, positions, block_size)
    kc = torch.full((S * max_blocks + 3, heads, block_size, head_dim), SENTINEL, dtype=dtype, device=DEVICE)
    vc = torch.full_like(kc, SENTINEL)
    q = rotary_kv_write(qkv, inv_freq, positions, slots, kc, vc, heads, head_dim, rotary_dim, logn,
                        seq_index=seq_index)

    kc_ref = torch.full(kc.shape, SENTINEL, dtype=torch.float32, device=DEVICE)
    vc_ref = kc_ref.clone()
    q_ref = rotary_kv_write_reference(qkv.float(), inv_freq, positions, slots, kc_ref, vc_ref, heads, head_dim,
                                      rotary_dim, logn, seq_index=seq_index)
    assert q.shape == (N, heads, head_dim) and q.dtype == dtype and q.is_contiguous()
    assert rel_err(q, q_ref) < TOL[dtype]

    written = torch.zeros(kc.shape, dtype=torch.bool, device=DEVICE)
    written[slots // block_size, :, slots % block_size] = True
    for cache, ref in ((kc, kc_ref), (vc, vc_ref)):
        assert (cache[~written] == SENTINEL).all(), "a cache slot outside slot_mapping changed"
        assert not (cache[written] == SENTINEL).any(), "an expected slot was not written"
        assert rel_err(cache[written], ref[written]) < TOL[dtype]
    v_new = qkv.unflatten(1, (3, heads, head_dim))[:, 2]  # [N, heads, head_dim]
    assert torch.equal(vc[slots // block_size, :, slots % block_size], v_new)  # v: raw copy, at its slot
    return q, kc, q_ref, kc_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rotary_dim", [(32, 32), (32, 16), (24, 16)])  # 24: masked lanes
@pytest.mark.parametrize("logn", [0, 16])
def test_rotary_kv_write(dtype, head_dim, rotary_dim, logn):
    """Decode: one token per sequence (inv_freq row i), each at its own position and block."""
    positions = torch.tensor([0, 15, 16, 40], device=DEVICE)  # logn: the last two (p + 1 > 16) are scaled
    _check_rotary(dtype, positions, 2, head_dim, rotary_dim, logn, [1.0, 1.0, 3.0, 7.0], head_dim + logn)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logn", [0, 16])
def test_rotary_kv_write_seq_index(dtype, logn):
    """Prefill chunks: 20 tokens of sequence 0 from position 0 (two blocks), 5 of sequence 1 after 30 cached
    tokens, 1 of sequence 2; seq_index (int32) picks each token's inv_freq row; qkv rows strided."""
    positions = torch.cat([torch.arange(20), torch.arange(30, 35), torch.tensor([7])]).to(DEVICE)
    index = torch.tensor([0] * 20 + [1] * 5 + [2], dtype=torch.int32, device=DEVICE)
    _check_rotary(dtype, positions, 2, 32, 32, logn, [1.0, 3.0, 2.0], 3 + logn, seq_index=index, row_pad=8)


def test_rotary_logn_factor():
    """With logn on, q differs from the logn-off q by exactly ln(p+1)/ln(L) beyond L, and not at all within L."""
    positions = torch.tensor([0, 15, 16, 40], device=DEVICE)
    q_on, *_ = _check_rotary(torch.float32, positions, 2, 32, 32, 16, [1.0] * 4, 5)
    q_off, *_ = _check_rotary(torch.float32, positions, 2, 32, 32, 0, [1.0] * 4, 5)
    factor = (q_on / q_off).flatten(1).median(dim=1).values.cpu()
    expect = torch.tensor([1.0, 1.0, math.log(17) / math.log(16), math.log(41) / math.log(16)])
    assert torch.allclose(factor, expect, rtol=1e-5)


def test_rotary_positions_int32_strided_and_far():
    """int32 positions taken as a strided column, angles of thousands of radians (range reduction), 128-token
    blocks."""
    pos2d = torch.tensor([[8191, 0], [5000, 0], [1234, 0]], dtype=torch.int32, device=DEVICE)
    _check_rotary(torch.float32, pos2d[:, 0], 2, 64, 64, 4096, [1.0, 3.0, 15.0], 11, block_size=128)


# --- paged_decode_attention ------------------------------------------------------------------------------------
def _check_decode(dtype, seq_lens, H, D, block_size, num_splits, seed, padding_rows=0):
    g = torch.Generator().manual_seed(seed)
    kc, vc, tables, *_ = _paged_kv(dtype, seq_lens, H, D, block_size, g)
    B = len(seq_lens)
    lens = torch.tensor(seq_lens + [1] * padding_rows, dtype=torch.int32, device=DEVICE)
    tables = torch.cat([tables, tables.new_zeros(padding_rows, tables.shape[1])])  # padding: the dummy block 0
    q = randn(B + padding_rows, H, D, gen=g, dtype=dtype)
    scale = 1.0 / math.sqrt(D)
    out = paged_decode_attention(q, kc, vc, tables, lens, scale, num_splits=num_splits)
    ref = paged_decode_attention_reference(q.double(), kc.double(), vc.double(), tables, lens, scale)
    assert out.shape == (B + padding_rows, H, D) and out.dtype == dtype
    assert torch.isfinite(out[:B]).all()
    for b in range(B):  # per sequence, so a short one cannot hide behind a long one
        assert rel_err(out[b], ref[b]) < TOL[dtype], f"sequence {b}"
    return out, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the padding row: NaN block 0
def test_paged_decode_attention(dtype, block_size, num_splits):
    """Shuffled block tables, NaN in every unwritten slot; lengths 1 (empty splits), 64 (whole blocks), 200
    (several splits, last block partial), 37; and a padding row on the dummy block (must not fault)."""
    _check_decode(dtype, [1, 64, 200, 37], 2, 32, block_size, num_splits, 17 + block_size + num_splits,
                  padding_rows=1)


@pytest.mark.parametrize("num_splits", [None, 2, 9])  # 9: a 16-wide merge, more splits than some sequences' blocks
def test_paged_decode_attention_head_dim_128_and_empty(num_splits):
    """head_dim 128, 128-token blocks, int64 seq_lens, and a sequence with no keys (zeros, not NaN)."""
    g = torch.Generator().manual_seed(29)
    kc, vc, tables, *_ = _paged_kv(torch.float32, [130, 0, 65], 2, 128, 128, g)
    q = randn(3, 2, 128, gen=g)
    lens = torch.tensor([130, 0, 65], device=DEVICE)
    out = paged_decode_attention(q, kc, vc, tables, lens, 0.1, num_splits=num_splits)
    ref = paged_decode_attention_reference(q, kc, vc, tables, lens, 0.1)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(ref[1], torch.zeros_like(ref[1]))
    assert rel_err(out, ref) < 1e-5


def _rotary_decode_case(dtype, lens, H, D, block_size, rotary_dim, gen, cache_dtype=None):
    """A decode step's operands on _paged_kv's caches: qkv, inv_freq (one row per sequence), the newest key's
    positions (seq_lens - 1) and slots; cache_dtype int8 / fp8: the caches quantised, with their scales."""
    kc, vc, tables, *_ = _paged_kv(dtype, lens, H, D, block_size, gen)
    scales = {}
    if cache_dtype is not None:
        from qwen_trtllm.kernels import quantize_kv_reference

        (kc, ks), (vc, vs) = (quantize_kv_reference(c.float().nan_to_num(), cache_dtype) for c in (kc, vc))
        scales = {"k_scale": ks, "v_scale": vs}
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    positions = (seq_lens - 1).clamp_min(0).long()
    slots = _slots(tables, torch.arange(len(lens), device=DEVICE), positions, block_size)
    qkv = randn(len(lens), 3 * H * D, gen=gen, dtype=dtype)
    inv_freq = _inv_freq([1.0 + i for i in range(len(lens))], rotary_dim)
    return qkv, inv_freq, positions, slots, kc, vc, tables, seq_lens, scales


def assert_rotary_decode_equals_two_kernels(dtype, lens, H, D, block_size, rotary_dim, logn, num_splits, seed,
                                            cache_dtype=None):
    """rotary_paged_decode_attention against rotary_kv_write then paged_decode_attention on copies of the same
    caches: the same output, caches and scales to the bit; and against the reference per sequence."""
    g = torch.Generator().manual_seed(seed)
    qkv, freq, pos, slots, kc, vc, tables, lens_t, scales = _rotary_decode_case(dtype, lens, H, D, block_size,
                                                                                 rotary_dim, g, cache_dtype)
    two, one = ({k: v.clone() for k, v in {"k_cache": kc, "v_cache": vc, **scales}.items()} for _ in range(2))
    sc = {k: two[k] for k in scales}
    q = rotary_kv_write(qkv, freq, pos, slots, two["k_cache"], two["v_cache"], H, D, rotary_dim, logn, **sc)
    want = paged_decode_attention(q, two["k_cache"], two["v_cache"], tables, lens_t, 0.17, num_splits, **sc)
    got = rotary_paged_decode_attention(qkv, freq, pos, slots, one["k_cache"], one["v_cache"], tables, lens_t, H, D,
                                        rotary_dim, 0.17, logn, num_splits, **{k: one[k] for k in scales})
    assert got.shape == (len(lens), H, D) and got.dtype == dtype
    assert torch.equal(got, want)
    for name in two:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=0, equal_nan=True, msg=name)
    ref = rotary_paged_decode_attention_reference(qkv, freq, pos, slots, kc, vc, tables, lens_t, H, D, rotary_dim,
                                                  0.17, logn, **scales)  # q rounded to its dtype, as the kernel
    # the interpreter truncates q to bf16 where the reference rounds it (both kernels alike: checked bitwise above)
    tol = TOL[dtype] if dtype != torch.bfloat16 or ROUNDS_BF16 else 2 * TOL[dtype]
    for b in range(len(lens)):
        assert rel_err(got[b], ref[b]) < tol, f"sequence {b}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN in unwritten slots
def test_rotary_paged_decode_attention_equals_rotary_then_attention(dtype, num_splits):
    """Rotary inside the decode kernel (one launch): lengths 1, 64, 200 and 37 put the newest key in the first, a
    middle and the last split; partial rotary (24 of 32 dims); logn past seq_length 40."""
    assert_rotary_decode_equals_two_kernels(dtype, [1, 64, 200, 37], 2, 32, 16, 24, 40, num_splits, 31 + num_splits)


def test_paged_decode_reference_matches_dense():
    """The reference against a plain softmax over each sequence's contiguous keys (the gather is right)."""
    g = torch.Generator().manual_seed(5)
    lens = [3, 40, 16]
    kc, vc, tables, ks, vs = _paged_kv(torch.float32, lens, 2, 16, 16, g)
    q = randn(3, 2, 16, gen=g)
    ref = paged_decode_attention_reference(q, kc, vc, tables, torch.tensor(lens, device=DEVICE), 0.3)
    for b in range(3):
        probs = torch.softmax(torch.einsum("hd,hnd->hn", q[b], ks[b]) * 0.3, dim=-1)
        assert rel_err(ref[b], torch.einsum("hn,hnd->hd", probs, vs[b])) < 1e-6


def test_default_num_splits():
    assert default_num_splits(64, 32, 4096, "cpu", 64) == 1
    assert default_num_splits(1, 2, 100, "cpu", 64) == 1  # at least one block per split
    assert default_num_splits(1, 2, 100, "cpu", 16) == 6  # 8 programs for each of 4 'SMs', capped by the blocks
    assert default_num_splits(1, 8, 4096, "cpu", 16) == 4
    assert default_num_splits(256, 32, 2048, DEVICE, 64) == 1  # large batches: one split, even on an H200
    s = default_num_splits(1, 32, 4096, DEVICE, 64)
    assert 1 <= s <= 4096 // 64
    if DEVICE == "cuda":
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert s * 32 >= 8 * sms


# --- paged_prefill_attention -----------------------------------------------------------------------------------
def _prefill_inputs(dtype, qlens, ctx_lens, H, D, block_size, seed):
    """Sequences whose first ctx_lens[p] + qlens[p] keys are cached; the packed queries of their chunks."""
    g = torch.Generator().manual_seed(seed)
    n_keys = [c + n for c, n in zip(ctx_lens, qlens, strict=True)]
    kc, vc, tables, ks, vs = _paged_kv(dtype, n_keys, H, D, block_size, g)
    q = randn(sum(qlens), H, D, gen=g, dtype=dtype)
    qsl = torch.tensor([0, *itertools.accumulate(qlens)], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    return q, kc, vc, tables, qsl, ctx, ks, vs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 64])
def test_paged_prefill_attention(dtype, block_size):
    """Chunks of 1, 5, 0, 37 and 16 query tokens after 30, 0, 3, 19 and 64 cached tokens, shuffled tables."""
    qlens, ctx_lens = [1, 5, 0, 37, 16], [30, 0, 3, 19, 64]
    q, kc, vc, tables, qsl, ctx, *_ = _prefill_inputs(dtype, qlens, ctx_lens, 2, 32, block_size, 7 + block_size)
    scale = 1.0 / math.sqrt(32)
    out = paged_prefill_attention(q, kc, vc, tables, qsl, ctx, scale, max(qlens))
    ref = paged_prefill_attention_reference(q.double(), kc.double(), vc.double(), tables, qsl, ctx, scale)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    for p in range(len(qlens)):
        rows = slice(qsl[p].item(), qsl[p + 1].item())
        assert rel_err(out[rows], ref[rows]) < TOL[dtype], f"sequence {p}"


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_paged_prefill_block_m(block_m):
    """Query tiles of 16 to 64 rows, a grid for a larger max_query_len than any chunk, 128-token blocks."""
    q, kc, vc, tables, qsl, ctx, *_ = _prefill_inputs(torch.float16, [70, 9], [5, 130], 2, 64, 128, block_m)
    out = paged_prefill_attention(q, kc, vc, tables, qsl, ctx, 0.125, 100, block_m=block_m)
    ref = paged_prefill_attention_reference(q.double(), kc.double(), vc.double(), tables, qsl, ctx, 0.125)
    assert rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill_matches_sdpa_and_decode(dtype):
    """A whole prompt (context 0) equals torch's causal SDPA on the contiguous keys; and a chunk's last row
    equals paged_decode_attention of that token over the same cache."""
    n, D = 40, 32
    q, kc, vc, tables, qsl, ctx, ks, vs = _prefill_inputs(dtype, [n], [0], 2, D, 16, 3)
    out = paged_prefill_attention(q, kc, vc, tables, qsl, ctx, D**-0.5, n)
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1).float(), ks[0].float(), vs[0].float(), is_causal=True)
    assert rel_err(out, sdpa.transpose(0, 1)) < TOL[dtype]
    ref = paged_prefill_attention_reference(q, kc, vc, tables, qsl, ctx, D**-0.5)
    assert rel_err(ref, sdpa.transpose(0, 1)) < TOL[dtype]
    last = paged_decode_attention(q[-1:], kc, vc, tables, torch.tensor([n], device=DEVICE), D**-0.5, num_splits=2)
    assert rel_err(out[-1:], last) < TOL[dtype]


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
    """Capture a decode step's kernels once, then replay on new inputs (positions, slots, seq_lens, activations)
    in place; a prefill chunk's attention is captured too (its max_query_len fixed)."""
    g = torch.Generator().manual_seed(0)
    B, H, D, bs, dtype = 2, 4, 128, 64, torch.float16
    x, res, w = randn(B, H * D, gen=g, dtype=dtype), randn(B, H * D, gen=g, dtype=dtype), randn(H * D, gen=g)
    w = w.to(dtype)
    qkv, gu = randn(B, 3 * H * D, gen=g, dtype=dtype), randn(B, 2 * 256, gen=g, dtype=dtype)
    inv_freq = _inv_freq([1.0, 3.0], D)
    tables = _block_tables(B, 4, 4 * B + 1, g)
    kc = randn(4 * B + 1, H, bs, D, gen=g, dtype=dtype)
    vc = randn(4 * B + 1, H, bs, D, gen=g, dtype=dtype)
    pos = torch.tensor([5, 100], device=DEVICE)
    rows = torch.arange(B, device=DEVICE)
    slots, lens = _slots(tables, rows, pos, bs), (pos + 1).to(torch.int32)
    qp = randn(24, H, D, gen=g, dtype=dtype)  # a prefill chunk of 24 tokens of sequence 0 after 16 cached
    qsl = torch.tensor([0, 24], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor([16], dtype=torch.int32, device=DEVICE)

    def step():
        n, h = rms_norm(x, w, 1e-6, residual=res)
        q = rotary_kv_write(qkv, inv_freq, pos, slots, kc, vc, H, D, D, 64)
        o = paged_decode_attention(q, kc, vc, tables, lens, D**-0.5)
        op = paged_prefill_attention(qp, kc, vc, tables[:1], qsl, ctx, D**-0.5, 24)
        return n, h, o, silu_mul(gu), op

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
        slots.copy_(_slots(tables, rows, pos, bs))
        lens.copy_(pos + 1)
        for t in (x, res, qkv, gu, qp):
            t.copy_(torch.randn(t.shape, generator=g).to(DEVICE, dtype))
        kc_eager, vc_eager = kc.clone(), vc.clone()
        graph.replay()
        n_ref, h_ref = rms_norm_reference(x, w, 1e-6, res)
        q_ref = rotary_kv_write_reference(qkv, inv_freq, pos, slots, kc_eager, vc_eager, H, D, D, 64)
        o_ref = paged_decode_attention_reference(q_ref, kc_eager, vc_eager, tables, pos + 1, D**-0.5)
        op_ref = paged_prefill_attention_reference(qp, kc_eager, vc_eager, tables[:1], qsl, ctx, D**-0.5)
        torch.cuda.synchronize()
        assert rel_err(outs[0], n_ref) < 2e-3 and torch.equal(outs[1], h_ref)
        assert rel_err(kc, kc_eager) < 2e-3 and torch.equal(vc, vc_eager)
        assert rel_err(outs[2], o_ref) < 2e-3
        assert rel_err(outs[3], silu_mul_reference(gu)) < 2e-3
        assert rel_err(outs[4], op_ref) < 2e-3
