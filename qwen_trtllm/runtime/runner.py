"""What run.py does, as library functions: sampling defaults from generation_config.json, reading prompt token
files, streaming text to the terminal, and writing outputs in TensorRT-LLM's formats."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from qwen_trtllm import QWenError
from qwen_trtllm.runtime.sampling import SamplingConfig

QWEN_EOD_ID = 151643


def generation_defaults(engine_dir: str | Path) -> dict:
    """The checkpoint's generation_config.json (copied into the engine), or {} when absent."""
    path = Path(engine_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise QWenError(f"{path} is not valid JSON ({e})") from None


def sampling_from_args(args, defaults: dict) -> SamplingConfig:
    """Command-line values win; otherwise generation_config.json (Qwen-7B-Chat: top_p 0.8, top_k 0, rep. 1.1)."""
    pick = lambda name, fallback: getattr(args, name) if getattr(args, name) is not None else \
        defaults.get(name, fallback)
    greedy_default = not defaults.get("do_sample", False)
    top_k = args.top_k if args.top_k is not None else (1 if greedy_default else defaults.get("top_k", 0))
    cfg = SamplingConfig(temperature=pick("temperature", 1.0), top_k=top_k, top_p=pick("top_p", 1.0),
                         repetition_penalty=pick("repetition_penalty", 1.0), seed=args.seed)
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
    """--output_csv: the generated ids, one row per sequence; --output_npy: int32 [B, input + output] sequences
    padded with the end id (TensorRT-LLM's layout)."""
    if output_csv:
        with open(output_csv, "w", newline="") as f:
            csv.writer(f).writerows(output_ids)
    if output_npy:
        np.save(output_npy, sequences.astype(np.int32))


class StreamPrinter:
    """Prints the first sequence's text as its tokens arrive (whole characters only)."""

    def __init__(self, tokenizer, stop_ids: set[int]):
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.ids: list[int] = []
        self.shown = ""
        self.done = False

    def __call__(self, new_tokens: list[int]) -> None:
        if self.done:
            return
        tok = new_tokens[0]
        if tok in self.stop_ids:
            self.done = True
            return
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text
