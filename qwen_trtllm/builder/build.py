"""Build an engine directory from an FT directory (hf_qwen_convert.py's output) or a Hugging Face checkpoint.

Weights are put into the runtime's layout here (transposed to nn.Linear's [out, in], gate/up fused, cast to the
engine dtype) so that loading an engine is a straight copy. Everything is validated before anything is written,
and the engine appears under its final name only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from qwen_trtllm import QWenError, __version__
from qwen_trtllm.builder.engine_format import (
    ARCHITECTURE,
    DTYPES,
    FORMAT_VERSION,
    TOKENIZER_FILES,
    BuildConfig,
    QuantizationConfig,
    rank_file,
)
from qwen_trtllm.config import QWenConfig
from qwen_trtllm.models.qwen.weights import fuse, iter_weights, shard

# TensorRT-LLM plugin flags and what they select in this engine (see README, "Build flags").
PLUGIN_FLAGS = ("use_gpt_attention_plugin", "use_gemm_plugin", "use_layernorm_plugin", "use_rmsnorm_plugin",
                "enable_context_fmha", "remove_input_padding")


def _ft_to_engine_layout(t: torch.Tensor, kind: str, hidden_size: int) -> torch.Tensor:
    """One rank's FT tensor as read_ft_rank returns it -> the engine's layout: linears [in, out] -> [out, in], the
    qkv weight [H, 3*H/tp] -> [3*H/tp, H], the qkv bias [3*H/tp]; norms and embeddings as they are."""
    if kind in ("global", "replicated"):
        return t
    if kind == "qkv":
        return t.reshape(hidden_size, -1).t()
    if kind == "qkv_bias":
        return t.reshape(-1)
    return t.t()  # column, row


def runtime_weights_from_ft(ft: dict[str, torch.Tensor], config: QWenConfig) -> dict[str, torch.Tensor]:
    """One rank's FT tensors ([in, out] linears) -> the runtime's state dict ([out, in], gate|up fused)."""
    return fuse((w, w.engine_name(i), _ft_to_engine_layout(ft[w.ft_name(i)], w.ft_kind, config.hidden_size))
                for w, i in iter_weights(config.num_hidden_layers))


def runtime_weights_from_hf(get, config: QWenConfig, rank: int, tp: int) -> dict[str, torch.Tensor]:
    """A Hugging Face checkpoint (get(name) -> tensor) -> one rank's runtime state dict: qkv [3*H/tp, H] (the
    rank's heads of q, k and v) + bias [3*H/tp], dense [H, H/tp], gate_up [2*F/tp, H], c_proj [H, F/tp]."""
    return fuse((w, w.engine_name(i), shard(get(w.hf_name(i)), w.split, rank, tp))
                for w, i in iter_weights(config.num_hidden_layers))


def _prepare_output(output_dir: Path) -> Path:
    if output_dir.exists() and not output_dir.is_dir():
        raise QWenError(f"--output_dir {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / "config.json").is_file():
        raise QWenError(f"--output_dir {output_dir} is a non-empty directory that is not an engine: "
                        "choose another --output_dir")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))


