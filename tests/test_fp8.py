"""FP8 (e4m3) linears, build.py --use_fp8: the quantiser's error bounds, the Triton FP8 GEMV against the reference
(CPU interpreter here, compiled on CUDA), torch._scaled_mm against the reference (sm_89+ GPUs only), a tiny fp32
engine built with --use_fp8 against the unquantised one, the build flags and the load-time refusal before sm_89."""

from __future__ import annotations

import json

import pytest
import torch
from kernel_paths import assert_triton_path_matches_plain
from safetensors import safe_open

import qwen_trtllm.kernels as kernels_pkg
import qwen_trtllm.kernels.fp8_gemv as fp8_gemv_mod
from qwen_trtllm import QWenError
from qwen_trtllm.kernels import silu_mul_reference
from qwen_trtllm.kernels.fp8_gemv import _CONFIGS, GEMV_ROWS, MAX_ROWS, fp8_gemv, fp8_gemv_reference
from qwen_trtllm.kernels.fp8_quant import quantize_fp8_rows, quantize_fp8_rows_reference
from qwen_trtllm.quantization.fp8 import (
    FP8_DTYPE,
    GATED_MAX_ROWS,
    GEMV_MAX_ROWS,
    Fp8Linear,
    check_fp8_supported,
    dequantize_fp8,
    fp8_linear_reference,
    fp8_scaled_mm,
    quantize_fp8_activation,
    quantize_fp8_weight,
)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _weights(N: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * K**-0.5 * torch.logspace(-2, 2, N)[:, None]  # rows of very unlike range
    w[0] = 0.0  # an all-zero row
    w[1, :5] *= 40.0  # an outlier-heavy row
    return w


# --- the format ---------------------------------------------------------------------------------------------------
def test_weight_quantisation_error_bound_and_per_channel_scales():
    w = _weights(48, 320, 0)
    q, s = quantize_fp8_weight(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and s.dtype == torch.float32 and s.shape == (48,)
    assert (q[0].float() == 0).all() and torch.isfinite(s).all() and (s > 0).all()
    amax = w[1:].abs().amax(dim=1)
    torch.testing.assert_close(s[1:], (amax.double() / 448).float(), rtol=0, atol=0)  # amax / 448 per row
    assert len(set(s.tolist())) == 48  # one scale per output channel, each row its own
    assert (q[1:].float().abs().amax(dim=1) == 448).all()  # every non-zero row uses e4m3's full range
    deq = dequantize_fp8(q, s)
    y = (w / s[:, None]).abs()  # the values as the codes see them
    normal = y >= 2.0**-6  # e4m3's normal range: 3 mantissa bits, relative rounding error <= 2^-4
    assert ((w - deq).abs() <= 2.0**-4 * w.abs() * (1 + 1e-6))[normal].all()
    # subnormals (steps of 2^-9): absolute error <= half a step, in the row's scale
    assert ((w - deq).abs() <= 2.0**-10 * s[:, None] * (1 + 1e-6))[~normal].all()
    assert normal.float().mean() > 0.9


def test_activation_scales_are_per_token():
    x = torch.randn(6, 96) * torch.tensor([1e-3, 0.1, 1, 10, 300, 0.0])[:, None]
    q, s = quantize_fp8_activation(x)
    assert q.dtype == FP8_DTYPE and s.shape == (6,) and torch.isfinite(s).all()
    torch.testing.assert_close(s[:5], (x[:5].abs().amax(dim=1).double() / 448).float(), rtol=0, atol=0)
    assert (q[5].float() == 0).all()
    rel = (dequantize_fp8(q, s) - x).abs() / x.abs().clamp_min(1e-30)
    assert (rel[:5][(x[:5] / s[:5, None]).abs() >= 2.0**-6] <= 2.0**-4 * (1 + 1e-6)).all()


def test_reference_quantises_activations_only_above_the_gemv_rows():
    w, b = _weights(32, 64, 1), torch.randn(32)
    q, s = quantize_fp8_weight(w)
    x = torch.randn(GEMV_MAX_ROWS + 1, 64)
    exact = x @ dequantize_fp8(q, s).t() + b
    torch.testing.assert_close(fp8_linear_reference(x[:GEMV_MAX_ROWS], q, s, b), exact[:GEMV_MAX_ROWS])
    xq = dequantize_fp8(*quantize_fp8_activation(x))
    torch.testing.assert_close(fp8_linear_reference(x, q, s, b), xq @ dequantize_fp8(q, s).t() + b)
    assert not torch.allclose(fp8_linear_reference(x, q, s, b), exact, rtol=1e-4, atol=1e-4)


# --- the kernels --------------------------------------------------------------------------------------------------
# Kernel and reference both accumulate in float32 (in other orders) from the same exactly widened e4m3 values;
# they differ by float32 summation error and by the one rounding of the output to its dtype.
_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2.0**-10, 2.0**-10), torch.bfloat16: (2.0**-7, 2.0**-7)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 96, 80), (7, 130, 256), (16, 64, 200)])
def test_fp8_gemv_matches_reference(dtype, M, N, K):
    w = _weights(N, K, M)
    q, s = (t.to(DEVICE) for t in quantize_fp8_weight(w))
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K)).to(DEVICE, dtype)
    bias = torch.randn(N).to(DEVICE, dtype) if M != 16 else None
    got, ref = fp8_gemv(x, q, s, bias), fp8_gemv_reference(x, q, s, bias)
    assert got.dtype == dtype and got.shape == (M, N)
    rtol, atol = _TOL[dtype]
    torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=atol * ref.float().abs().max().item())


