"""Throughput and latency under load, in the conventions of TensorRT-LLM's and vLLM's serving benchmarks.

N requests arrive all at once or at a Poisson rate (fixed seed), with fixed lengths ("128,128") or a synthetic
mix shaped like chat traffic ("chat": log-normal input 16..1024 and output 16..512 tokens, long-tailed). The
engine runs them through its in-flight batching executor on the caller's thread; every output token gets the
host time at which the executor handed it over. Reported: output tokens/s, requests/s, time to first token
(TTFT) and inter-token latency (ITL: gaps between consecutive tokens of a request, as a client sees them)
p50/p99, and KV cache blocks in use. Hugging Face transformers' continuous batching (`generate_batch`, paged
cache) runs the same requests on the same weights for comparison; http_load.py sends the same workload to a
running server (the same LoadResult rows).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from qwen_trtllm import QWenError
from qwen_trtllm.runtime.llm import LLM
from qwen_trtllm.runtime.request import Request, SamplingParams


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    arrival_s: list[float]  # offsets from the start


def make_workload(kind: str, num_requests: int, vocab: int, rate: float = float("inf"), seed: int = 0) -> Workload:
    """kind: "IN,OUT" (fixed lengths) or "chat". rate: requests/s (inf: all at t = 0)."""
    rng = np.random.default_rng(seed)
    if kind == "chat":
        ins = np.clip(rng.lognormal(np.log(180), 0.9, num_requests), 16, 1024).astype(int)
        outs = np.clip(rng.lognormal(np.log(120), 0.8, num_requests), 16, 512).astype(int)
    else:
        try:
            i, o = (int(v) for v in kind.split(","))
        except ValueError:
            raise QWenError(f'--dataset "{kind}" must be "chat" or "IN,OUT" such as "128,128"') from None
        ins, outs = np.full(num_requests, i), np.full(num_requests, o)
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in ins]
    gaps = rng.exponential(1.0 / rate, num_requests) if np.isfinite(rate) else np.zeros(num_requests)
    return Workload(prompts, [int(o) for o in outs], np.cumsum(gaps).tolist() if np.isfinite(rate) else
                    [0.0] * num_requests)


@dataclass
class LoadResult:
    backend: str
    requests: int
    output_tokens: int
    duration_s: float
    output_tok_s: float
    requests_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    kv_blocks_max: int  # -1: not known (an HTTP client does not see them)
    kv_blocks_total: int
    preemptions: int
    request_rate: float | None = None  # the workload's requests/s (None: not recorded; inf: all at once)
    errors: int = 0  # requests that failed (HTTP: non-200, an error event, a cut stream, a wrong token count)


def parse_rates(text: str, default_n: int) -> list[tuple[float, int]]:
    """--request_rates "4,8:200,inf" -> [(4.0, default_n), (8.0, 200), (inf, default_n)] (RATE[:N])."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        try:
            rate, _, n = item.partition(":")
            out.append((float(rate), int(n) if n else default_n))
        except ValueError:
            raise QWenError(f'--request_rates "{text}": give RATE[:N] items such as "4,8:200,inf"') from None
        if not out[-1][0] > 0 or out[-1][1] < 1:
            raise QWenError(f'--request_rates "{text}": rates must be > 0 and request counts >= 1')
    return out


def warm_up(llm: LLM) -> int:
    """Before timing: 64 short requests at once and 32 prompts of the chat mix's lengths (16..1024 tokens) with 8
    output tokens (Triton compilation for the prefill shapes), then every decode CUDA graph captured; returns how
    many graphs exist."""
    ex = llm.executor
    vocab, out = llm.engine.config.vocab_size, min(16, ex.max_output_len)
    run_load(llm, make_workload(f"{min(128, ex.max_input_len)},{out}", 64, vocab, seed=99))
    chat = make_workload("chat", 32, vocab, seed=98)
    run_load(llm, Workload([p[: ex.max_input_len] for p in chat.prompts], [min(8, out)] * 32, [0.0] * 32))
    return ex.runner.capture_graphs()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def token_gaps_ms(token_times: list[float]) -> list[float]:
    """ITL samples of one request: gaps between consecutive tokens (tokens that arrived together: 0)."""
    return [(b - a) * 1e3 for a, b in zip(token_times, token_times[1:], strict=False)]


