"""The FT directory format of TensorRT-LLM's Qwen example: writer (hf_qwen_convert.py) and reader (the builder).

Layout of `<out>/<tp>-gpu/`:
  config.ini      one section [qwen]: the converter's arguments (model_dir, storage_dtype, tensor_parallelism) and
                  every QWenConfig field.
  *.bin           one raw little-endian file per tensor (no header; shapes follow from config.ini). bfloat16 is
                  stored as its 16-bit pattern.
  qwen.tiktoken, tokenizer_config.json, generation_config.json   copied from the checkpoint when present.

Tensors (H hidden, V vocab, F = intermediate_size/2 MLP width, tp ranks, r a rank; names and splits from the table
in qwen_trtllm.models.qwen.weights). Linear weights are stored [in, out], the transpose of nn.Linear's [out, in]:
  vocab_embedding.weight.bin [V, H], ln_f.weight.bin [H], lm_head.weight.bin [V, H]        (rank independent)
  model.layers.{i}.ln_1.weight.bin, model.layers.{i}.ln_2.weight.bin [H]                    (replicated)
  model.layers.{i}.attention.qkv.weight.{r}.bin   [H, 3, H/tp]  c_attn.weight^T viewed [H, 3, H], last axis split:
                                                   rank r holds its own heads of Q, K and V
  model.layers.{i}.attention.qkv.bias.{r}.bin     [3, H/tp]
  model.layers.{i}.attention.dense.weight.{r}.bin [H/tp, H]     attn.c_proj^T, split on the in axis
  model.layers.{i}.mlp.w1.weight.{r}.bin          [H, F/tp]     mlp.w1^T, split on the out axis
  model.layers.{i}.mlp.w2.weight.{r}.bin          [H, F/tp]     mlp.w2^T (the gate branch, as in Hugging Face)
  model.layers.{i}.mlp.c_proj.weight.{r}.bin      [F/tp, H]     mlp.c_proj^T, split on the in axis

read_ft_rank() returns these with the qkv weight flattened to [H, 3*H/tp] and the qkv bias to [3*H/tp].
"""

from __future__ import annotations

import configparser
import dataclasses
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qwen_trtllm import QWenError
from qwen_trtllm.checkpoint.hf_checkpoint import HFCheckpoint
from qwen_trtllm.cli import check_output_dir
from qwen_trtllm.config import QWenConfig
from qwen_trtllm.dtypes import DTYPES, dtype_name
from qwen_trtllm.logger import LOGGER, format_duration, progress
from qwen_trtllm.models.qwen.weights import lookup_hf, shard_view
from qwen_trtllm.tokenizer import TIKTOKEN_FILE, TOKENIZER_FILES

STORAGE_TYPES = DTYPES  # the shared table of qwen_trtllm.dtypes (aliases fp32, fp16, bf16)
_NUMPY = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<i2")}
CONVERTER_KEYS = ("model_dir", "storage_dtype", "tensor_parallelism")
CHUNK_BYTES = 8 << 20  # largest slab converted at once: bounds the converter's private memory per tensor
TILE = 64  # columns per transpose tile (32..256 measured alike on the 7B shapes; 2x faster than one strided copy)


def normalize_storage_type(storage_type: str) -> str:
    """'float32' | 'float16' | 'bfloat16' (aliases fp32, fp16, bf16 accepted)."""
    return dtype_name(storage_type, flag="--storage-type")


def hf_to_ft(name: str) -> tuple[str, str]:
    """Hugging Face tensor name -> (FT name without rank suffix or .bin, split kind)."""
    found = lookup_hf(name)
    if found is not None:
        w, layer = found
        return w.ft_name(layer), w.ft_kind
    raise QWenError(f"tensor {name} has no FT counterpart: not a Qwen (v1) weight")


def ft_file_name(ft_name: str, kind: str, rank: int) -> str:
    """File name of one FT tensor for a rank (rank-independent tensors carry no rank suffix)."""
    return f"{ft_name}.bin" if kind in ("global", "replicated") else f"{ft_name}.{rank}.bin"


