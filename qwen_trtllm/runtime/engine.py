"""Loading an engine directory onto a device: the engine's config decides everything."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qwen_trtllm import QWenError
from qwen_trtllm.builder.engine_format import DTYPES, BuildConfig, QuantizationConfig, rank_file, read_engine_config
from qwen_trtllm.config import QWenConfig
from qwen_trtllm.logger import LOGGER
from qwen_trtllm.models.qwen.model import QWen


def default_device(rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def check_dtype_supported(dtype: torch.dtype, device: torch.device) -> None:
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise QWenError(f"this engine is bfloat16 but {torch.cuda.get_device_name(device)} cannot run bfloat16: "
                        "rebuild with --dtype float16")


def check_kv_cache_supported(kv_cache_dtype: str, device: torch.device, triton: bool) -> None:
    """An fp8 KV cache through the Triton kernels needs fp8 e4m3 conversions in hardware (sm_89+: Ada, Hopper);
    the PyTorch references (CPU, --kernels torch) run it anywhere."""
    if kv_cache_dtype == "fp8" and triton and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise QWenError(f"this engine's fp8 KV cache needs an sm_89+ GPU (Ada, Hopper) for its Triton kernels, "
                            f"but {torch.cuda.get_device_name(device)} is sm_{major}{minor}: rebuild with "
                            "--int8_kv_cache (or --kernels torch)")


@dataclass
class Engine:
    """A loaded engine: the model of this rank on its device, and the engine's configs."""

    engine_dir: Path
    config: QWenConfig
    build: BuildConfig
    model: QWen
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1

    @classmethod
    def load(cls, engine_dir: str | Path, device: str | torch.device | None = None, rank: int = 0,
             world_size: int = 1) -> Engine:
        engine_dir = Path(engine_dir)
        config, build = read_engine_config(engine_dir)
        if build.world_size != world_size:
            raise QWenError(f"engine {engine_dir} was built for world size {build.world_size} but is run with "
                            f"{world_size} rank(s): launch {build.world_size} ranks (torchrun --nproc-per-node "
                            f"{build.world_size}) or rebuild with --world_size {world_size}")
        device = torch.device(device) if device is not None else default_device(rank)
        dtype = DTYPES[build.dtype]
        check_dtype_supported(dtype, device)
        if build.quantization is not None and build.quantization.mode == "fp8":
            from qwen_trtllm.quantization.fp8 import check_fp8_supported  # before any reading

            check_fp8_supported(device)
        path = rank_file(engine_dir, rank)
        if not path.is_file():
            raise QWenError(f"{path} is missing: rebuild the engine with examples/qwen/build.py")
        LOGGER.info(f"loading engine {engine_dir} ({path.stat().st_size / 1e9:.2f} GB) onto {device}")
        t0 = time.monotonic()
        try:
            state = load_file(str(path), device=str(device))
        except (SafetensorError, OSError) as e:
            raise QWenError(f"{path} is corrupt ({e}): rebuild the engine with examples/qwen/build.py") from None
        model = model_skeleton(config, world_size, build.quantization)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        got = {k: v.shape for k, v in state.items()}
        if expected != got:
            bad = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
            if bad[0] == "lm_head.weight" and world_size > 1 and got[bad[0]][0] == config.vocab_size:
                raise QWenError(f"{path} holds the whole lm_head: the engine was built before lm_head became "
                                "vocab-parallel (V/tp rows per rank); rebuild it with examples/qwen/build.py")
            raise QWenError(f"{path} does not match its config.json (first mismatch: {bad[0]}): rebuild the engine")
        model.load_state_dict(state, assign=True)
        triton = use_triton_kernels(build, device)
        check_kv_cache_supported(build.kv_cache_dtype, device, triton)
        model.eval().requires_grad_(False).set_kernels(triton)
        LOGGER.info(f"engine {engine_dir} loaded in {time.monotonic() - t0:.1f} s")
        return cls(engine_dir, config, build, model, device, dtype, rank, world_size)


def use_triton_kernels(build: BuildConfig, device: torch.device) -> bool:
    """The build's kernel choice (`--kernels triton|torch`, Triton by default) where Triton can run on `device`
    (CUDA; the CPU only under Triton's interpreter); otherwise the plain PyTorch references."""
    if build.kernels != "triton" or device.type != "cuda":
        return False
    from qwen_trtllm.kernels import triton_available

    return triton_available(device)


def model_skeleton(config: QWenConfig, world_size: int, quantization: QuantizationConfig | None) -> QWen:
    """One rank's model on the meta device, its linears quantised where the build's `quantization` record says;
    load_state_dict(state, assign=True) fills it."""
    with torch.device("meta"):
        model = QWen(config, tp=world_size)
    if quantization:
        from qwen_trtllm.quantization import make_quantized_skeleton

        make_quantized_skeleton(model, quantization.precision, quantization.group_size,
                                quantization.quantize_lm_head)
    return model


def world_from_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's or mpirun's environment; (0, 1) when launched alone."""
    for r, w in (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")):
        if w in os.environ:
            return int(os.environ[r]), int(os.environ[w])
    return 0, 1