def run_load(llm: LLM, work: Workload, backend: str = "engine") -> tuple[LoadResult, list[Request]]:
    """Feed the workload to the executor in real time; returns the metrics and the finished requests."""
    ex = llm.executor
    pending = list(range(len(work.prompts)))
    requests: list[Request] = []
    blocks_max, pre0 = 0, ex.stats["preemptions"]
    t0 = time.perf_counter()
    while pending or ex.has_work:
        now = time.perf_counter() - t0
        while pending and work.arrival_s[pending[0]] <= now:
            i = pending.pop(0)
            r = ex.add_request(work.prompts[i], SamplingParams(max_tokens=work.output_lens[i], ignore_eos=True))
            r.arrival_time = t0 + work.arrival_s[i]
            requests.append(r)
        if ex.has_work:
            ex.step()
            blocks_max = max(blocks_max, ex.kv_cache.pool.num_used)
        elif pending:
            time.sleep(max(0.0, work.arrival_s[pending[0]] - (time.perf_counter() - t0)))
    duration = time.perf_counter() - t0
    ex.end_of_work()
    ttft = [(r.first_token_time - r.arrival_time) * 1e3 for r in requests]
    itl = [g for r in requests for g in token_gaps_ms(r.token_times)]
    n_out = sum(len(r.output_token_ids) for r in requests)
    return LoadResult(backend, len(requests), n_out, duration, n_out / duration, len(requests) / duration,
                      pct(ttft, 50), pct(ttft, 99), pct(itl, 50), pct(itl, 99), blocks_max,
                      ex.kv_cache.num_blocks - 1, ex.stats["preemptions"] - pre0), requests


def run_hf_continuous_batching(model, work: Workload, max_batch_tokens: int = 8192) -> LoadResult:
    """transformers' generate_batch (continuous batching, paged cache) on the same prompts, all at once.

    generate_batch takes one max_new_tokens for all requests: the workload's longest, with no end token, so for
    a mixed workload it generates more tokens per request than the engine (longer runs at full batch, which
    favours its tokens/s); tokens/s counts every token it generated."""
    from transformers.generation import GenerationConfig

    model.set_attn_implementation("paged|sdpa")  # transformers 5.17: paged cache + SDPA
    cfg = GenerationConfig(max_new_tokens=max(work.output_lens), do_sample=False, eos_token_id=-1, pad_token_id=0,
                           max_batch_tokens=max_batch_tokens)
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate_batch(inputs=work.prompts, generation_config=cfg, progress_bar=False)
    torch.cuda.synchronize()
    duration = time.perf_counter() - t
    n_out = sum(len(o.generated_tokens) for o in out.values())
    nan = float("nan")
    return LoadResult("hf-continuous-batching", len(work.prompts), n_out, duration, n_out / duration,
                      len(work.prompts) / duration, nan, nan, nan, nan, 0, 0, 0)


def interference(llm: LLM, vocab: int, streams: int = 64, stream_len: tuple[int, int] = (128, 384),
                 long_prompt: int = 2048, seed: int = 0) -> dict:
    """`streams` requests decode; once all have produced a quarter of their tokens, one long_prompt-token request
    arrives. The
    streams' inter-token gaps while it is prefilled (until its first token) against their gaps before it."""
    ex = llm.executor
    rng = np.random.default_rng(seed)
    reqs = [ex.add_request(rng.integers(0, vocab, stream_len[0]).tolist(),
                           SamplingParams(max_tokens=stream_len[1], ignore_eos=True)) for _ in range(streams)]
    while min(len(r.output_token_ids) for r in reqs) < stream_len[1] // 4:
        ex.step()
    t_arrive = time.perf_counter()
    long_req = ex.add_request(rng.integers(0, vocab, long_prompt).tolist(), SamplingParams(max_tokens=8,
                                                                                          ignore_eos=True))
    while long_req.first_token_time is None:
        ex.step()
    t_first = long_req.first_token_time
    while ex.has_work:
        ex.step()
    ex.end_of_work()
    gaps = lambda lo, hi: [(b - a) * 1e3 for r in reqs for a, b in zip(r.token_times, r.token_times[1:],
                                                                          strict=False) if lo < b <= hi]
    before, during = gaps(0, t_arrive), gaps(t_arrive, t_first)
    allg = gaps(0, float("inf"))
    return {"streams": streams, "long_prompt": long_prompt, "max_num_tokens": ex.max_num_tokens,
            "long_ttft_ms": (t_first - t_arrive) * 1e3, "itl_before_p50_ms": pct(before, 50),
            "itl_during_p50_ms": pct(during, 50), "itl_during_max_ms": max(during, default=float("nan")),
            "itl_all_p50_ms": pct(allg, 50), "itl_all_p99_ms": pct(allg, 99),
            "p99_over_p50": pct(allg, 99) / max(pct(allg, 50), 1e-9)}


