"""Weight-only int8/int4 engines end to end on a tiny checkpoint: build flags, loading, accuracy bounds, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_paths import assert_triton_path_matches_plain
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


def cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples/qwen" / script), *args], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    common = ["--hf_model_dir", str(tiny_checkpoint), "--dtype", "float16", "--max_batch_size", "8",
              "--max_input_len", "48", "--max_output_len", "24"]
    out = {}
    for name, extra in (("fp16", []), ("int8", ["--use_weight_only", "--weight_only_precision", "int8"]),
                        ("int4", ["--use_weight_only", "--weight_only_precision", "int4", "--group_size", "16"])):
        r = cli("build.py", *common, *extra, "--output_dir", str(d / name))
        assert r.returncode == 0, r.stderr
        out[name] = d / name
    return out


def test_engine_files_hold_packed_weights(engines):
    with safe_open(str(engines["int4"] / "rank0.safetensors"), "pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("layers.0.mlp.gate_up.qweight")
        s = f.get_tensor("layers.0.mlp.gate_up.scales")
    assert "layers.0.mlp.gate_up.weight" not in keys and "lm_head.weight" in keys  # lm_head stays fp16
    assert str(q.dtype) == "torch.uint8" and q.shape[1] == 64 // 2 and s.shape[1] == 64 // 16
    sizes = {k: (v / "rank0.safetensors").stat().st_size for k, v in engines.items()}
    assert sizes["int4"] < sizes["int8"] < sizes["fp16"]


# Bounds for a random tiny model (hidden 64, vocab 1024): the per-weight quantisation error is ~0.3% rms for int8
# and ~8% for int4 (7 levels per sign, groups of 16), and random-weight logits are full of near-ties, so top-1
# agreement measured 98% (int8) and 77% (int4) over 64 x 32 positions. The bounds leave room for seed noise and
# still fail on a broken kernel or a wrong scale (which give chance-level agreement, ~0.1%).
@pytest.mark.parametrize("name,min_top1", [("int8", 0.95), ("int4", 0.6)])
def test_teacher_forced_agreement_with_fp16(engines, name, min_top1):
    r = cli("eval_accuracy.py", "--engine_dir", str(engines[name]), "--reference_engine_dir", str(engines["fp16"]),
            "--num_prompts", "64", "--prompt_len", "16", "--steps", "32", "--batch_size", "8",
            "--min_top1", str(min_top1))
    assert r.returncode == 0, r.stdout + r.stderr


def test_run_py_on_a_quantised_engine(engines, tmp_path):
    tokens = tmp_path / "t.csv"
    tokens.write_text("1,2,3,4\n")
    r = cli("run.py", "--engine_dir", str(engines["int8"]), "--input_tokens", str(tokens), "--max_output_len", "5",
            "--top_k", "1")
    assert r.returncode == 0 and "Output:" in r.stdout, r.stderr


def test_group_size_not_dividing_is_one_line_error(tiny_checkpoint, tmp_path):
    r = cli("build.py", "--hf_model_dir", str(tiny_checkpoint), "--use_weight_only", "--weight_only_precision",
            "int4", "--group_size", "48", "--output_dir", str(tmp_path / "bad"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "group_size 48" in r.stderr
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_int8_engine_triton_path_matches_plain(tiny_checkpoint, tmp_path, monkeypatch):
    """A float32 int8 engine with its Triton kernels (the interpreter on CPU) against its PyTorch path (dequantise
    + F.linear): the same teacher-forced logits to float32 rounding. Batch-1 decode steps take int8_gemv
    (kernels/fp8_gemv.py) in every linear layer, with SiLU*mul fused into c_proj; the prefills and batch-3 decode
    take the weight-only matmul (tests/test_weight_only.py covers that kernel and the routing at every row count)."""

    import qwen_trtllm.kernels.fp8_gemv as fp8_gemv_mod
    from qwen_trtllm.builder.build import build_engine
    from qwen_trtllm.kernels import triton_available
    from qwen_trtllm.runtime import LLM, Engine, ExecutorConfig, KvCacheConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = build_engine(tmp_path / "int8", hf_dir=tiny_checkpoint, dtype="float32", max_batch_size=8,
                        max_input_len=48, max_output_len=24, weight_only_precision="int8")
    engine = Engine.load(path, device=device)
    if not triton_available(engine.device):
        pytest.skip("Triton kernels unavailable on this device")
    rows: list[tuple[int, bool]] = []
    real = fp8_gemv_mod.int8_gemv
    monkeypatch.setattr(fp8_gemv_mod, "int8_gemv", lambda x, *a, gated=False, **k: rows.append((x.shape[0], gated))
                        or real(x, *a, gated=gated, **k))
    llm = LLM.from_engine(engine, config=ExecutorConfig(kv_cache=KvCacheConfig(max_tokens=3 * 64), cuda_graphs=False))
    g = torch.Generator().manual_seed(0)
    for lens in ((5, 3, 4), (6,)):
        prompts = [torch.randint(0, engine.config.vocab_size, (n,), generator=g).tolist() for n in lens]
        forced = torch.randint(0, engine.config.vocab_size, (len(lens), 3), generator=g)
        assert_triton_path_matches_plain(engine, llm, prompts, forced)
    layers = engine.config.num_hidden_layers  # 2 decode steps of 1 row: qkv, dense, gate_up, gated c_proj
    assert sorted(set(rows)) == [(1, False), (1, True)] and len(rows) == 2 * layers * 4
    assert rows.count((1, True)) == 2 * layers


def test_quantized_engine_shares_the_unquantised_tensors():
    """benchmark.py's in-memory quantised copy (its new tensors made again after the quantiser's temporaries are
    freed, on CUDA): the quantised layers equal quantize_state_dict's, the rest is the original's storage."""

    from qwen_trtllm.evaluation.benchmark import quantized_engine, random_engine
    from qwen_trtllm.quantization import quantize_state_dict

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = random_engine("tiny", "float32" if device == "cpu" else "float16", device, max_batch_size=2,
                         max_input_len=16, max_output_len=8)
    q = quantized_engine(base, "int8")
    state, got = base.model.state_dict(), q.model.state_dict()
    want = quantize_state_dict(state, "int8")
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].device == v.device and torch.equal(got[k], v), k
        assert (got[k].data_ptr() == v.data_ptr()) == (k in state), k  # only the unquantised tensors are shared


def test_bench_engine_refuses_a_batch_its_kv_cache_cannot_hold(monkeypatch):
    """A pool one block short of the static batch, or with no block at all: QWenError, no row (the batch would run
    in waves and its decode ms/token would count a later wave's prefill); the full pool gives a row (CUDA: the
    timing needs it; the refusals come first and run anywhere)."""
    from qwen_trtllm import QWenError
    from qwen_trtllm.evaluation import benchmark as bm
    from qwen_trtllm.runtime import executor

    cuda = torch.cuda.is_available()
    engine = bm.random_engine("tiny", "float16" if cuda else "float32", "cuda" if cuda else "cpu", max_batch_size=4,
                              max_input_len=16, max_output_len=8)
    if cuda:
        row = bm.bench_engine(engine, 4, 16, 8, runs=1)
        assert row.batch == 4 and row.decode_ms_per_token > 0
    sized = executor.pool_size_in_blocks
    monkeypatch.setattr(executor, "pool_size_in_blocks", lambda *a, **k: sized(*a, **k) - 1)
    with pytest.raises(QWenError, match="the KV cache holds 192 tokens, 4 x 24 needs 256 in 64-token"):
        bm.bench_engine(engine, 4, 16, 8, runs=1)
    monkeypatch.setattr(executor, "pool_size_in_blocks", lambda *a, **k: 1)  # the null block only
    with pytest.raises(QWenError, match="room for no block"):
        bm.bench_engine(engine, 4, 16, 8, runs=1)
