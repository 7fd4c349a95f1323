"""The engine directory: config.json (model + build config, format version), rank{r}.safetensors (weights in the
runtime's layout, fused and cast at build), and the tokenizer files and generation_config.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwen_trtllm import QWenError
from qwen_trtllm.checkpoint.ft_format import TOKENIZER_FILES  # noqa: F401  (re-exported: copied into engines)
from qwen_trtllm.config import QWenConfig

FORMAT_VERSION = 1
ARCHITECTURE = "QWenForCausalLM"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_engine_config(engine_dir: str | Path) -> tuple[QWenConfig, dict]:
    """(model config, build config) of an engine directory, validated."""
    d = Path(engine_dir)
    path = d / "config.json"
    if not d.is_dir():
        raise QWenError(f"engine directory {d} does not exist: build one with examples/qwen/build.py")
    if not path.is_file():
        raise QWenError(f"{path} not found: {d} is not an engine directory; build one with examples/qwen/build.py")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise QWenError(f"{path} is corrupt ({e}): rebuild the engine with examples/qwen/build.py") from None
    if cfg.get("architecture") != ARCHITECTURE or cfg.get("format_version") != FORMAT_VERSION:
        raise QWenError(f"{path} is not a {ARCHITECTURE} engine of format {FORMAT_VERSION}: rebuild the engine "
                        "with this version's examples/qwen/build.py")
    try:
        model, build = QWenConfig.from_dict(cfg["model"]), cfg["build"]
        for key in ("dtype", "world_size", "max_batch_size", "max_input_len", "max_output_len"):
            build[key]
    except KeyError as e:
        raise QWenError(f"{path} lacks {e}: rebuild the engine with examples/qwen/build.py") from None
    return model, build


def rank_file(engine_dir: str | Path, rank: int) -> Path:
    return Path(engine_dir) / f"rank{rank}.safetensors"