def ft_rank_shapes(config: QWenConfig, tp: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """FT name -> (shape as read_ft_rank returns it for one rank, split kind), in Hugging Face file order."""
    H, F = config.hidden_size, config.ffn_hidden_size
    per_kind = {"qkv": (H, 3 * H // tp), "qkv_bias": (3 * H // tp,), "column": (H, F // tp)}
    out = {}
    for hf_name, hf_shape in HFCheckpoint.shapes_for(config).items():
        ft_name, kind = hf_to_ft(hf_name)
        if kind in ("global", "replicated"):
            shape = hf_shape
        elif kind == "row":
            shape = (hf_shape[1] // tp, hf_shape[0])
        else:
            shape = per_kind[kind]
        out[ft_name] = (shape, kind)
    return out


# --- writer ---------------------------------------------------------------------------------------------
def rank_views(t: torch.Tensor, kind: str, tp: int) -> list[torch.Tensor]:
    """The views (no copies) of a Hugging Face tensor that the FT files of each rank hold, in stored layout."""
    if kind in ("global", "replicated"):
        return [t]
    views = [shard_view(t, "qkv" if kind.startswith("qkv") else kind, r, tp) for r in range(tp)]
    if kind == "qkv":  # [3H, H] rows q|k|v -> per rank [3, H/tp, H] -> [H, 3, H/tp]
        return [v.permute(2, 0, 1) for v in views]
    if kind == "qkv_bias":  # [3H] -> per rank [3, H/tp]
        return views
    return [v.t() for v in views]  # column: [out/tp, in] -> [in, out/tp]; row: [out, in/tp] -> [in/tp, out]


def _contiguous_copy(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """part as a new contiguous tensor of dtype. A transposed source (axis 0 has stride 1) goes through TILE-wide
    tiles: gather the tile into rows, then a plain 2-D transpose copy; about 2x faster than one strided copy."""
    out = torch.empty(part.shape, dtype=dtype)
    if part.dim() < 2 or part.stride(0) != 1 or part.shape[0] == 1:
        return out.copy_(part)
    flat = out.view(part.shape[0], -1)
    for j in range(0, part.shape[0], TILE):
        src = part[j:j + TILE].movedim(0, -1)  # [..., tile], the tile axis now innermost in memory
        tmp = torch.empty(src.shape, dtype=dtype).copy_(src)
        flat[j:j + TILE].copy_(tmp.view(-1, tmp.shape[-1]).t())
    return out


def write_raw(view: torch.Tensor, path: Path, storage_type: str) -> int:
    """Write view in storage_type as raw little-endian bytes, CHUNK_BYTES at a time; returns bytes written."""
    dtype = STORAGE_TYPES[storage_type]
    rows = view.shape[0] if view.dim() else 1
    view = view.reshape(1) if view.dim() == 0 else view
    row_bytes = max(1, view[0].numel() * dtype.itemsize)
    step = max(1, CHUNK_BYTES // row_bytes)
    written = 0
    with open(path, "wb") as f:
        for i in range(0, rows, step):
            part = view[i:i + step]
            if part.dtype != dtype or not part.is_contiguous():
                part = _contiguous_copy(part, dtype)
            arr = (part.view(torch.int16) if dtype == torch.bfloat16 else part).numpy()
            f.write(arr.astype(_NUMPY[storage_type], copy=False).data)
            written += arr.nbytes
            del part, arr
    return written


def convert_tensor(ckpt: HFCheckpoint, name: str, out_dir: Path, tp: int, storage_type: str) -> int:
    """Write the FT files of one Hugging Face tensor for every rank; returns bytes written."""
    ft_name, kind = hf_to_ft(name)
    t = ckpt.get(name)
    written = 0
    for r, view in enumerate(rank_views(t, kind, tp)):
        written += write_raw(view, out_dir / ft_file_name(ft_name, kind, r), storage_type)
    return written


_worker: dict = {}


def _worker_init(in_dir: str, out_dir: str, tp: int, storage_type: str) -> None:
    torch.set_num_threads(1)
    _worker.update(ckpt=HFCheckpoint(in_dir), out=Path(out_dir), tp=tp, storage_type=storage_type)


def _worker_convert(name: str) -> int:
    w = _worker
    return convert_tensor(w["ckpt"], name, w["out"], w["tp"], w["storage_type"])


def _write_config_ini(path: Path, config: QWenConfig, info: dict) -> None:
    cp = configparser.ConfigParser(interpolation=None)
    cp["qwen"] = {**{k: str(info[k]) for k in CONVERTER_KEYS}, **{k: str(v) for k, v in config.to_dict().items()}}
    with open(path, "w") as f:
        cp.write(f)


def convert_checkpoint(in_dir: str | Path, out_dir: str | Path, tp: int = 1, storage_type: str = "float16",
                       processes: int = 1, force: bool = False) -> Path:
    """Convert a Hugging Face Qwen (v1) checkpoint into `<out_dir>/<tp>-gpu` and return that path.

    Validates everything before writing; writes into a temporary sibling directory that replaces the result only
    when complete. Tensors are streamed one at a time (at most `processes` in flight, each converted in slabs of
    CHUNK_BYTES), so the private memory stays far below one copy of the weights. An existing FT directory is
    replaced only with force (build.py's rule for engines); anything else there is never replaced.
    """
    t_start = time.monotonic()
    storage_type = normalize_storage_type(storage_type)
    if sys.byteorder != "little":
        raise QWenError("the FT format is little-endian; convert on a little-endian machine")
    if not isinstance(processes, int) or processes < 1:
        raise QWenError(f"processes must be >= 1, got {processes}")
    out_root = Path(out_dir)
    check_output_dir(out_root, "-o/--out-dir")
    ckpt = HFCheckpoint(in_dir)
    config = ckpt.config
    if not isinstance(tp, int) or tp < 1:
        raise QWenError(f"tensor parallelism must be >= 1, got {tp}")
    config.check_tensor_parallel(tp)
    ckpt.validate()
    final = out_root / f"{tp}-gpu"
    if final.exists() and not force:
        raise QWenError(f"{final} exists; pass --force to overwrite")
    if final.exists() and (not final.is_dir() or any(final.iterdir()) and not (final / "config.ini").is_file()):
        raise QWenError(f"{final} exists and is not an FT directory: it is never replaced; choose another -o")
    if not (ckpt.path / TIKTOKEN_FILE).is_file():
        LOGGER.warning(f"{ckpt.path} has no {TIKTOKEN_FILE}: the engine will take token ids only; to give it the "
                       "tokenizer pass build.py --tokenizer_dir <the Hugging Face checkpoint directory>, or run.py "
                       "--tokenizer_dir")

    created = [p for p in (out_root, *out_root.parents) if not p.exists()]
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".{final.name}.tmp-{os.getpid()}"
    old = out_root / f".{final.name}.old-{os.getpid()}"
    done = False
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        expected = ckpt.expected_shapes()
        names = [n for n in ckpt.names() if n in expected]  # file order; extra buffers (inv_freq) skipped
        total = sum(math.prod(s) for s in expected.values()) * STORAGE_TYPES[storage_type].itemsize
        with progress(total, f"converting {ckpt.path} to {final} ({storage_type})", unit="B") as bar:
            if processes == 1:
                for name in names:
                    bar.update(convert_tensor(ckpt, name, tmp, tp, storage_type))
            else:
                import multiprocessing as mp

                ctx = mp.get_context("spawn")  # a clean interpreter: no inherited OpenMP state or open mmaps
                with ctx.Pool(processes, _worker_init, (str(in_dir), str(tmp), tp, storage_type)) as pool:
                    for n in pool.imap_unordered(_worker_convert, names):
                        bar.update(n)
        ckpt.close()
        info = {"model_dir": str(in_dir), "storage_dtype": storage_type, "tensor_parallelism": tp}
        _write_config_ini(tmp / "config.ini", config, info)
        for fname in TOKENIZER_FILES:
            if (ckpt.path / fname).is_file():
                shutil.copyfile(ckpt.path / fname, tmp / fname)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        done = True
    except OSError as e:
        raise QWenError(f"writing {final} failed: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        if not done:
            for p in created:  # leave no empty output directories behind
                try:
                    p.rmdir()
                except OSError:
                    break
    LOGGER.info(f"Total time of converting the checkpoint: {format_duration(time.monotonic() - t_start)}")
    return final


# --- reader ---------------------------------------------------------------------------------------------
def read_ft_config(ft_dir: str | Path) -> tuple[QWenConfig, dict]:
    """config.ini of an FT directory -> (model config, converter args: model_dir, storage_dtype (str),
    tensor_parallelism (int))."""
    d = Path(ft_dir)
    ini = d / "config.ini"
    if not d.is_dir():
        raise QWenError(f"FT directory {d} does not exist: run hf_qwen_convert.py first (it writes <out>/<tp>-gpu)")
    if not ini.is_file():
        raise QWenError(f"{ini} not found: {d} is not an FT directory; run hf_qwen_convert.py first, or build "
                        "from a Hugging Face checkpoint with --hf_model_dir")
    cp = configparser.ConfigParser(interpolation=None)
    try:
        cp.read(ini)
    except configparser.Error as e:
        raise QWenError(f"{ini} is not a valid config.ini ({e.message.splitlines()[0]}); "
                        "re-run hf_qwen_convert.py") from None
    if "qwen" not in cp:
        raise QWenError(f"{ini} has no [qwen] section; re-run hf_qwen_convert.py")
    sec = cp["qwen"]
    known = set(CONVERTER_KEYS) | {f.name for f in dataclasses.fields(QWenConfig)}
    unknown = sorted(set(sec) - known)
    if unknown:
        raise QWenError(f"unknown keys in {ini}: {', '.join(unknown)}; re-run hf_qwen_convert.py")
    missing = [k for k in CONVERTER_KEYS if k not in sec]
    if missing:
        raise QWenError(f"{ini} lacks {', '.join(missing)}; re-run hf_qwen_convert.py")
    try:
        config = QWenConfig.from_ini_section(sec)
        tp = int(sec["tensor_parallelism"])
    except ValueError as e:
        raise QWenError(f"{ini} has a malformed value ({e}); re-run hf_qwen_convert.py") from None
    storage = sec["storage_dtype"]
    if storage not in STORAGE_TYPES:
        raise QWenError(f"{ini}: storage_dtype={storage!r} is not one of {', '.join(STORAGE_TYPES)}")
    config.check_tensor_parallel(tp)
    return config, {"model_dir": sec["model_dir"], "storage_dtype": storage, "tensor_parallelism": tp}


def read_ft_rank(ft_dir: str | Path, rank: int) -> dict[str, torch.Tensor]:
    """One rank's tensors, keyed by FT name without suffix, in the stored dtype and layout: linears [in, out],
    qkv weight [H, 3*H/tp] (the rank's Q|K|V heads side by side), qkv bias [3*H/tp]."""
    d = Path(ft_dir)
    config, info = read_ft_config(d)
    tp, storage = info["tensor_parallelism"], info["storage_dtype"]
    if not 0 <= rank < tp:
        raise QWenError(f"rank {rank} out of range: {d} holds {tp} rank(s)")
    np_dtype = _NUMPY[storage]
    out = {}
    for ft_name, (shape, kind) in ft_rank_shapes(config, tp).items():
        path = d / ft_file_name(ft_name, kind, rank)
        want = math.prod(shape) * np_dtype.itemsize
        try:
            got = path.stat().st_size
        except FileNotFoundError:
            raise QWenError(f"{path} is missing: the FT directory is incomplete; re-run hf_qwen_convert.py") from None
        if got != want:
            raise QWenError(f"{path} has {got} bytes, expected {want} ({storage} {list(shape)}); "
                            "re-run hf_qwen_convert.py")
        t = torch.from_numpy(np.fromfile(path, dtype=np_dtype).reshape(shape))
        out[ft_name] = t.view(torch.bfloat16) if storage == "bfloat16" else t
    return out


def merge_ft_ranks(ft_dir: str | Path) -> dict[str, torch.Tensor]:
    """All ranks reassembled into full tensors with Hugging Face names and layout (stored dtype)."""
    config, info = read_ft_config(ft_dir)
    tp, H = info["tensor_parallelism"], config.hidden_size
    ranks = [read_ft_rank(ft_dir, r) for r in range(tp)]
    ft_of = {hf_to_ft(n)[0]: n for n in HFCheckpoint.shapes_for(config)}
    out = {}
    for ft_name, (_, kind) in ft_rank_shapes(config, tp).items():
        parts = [rk[ft_name] for rk in ranks]
        if kind in ("global", "replicated"):
            full = parts[0]
        elif kind == "qkv":  # [H, 3*H/tp] per rank -> [H, 3, H] -> [3H, H]
            full = torch.cat([p.view(H, 3, -1) for p in parts], dim=2).reshape(H, 3 * H).t()
        elif kind == "qkv_bias":
            full = torch.cat([p.view(3, -1) for p in parts], dim=1).reshape(-1)
        elif kind == "column":
            full = torch.cat(parts, dim=1).t()
        else:  # row
            full = torch.cat(parts, dim=0).t()
        out[ft_of[ft_name]] = full.contiguous()
    return out