def batch1_latency(llm: LLM, vocab: int, input_len: int = 128, output_len: int = 128, seed: int = 0) -> dict:
    """One request alone on the same executor: TTFT and decode ms/token ((last - first token) / (n - 1))."""
    ex = llm.executor
    prompt = np.random.default_rng(seed).integers(0, vocab, input_len).tolist()
    r = ex.add_request(prompt, SamplingParams(max_tokens=output_len, ignore_eos=True))
    t0 = time.perf_counter()
    while ex.has_work:
        ex.step()
    ex.end_of_work()
    return {"input_len": input_len, "output_len": output_len, "ttft_ms": (r.first_token_time - t0) * 1e3,
            "decode_ms_per_token": (r.token_times[-1] - r.token_times[0]) * 1e3 / max(len(r.token_times) - 1, 1)}


def format_results(rows: list[LoadResult]) -> str:
    head = (f"{'backend':<24} {'reqs':>5} {'out tok':>8} {'sec':>7} {'out tok/s':>10} {'req/s':>7} "
            f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'KV blk max':>10} {'preempt':>7} "
            f"{'errors':>6}")
    lines = [head, "-" * len(head)]
    known = lambda v: "-" if v < 0 else v
    for r in rows:
        lines.append(f"{r.backend:<24} {r.requests:>5} {r.output_tokens:>8} {r.duration_s:>7.2f} "
                     f"{r.output_tok_s:>10.1f} {r.requests_s:>7.2f} {r.ttft_p50_ms:>9.1f} {r.ttft_p99_ms:>9.1f} "
                     f"{r.itl_p50_ms:>8.2f} {r.itl_p99_ms:>8.2f} {known(r.kv_blocks_max):>5}/"
                     f"{known(r.kv_blocks_total):<5} {known(r.preemptions):>7} {r.errors:>6}")
    return "\n".join(lines)


def format_overhead(http: list[LoadResult], engine: list[LoadResult]) -> str:
    """HTTP rows against the in-process rows of the same request rates: output tok/s of each and the HTTP
    overhead (1 - HTTP / in-process, in %); TTFT and ITL p50/p99 (ms) of each; failed requests of both."""
    by_rate = {r.request_rate: r for r in engine}
    pair = lambda a, b, f: f"{a:{f}}/{b:{f}}"
    head = (f"{'rate':>5} | {'HTTP tok/s':>10} {'in-proc':>8} {'overhead':>8} | {'TTFT HTTP':>11} {'in-proc':>11} | "
            f"{'ITL HTTP':>13} {'in-proc':>13} | {'errors':>6}")
    lines = [head, "-" * len(head)]
    for h in http:
        e = by_rate.get(h.request_rate)
        if e is None:
            continue
        ttft = [pair(r.ttft_p50_ms, r.ttft_p99_ms, ".0f") for r in (h, e)]
        itl = [pair(r.itl_p50_ms, r.itl_p99_ms, ".2f") for r in (h, e)]
        lines.append(f"{h.request_rate:>5g} | {h.output_tok_s:>10.1f} {e.output_tok_s:>8.1f} "
                     f"{100 * (1 - h.output_tok_s / e.output_tok_s):>7.1f}% | {ttft[0]:>11} {ttft[1]:>11} | "
                     f"{itl[0]:>13} {itl[1]:>13} | {h.errors + e.errors:>6}")
    return "\n".join(lines)


def results_to_json(rows: list[LoadResult]) -> list[dict]:
    return [asdict(r) for r in rows]


def results_from_json(rows: list[dict]) -> list[LoadResult]:
    return [LoadResult(**r) for r in rows]
