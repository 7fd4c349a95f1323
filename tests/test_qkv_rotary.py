"""The QKV GEMV with rotary + logn + KV write in its epilogue (kernels/qkv_rotary.py) against the unfused pair it
replaces (the projection, then rotary_kv_write's reference), and the model's choice between them.

Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET); the real kernel on CUDA."""

import pytest
import torch

from qwen_trtllm.kernels.gemv import MAX_ROWS
from qwen_trtllm.kernels.qkv_rotary import qkv_rotary_kv_write, qkv_rotary_supported
from qwen_trtllm.kernels.rotary import rotary_kv_write_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SENTINEL = 1e4
BLOCK = 16


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def inv_freq_rows(alphas: list[float], head_dim: int) -> torch.Tensor:
    a = torch.tensor(alphas, dtype=torch.float64)
    base = 10000.0 * a ** (head_dim / (head_dim - 2))
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    return (1.0 / (base.float()[:, None] ** exponent[None, :])).to(DEVICE)


def run_both(dtype, positions, heads, head_dim, K, logn, seq_index=None, seed=0):
    """(fused q, k cache, v cache), (reference q, k cache, v cache) and the slots written."""
    g = torch.Generator().manual_seed(seed)
    N = positions.shape[0]
    width = heads * head_dim
    x = torch.randn(N, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(3 * width, K, generator=g) * K**-0.5).to(DEVICE, dtype)
    b = torch.randn(3 * width, generator=g).to(DEVICE, dtype)
    S = N if seq_index is None else int(seq_index.max()) + 1
    inv_freq = inv_freq_rows([1.0 + 2 * i for i in range(S)], head_dim)
    num_blocks = N * (int(positions.max()) // BLOCK + 1) + 2
    slots = torch.randperm(num_blocks * BLOCK, generator=g)[:N].to(DEVICE)  # distinct slots, any block
    caches = [torch.full((num_blocks, heads, BLOCK, head_dim), SENTINEL, dtype=dtype, device=DEVICE)
              for _ in range(4)]
    q = qkv_rotary_kv_write(x, w, b, inv_freq, positions, slots, caches[0], caches[1], heads, head_dim, logn,
                            seq_index)
    qkv = torch.nn.functional.linear(x.double(), w.double(), b.double()).to(dtype)  # the unfused GEMV's output
    q_ref = rotary_kv_write_reference(qkv, inv_freq, positions, slots, caches[2], caches[3], heads, head_dim,
                                      head_dim, logn, seq_index=seq_index)
    return (q, caches[0], caches[1]), (q_ref, caches[2], caches[3]), slots


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
@pytest.mark.parametrize("K,logn", [(256, 0), (200, 16)])  # 200: a ragged last K tile; logn on positions > 15
def test_fused_equals_projection_then_rotary(dtype, rows, K, logn):
    positions = torch.tensor([3, 40, 15, 77][:rows], device=DEVICE)
    fused, ref, slots = run_both(dtype, positions, 4, 32, K, logn, seed=rows * K + logn)
    assert fused[0].shape == (rows, 4, 32) and fused[0].dtype == dtype and fused[0].is_contiguous()
    assert rel_err(fused[0], ref[0]) < TOL[dtype]
    written = torch.zeros(fused[1].shape, dtype=torch.bool, device=DEVICE)
    written[slots // BLOCK, :, slots % BLOCK] = True
    for cache, cache_ref in zip(fused[1:], ref[1:], strict=True):
        assert (cache[~written] == SENTINEL).all(), "a cache slot outside slot_mapping changed"
        assert not (cache[written] == SENTINEL).any(), "an expected slot was not written"
        assert rel_err(cache[written], cache_ref[written]) < TOL[dtype]


def test_seq_index_picks_each_tokens_inv_freq():
    """Tokens of one sequence (a prefill chunk of <= MAX_ROWS tokens) share its inv_freq row (dynamic NTK)."""
    positions = torch.tensor([20, 21, 22, 5], device=DEVICE)
    seq_index = torch.tensor([1, 1, 1, 0], device=DEVICE, dtype=torch.int32)
    fused, ref, _ = run_both(torch.float32, positions, 2, 64, 128, 0, seq_index=seq_index, seed=7)
    assert rel_err(fused[0], ref[0]) < 1e-5  # token 0 on row 0 (alpha 1) instead of row 1 (alpha 3) would fail
    assert rel_err(fused[1], ref[1]) < 1e-5


def test_model_uses_fused_kernel_only_where_it_applies():
    x = torch.zeros(MAX_ROWS, 64, device=DEVICE)
    w, b = torch.zeros(3 * 64, 64, device=DEVICE), torch.zeros(3 * 64, device=DEVICE)
    kc = torch.zeros(2, 2, BLOCK, 32, device=DEVICE)
    assert qkv_rotary_supported(x, w, b, kc, 32, 32)
    assert not qkv_rotary_supported(torch.zeros(MAX_ROWS + 1, 64, device=DEVICE), w, b, kc, 32, 32)  # prefill
    assert not qkv_rotary_supported(x, w, b, kc, 32, 16)  # partial rotary
    assert not qkv_rotary_supported(x, w, None, kc, 32, 32)
    assert not qkv_rotary_supported(x, w, b, kc.to(torch.int8), 32, 32)  # a quantised cache