def build_engine(output_dir: str | Path, *, ft_dir: str | Path | None = None, hf_dir: str | Path | None = None,
                 dtype: str = "float16", max_batch_size: int = 8, max_input_len: int = 2048,
                 max_output_len: int = 2048, world_size: int = 1, plugins: dict | None = None,
                 kernels: str = "triton", weight_only_precision: str | None = None, group_size: int = 128,
                 quantize_lm_head: bool = False, tokens_per_block: int = 64, max_num_tokens: int = 8192,
                 kv_cache_dtype: str = "auto") -> Path:
    """Build the engine directory and return its path. Exactly one of ft_dir / hf_dir. weight_only_precision
    'int8' or 'int4' stores the linear layers quantised (TensorRT-LLM's --use_weight_only). tokens_per_block
    (tokens per KV cache block) and max_num_tokens (tokens per in-flight batching step, chunked prefill) are
    the runtime's defaults, recorded as TensorRT-LLM records them. kv_cache_dtype "int8" / "fp8" (--int8_kv_cache
    / --fp8_kv_cache): the runtime stores K and V as int8 / e4m3 codes with a scale per token and head, computed
    as the cache is written (no calibration: nothing changes in the weights)."""
    if (ft_dir is None) == (hf_dir is None):
        raise QWenError("give exactly one of --model_dir (FT directory) or --hf_model_dir (Hugging Face checkpoint)")
    quant = lambda: QuantizationConfig(weight_only_precision, group_size, quantize_lm_head) \
        if weight_only_precision else None
    if weight_only_precision is None and group_size < 1:
        raise QWenError(f"--group_size must be >= 1, got {group_size}")
    settings = dict(dtype=dtype, world_size=world_size, max_batch_size=max_batch_size, max_input_len=max_input_len,
                    max_output_len=max_output_len, max_num_tokens=max_num_tokens, tokens_per_block=tokens_per_block,
                    kernels=kernels, kv_cache_dtype=kv_cache_dtype,
                    plugins={k: v for k, v in (plugins or {}).items() if k in PLUGIN_FLAGS},
                    builder_version=__version__, torch_version=torch.__version__)
    BuildConfig(quantization=quant(), **settings)  # validates every value before any work
    if ft_dir is not None:
        from qwen_trtllm.checkpoint.ft_format import read_ft_config, read_ft_rank

        src = Path(ft_dir)
        config, info = read_ft_config(src)
        if int(info["tensor_parallelism"]) != world_size:
            raise QWenError(f"{src} was converted for {info['tensor_parallelism']} rank(s) but --world_size is "
                            f"{world_size}: pass --world_size {info['tensor_parallelism']} or re-run "
                            f"hf_qwen_convert.py with --tensor-parallelism {world_size}")
        rank_weights = lambda r: runtime_weights_from_ft(read_ft_rank(src, r), config)
        source = {"ft_dir": str(src), "storage_dtype": info.get("storage_dtype")}
    else:
        from qwen_trtllm.checkpoint.gptq import gptq_group_size, is_gptq_checkpoint, runtime_weights_from_gptq
        from qwen_trtllm.checkpoint.hf_checkpoint import HFCheckpoint

        src = Path(hf_dir)
        ckpt = HFCheckpoint(src)
        config = ckpt.config
        source = {"hf_model_dir": str(src)}
        if is_gptq_checkpoint(src):  # already int4: its weights are repacked, not re-quantised
            if world_size != 1 or weight_only_precision not in (None, "int4"):
                raise QWenError(f"{src} is a GPTQ int4 checkpoint: build it with --world_size 1 and no other "
                                "--weight_only_precision than int4")
            weight_only_precision, group_size, quantize_lm_head = "int4", gptq_group_size(src), False
            gptq = runtime_weights_from_gptq(ckpt, config, group_size)
            rank_weights = lambda r: gptq
            source["gptq"] = True
        else:
            ckpt.validate()
            rank_weights = lambda r: runtime_weights_from_hf(ckpt.get, config, r, world_size)
    config.check_tensor_parallel(world_size)

    out = Path(output_dir)
    tmp = _prepare_output(out)
    try:
        for r in tqdm(range(world_size), desc="building ranks", disable=world_size == 1):
            weights = {k: v if k.endswith((".qweight", ".scales")) else v.to(DTYPES[dtype]).contiguous()
                       for k, v in rank_weights(r).items()}  # packed GPTQ weights keep their storage types
            if weight_only_precision and not source.get("gptq"):
                from qwen_trtllm.quantization import quantize_state_dict

                weights = quantize_state_dict(weights, weight_only_precision, group_size, quantize_lm_head)
            save_file(weights, str(rank_file(tmp, r)), metadata={"format": "pt"})
            del weights
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        build = BuildConfig(quantization=quant(), source=source, **settings)
        (tmp / "config.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "architecture": ARCHITECTURE,
                                                     "model": config.to_dict(), "build": build.to_dict()}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
