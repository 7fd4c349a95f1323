"""Weight-only int8 / int4 quantisation: error bounds, packing, the Triton kernels against an fp32 matmul with the
dequantised weights (CPU interpreter here, the compiled kernels on CUDA), and a quantised tiny QWen."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qwen_trtllm import QWenError
from qwen_trtllm.checkpoint.random_checkpoint import PRESETS
from qwen_trtllm.config import QWenConfig
from qwen_trtllm.kernels.weight_only_gemm import (
    WOConfig,
    int4_weight_only_matmul,
    int8_weight_only_matmul,
    select_config,
    weight_only_matmul,
)
from qwen_trtllm.models.qwen.model import QWen, ntk_alpha
from qwen_trtllm.quantization import (
    WeightOnlyLinear,
    dequantize_int4,
    dequantize_int8,
    make_quantized_skeleton,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantize_state_dict,
    quantized_state_dict_names,
    unpack_int4,
)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"


def _weights(N: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * K**-0.5
    w[0] = 0.0  # an all-zero row (and so all-zero groups)
    w[1, :7] *= 40.0  # an outlier-heavy row
    return w


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


# --- quantisation -------------------------------------------------------------------------------------------------
def test_int8_quantisation_error_bound():
    w = _weights(48, 320, 0)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.dtype == torch.float16 and s.shape == (48,)
    assert q.abs().max() <= 127 and (q[0] == 0).all() and (s > 0).all()
    deq = dequantize_int8(q, s)
    assert ((w - deq).abs() <= s.float()[:, None] / 2 * (1 + 1e-6)).all()
    assert q[2:].abs().amax(dim=1).min() >= 126  # every non-zero row uses its full range


def test_int4_quantisation_error_bound_and_layout():
    w = _weights(40, 256, 1)
    qp, s, zeros = quantize_int4(w, group_size=64)
    assert zeros is None  # symmetric: no zero points
    assert qp.dtype == torch.uint8 and qp.shape == (40, 128) and s.dtype == torch.float16 and s.shape == (40, 4)
    deq = dequantize_int4(qp, s, 64)
    bound = s.float().repeat_interleave(64, dim=1) / 2
    assert ((w - deq).abs() <= bound * (1 + 1e-6)).all()
    q = unpack_int4(qp)
    assert q.min() >= -7 and q.max() <= 7 and (q[0] == 0).all()
    # byte j of a row: input 2j in the low nibble, input 2j + 1 in the high nibble, each stored as q + 8
    assert torch.equal(qp[:, 3] & 0xF, (q[:, 6] + 8).to(torch.uint8))
    assert torch.equal(qp[:, 3] >> 4, (q[:, 7] + 8).to(torch.uint8))


def test_int4_pack_unpack_round_trip():
    q = torch.randint(-8, 8, (17, 96), generator=torch.Generator().manual_seed(2), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (17, 48)
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(pack_int4(unpack_int4(packed)), packed)


def test_group_size_must_divide_input_width():
    with pytest.raises(QWenError, match=r"\[out=8, in=96\].*group_size 64 does not divide"):
        quantize_int4(torch.randn(8, 96), group_size=64)
    model = QWen(QWenConfig(**PRESETS["tiny"]))  # MLP width 176: group 32 divides hidden 64 but not 176
    with pytest.raises(QWenError, match=r"layers\.0\.mlp\.c_proj.*in=176.*group_size 32"):
        quantize_model(model, "int4", group_size=32)
    assert all(type(m).__name__ != "WeightOnlyLinear" for m in model.modules())  # nothing was changed
    with pytest.raises(QWenError, match="precision"):
        quantize_model(model, "int2")


# --- kernels ------------------------------------------------------------------------------------------------------
def _case(precision: str, M: int, K: int, N: int, dtype: torch.dtype, group: int, seed: int):
    w = _weights(N, K, seed)
    if precision == "int8":
        qw, s = quantize_int8(w)
        deq = dequantize_int8(qw, s)
    else:
        qw, s, _ = quantize_int4(w, group)
        deq = dequantize_int4(qw, s, group)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    ref = x.double() @ deq.double().T + b.double()  # fp32-exact inputs: x as rounded to its dtype
    return x.to(DEVICE), qw.to(DEVICE), s.to(DEVICE), b.to(DEVICE), ref


def _configs(M: int, precision: str, group: int) -> list[WOConfig]:
    """Two configs per case that together cover both kernels, split-K and ragged M / N tiles (few programs, so
    that the interpreter stays fast)."""
    bk = 32 if precision == "int4" else 64  # int4: two K tiles per group
    gemv = WOConfig("gemv", max(4, 1 << (M - 1).bit_length()), 32, 64, split_k=2)
    mma = WOConfig("mma", 16 if M <= 16 else 32, 64, bk, split_k=1 if M > 4 else 2)
    return [gemv, mma] if M <= 4 else [mma, WOConfig("mma", 16, 32, 64, split_k=2)]


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("K,N", [(128, 64), (256, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_fp32_matmul_of_dequantised_weights(precision, M, K, N, dtype):
    group = 64
    x, qw, s, b, ref = _case(precision, M, K, N, dtype, group, seed=M * K + N)
    tol = 1e-3 if dtype == torch.float32 else 2e-3  # fp16 output rounding alone is ~3e-4
    for cfg in _configs(M, precision, group):
        y = weight_only_matmul(x, qw, s, precision, group, b, config=cfg)
        assert y.shape == (M, N) and y.dtype == dtype
        assert _rel(y.cpu(), ref) <= tol, cfg


def test_kernel_defaults_bf16_and_no_bias():
    """select_config's choice, the public wrappers, bfloat16 (the interpreter's bf16 tl.dot is broken, so bf16
    takes the gemv kernel on CPU), no bias, and a K that is not a multiple of block_k (int8)."""
    x, qw, s, _, _ = _case("int8", 2, 176, 40, torch.float16, 0, seed=5)
    y = int8_weight_only_matmul(x, qw, s)
    ref = x.double().cpu() @ dequantize_int8(qw.cpu(), s.cpu()).double().T
    assert select_config(2, 40, 176, "int8").kernel == "mma" and _rel(y.cpu(), ref) <= 2e-3
    bf16_cfg = WOConfig("gemv", 8, 16, 32) if INTERPRETED else None
    x, qw, s, b, ref = _case("int4", 1, 128, 48, torch.bfloat16, 32, seed=6)
    y = int4_weight_only_matmul(x, qw, s, 32, b) if bf16_cfg is None else weight_only_matmul(
        x, qw, s, "int4", 32, b, config=bf16_cfg)
    assert y.dtype == torch.bfloat16 and _rel(y.cpu(), ref) <= 1e-2  # bf16 output rounding: 2^-9 relative
    x, qw, s, b, ref = _case("int8", 5, 176, 40, torch.bfloat16, 0, seed=7)
    assert _rel(weight_only_matmul(x, qw, s, "int8", bias=b, config=bf16_cfg).cpu(), ref) <= 1e-2


def test_int4_small_groups_take_the_gemv_kernel():
    cfg = select_config(3, 48, 96, "int4", 16)
    assert cfg.kernel == "gemv" and cfg.block_k == 16
    x, qw, s, b, ref = _case("int4", 3, 96, 48, torch.float16, 16, seed=9)
    assert _rel(int4_weight_only_matmul(x, qw, s, 16, b).cpu(), ref) <= 2e-3


def test_kernel_rejects_bad_shapes():
    x, qw, s, _, _ = _case("int4", 1, 128, 16, torch.float32, 32, seed=8)
    with pytest.raises(ValueError, match="group_size 48"):
        int4_weight_only_matmul(x, qw, s, 48)
    with pytest.raises(ValueError, match="int8"):
        int8_weight_only_matmul(x, qw, s)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_split_k_is_reduced_by_the_last_program_of_each_tile(precision):
    """Split K sums the partials in split order inside the kernel: close to the unsplit result, the same bits
    on every call, and the arrival counters are back at zero after each call (as CUDA-graph replays need)."""
    from qwen_trtllm.kernels import launch

    x, qw, s, b, ref = _case(precision, 3, 256, 96, torch.float16, 64, seed=13)
    for kernel, bm in (("mma", 16), ("gemv", 4)):
        cfg = WOConfig(kernel, bm, 32, 32, split_k=4)
        outs = [weight_only_matmul(x, qw, s, precision, 64, b, config=cfg) for _ in range(2)]
        whole = weight_only_matmul(x, qw, s, precision, 64, b, config=replace(cfg, split_k=1))
        assert _rel(outs[0].cpu(), ref) <= 2e-3 and _rel(outs[0].cpu(), whole.cpu()) <= 2e-3, kernel
        assert torch.equal(outs[0], outs[1]), kernel
        assert int(launch._COUNTERS[x.device].abs().sum()) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_kernels_replay_in_cuda_graphs(precision):
    """Warm-up (compilation) before capture, then replays on new inputs in the static buffer; split-K included."""
    x, qw, s, b, _ = _case(precision, 4, 1024, 256, torch.float16, 128, seed=10)
    assert select_config(4, 256, 1024, precision, 128, x.device).split_k > 1
    fn = lambda: weight_only_matmul(x, qw, s, precision, 128, b)
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn()
    for seed in (11, 12):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).half())
        graph.replay()
        deq = dequantize_int8(qw, s) if precision == "int8" else dequantize_int4(qw, s, 128)
        ref = x.double() @ deq.double().T + b.double()
        assert _rel(y, ref) <= 2e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a 4.3 GB output: the compiled kernels on a GPU")
@pytest.mark.parametrize("precision,group", [("int8", 128), ("int4", 128), ("int4", 16)])
def test_outputs_past_two_giga_elements(precision, group):
    """Offsets past 2^31 elements: a prefill chunk of 131072 tokens through gate_up (N 22016) has M x N = 2.9e9
    (benchmark.py's batch 64 x 2048 prefill; int32 offsets faulted). Here M x N = 2.15e9 with select_config's
    prefill kernel (int4 groups of 16: the gemv kernel): the rows at both ends and across the boundary equal the
    reference. (Split-K, whose partials take int64 offsets too past 2^31, is only picked for a few hundred tiles.)"""
    M, N, K = 65600, 32768 + 64, 128
    x, qw, s, b, _ = _case(precision, 8, K, N, torch.float16, group, seed=21)
    assert select_config(M, N, K, precision, group).kernel == ("gemv" if group < 32 else "mma")
    x = torch.randn(M, K, generator=torch.Generator(DEVICE).manual_seed(22), device=DEVICE).half()
    y = weight_only_matmul(x, qw, s, precision, group, b)
    deq = dequantize_int8(qw, s) if precision == "int8" else dequantize_int4(qw, s, group)
    edge = 2**31 // N  # the first row whose last elements lie past 2^31
    for rows in (slice(0, 4), slice(edge - 2, edge + 2), slice(M - 4, M)):
        ref = x[rows].double() @ deq.double().T + b.double()
        assert _rel(y[rows], ref) <= 2e-3, rows
    del y
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,gated", [(1, 96, 512, False), (1, 130, 600, False), (1, 72, 200, True),
                                         (1, 40, 256, True)])
def test_int8_gemv_matches_fp32_matmul_of_dequantised_weights(M, N, K, gated, dtype):
    """Decode rows of int8 weight-only layers: the elementwise 1-byte-code GEMV (kernels/fp8_gemv.py int8_gemv)
    against float64 over the dequantised weights; every int8 code (-127..127) is in the weights, so a wrong
    int8 -> float conversion fails, and the per-channel scale differs per row."""
    from qwen_trtllm.kernels import silu_mul_reference
    from qwen_trtllm.kernels.fp8_gemv import int8_gemv

    x, qw, s, b, _ = _case("int8", M, 2 * K if gated else K, N, dtype, 0, seed=M * K + N)
    qw, s = quantize_int8(_weights(N, K, M + N))
    qw[0, :255] = torch.arange(-127, 128, dtype=torch.int8)[: min(255, K)]
    deq = dequantize_int8(qw, s).double()
    xin = silu_mul_reference(x.cpu()) if gated else x.cpu()
    ref = xin.double() @ deq.T + b.double().cpu()
    y = int8_gemv(x, qw.to(DEVICE), s.to(DEVICE), b, gated=gated)
    tol = 1e-5 if dtype == torch.float32 else 2e-3 if dtype == torch.float16 else 1e-2  # the output's rounding
    assert y.shape == (M, N) and y.dtype == dtype and _rel(y.cpu(), ref) <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.float32, 1e-4)])
def test_int8_gemv_offset_codes_with_biased_activations(dtype, tol):
    """int8_gemv sums (q + 128) x and subtracts 128 sum x (the denormal scheme of kernels/fp8_gemv.py): with every
    activation near 1 (and one outlier) the two sums are ~100x the result, the case where a wrong offset or its
    float32 cancellation shows. fp16: the output's rounding; fp32: the documented bound (~1e-5 here)."""
    from qwen_trtllm.kernels.fp8_gemv import int8_gemv

    M, N, K = 1, 24, 4096
    qw, s = quantize_int8(_weights(N, K, 5))
    g = torch.Generator().manual_seed(6)
    x = 1.0 + 0.1 * torch.randn(M, K, generator=g)
    x[:, 7] = 300.0
    ref = x.double() @ dequantize_int8(qw, s).double().T
    y = int8_gemv(x.to(dtype).to(DEVICE), qw.to(DEVICE), s.to(DEVICE))
    assert _rel(y.cpu(), ref) <= tol


@pytest.mark.parametrize("gpu", ["H200", "H100"])
def test_int8_gemv_gpu_configs(gpu):
    """Every int8 config of the code GEMV's table gives the product (here in the interpreter; shapes crossing two
    K tiles, evenly and not, ending in a partial row block)."""
    from qwen_trtllm.kernels.fp8_gemv import _CONFIGS, int8_gemv

    for cfg in _CONFIGS[gpu]["int8"]:
        for K in (2 * cfg.block_k, 2 * cfg.block_k - 48):
            N = 2 * cfg.block_n + 3
            x, qw, s, b, ref = _case("int8", 1, K, N, torch.float16, 0, seed=K + N)
            assert _rel(int8_gemv(x, qw, s, b, config=cfg).cpu(), ref) <= 2e-3, (cfg, K)


def test_int8_gemv_refuses_bad_shapes():
    """One ValueError naming each problem (not an AssertionError or a read past a short bias), and the engine's row
    limit equal to the kernel's."""
    from qwen_trtllm.kernels.fp8_gemv import GEMV_ROWS, int8_gemv
    from qwen_trtllm.quantization import weight_only

    assert weight_only.GEMV_ROWS == GEMV_ROWS
    qw, s = quantize_int8(_weights(32, 64, 0))
    q4, s4, _ = quantize_int4(_weights(32, 64, 0), 32)
    x = torch.randn(1, 64)
    cases = [((torch.randn(GEMV_ROWS + 1, 64), qw, s), f"{GEMV_ROWS + 1} rows"),
             ((x, q4, s4), "qweight must be contiguous int8"),
             ((x, qw, s.float()), "scales must be contiguous float16"),
             ((torch.randn(1, 96), qw, s), "int8 \\[N, 96\\]"),
             ((x.to(torch.int8), qw, s), "x must be 2-D float16"), ((torch.randn(64), qw, s), "x must be 2-D"),
             ((x, qw.t().contiguous().t(), s), "qweight must be contiguous"),
             ((x, qw, s, torch.randn(10)), "bias must be \\[32\\]")]
    for args, msg in cases:
        with pytest.raises(ValueError, match="int8 GEMV: .*" + msg):
            int8_gemv(*(a.to(DEVICE) for a in args))
    with pytest.raises(ValueError, match="gated x \\[1, 63\\] must be \\[gate \\| up\\]"):
        int8_gemv(torch.randn(1, 63).to(DEVICE), qw.to(DEVICE), s.to(DEVICE), gated=True)


def test_weight_only_linear_refuses_a_wrong_width():
    layer = WeightOnlyLinear.from_linear(torch.nn.Linear(64, 48), "int8")
    for width, gated in ((128, False), (64, True)):
        with pytest.raises(ValueError, match=rf"int8 weight-only linear: x \[\.\.\., {width}\]"):
            layer(torch.randn(2, width), gated=gated)


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("gated", [False, True])
def test_weight_only_linear_picks_its_kernel(precision, rows, gated, monkeypatch):
    """Kernels.linear on a WeightOnlyLinear: int8 at one row (GEMV_ROWS) runs int8_gemv (SiLU(gate) * up inside it when
    gated: no silu_mul kernel), everything else silu_mul (gated) then weight_only_matmul; all equal the fallback
    (dequantise + F.linear after silu_mul_reference)."""
    import qwen_trtllm.kernels as kernels_pkg
    import qwen_trtllm.kernels.fp8_gemv as fp8_gemv_mod
    import qwen_trtllm.kernels.weight_only_gemm as wo_mod
    from qwen_trtllm.models.qwen.model import Kernels
    from qwen_trtllm.quantization import weight_only

    rec: list[str] = []
    for mod, name in ((kernels_pkg, "silu_mul"), (fp8_gemv_mod, "int8_gemv"), (wo_mod, "weight_only_matmul")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k: rec.append(_n) or _r(*a, **k))
    layer = WeightOnlyLinear.from_linear(torch.nn.Linear(128, 48, bias=True), precision, group_size=32).to(DEVICE)
    x = torch.randn(rows, 1, 256 if gated else 128, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
    layer.use_triton = False
    ref = Kernels(triton=False).linear(layer, x, gated=gated)
    layer.use_triton = True
    got = Kernels(triton=True).linear(layer, x, gated=gated)
    gemv = precision == "int8" and rows <= weight_only.GEMV_ROWS
    assert rec == (["int8_gemv"] if gemv else ["silu_mul"] * gated + ["weight_only_matmul"])
    assert got.shape == ref.shape == (rows, 1, 48) and _rel(got.cpu(), ref.double().cpu()) < 1e-5


# --- the module and the model -------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_only_linear(precision):
    lin = torch.nn.Linear(128, 48, bias=True)
    mod = WeightOnlyLinear.from_linear(lin, precision, group_size=32)
    assert mod.qweight.device == lin.weight.device and mod.bias.dtype == lin.bias.dtype
    assert set(mod.state_dict()) == {"qweight", "scales", "bias"}
    x = torch.randn(2, 3, 128)
    fallback = mod(x)
    ref = torch.nn.functional.linear(x.double(), mod.dequantized_weight(torch.float64), lin.bias.double())
    assert fallback.shape == (2, 3, 48) and _rel(fallback, ref) < 1e-6
    mod.use_triton = True  # the kernel (interpreted on CPU)
    assert _rel(mod.to(DEVICE)(x.to(DEVICE)).cpu(), ref) < 1e-3
    assert _rel(fallback, lin(x).detach()) < (0.02 if precision == "int8" else 0.2)


def _tiny_model(seed: int = 0) -> QWen:
    torch.manual_seed(seed)
    model = QWen(QWenConfig(**PRESETS["tiny"])).eval().requires_grad_(False)
    for name, p in model.named_parameters():  # unit-variance activations, as in a trained model
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 1.0 if name == "embed.weight" else p.shape[-1] ** -0.5)
    return model


def _logits(model: QWen, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] at every position of one prefill of tokens [1, T] (the model runner's prefill step)."""
    from qwen_trtllm.builder.engine_format import BuildConfig
    from qwen_trtllm.runtime import Engine, Executor, ExecutorConfig
    from qwen_trtllm.runtime.model_runner import StepPlan

    cfg, T = model.config, tokens.shape[1]
    build = BuildConfig("float32", max_batch_size=1, max_input_len=T, max_output_len=1)
    engine = Engine(Path("."), cfg, build, model, torch.device("cpu"), torch.float32)
    executor = Executor(engine, ExecutorConfig(cuda_graphs=False))
    blocks: list[int] = []
    executor.kv_cache.grow(blocks, T)
    plan = StepPlan(tokens[0].tolist(), list(range(T)), [T], [0], [blocks], [ntk_alpha(T, cfg.seq_length)], [0],
                    num_decode=0)
    with torch.inference_mode():
        return executor.runner.forward_plan(plan, all_logits=True)


def _weight_noise(model: QWen, precision: str, group: int, lm_head: bool) -> float:
    """RMS over the quantised layers of |w - dequant(quant(w))| / RMS(w): the relative output noise of one
    quantised matmul on inputs uncorrelated with the rounding errors."""
    errs = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and (name != "lm_head" or lm_head):
            w = m.weight
            deq = WeightOnlyLinear.from_linear(m, precision, group).dequantized_weight()
            errs.append(((w - deq).pow(2).mean() / w.pow(2).mean()).item())
    return math.sqrt(sum(errs) / len(errs))


@pytest.mark.parametrize("precision,lm_head", [("int8", False), ("int8", True), ("int4", False)])
def test_quantize_model_logits_and_reload(precision, lm_head):
    group = 16  # divides both the tiny preset's hidden size (64) and its MLP width (176)
    tokens = torch.randint(0, PRESETS["tiny"]["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(3))
    ref_model = _tiny_model()
    ref = _logits(ref_model, tokens)
    noise = _weight_noise(ref_model, precision, group, lm_head)
    fp_names = list(ref_model.state_dict())
    fp_state = {k: v.clone() for k, v in ref_model.state_dict().items()}

    model = quantize_model(_tiny_model(), precision, group, quantize_lm_head=lm_head)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["layers.1.attn.qkv"] == kinds["layers.0.mlp.c_proj"] == "WeightOnlyLinear"
    assert kinds["lm_head"] == ("WeightOnlyLinear" if lm_head else "Linear") and kinds["embed"] == "Embedding"
    err = _rel(_logits(model, tokens), ref)
    # Each quantised matmul adds relative output noise ~`noise` (int8 per channel: scale = amax/127, rounding
    # error RMS scale/sqrt(12), ~0.6% of RMS(w) for these Gaussian rows; int4 per 16-group: amax/7, ~8.5%).
    # Along the path to the logits the independent errors of the four matmuls per block (and lm_head) add
    # roughly in quadrature (sqrt(4) = 2) while the residual stream and the norms keep the scale: measured
    # 1.6-2.0x `noise` over seeds, so 3x leaves room for the draw: int8 <= ~2%, int4 <= ~26%, int8 < int4.
    assert err <= 3 * noise, (err, noise)
    assert noise < (0.012 if precision == "int8" else 0.12)

    state = model.state_dict()
    assert list(state) == quantized_state_dict_names(fp_names, precision, quantize_lm_head=lm_head)
    assert "layers.0.attn.qkv.qweight" in state and "layers.0.attn.qkv.bias" in state
    assert "layers.0.attn.qkv.weight" not in state and "embed.weight" in state
    assert state["layers.0.mlp.gate_up.qweight"].dtype == (torch.int8 if precision == "int8" else torch.uint8)
    built = quantize_state_dict(fp_state, precision, group, quantize_lm_head=lm_head)  # the builder's path
    assert list(built) == list(state) and all(torch.equal(built[k], state[k]) for k in state)

    with torch.device("meta"):
        skeleton = QWen(QWenConfig(**PRESETS["tiny"]))
    make_quantized_skeleton(skeleton, precision, group, quantize_lm_head=lm_head)
    assert {k: (v.shape, v.dtype) for k, v in skeleton.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in state.items()}
    skeleton.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    assert all(torch.equal(v, state[k]) for k, v in skeleton.state_dict().items())
    assert torch.equal(_logits(skeleton.eval(), tokens), _logits(model, tokens))


def test_int8_closer_than_int4():
    model = _tiny_model(1)
    tokens = torch.randint(0, PRESETS["tiny"]["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(4))
    ref = _logits(model, tokens)
    e8 = _rel(_logits(quantize_model(_tiny_model(1), "int8"), tokens), ref)
    e4 = _rel(_logits(quantize_model(_tiny_model(1), "int4", 16), tokens), ref)
    assert e8 < e4 / 4, (e8, e4)
