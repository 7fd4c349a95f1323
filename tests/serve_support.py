"""Helpers shared by test_serve.py and test_serve_in_process.py (the engine, the server, references); no tests."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from qwen_trtllm.builder.build import build_engine
from qwen_trtllm.runtime import LLM, SamplingParams
from qwen_trtllm.tokenizer import stop_token_ids

ROOT = Path(__file__).resolve().parents[1]
EOD = 151643
MODEL = "qwen-tiny"
MAX_INPUT_LEN, MAX_OUTPUT_LEN = 256, 64
USER = {"role": "user", "content": "Hi"}


def build_serve_engine(make_checkpoint, tiktoken_file, tmp_path_factory) -> Path:
    """The server tests' engine (conftest.py serve_engine_dir): a tiny random engine with the real tokenizer (fp32)."""
    ckpt = make_checkpoint(vocab_size=151936, seq_length=2048, tokenizer_file=tiktoken_file, seed=5)
    return build_engine(tmp_path_factory.mktemp("serve") / MODEL, hf_dir=ckpt, dtype="float32", max_batch_size=8,
                        max_input_len=MAX_INPUT_LEN, max_output_len=MAX_OUTPUT_LEN, tokens_per_block=16)


def script_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    run_py: subprocess.Popen  # run.py on the same engine, started beside the server (greedy reference)
    run_py_csv: Path
    extra: dict = field(default_factory=dict)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def wait_healthy(url: str, proc: subprocess.Popen, log_tail, timeout: float = 120) -> None:
    """Until the server process answers /health (it must not exit first; its log tail explains a failure)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log_tail()}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the server did not come up:\n{log_tail()}"
        time.sleep(0.2)


def client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)


def metrics(srv: Server) -> dict[str, float]:
    """Every sample of /metrics: 'name{a="x",b="y"}' (labels sorted) or 'name' -> value."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(srv.url + "/metrics", timeout=10).text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_idle(srv: Server, timeout: float = 15.0) -> dict[str, float]:
    """Poll /metrics until no request is in flight and no KV cache block is in use."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(srv)
        if m["qwen_trtllm_kv_cache_blocks_used"] == 0 and m["qwen_trtllm_num_requests_in_flight"] == 0:
            return m
        assert time.monotonic() < deadline, f"not idle: {m}"
        time.sleep(0.05)


def chat_stops(tok) -> list[int]:
    return sorted(stop_token_ids(tok, "chatml"))


def reference(llm: LLM, ids: list[int], stops: list[int], max_tokens: int, temperature: float = 0.0,
              top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
              seed: int = 0) -> list[int]:
    """The request alone, in-process, with generation_config.json's defaults spelled out (Qwen-7B-Chat's:
    top_p 0.8, top_k 0, repetition_penalty 1.1)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                            top_p=0.8 if top_p is None else top_p, top_k=0 if top_k is None else top_k,
                            repetition_penalty=1.1 if repetition_penalty is None else repetition_penalty,
                            seed=seed, stop_token_ids=stops, end_id=EOD)
    return llm.generate([ids], params)[0].token_ids


def text_of(tok, ids: list[int], stops: list[int] = ()) -> str:
    """The text of output ids, stop tokens left out (the embedding's padding ids decode to nothing)."""
    return tok.decode([t for t in ids if t not in stops])


def finish_of(ids: list[int], stops: list[int]) -> str:
    return "stop" if ids and ids[-1] in stops else "length"


def sse_data(lines) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]
