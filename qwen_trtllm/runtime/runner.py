"""What run.py does, as library functions: sampling defaults from generation_config.json, reading prompt token
files, streaming text to the terminal, and writing outputs in TensorRT-LLM's formats."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from qwen_trtllm import QWenError
from qwen_trtllm.builder.engine_format import BuildConfig
from qwen_trtllm.runtime.executor import ExecutorConfig
from qwen_trtllm.runtime.kv_cache import KvCacheConfig
from qwen_trtllm.runtime.request import QWEN_EOD_ID, RequestOutput, SamplingParams

__all__ = ["QWEN_EOD_ID", "StreamPrinter", "add_beam_search_args", "add_runtime_args", "beam_search_from_args",
           "executor_config_from_args", "generation_defaults", "load_tokenizer", "read_input_tokens",
           "sampling_from_args", "tokenizer_path", "write_outputs"]


# generation_config.json fields the runtime reads, and their types; null (seen in real checkpoints) means "not set"
GENERATION_FIELDS = {"temperature": float, "top_p": float, "top_k": int, "repetition_penalty": float,
                     "max_window_size": int, "max_new_tokens": int, "do_sample": bool}


def generation_defaults(engine_dir: str | Path) -> dict:
    """The checkpoint's generation_config.json (copied into the engine), or {} when absent. Null values are left
    out (not set: the caller's fallback applies); a sampling field of the wrong type is a QWenError."""
    path = Path(engine_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise QWenError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise QWenError(f"{path} is not a JSON object: fix it or remove it")
    cfg = {k: v for k, v in cfg.items() if v is not None}
    for name, kind in GENERATION_FIELDS.items():
        if name not in cfg:
            continue
        v = cfg[name]
        if kind is bool:
            ok, want = isinstance(v, bool), "true or false"
        else:
            ok = isinstance(v, int if kind is int else (int, float)) and not isinstance(v, bool)
            want = "an integer" if kind is int else "a number"
        if not ok:
            raise QWenError(f"{path}: {name} must be {want}, got {v!r}: fix it, set it to null or remove it")
    return cfg


def tokenizer_path(engine_dir: str | Path, tokenizer_dir: str | Path | None = None,
                   required: bool = True) -> Path | None:
    """Where the tokenizer comes from: --tokenizer_dir (a directory holding qwen.tiktoken, or the file), else the
    engine directory (build.py copies the checkpoint's qwen.tiktoken there). None when the engine has none and
    `required` is False; otherwise a QWenError that names --tokenizer_dir."""
    from qwen_trtllm.tokenizer import TIKTOKEN_FILE

    if tokenizer_dir is not None:
        d = Path(tokenizer_dir)
        if not d.is_file() and not (d / TIKTOKEN_FILE).is_file():
            raise QWenError(f"--tokenizer_dir {d} has no {TIKTOKEN_FILE}: point it at the Hugging Face checkpoint "
                            f"directory that holds {TIKTOKEN_FILE}")
        return d
    if (Path(engine_dir) / TIKTOKEN_FILE).is_file():
        return Path(engine_dir)
    if required:
        raise QWenError(f"engine directory {engine_dir} has no {TIKTOKEN_FILE} (its checkpoint had none): pass "
                        f"--tokenizer_dir <the Hugging Face checkpoint directory>, or rebuild with build.py "
                        "--tokenizer_dir")
    return None


def load_tokenizer(engine_dir: str | Path, tokenizer_dir: str | Path | None = None, required: bool = True):
    """The QWenTokenizer of tokenizer_path(...), or None."""
    from qwen_trtllm.tokenizer import QWenTokenizer

    path = tokenizer_path(engine_dir, tokenizer_dir, required)
    return QWenTokenizer.from_dir(path) if path is not None else None


def add_runtime_args(p) -> None:
    """The in-flight batching runtime's flags (TensorRT-LLM's names), shared by the example scripts."""
    p.add_argument("--kv_cache_free_gpu_mem_fraction", "--kv_cache_free_gpu_memory_fraction", type=float,
                   default=0.9, help="share of the GPU memory free after loading the weights for the KV cache")
    p.add_argument("--max_tokens_in_paged_kv_cache", type=int, default=None, help="cap on the KV cache, in tokens")
    p.add_argument("--max_num_tokens", type=int, default=None,
                   help="tokens per step: decode tokens + prefill chunks (default: the engine's)")
    p.add_argument("--max_batch_size", type=int, default=None,
                   help="requests in flight at once (default: the engine's); more prompts wait in a queue")


def add_beam_search_args(p) -> None:
    """Beam search's flags (TensorRT-LLM's names), shared by run.py and summarize.py."""
    p.add_argument("--num_beams", type=int, default=1,
                   help="beam width; > 1 = beam search (deterministic: the sampling flags do not apply), which returns "
                        "that many outputs per prompt, best first (default: %(default)s)")
    p.add_argument("--length_penalty", type=float, default=1.0,
                   help="beam scores are log-probability sums / output length ** this (default: %(default)s)")
    p.add_argument("--early_stopping", type=int, default=0,
                   help="beam search ends: 1 = once num_beams hypotheses are done; 0 = when no running beam can "
                        "beat them any more (Hugging Face's default heuristic); other = never before the length "
                        "limit (default: %(default)s)")


def beam_search_from_args(args, sampling: SamplingParams) -> SamplingParams:
    """sampling with add_beam_search_args' settings (unchanged for --num_beams 1); QWenError for a bad value."""
    if args.num_beams < 1:
        raise QWenError(f"--num_beams {args.num_beams} must be >= 1")
    if args.num_beams == 1:
        return sampling
    early = {1: True, 0: False}.get(args.early_stopping, "never")
    beams = dataclasses.replace(sampling, use_beam_search=True, n=args.num_beams, length_penalty=args.length_penalty,
                                early_stopping=early)
    beams.validate()
    return beams


def executor_config_from_args(args, engine_build: BuildConfig | None = None) -> ExecutorConfig:
    """ExecutorConfig from add_runtime_args' flags (tokens_per_block from the engine's build); QWenError for a
    value out of range."""
    for name in ("max_batch_size", "max_num_tokens", "max_tokens_in_paged_kv_cache"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise QWenError(f"--{name} must be >= 1, got {v}: leave it out for the engine's value")
    kv = KvCacheConfig(free_gpu_memory_fraction=args.kv_cache_free_gpu_mem_fraction,
                       max_tokens=args.max_tokens_in_paged_kv_cache,
                       tokens_per_block=engine_build.tokens_per_block if engine_build else 64)
    return ExecutorConfig(max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens, kv_cache=kv)


def sampling_from_args(args, defaults: dict, max_tokens: int = 16) -> SamplingParams:
    """Command-line values win; otherwise generation_config.json (Qwen-7B-Chat: top_p 0.8, top_k 0, rep. 1.1);
    None on either side means not set."""
    pick = lambda name, fallback: next(v for v in (getattr(args, name), defaults.get(name), fallback) if v is not None)
    greedy_default = not defaults.get("do_sample")
    top_k = args.top_k if args.top_k is not None else (1 if greedy_default else pick("top_k", 0))
    cfg = SamplingParams(max_tokens=max_tokens, temperature=pick("temperature", 1.0), top_k=top_k,
                         top_p=pick("top_p", 1.0), repetition_penalty=pick("repetition_penalty", 1.0),
                         seed=args.seed)
    cfg.validate()
    return cfg


def read_input_tokens(path: str | Path, end_id: int = QWEN_EOD_ID) -> list[list[int]]:
    """Prompts as token ids from a .csv (one prompt a row) or .npy ([B, T], padded with end_id)."""
    p = Path(path)
    if not p.is_file():
        raise QWenError(f"--input_tokens file {p} does not exist")
    try:
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
            arr = arr[None] if arr.ndim == 1 else arr
            rows = [[int(t) for t in row] for row in arr]
            rows = [row[: max((i + 1 for i, t in enumerate(row) if t != end_id), default=0)] for row in rows]
        elif p.suffix == ".csv":
            with p.open(newline="") as f:
                rows = [[int(t) for t in row if t.strip()] for row in csv.reader(f)]
        else:
            raise QWenError(f"--input_tokens {p}: use a .csv or .npy file")
    except ValueError as e:
        raise QWenError(f"--input_tokens {p} does not hold integer token ids ({e})") from None
    rows = [r for r in rows if r]
    if not rows:
        raise QWenError(f"--input_tokens {p} holds no tokens")
    return rows


def write_outputs(output_ids: list[list[int]], sequences: np.ndarray, output_csv: str | None,
                  output_npy: str | None) -> None:
    """--output_csv: the generated ids, one row per sequence (with beam search: per beam, prompt after prompt);
    --output_npy: int32 [B, input + output] ([B, num_beams, input + output] with beam search) sequences padded
    with the end id (TensorRT-LLM's layout)."""
    from qwen_trtllm.cli import atomic_write

    if output_csv:
        with atomic_write(output_csv, newline="") as f:
            csv.writer(f).writerows(output_ids)
    if output_npy:
        with atomic_write(output_npy, "wb") as f:
            np.save(f, sequences.astype(np.int32))


class StreamPrinter:
    """Prints one request's text as its tokens arrive (whole characters only); an on_output callback."""

    def __init__(self, tokenizer, stop_ids: set[int], index: int = 0):
        self.tokenizer, self.stop_ids, self.index = tokenizer, stop_ids, index
        self.shown = ""

    def __call__(self, index: int, out: RequestOutput) -> None:
        if index != self.index:
            return
        ids = [t for t in out.token_ids if t not in self.stop_ids]
        text = self.tokenizer.decode(ids)
        if out.finished or not text.endswith("\ufffd"):  # a partial UTF-8 tail waits, unless nothing follows
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text