# The GEMV against the exact product (float64 of the same e4m3 codes, scales, activations and bias). Its only
# errors are float32 rounding and the output's rounding to x's dtype:
#  * fp16/bf16 activations times e4m3 codes are exact in float32 (11 + 4 significant bits); the sum over K, the
#    scale and the bias round at u = 2^-24 per step: with random-sign terms the error stays below
#    6 sqrt(K + 3) u sum|terms| (Higham & Mary's probabilistic bound, lambda = 6: ~1e-8 odds per element);
#  * the rounding to x's dtype: one ulp (the interpreter truncates float32 -> bf16; the GPU rounds to nearest),
#    and a subnormal step near zero;
#  * gated: SiLU(gate) * up rounds twice in x's dtype (kernel: silu_times, reference: silu_mul_reference, whose
#    exp and, under the interpreter, bf16 roundings may land an ulp apart): two ulps of each input element.
_ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _gemv_error_ratio(got: torch.Tensor, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias, gated: bool,
                      ) -> float:
    """max |got - exact| / bound over the [M, N] outputs (<= 1 passes); the bound as explained above."""
    xe = (silu_mul_reference(x) if gated else x).double().cpu()
    c, sc = q.cpu().double(), s.cpu().double()
    b = bias.cpu().double() if bias is not None else torch.zeros_like(sc)
    exact = (xe @ c.t()) * sc + b
    terms = (xe.abs() @ c.abs().t()) * sc
    dt, K = x.dtype, c.shape[1]
    tiny = torch.finfo(dt).smallest_normal * torch.finfo(dt).eps
    bound = _ULP[dt] * exact.abs() + tiny + 6 * (K + 3) ** 0.5 * 2.0**-24 * (terms + b.abs())
    if gated:
        bound += 2 * _ULP[dt] * terms
    return ((got.cpu().double() - exact).abs() / bound).max().item()


# (M, N, K, bias): every kernel row count (1 elementwise, 2-16 tl.dot), K a multiple of the interpreter's
# 256-wide K tiles and not, one or several tiles, ragged N (64-row blocks).
GEMV_CASES = [(1, 96, 512, True), (1, 40, 200, False), (3, 130, 600, True), (4, 72, 256, False),
              (5, 130, 512, True), (5, 96, 200, False), (16, 64, 200, False), (16, 48, 768, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,has_bias,gated", [(*case, gated) for gated in (False, True) for case in GEMV_CASES
                                                  if not gated or case[0] <= GEMV_ROWS])  # gated: 1 row
