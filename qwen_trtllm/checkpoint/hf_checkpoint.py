"""Lazy, memory-bounded reader of a Hugging Face Qwen (v1) checkpoint directory.

Weights are looked up in this order: model.safetensors.index.json (+ shards), model.safetensors,
pytorch_model.bin.index.json (+ shards), pytorch_model.bin. Safetensors files are memory-mapped through
safetensors.safe_open; .bin files through torch.load(..., weights_only=True, mmap=True), so no pickled code is ever
run and a tensor's bytes are only read when it is used. At most one weight file is open at a time: tensors are
best read in file order (see names()).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from qwen_trtllm import QWenError
from qwen_trtllm.checkpoint.random_checkpoint import hf_tensor_shapes
from qwen_trtllm.config import QWenConfig

# (index file, single file) per format, in lookup order.
WEIGHT_LAYOUTS = (
    ("safetensors", "model.safetensors.index.json", "model.safetensors"),
    ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
)
# Non-weight buffers some exports carry; never converted.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".masked_bias")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

DOWNLOAD_HINT = "e.g. `huggingface-cli download Qwen/Qwen-7B-Chat --local-dir Qwen/Qwen-7B-Chat`"


class HFCheckpoint:
    """A Hugging Face Qwen (v1) checkpoint directory: config, tensor names, one tensor at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise QWenError(f"checkpoint directory {self.path} does not exist: it must be a local directory; download "
                            f"the checkpoint first, {DOWNLOAD_HINT}")
        if not self.path.is_dir():
            raise QWenError(f"{self.path} is not a directory: pass a Hugging Face Qwen checkpoint directory")
        self.config: QWenConfig = QWenConfig.from_hf_dir(self.path)
        self._open_path: Path | None = None
        self._open: object | None = None  # safe_open handle or the dict torch.load returned
        self._open_keys: set[str] = set()
        self.format, self._where = self._find_weights()

    # --- locating the weights ------------------------------------------------------------------------
    def _find_weights(self) -> tuple[str, dict[str, Path]]:
        for fmt, index_name, single_name in WEIGHT_LAYOUTS:
            index = self.path / index_name
            if index.is_file():
                return fmt, self._read_index(index)
            single = self.path / single_name
            if single.is_file():
                return fmt, {name: single for name in self._file_keys(fmt, single)}
        raise QWenError(f"{self.path} holds no weights (model.safetensors[.index.json] or pytorch_model.bin"
                        f"[.index.json]); the download is incomplete: download it again, {DOWNLOAD_HINT}")

    def _read_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise ValueError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise QWenError(f"{index} is not a valid weight index ({e}); re-download the checkpoint") from None
        where: dict[str, Path] = {}
        for name, fname in weight_map.items():
            f = self.path / fname
            if not f.is_file():
                raise QWenError(f"{index.name} lists shard {fname} (holding {name}) but {f} is missing; "
                                "the download is incomplete: copy the whole checkpoint directory")
            where[name] = f
        return where

    def _file_keys(self, fmt: str, f: Path) -> list[str]:
        self._handle(f)
        return sorted(self._open_keys)

    def _handle(self, f: Path):
        """The open handle of weight file f; the previously open file is released first."""
        if self._open_path == f:
            return self._open
        self.close()
        try:
            if f.suffix == ".safetensors":
                handle = safe_open(str(f), framework="pt")
                keys = set(handle.keys())
            else:
                try:
                    handle = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    # legacy (non-zip) torch.save format cannot be memory-mapped: read the whole shard
                    handle = torch.load(f, map_location="cpu", weights_only=True)
                if not isinstance(handle, dict) or not all(isinstance(v, torch.Tensor) for v in handle.values()):
                    raise ValueError(f"holds a {type(handle).__name__}, not a state dict of tensors")
                keys = set(handle)
        except Exception as e:  # safetensors, pickle and zip errors have no common base class
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise QWenError(f"cannot read weight file {f}: {msg}") from None
        self._open_path, self._open, self._open_keys = f, handle, keys
        return handle

    def close(self) -> None:
        """Release the open weight file (its memory map goes once no tensor read from it is alive)."""
        self._open_path, self._open, self._open_keys = None, None, set()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading ---------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every tensor name the checkpoint lists, grouped by weight file (the cheapest reading order)."""
        order = {f: k for k, f in enumerate(dict.fromkeys(self._where.values()))}
        return sorted(self._where, key=lambda n: order[self._where[n]])

    def file_of(self, name: str) -> Path:
        """The weight file that holds name."""
        if name not in self._where:
            raise QWenError(f"checkpoint {self.path} has no tensor {name!r}")
        return self._where[name]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, as stored (memory-mapped: its bytes are read when used)."""
        f = self.file_of(name)
        handle = self._handle(f)
        if name not in self._open_keys:
            raise QWenError(f"tensor {name} is listed in the index but missing from {f}; "
                            "the shard is damaged: re-download it")
        if isinstance(handle, dict):
            return handle[name]
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise QWenError(f"cannot read tensor {name} from {f}: {e}") from None

    def _shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype | str] | None:
        """Shape and dtype without reading the data; None when the file lacks the tensor."""
        handle = self._handle(self.file_of(name))
        if name not in self._open_keys:
            return None
        if isinstance(handle, dict):
            return tuple(handle[name].shape), handle[name].dtype
        s = handle.get_slice(name)
        return tuple(s.get_shape()), _ST_DTYPES.get(s.get_dtype(), s.get_dtype())

    @staticmethod
    def shapes_for(config: QWenConfig) -> dict[str, tuple[int, ...]]:
        """Every weight a config calls for, name -> shape, in Hugging Face file order."""
        return hf_tensor_shapes(config.to_dict())

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight this checkpoint's config calls for, name -> shape, in Hugging Face file order."""
        return self.shapes_for(self.config)

    def validate(self) -> None:
        """Raise QWenError naming the first missing, misshapen, non-float or unexpected tensor."""
        expected = self.expected_shapes()
        for name in sorted(expected, key=lambda n: str(self._where.get(n, ""))):  # one pass per file
            if name not in self._where:
                raise QWenError(f"checkpoint {self.path} lacks tensor {name} (expected shape {list(expected[name])}); "
                                "the download is incomplete or it does not match config.json")
            got = self._shape_dtype(name)
            if got is None:
                raise QWenError(f"tensor {name} is listed in the index but missing from {self._where[name]}; "
                                "the shard is damaged: re-download it")
            shape, dtype = got
            if shape != expected[name]:
                raise QWenError(f"tensor {name} has shape {list(shape)}, expected {list(expected[name])} from "
                                f"config.json: the weights do not match the config")
            if dtype not in FLOAT_DTYPES:
                raise QWenError(f"tensor {name} has dtype {dtype}; expected float32, float16 or bfloat16")
        extra = [n for n in self._where if n not in expected and not n.endswith(IGNORED_SUFFIXES)]
        if extra:
            raise QWenError(f"checkpoint {self.path} has unexpected tensor {extra[0]}"
                            f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}: "
                            "config.json does not match the weights, or this is not a Qwen (v1) checkpoint")
        self.close()
