"""The one table of dtype names that every script and library entry point accepts.

Canonical names are PyTorch's (float32, float16, bfloat16); TensorRT-LLM's short aliases (fp32, fp16, bf16) mean
the same everywhere: convert's --storage-type, build's and benchmark's --dtype, summarize's --data_type,
compare_layers' and eval_accuracy's dtypes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from qwen_trtllm import QWenError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EXTRA_DTYPES: dict[str, torch.dtype] = {"float64": torch.float64}  # the reference of compare_layers only
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
ENGINE_DTYPES = tuple(DTYPES)


def dtype_name(name: str, allowed: Sequence[str] = ENGINE_DTYPES, flag: str = "dtype") -> str:
    """The canonical name of `name` (an alias such as fp16 accepted); QWenError naming the flag and the choices."""
    canonical = DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if canonical not in allowed:
        raise QWenError(f"{flag} {name!r} is not one of {choices_text(allowed)}")
    return canonical


def torch_dtype(name: str, allowed: Sequence[str] = ENGINE_DTYPES, flag: str = "dtype") -> torch.dtype:
    """The torch dtype of a name or alias."""
    canonical = dtype_name(name, allowed, flag)
    return DTYPES.get(canonical) or EXTRA_DTYPES[canonical]


def choices_text(allowed: Sequence[str] = ENGINE_DTYPES) -> str:
    """'float32 (fp32), float16 (fp16), bfloat16 (bf16)'."""
    short = {v: k for k, v in DTYPE_ALIASES.items()}
    return ", ".join(f"{a} ({short[a]})" if a in short else a for a in allowed)


def dtype_arg(allowed: Sequence[str] = ENGINE_DTYPES) -> Callable[[str], str]:
    """An argparse `type=` that maps aliases to the canonical name (so args.dtype is always canonical)."""

    def parse(value: str) -> str:
        try:
            return dtype_name(value, allowed)
        except QWenError:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {choices_text(allowed)}") from None

    parse.__name__ = "dtype"
    return parse


def add_dtype_argument(p: argparse.ArgumentParser, *flags: str, default: str | None,
                       allowed: Sequence[str] = ENGINE_DTYPES, help: str, **kwargs) -> None:
    """A dtype flag that accepts the names and aliases of `allowed`; the help lists them."""
    p.add_argument(*flags, default=default, type=dtype_arg(allowed), metavar="{" + ",".join(allowed) + "}",
                   help=f"{help}; one of {choices_text(allowed)}", **kwargs)
