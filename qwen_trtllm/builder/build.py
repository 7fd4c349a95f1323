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
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

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
from qwen_trtllm.cli import check_output_dir, default_mode, give_default_mode
from qwen_trtllm.config import QWenConfig
from qwen_trtllm.dtypes import dtype_name
from qwen_trtllm.logger import LOGGER, format_duration, progress
from qwen_trtllm.models.qwen.weights import fuse, iter_weights, shard
from qwen_trtllm.tokenizer import TIKTOKEN_FILE

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


def runtime_weights_from_ft(ft: dict[str, torch.Tensor], config: QWenConfig, rank: int,
                            tp: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s FT tensors ([in, out] linears) -> its runtime state dict ([out, in], gate|up fused); the
    global rows, whole in the FT directory, are split here (lm_head: the rank's vocabulary rows)."""

    def tensor(w, i: int | None) -> torch.Tensor:
        t = _ft_to_engine_layout(ft[w.ft_name(i)], w.ft_kind, config.hidden_size)
        return shard(t, w.split, rank, tp) if w.ft_kind == "global" else t

    return fuse((w, w.engine_name(i), tensor(w, i)) for w, i in iter_weights(config.num_hidden_layers))


def runtime_weights_from_hf(get, config: QWenConfig, rank: int, tp: int) -> dict[str, torch.Tensor]:
    """A Hugging Face checkpoint (get(name) -> tensor) -> one rank's runtime state dict: qkv [3*H/tp, H] (the
    rank's heads of q, k and v) + bias [3*H/tp], dense [H, H/tp], gate_up [2*F/tp, H], c_proj [H, F/tp]."""
    return fuse((w, w.engine_name(i), shard(get(w.hf_name(i)), w.split, rank, tp))
                for w, i in iter_weights(config.num_hidden_layers))


def is_engine_dir(d: Path) -> bool:
    """Whether d holds an engine (its config.json names this engine's architecture)."""
    try:
        return json.loads((d / "config.json").read_text()).get("architecture") == ARCHITECTURE
    except (OSError, ValueError, AttributeError):
        return False


def check_output(output_dir: Path, force: bool, source: Path | None = None) -> None:
    """The one rule of build.py and hf_qwen_convert.py: a missing or empty output directory is written; an existing
    output of the same kind (here an engine) is replaced only with --force, and only once the new one is complete;
    anything else (a file, a non-empty directory of another kind, the source itself) is never replaced."""
    check_output_dir(output_dir, "--output_dir")
    if source is not None and output_dir.resolve() == source.resolve():
        raise QWenError(f"--output_dir {output_dir} is the checkpoint being built: choose another --output_dir")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if not is_engine_dir(output_dir):
        raise QWenError(f"--output_dir {output_dir} is a non-empty directory that is not an engine: "
                        "choose another --output_dir")
    if not force:
        raise QWenError(f"--output_dir {output_dir} already holds an engine: pass --force to replace it, or choose "
                        "another --output_dir")


def _temporary_output(output_dir: Path) -> Path:
    """An empty sibling of output_dir that becomes it when complete; the umask's directory mode (not mkdtemp's
    0700: other users read engines)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    os.chmod(tmp, default_mode(directory=True))
    return tmp


def check_finite(t: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """t, or a QWenError naming the tensor when it holds NaN or Inf values."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise QWenError(f"tensor {name} of {where} holds NaN or Inf values: the checkpoint is damaged; "
                        "re-download (or re-convert) it")
    return t


def _tokenizer_source(src: Path, tokenizer_dir: str | Path | None, config: QWenConfig) -> dict[str, Path]:
    """The tokenizer files to copy into the engine: --tokenizer_dir's first, then the checkpoint's."""
    files = {name: src / name for name in TOKENIZER_FILES if (src / name).is_file()}
    if tokenizer_dir is not None:
        d = Path(tokenizer_dir)
        if not d.is_file() and not (d / TIKTOKEN_FILE).is_file():
            raise QWenError(f"--tokenizer_dir {d} has no {TIKTOKEN_FILE}: point it at the Hugging Face checkpoint "
                            f"directory that holds {TIKTOKEN_FILE}")
        from qwen_trtllm.tokenizer import QWenTokenizer

        n = QWenTokenizer.from_dir(d).vocab_size
        if n > config.vocab_size:
            raise QWenError(f"--tokenizer_dir {d}: its tokenizer has {n} ids but the model's vocabulary is "
                            f"{config.vocab_size}: it is not this model's tokenizer")
        if d.is_file():  # the qwen.tiktoken file itself
            files[TIKTOKEN_FILE] = d
        else:
            files.update({name: d / name for name in TOKENIZER_FILES if (d / name).is_file()})
    return files


def _check_group_size(config: QWenConfig, world_size: int, group_size: int, quantize_lm_head: bool) -> None:
    """Every int4 layer of every rank against --group_size, from the shapes alone (before any work)."""
    from qwen_trtllm.quantization import check_group_size, is_quantized_layer
    from qwen_trtllm.runtime.engine import model_skeleton

    for k, v in model_skeleton(config, world_size, None).state_dict().items():
        if k.endswith(".weight") and is_quantized_layer(k[: -len(".weight")], quantize_lm_head):
            check_group_size(tuple(v.shape), group_size, k[: -len(".weight")])


def build_engine(output_dir: str | Path, *, ft_dir: str | Path | None = None, hf_dir: str | Path | None = None,
                 dtype: str = "float16", max_batch_size: int = 8, max_input_len: int = 2048,
                 max_output_len: int = 2048, world_size: int = 1, plugins: dict | None = None,
                 kernels: str = "triton", weight_only_precision: str | None = None, group_size: int | None = None,
                 quantize_lm_head: bool = False, tokens_per_block: int = 64, max_num_tokens: int = 8192,
                 tokenizer_dir: str | Path | None = None, force: bool = False,
                 kv_cache_dtype: str = "auto", use_fp8: bool = False) -> Path:
    """Build the engine directory and return its path. Exactly one of ft_dir / hf_dir. weight_only_precision
    'int8' or 'int4' stores the linear layers quantised (TensorRT-LLM's --use_weight_only; group_size: int4's
    input channels per scale, default 128). tokens_per_block (tokens per KV cache block) and max_num_tokens
    (tokens per in-flight batching step, chunked prefill) are the runtime's defaults, recorded as TensorRT-LLM
    records them. tokenizer_dir: where qwen.tiktoken comes from when the checkpoint has none. force: replace an
    existing engine at output_dir. dtype accepts the aliases fp32, fp16, bf16. kv_cache_dtype "int8" / "fp8"
    (--int8_kv_cache / --fp8_kv_cache): the runtime stores K and V as int8 / e4m3 codes with a scale per token and
    head, computed as the cache is written (no calibration: nothing changes in the weights). use_fp8 (--use_fp8):
    the linear layers as e4m3 with a float32 scale per output channel, activations quantised per token at run time
    (quantization/fp8.py); exclusive with weight_only_precision. quantize_lm_head: lm_head in the linears' format
    too (int8 / int4 / e4m3), otherwise it stays in dtype; the embedding always does."""
    t_start = time.monotonic()
    if (ft_dir is None) == (hf_dir is None):
        raise QWenError("give exactly one of --model_dir (FT directory) or --hf_model_dir (Hugging Face checkpoint)")
    dtype = dtype_name(dtype, flag="--dtype")
    src = Path(ft_dir if ft_dir is not None else hf_dir)
    out = Path(output_dir)
    check_output(out, force, src)
    if use_fp8 and weight_only_precision is not None:
        raise QWenError("--use_fp8 and --use_weight_only are mutually exclusive: give one of them")
    if use_fp8 and group_size is not None:
        raise QWenError("--group_size does not apply to --use_fp8 (e4m3 with one scale per output channel): drop it")
    if weight_only_precision is None and group_size is not None:
        raise QWenError("--group_size applies to weight-only int4 only: add --use_weight_only "
                        "--weight_only_precision int4 or drop it")
    if weight_only_precision is None and not use_fp8 and quantize_lm_head:
        raise QWenError("--quantize_lm_head applies to quantised engines only: add --use_weight_only or --use_fp8")
    if weight_only_precision == "int8" and group_size is not None:
        raise QWenError("--group_size applies to int4 only: add --weight_only_precision int4 or drop it")
    explicit_group_size, group_size = group_size, group_size or 128
    quant = lambda: QuantizationConfig("fp8", quantize_lm_head=quantize_lm_head) if use_fp8 else \
        QuantizationConfig(weight_only_precision, group_size, quantize_lm_head) if weight_only_precision else None
    settings = dict(dtype=dtype, world_size=world_size, max_batch_size=max_batch_size, max_input_len=max_input_len,
                    max_output_len=max_output_len, max_num_tokens=max_num_tokens, tokens_per_block=tokens_per_block,
                    kernels=kernels, kv_cache_dtype=kv_cache_dtype,
                    plugins={k: v for k, v in (plugins or {}).items() if k in PLUGIN_FLAGS},
                    builder_version=__version__, torch_version=torch.__version__)
    BuildConfig(quantization=quant(), **settings)  # validates every value before any work
    reading = [None]  # the progress bar of the source tensors being read (Hugging Face checkpoints)
    if ft_dir is not None:
        from qwen_trtllm.checkpoint.ft_format import read_ft_config, read_ft_rank

        config, info = read_ft_config(src)
        if int(info["tensor_parallelism"]) != world_size:
            raise QWenError(f"{src} was converted for {info['tensor_parallelism']} rank(s) but --world_size is "
                            f"{world_size}: pass --world_size {info['tensor_parallelism']} or re-run "
                            f"hf_qwen_convert.py with --tensor-parallelism {world_size}")

        def rank_weights(r: int) -> dict[str, torch.Tensor]:
            ft = {k: check_finite(t, k, f"{src} (rank {r})") for k, t in read_ft_rank(src, r).items()}
            return runtime_weights_from_ft(ft, config, r, world_size)

        source = {"ft_dir": str(src), "storage_dtype": info.get("storage_dtype")}
    else:
        from qwen_trtllm.checkpoint.gptq import gptq_group_size, is_gptq_checkpoint, runtime_weights_from_gptq
        from qwen_trtllm.checkpoint.hf_checkpoint import HFCheckpoint

        ckpt = HFCheckpoint(src)
        config = ckpt.config
        source = {"hf_model_dir": str(src)}
        if is_gptq_checkpoint(src) and use_fp8:
            raise QWenError(f"{src} is a GPTQ int4 checkpoint: --use_fp8 needs the float weights; build it without "
                            "--use_fp8 or from the unquantised checkpoint")
        if is_gptq_checkpoint(src):  # already int4: its weights are repacked, not re-quantised
            gptq_groups = gptq_group_size(src)
            if world_size != 1 or weight_only_precision not in (None, "int4") or quantize_lm_head or \
                    explicit_group_size not in (None, gptq_groups):
                raise QWenError(f"{src} is a GPTQ int4 checkpoint (group size {gptq_groups}): build it with "
                                "--world_size 1 and no other --weight_only_precision than int4, --group_size than "
                                "its own, nor --quantize_lm_head")
            weight_only_precision, group_size = "int4", gptq_groups
            rank_weights = lambda r: runtime_weights_from_gptq(ckpt, config, group_size)
            source["gptq"] = True
        else:
            ckpt.validate()

            def get(name: str) -> torch.Tensor:
                t = check_finite(ckpt.get(name), name, str(src))
                if reading[0] is not None:
                    reading[0].update(1)
                return t

            rank_weights = lambda r: runtime_weights_from_hf(get, config, r, world_size)
    config.check_tensor_parallel(world_size)
    if weight_only_precision == "int4" and not source.get("gptq"):
        _check_group_size(config, world_size, group_size, quantize_lm_head)
    tokenizer_files = _tokenizer_source(src, tokenizer_dir, config)
    if TIKTOKEN_FILE not in tokenizer_files:
        LOGGER.warning(f"{src} has no {TIKTOKEN_FILE}: the engine will take token ids only (run.py "
                       "--input_tokens); to give it the tokenizer pass build.py --tokenizer_dir <the Hugging Face "
                       "checkpoint directory>, or run.py --tokenizer_dir")

    LOGGER.info(f"building {out} from {src}: {dtype}, {world_size} rank(s)"
                f"{f', weight-only {weight_only_precision}' if weight_only_precision else ''}"
                f"{', fp8 (e4m3) linears' if use_fp8 else ''}")
    tmp = _temporary_output(out)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        for r in range(world_size):
            if ft_dir is None and not source.get("gptq"):
                n = sum(1 for _ in iter_weights(config.num_hidden_layers))
                with progress(n, f"rank {r}: reading {src}") as reading[0]:
                    state = rank_weights(r)
            else:
                t0 = time.monotonic()
                state = rank_weights(r)
                LOGGER.info(f"rank {r}: read {src} in {format_duration(time.monotonic() - t0)}")
            weights = {}
            with progress(len(state), f"rank {r}: converting to {dtype}") as bar:
                for k in list(state):
                    v = state.pop(k)  # (the source copy goes as its engine copy comes)
                    if not k.endswith((".qweight", ".scales")):  # packed GPTQ weights keep their storage types
                        v = v.to(DTYPES[dtype]).contiguous()
                    if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                        raise QWenError(f"tensor {k} is NaN or Inf in the engine's {dtype}: " + (
                            "a checkpoint value is beyond float16's range (+-65504); build with --dtype bfloat16 or "
                            "float32" if dtype == "float16" and not source.get("gptq") else
                            "the checkpoint holds NaN or Inf values; re-download it"))
                    weights[k] = v
                    bar.update(1)
            del state
            kind = "fp8" if use_fp8 else weight_only_precision
            if kind and not source.get("gptq"):
                from qwen_trtllm.quantization import quantize_state_dict

                LOGGER.info(f"rank {r}: quantising the linear layers{' and lm_head' if quantize_lm_head else ''} "
                            f"to {kind}")
                weights = quantize_state_dict(weights, kind, group_size, quantize_lm_head)
            nbytes = sum(t.nbytes for t in weights.values())
            LOGGER.info(f"rank {r}: writing {rank_file(out, r).name} ({nbytes / 1e9:.2f} GB)")
            save_file(weights, str(rank_file(tmp, r)), metadata={"format": "pt"})
            give_default_mode(rank_file(tmp, r))
            del weights
        for name, path in tokenizer_files.items():
            shutil.copyfile(path, tmp / name)
        build = BuildConfig(quantization=quant(), source=source, **settings)
        (tmp / "config.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "architecture": ARCHITECTURE,
                                                     "model": config.to_dict(), "build": build.to_dict()}, indent=2))
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as e:
        raise QWenError(f"writing {out} failed: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    LOGGER.info(f"Total time of building all engines: {format_duration(time.monotonic() - t_start)}")
    return out
