"""The engine directory: config.json (model + build config, format version), rank{r}.safetensors (weights in the
runtime's layout, fused and cast at build), and the tokenizer files and generation_config.json.

Reading an engine needs nothing from the converters: this module, the model config and the tokenizer's file list."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qwen_trtllm import QWenError
from qwen_trtllm.config import QWenConfig
from qwen_trtllm.dtypes import DTYPES, dtype_name  # noqa: F401  (DTYPES re-exported: the one table)
from qwen_trtllm.tokenizer import TOKENIZER_FILES  # noqa: F401  (re-exported: copied into engines)

FORMAT_VERSION = 1
ARCHITECTURE = "QWenForCausalLM"


KERNELS = ("triton", "torch")
KV_CACHE_DTYPES = ("auto", "int8", "fp8")  # the KV cache's format: the model's dtype, or codes + scales


@dataclass(frozen=True)
class QuantizationConfig:
    """Quantisation of the engine's linear layers: weight-only int8 / int4 (TensorRT-LLM's --use_weight_only) or
    fp8 (--use_fp8: e4m3 weights with per-channel scales, activations quantised per token; mode "fp8")."""

    precision: str  # "int8" | "int4" | "fp8"
    group_size: int = 128  # int4: input channels per scale
    quantize_lm_head: bool = False  # lm_head quantised too (in the layers' precision); the embedding never is
    mode: str = "weight_only"  # "weight_only" | "fp8" (set from precision fp8)

    def __post_init__(self) -> None:
        if self.precision == "fp8":
            object.__setattr__(self, "mode", "fp8")
        elif self.precision not in ("int8", "int4") or self.mode != "weight_only":
            raise QWenError(f"--weight_only_precision {self.precision} is not one of int8, int4")
        if self.group_size < 1:
            raise QWenError(f"--group_size must be >= 1, got {self.group_size}")


@dataclass(frozen=True)
class BuildConfig:
    """The engine's build settings, validated and immutable; config.json's "build" section.

    dtype: "float32" | "float16" | "bfloat16"; max_batch_size: requests in flight; max_input_len /
    max_output_len: tokens per prompt / per output; max_num_tokens: tokens per in-flight batching step;
    tokens_per_block: tokens per KV cache block; kernels: "triton" (fused Triton kernels on CUDA) or "torch";
    kv_cache_dtype: "auto" (K and V in dtype), "int8" or "fp8" (e4m3 codes; both with a float32 scale per token and
    head computed as the cache is written: build.py --int8_kv_cache / --fp8_kv_cache)."""

    dtype: str
    world_size: int = 1
    max_batch_size: int = 8
    max_input_len: int = 2048
    max_output_len: int = 2048
    max_num_tokens: int = 8192
    tokens_per_block: int = 64
    kernels: str = "triton"
    kv_cache_dtype: str = "auto"
    quantization: QuantizationConfig | None = None
    plugins: Mapping[str, str] = field(default_factory=dict)
    source: Mapping[str, object] = field(default_factory=dict)
    builder_version: str = ""
    torch_version: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype, flag="--dtype"))  # aliases: fp16 -> float16
        for name in ("max_batch_size", "max_input_len", "max_output_len", "world_size", "max_num_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise QWenError(f"--{name} must be >= 1, got {v}")
        if self.tokens_per_block not in (16, 32, 64, 128):
            raise QWenError(f"--tokens_per_block {self.tokens_per_block} must be 16, 32, 64 or 128")
        if self.kernels not in KERNELS:
            raise QWenError(f"--kernels {self.kernels} is not one of {', '.join(KERNELS)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise QWenError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}: "
                            "rebuild with --int8_kv_cache, --fp8_kv_cache or neither")

    @property
    def max_seq_len(self) -> int:
        return self.max_input_len + self.max_output_len

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kernels"] = {"decode": self.kernels, "prefill_attention": "paged_flash", "gemm": "cublas"}
        d["plugins"], d["source"] = dict(self.plugins), dict(self.source)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> BuildConfig:
        """From config.json's "build" section (engines written before max_num_tokens / tokens_per_block /
        kv_cache_dtype existed get the defaults). Raises KeyError for a missing required key, QWenError for a bad
        value."""
        v = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        v["dtype"] = d["dtype"]
        for key in ("world_size", "max_batch_size", "max_input_len", "max_output_len"):
            v[key] = d[key]
        if isinstance(v.get("kernels"), Mapping):
            v["kernels"] = v["kernels"].get("decode", "triton")
        if v.get("quantization"):
            q = v["quantization"]
            v["quantization"] = QuantizationConfig(q["precision"], q.get("group_size", 128),
                                                   q.get("quantize_lm_head", False), q.get("mode", "weight_only"))
        try:
            return cls(**v)
        except TypeError as e:
            raise QWenError(f"bad build config: {e}") from None


def read_engine_config(engine_dir: str | Path) -> tuple[QWenConfig, BuildConfig]:
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
        model, build = QWenConfig.from_dict(cfg["model"]), BuildConfig.from_dict(cfg["build"])
    except KeyError as e:
        raise QWenError(f"{path} lacks {e}: rebuild the engine with examples/qwen/build.py") from None
    return model, build


def rank_file(engine_dir: str | Path, rank: int) -> Path:
    return Path(engine_dir) / f"rank{rank}.safetensors"
