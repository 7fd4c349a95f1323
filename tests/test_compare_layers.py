"""compare_layers finds where a port goes wrong: nothing flagged for a correct engine, and planted bugs are
flagged first at the tensor where they enter (tiny random checkpoint, real vocabulary size, CPU)."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

from qwen_trtllm.builder.build import build_engine
from qwen_trtllm.checkpoint.random_checkpoint import swap_mlp_weights
from qwen_trtllm.evaluation.compare_layers import compare_layers, engine_tolerance, first_flagged, tensor_names
from qwen_trtllm.kernels import rotary as rotary_mod
from qwen_trtllm.models.qwen.reference import load_reference
from qwen_trtllm.runtime import Engine

ROOT = Path(__file__).resolve().parents[1]
TOKENS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 9707, 11, 1879, 0,
          151645, 198, 151644, 77091, 198]


def gptj_interleaved_rotary(x, cos, sin, rotary_dim):
    """The wrong rotary convention: rotate (even, odd) pairs instead of Qwen's two halves (apply_rotary_reference's
    signature: x [..., D], cos and sin [..., rotary_dim // 2] broadcasting against it)."""
    xf, x_pass = x.float()[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat((rot, x_pass), dim=-1) if x_pass.numel() else rot


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint, tiktoken_file) -> Path:
    return make_checkpoint(vocab_size=151936, tokenizer_file=tiktoken_file, seq_length=2048,
                           max_position_embeddings=2048)


@pytest.fixture(scope="module")
def engine_dir(checkpoint, tmp_path_factory) -> Path:
    return build_engine(tmp_path_factory.mktemp("cl") / "engine", hf_dir=checkpoint, dtype="float32",
                        max_batch_size=1, max_input_len=64, max_output_len=4)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return load_reference(checkpoint, torch.float32)


def test_correct_engine_nothing_flagged(engine_dir, reference):
    diffs = compare_layers(Engine.load(engine_dir, device="cpu"), reference, TOKENS)
    assert [d.name for d in diffs] == tensor_names(2)
    assert first_flagged(diffs) is None, [(d.name, d.rel_err) for d in diffs]
    assert all(d.rel_err < 1e-5 and d.cosine > 0.999999 for d in diffs)
    assert diffs[-1].shape == (len(TOKENS), 151936)


def test_swapped_mlp_weights_flag_that_mlp_first(checkpoint, reference, tmp_path):
    bad = swap_mlp_weights(checkpoint, tmp_path / "bad_ckpt", layer=1)
    eng = build_engine(tmp_path / "engine", hf_dir=bad, dtype="float32", max_batch_size=1, max_input_len=64,
                       max_output_len=4)
    diffs = compare_layers(Engine.load(eng, device="cpu"), reference, TOKENS)
    first = first_flagged(diffs)
    assert first is not None and first.name == "layers.1.mlp", first
    assert all(d.flagged for d in diffs[diffs.index(first):])  # everything downstream inherits it


def test_interleaved_rotary_flags_first_attention(engine_dir, reference, monkeypatch):
    monkeypatch.setattr(rotary_mod, "apply_rotary_reference", gptj_interleaved_rotary)  # the PyTorch path's rotary
    first = first_flagged(compare_layers(Engine.load(engine_dir, device="cpu"), reference, TOKENS))
    assert first is not None and first.name == "layers.0.attention", first


def test_fp16_engine_within_its_default_tolerance(checkpoint, reference, tmp_path):
    eng = build_engine(tmp_path / "engine", hf_dir=checkpoint, dtype="float16", max_batch_size=1, max_input_len=64,
                       max_output_len=4)
    diffs = compare_layers(Engine.load(eng, device="cpu"), reference, TOKENS)
    assert diffs[0].tol == 2e-2 and first_flagged(diffs) is None, [(d.name, d.rel_err) for d in diffs]
    assert first_flagged(compare_layers(Engine.load(eng, device="cpu"), reference, TOKENS, tol=1e-6)).name == \
        "embedding"  # fp16 storage of the embedding table is the first rounding


def test_tolerance_follows_the_ft_storage_type(checkpoint, reference, tmp_path, monkeypatch, capsys):
    """A float32 engine built from float16 FT files: the rounding of its stored weights is no bug (the float32
    tolerance blamed the embedding); the storage type is recorded in config.json, older engines still load."""
    from qwen_trtllm.checkpoint.ft_format import convert_checkpoint

    ft = convert_checkpoint(checkpoint, tmp_path / "ft", tp=1, storage_type="float16")
    eng = build_engine(tmp_path / "engine", ft_dir=ft, dtype="float32", max_batch_size=1, max_input_len=64,
                       max_output_len=4)
    config = json.loads((eng / "config.json").read_text())
    assert config["build"]["dtype"] == "float32" and config["build"]["source"]["storage_dtype"] == "float16"
    engine = Engine.load(eng, device="cpu")
    assert engine_tolerance(engine) == 2e-2
    diffs = compare_layers(engine, reference, TOKENS)
    assert diffs[0].tol == 2e-2 and first_flagged(diffs) is None, [(d.name, d.rel_err) for d in diffs]
    assert 1e-4 < diffs[0].rel_err < 1e-3  # the fp16 rounding of the embedding table: over float32's tolerance
    code, out, err = run_script(monkeypatch, capsys, "--engine_dir", str(eng), "--hf_model_dir", str(checkpoint),
                                "--device", "cpu", "--input_tokens", ",".join(map(str, TOKENS)))
    assert code == 0 and "from float16 FT files" in out and "relative error 0.02" in out, out + err
    old = tmp_path / "old_engine"  # an engine directory written before the record
    shutil.copytree(eng, old)
    del config["build"]["source"]["storage_dtype"]
    (old / "config.json").write_text(json.dumps(config))
    assert engine_tolerance(Engine.load(old, device="cpu")) == 1e-4
    engine.dtype = torch.float64  # run in another dtype: the built dtype's rounding still counts
    assert engine_tolerance(engine) == 2e-2


def run_script(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """examples/qwen/compare_layers.py run in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    script = ROOT / "examples/qwen/compare_layers.py"
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(script), run_name="__main__")
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli(engine_dir, checkpoint, tmp_path, monkeypatch, capsys):
    """The script, run in this process (no interpreter start-up): correct engine, planted bug, bad input."""
    flags = ["--engine_dir", str(engine_dir), "--hf_model_dir", str(checkpoint), "--device", "cpu"]
    in_process = lambda *args: run_script(monkeypatch, capsys, *args)

    code, out, err = in_process(*flags, "--input_text", "Hello, world!", "--reference_dtype", "float64")
    assert code == 0, err
    assert "no tensor over tolerance" in out and "layers.1.mlp" in out
    bad_engine = swap_mlp_weights(checkpoint, tmp_path / "bad_ckpt", layer=0)
    build_engine(tmp_path / "bad_engine", hf_dir=bad_engine, dtype="float32", max_batch_size=1, max_input_len=64,
                 max_output_len=4)
    code, out, _ = in_process("--engine_dir", str(tmp_path / "bad_engine"), *flags[2:], "--input_tokens", "1,2,3")
    assert code == 1 and "first tensor over tolerance: layers.0.mlp" in out
    code, _, err = in_process(*flags, "--input_tokens", "1,2,x")
    assert code == 2 and err.strip().startswith("error: --input_tokens") and len(err.splitlines()) == 1