def test_fp8_gemv_rows_bias_gated_within_fp32_rounding(M, N, K, has_bias, dtype, gated):
    g = torch.Generator().manual_seed(M * 1000 + K)
    q, s = (t.to(DEVICE) for t in quantize_fp8_weight(_weights(N, K, M + K)))
    x = (torch.randn(M, 2 * K if gated else K, generator=g) * 2).to(DEVICE, dtype)
    bias = torch.randn(N, generator=g).to(DEVICE, dtype) if has_bias else None
    got, ref = fp8_gemv(x, q, s, bias, gated=gated), fp8_gemv_reference(x, q, s, bias, gated=gated)
    assert got.dtype == ref.dtype == dtype and got.shape == ref.shape == (M, N)
    assert _gemv_error_ratio(got, x, q, s, bias, gated) <= 1  # the kernel
    assert _gemv_error_ratio(ref, x, q, s, bias, gated) <= 1  # the reference (kernel == reference to rounding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp8_gemv_error_bound_catches_wrong_results(dtype):
    """The bound above is tight enough to fail on plausible bugs: a dropped bias, a dropped last K column, a
    scale 2^-3 off, fp32 activations rounded to bf16 or fp16, gate and up swapped."""
    M, N, K = 3, 64, 200
    g = torch.Generator().manual_seed(7)
    q, s = quantize_fp8_weight(_weights(N, K, 7))
    x, bias = torch.randn(M, 2 * K, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
    xp = x[:, :K]
    ok = fp8_gemv_reference(xp, q, s, bias)
    assert _gemv_error_ratio(ok, xp, q, s, bias, False) <= 1
    wrong = [fp8_gemv_reference(xp, q, s), fp8_gemv_reference(xp[:, :-1], q[:, :-1], s, bias),
             fp8_gemv_reference(xp, q, s * (1 + 2.0**-3), bias)]
    if dtype == torch.float32:
        wrong += [fp8_gemv_reference(xp.to(low).float(), q, s, bias) for low in (torch.bfloat16, torch.float16)]
    assert all(_gemv_error_ratio(w, xp, q, s, bias, False) > 1 for w in wrong)
    swapped = torch.cat([x[:, K:], x[:, :K]], dim=1)
    ok_gated = fp8_gemv_reference(x, q, s, bias, gated=True)
    assert _gemv_error_ratio(ok_gated, x, q, s, bias, True) <= 1
    assert _gemv_error_ratio(fp8_gemv_reference(swapped, q, s, bias, gated=True), x, q, s, bias, True) > 1


@pytest.mark.parametrize("gpu", sorted(_CONFIGS))
@pytest.mark.parametrize("kind", ["gemv", "gated", "mma"])
def test_fp8_gemv_gpu_configs(gpu, kind):
    """Every config of the GPU table gives the product within float32 rounding (here in the interpreter; the
    shapes cross two K tiles, evenly and not, and end in a partial row block)."""
    rows = GEMV_ROWS + 1 if kind == "mma" else GEMV_ROWS
    gated = kind == "gated"
    g = torch.Generator().manual_seed(rows)
    for cfg in _CONFIGS[gpu][kind]:
        for K in (2 * cfg.block_k, 2 * cfg.block_k - 48):
            N = 2 * cfg.block_n + 3
            q, s = (t.to(DEVICE) for t in quantize_fp8_weight(_weights(N, K, K)))
            x = torch.randn(rows, 2 * K if gated else K, generator=g).to(DEVICE, torch.float16)
            bias = torch.randn(N, generator=g).to(DEVICE, torch.float16)
            got = fp8_gemv(x, q, s, bias, gated=gated, config=cfg)
            assert _gemv_error_ratio(got, x, q, s, bias, gated) <= 1, (cfg, K)


def test_fp8_gemv_config_table(monkeypatch):
    """On CUDA the GPU model's table: the elementwise kernel's configs up to GEMV_ROWS rows, the tl.dot kernel's
    above, narrow (N <= 4096) or wide ones, the gated one for c_proj with SiLU*mul, int8_gemv's own (not gated),
    K tiles clamped to K (>= 16);
    an unknown GPU takes the H100's."""
    cuda = torch.device("cuda", 0)
    for model, table in (("H200", _CONFIGS["H200"]), ("", _CONFIGS["H100"])):
        monkeypatch.setattr(fp8_gemv_mod, "gpu_model", lambda device, m=model: m)
        assert fp8_gemv_mod.default_config(4096, 11008, cuda, 1) == table["gemv"][0]
        assert fp8_gemv_mod.default_config(22016, 4096, cuda, GEMV_ROWS) == table["gemv"][1]
        assert fp8_gemv_mod.default_config(4096, 4096, cuda, 1, int8=True) == table["int8"][0]
        assert fp8_gemv_mod.default_config(12288, 4096, cuda, GEMV_ROWS, int8=True) == table["int8"][1]
        assert fp8_gemv_mod.default_config(4096, 11008, cuda, 1, gated=True, int8=True) == table["gated"][0]
        assert fp8_gemv_mod.default_config(4096, 11008, cuda, 1, gated=True) == table["gated"][0]
        assert fp8_gemv_mod.default_config(4096, 4096, cuda, GEMV_ROWS + 1) == table["mma"][0]
        assert fp8_gemv_mod.default_config(12288, 4096, cuda, MAX_ROWS) == table["mma"][1]
        assert fp8_gemv_mod.default_config(64, 40, cuda, 1).block_k == 64
        assert fp8_gemv_mod.default_config(64, 8, cuda, GEMV_ROWS + 1).block_k == 16


def test_fp8_gemv_refuses_bad_shapes():
    assert GATED_MAX_ROWS == GEMV_ROWS  # the engine hands the GEMV gated inputs only where it takes them
    q, s = quantize_fp8_weight(_weights(32, 64, 0))
    for x, gated in ((torch.randn(MAX_ROWS + 1, 64), False), (torch.randn(2, 64), True), (torch.randn(2, 96), False),
                     (torch.randn(GEMV_ROWS + 1, 128), True)):  # gated: the elementwise kernel's rows only
        with pytest.raises(ValueError, match="fp8 GEMV"):
            fp8_gemv(x, q, s, gated=gated)


def test_fp8_linear_layer_picks_its_kernel():
    lin = torch.nn.Linear(64, 48, bias=True)
    layer = Fp8Linear.from_linear(lin).to(DEVICE)
    assert layer.qweight.dtype == FP8_DTYPE and "precision=fp8" in repr(layer)
    for rows in (3, GEMV_MAX_ROWS + 5):
        x = torch.randn(rows, 64).to(DEVICE)
        layer.use_triton = False
        ref = layer(x)
        layer.use_triton = True  # the GEMV up to 16 rows; above, torch._scaled_mm on sm_89+, the reference on CPU
        got = layer(x)
        tol = 1e-5 if rows <= GEMV_MAX_ROWS or DEVICE == "cpu" else 2e-3
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.fixture
def calls(monkeypatch) -> dict[str, list]:
    """Records the rows of every silu_mul and (rows, gated) of every fp8_gemv call (the functions still run)."""
    rec: dict[str, list] = {"silu_mul": [], "fp8_gemv": []}
    real_silu, real_gemv = kernels_pkg.silu_mul, fp8_gemv_mod.fp8_gemv

    def silu(x, *a, **k):
        rec["silu_mul"].append(x.numel() // x.shape[-1])
        return real_silu(x, *a, **k)

    def gemv(x, *a, gated=False, **k):
        rec["fp8_gemv"].append((x.shape[0], gated))
        return real_gemv(x, *a, gated=gated, **k)

    monkeypatch.setattr(kernels_pkg, "silu_mul", silu)
    monkeypatch.setattr(fp8_gemv_mod, "fp8_gemv", gemv)
    return rec


@pytest.mark.parametrize("rows", [1, GEMV_ROWS, GEMV_ROWS + 1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 5])
def test_fp8_linear_gated_fuses_silu_mul(rows, calls):
    """Kernels.linear(c_proj, [gate | up], gated=True) on an Fp8Linear: the GEMV applies SiLU(gate) * up itself up
    to GATED_MAX_ROWS rows (no silu_mul kernel), silu_mul then the GEMV up to GEMV_MAX_ROWS, the activation
    quantiser above (sm_89+ GPUs); the same as silu_mul_reference then the reference product."""
    from qwen_trtllm.models.qwen.model import Kernels

    K = 208  # a multiple of 16 (torch._scaled_mm's), not of the K tiles
    layer = Fp8Linear.from_linear(torch.nn.Linear(K, 48, bias=False)).to(DEVICE)
    gu = torch.randn(rows, 1, 2 * K, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
    layer.use_triton = False
    ref = Kernels(triton=False).linear(layer, gu, gated=True)
    torch.testing.assert_close(ref, layer(silu_mul_reference(gu)), rtol=0, atol=0)
    layer.use_triton = True
    got = Kernels(triton=True).linear(layer, gu, gated=True)
    assert got.shape == (rows, 1, 48)
    fused = rows <= GATED_MAX_ROWS
    in_quantiser = rows > GEMV_MAX_ROWS and FP8_GPU  # torch._scaled_mm's activation quantiser applies it
    assert calls["silu_mul"] == ([] if fused or in_quantiser else [rows])
    assert calls["fp8_gemv"] == ([(rows, True)] if fused else [] if rows > GEMV_MAX_ROWS else [(rows, False)])
    tol = 1e-5 if rows <= GEMV_MAX_ROWS or DEVICE == "cpu" else 2e-3
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.skipif(not FP8_GPU, reason="torch._scaled_mm's e4m3 GEMM needs an sm_89+ GPU (none here)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scaled_mm_matches_reference(dtype):
    w = _weights(256, 512, 3)
    q, s = (t.cuda() for t in quantize_fp8_weight(w))
    x = torch.randn(64, 512, device="cuda", dtype=dtype)
    bias = torch.randn(256, device="cuda", dtype=dtype)
    ref = fp8_linear_reference(x, q, s, bias, quantize_activations=True).float()
    got = fp8_scaled_mm(x, q, s, bias).float()
    rtol = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-9
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * ref.abs().max().item())
    gu = torch.randn(64, 1024, device="cuda", dtype=dtype)  # c_proj: SiLU(gate) * up fused into the quantiser
    ref = fp8_linear_reference(silu_mul_reference(gu), q, s, quantize_activations=True).float()
    got = fp8_scaled_mm(gu, q, s, gated=True).float()
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * ref.abs().max().item())


# --- the activation quantiser (torch._scaled_mm's input) ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K", [96, 200, 1024])
def test_activation_quantiser_kernel_equals_reference_bitwise(dtype, K):
    """kernels/fp8_quant.py: codes and scales bit for bit the reference's, for rows of unlike ranges, an all-zero
    row, values that overflow fp16's subnormals after scaling, and a strided input."""
    g = torch.Generator().manual_seed(K)
    ranges = torch.tensor([1e-4, 0.02, 1.0, 7.0, 300.0, 0.0, 1.0, 1e3])[:, None]
    x = torch.randn(8, 2 * K, generator=g) * ranges
    x[6, 3] = 1e4  # one outlier: the rest of its row falls to e4m3's subnormals and zero
    x = x.to(DEVICE, dtype)[:, ::2]  # a strided view
    codes, scales = quantize_fp8_rows(x)
    ref_codes, ref_scales = quantize_fp8_rows_reference(x)
    assert codes.dtype == FP8_DTYPE and codes.shape == (8, K) and scales.dtype == torch.float32
    assert torch.equal(scales.cpu(), ref_scales.cpu())
    assert torch.equal(codes.cpu().float(), ref_codes.cpu().float())  # every code (-0 and +0 alike: the same value)
    assert (codes[5].float() == 0).all() and (codes[:5].float().abs().amax(dim=1) == 448).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_activation_quantiser_gated_equals_silu_mul_then_quantiser(dtype):
    """gated=True quantises SiLU(gate) * up with silu_mul's roundings: the same bits as silu_mul, then the
    quantiser (silu_mul is checked against its reference in test_kernels.py)."""
    x = (torch.randn(5, 2 * 300, generator=torch.Generator().manual_seed(1)) * 3).to(DEVICE, dtype)
    codes, scales = quantize_fp8_rows(x, gated=True)
    want_codes, want_scales = quantize_fp8_rows(kernels_pkg.silu_mul(x))
    assert torch.equal(scales, want_scales) and torch.equal(codes.float(), want_codes.float())
    # and against the reference: e4m3's half step (2^-4 relative, 2^-10 of the scale in subnormals) on top of
    # SiLU's one-ulp differences in x's dtype (the interpreter truncates float32 -> bf16)
    want = silu_mul_reference(x).float()
    torch.testing.assert_close(dequantize_fp8(codes, scales), want, rtol=2.0**-4 + 2.0**-7,
                               atol=2.0**-10 * scales.max().item())


# --- engines ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(tiny_checkpoint, tmp_path_factory):
    from qwen_trtllm.builder.build import build_engine

    d = tmp_path_factory.mktemp("fp8")
    common = dict(hf_dir=tiny_checkpoint, dtype="float32", max_batch_size=8, max_input_len=48, max_output_len=24)
    return {"fp32": build_engine(d / "fp32", **common), "fp8": build_engine(d / "fp8", use_fp8=True, **common),
            "fp8_lm_head": build_engine(d / "fp8_lm_head", use_fp8=True, quantize_lm_head=True, **common)}


def test_engine_files_and_config(engines):
    cfg = json.loads((engines["fp8"] / "config.json").read_text())["build"]["quantization"]
    assert cfg["precision"] == "fp8" and cfg["mode"] == "fp8" and not cfg["quantize_lm_head"]
    with safe_open(str(engines["fp8"] / "rank0.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("layers.0.mlp.gate_up.qweight").dtype == FP8_DTYPE
        assert f.get_tensor("layers.0.attn.qkv.scales").dtype == torch.float32
        assert f.get_tensor("layers.0.attn.qkv.bias").dtype == torch.float32
        assert f.get_tensor("lm_head.weight").dtype == f.get_tensor("embed.weight").dtype == torch.float32
    assert "layers.0.attn.dense.weight" not in keys
    # --quantize_lm_head: lm_head in e4m3 with a scale per vocabulary row; the embedding stays float32
    cfg = json.loads((engines["fp8_lm_head"] / "config.json").read_text())["build"]["quantization"]
    assert cfg["precision"] == "fp8" and cfg["quantize_lm_head"]
    with safe_open(str(engines["fp8_lm_head"] / "rank0.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
        assert f.get_tensor("lm_head.qweight").dtype == FP8_DTYPE
        vocab = f.get_tensor("embed.weight").shape[0]
        assert f.get_tensor("lm_head.scales").shape == (vocab,)
        assert f.get_tensor("embed.weight").dtype == torch.float32


def test_fp8_engine_triton_path_matches_plain(engines, calls):
    """The fp8 engine with its Triton kernels (the interpreter on CPU) against its PyTorch path: the same
    teacher-forced logits to float32 rounding. The prefills (12 and 7 rows) and batch-3 and batch-6 decode take the
    GEMV's tl.dot kernel after the SiLU*mul kernel, batch-1 decode its elementwise one with SiLU*mul fused into
    c_proj."""
    from qwen_trtllm.runtime import LLM, Engine, ExecutorConfig, KvCacheConfig

    if DEVICE == "cuda" and not FP8_GPU:
        pytest.skip("fp8 engines need an sm_89+ GPU")
    engine = Engine.load(engines["fp8"], device=DEVICE)
    if not kernels_pkg.triton_available(engine.device):
        pytest.skip("Triton kernels unavailable on this device")
    llm = LLM.from_engine(engine, config=ExecutorConfig(kv_cache=KvCacheConfig(max_tokens=6 * 64),
                                                        cuda_graphs=False))
    g = torch.Generator().manual_seed(0)
    vocab = engine.config.vocab_size
    for lens in ((5, 3, 4), (2,) * 6, (7,)):
        prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]
        forced = torch.randint(0, vocab, (len(lens), 4), generator=g)
        assert_triton_path_matches_plain(engine, llm, prompts, forced)
    layers = engine.config.num_hidden_layers
    # 3 prefills, 3 decodes of 3 rows and 3 of 6 rows; 3 decodes of 1 row fused
    assert sorted(set(calls["silu_mul"])) == [3, 6, 7, 12] and len(calls["silu_mul"]) == layers * (3 + 3 + 3)
    gated = [rows for rows, fused in calls["fp8_gemv"] if fused]
    assert set(gated) == {1} and len(gated) == layers * 3


# Random tiny model (hidden 64, vocab 1024), fp32: e4m3 rounds each weight with a relative error <= 2^-4 (~2.5%
# rms, between per-channel int8's ~0.3% and int4's ~8%), and the teacher-forced passes (8 prompts of many tokens,
# above 16 rows) round the activations the same way. test_quantized_engine.py measured 98% top-1 agreement for int8
# and 77% for int4 on such models (their logits are full of near-ties); fp8 measured 92.5% here (64 x 32
# positions). 0.85 leaves room for seed noise and still fails on a wrong scale or a broken layout (chance: ~0.1%).
@pytest.mark.parametrize("engine", ["fp8", "fp8_lm_head"])
def test_teacher_forced_agreement_with_fp32(engines, run_script, tmp_path, engine):
    out = tmp_path / "stats.json"
    rc, stdout, err = run_script("eval_accuracy.py", "--engine_dir", engines[engine], "--reference_engine_dir",
                                 engines["fp32"], "--num_prompts", "64", "--prompt_len", "16", "--steps", "32",
                                 "--batch_size", "8", "--min_top1", "0.85", "--json_output", out)
    top1 = json.loads(out.read_text())["top1_agreement"] if out.exists() else None
    print(f"{engine} vs fp32 top-1 agreement: {top1}")
    assert rc == 0, stdout + err
    label = "float32, fp8 weights and lm_head)" if engine == "fp8_lm_head" else "float32, fp8 weights)"
    assert label in stdout, stdout  # the report names the engine's number formats


def test_build_flag_conflicts(tiny_checkpoint, run_script, tmp_path):
    for extra in (["--use_weight_only"], ["--use_weight_only", "--weight_only_precision", "int4"],
                  ["--group_size", "16"], ["--weight_only_precision", "int8"]):
        rc, _, err = run_script("build.py", "--hf_model_dir", tiny_checkpoint, "--use_fp8", *extra,
                                "--output_dir", tmp_path / "bad")
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert ("mutually exclusive" in err) if "--use_weight_only" in extra else \
            (f"{extra[0]} does not apply to --use_fp8" in err and "drop it" in err)
    assert not (tmp_path / "bad").exists()
    from qwen_trtllm.builder.build import build_engine

    with pytest.raises(QWenError, match="mutually exclusive"):
        build_engine(tmp_path / "bad", hf_dir=tiny_checkpoint, use_fp8=True, weight_only_precision="int8")
    with pytest.raises(QWenError, match="--group_size does not apply to --use_fp8"):
        build_engine(tmp_path / "bad", hf_dir=tiny_checkpoint, use_fp8=True, group_size=64)
    with pytest.raises(QWenError, match="--quantize_lm_head applies to quantised engines only"):
        build_engine(tmp_path / "bad", hf_dir=tiny_checkpoint, quantize_lm_head=True)
    from qwen_trtllm.checkpoint.gptq import write_gptq_checkpoint

    gptq = write_gptq_checkpoint(tiny_checkpoint, tmp_path / "gptq", group_size=16)
    with pytest.raises(QWenError, match="GPTQ int4 checkpoint.*--use_fp8") as e:
        build_engine(tmp_path / "bad", hf_dir=gptq, use_fp8=True)
    assert "\n" not in str(e.value) and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("capability,ok", [((8, 6), False), ((8, 0), False), ((8, 9), True), ((9, 0), True)])
def test_load_refused_before_sm89(engines, monkeypatch, capability, ok):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Test GPU")
    if ok:
        check_fp8_supported("cuda")
        return
    from qwen_trtllm.runtime.engine import Engine

    with pytest.raises(QWenError) as e:
        Engine.load(engines["fp8"], device="cuda")
    msg = str(e.value)
    assert "\n" not in msg and f"sm_{capability[0]}{capability[1]}" in msg and "sm_89" in msg and "rebuild" in msg
    check_fp8_supported("cpu")  # the CPU runs fp8 engines through the reference
