"""The serving benchmark over HTTP: serving.make_workload's requests sent to a running OpenAI-compatible server
(examples/qwen/serve.py) at their arrival times, measured on the client's clock into serving.LoadResult rows, so
that they print beside the in-process run (serving.run_load) of the same workload.

Each request is one streaming POST {base_url}/completions: the prompt as token ids, max_tokens = its output
length, greedy with no penalty (temperature 0, top_k 1, top_p 1, repetition_penalty 1: run_load's
SamplingParams), `ignore_eos` (stop tokens end nothing: exactly max_tokens tokens, as run_load's ignore_eos),
`return_token_ids` (every chunk names its tokens) and `stream_options.include_usage` (the exact count at the
end). Open loop: every request has its own connection (the pool holds them all) and goes out at its arrival
time whatever is still running. Per request: TTFT = arrival of the first chunk carrying tokens - the request's
scheduled arrival; every token of a chunk is stamped with the chunk's arrival and ITL = the gaps between
consecutive tokens (as run_load stamps the tokens of a window of steps; one token per chunk with
--num_scheduler_steps 1). Output tokens/s = completion tokens of the requests that succeeded / (end of the last
one - start). Errors: a non-200 answer, an error event, a stream without [DONE] or without its usage, a count
other than max_tokens, a transport error or a timeout; counted in LoadResult.errors, their tokens not counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from qwen_trtllm.evaluation.serving import LoadResult, Workload, pct, token_gaps_ms


@dataclass
class HttpRequestResult:
    max_tokens: int
    arrival: float  # perf_counter time it was due to be sent
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # arrival of the chunk that carried each token
    completion_tokens: int | None = None  # from the usage chunk
    finish_reason: str | None = None
    error: str | None = None


def request_body(prompt: list[int], max_tokens: int, model: str | None = None) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "top_k": 1, "top_p": 1.0,
            "repetition_penalty": 1.0, "ignore_eos": True, "return_token_ids": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    return body


async def _one(client: httpx.AsyncClient, body: dict, res: HttpRequestResult) -> None:
    done = False
    try:
        async with client.stream("POST", "completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                res.error = f"HTTP {r.status_code}: {text[:300]}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                t = time.perf_counter()
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = f"error event: {json.dumps(event['error'])[:300]}"
                    return
                if event.get("usage"):
                    res.completion_tokens = int(event["usage"]["completion_tokens"])
                for choice in event.get("choices") or []:
                    ids = choice.get("token_ids")
                    n = len(ids) if ids is not None else int(bool(choice.get("text")))  # a server without them
                    res.token_ids += ids or []
                    res.token_times += [t] * n
                    res.finish_reason = choice.get("finish_reason") or res.finish_reason
    except (httpx.HTTPError, httpx.StreamError, ValueError, KeyError, TypeError) as e:  # transport, timeout, bad event
        res.error = f"{type(e).__name__}: {e}"
        return
    if not done:
        res.error = "the stream ended without [DONE]"
    elif res.completion_tokens is None:
        res.error = "no usage chunk (stream_options.include_usage)"
    elif res.completion_tokens != res.max_tokens:
        res.error = f"{res.completion_tokens} tokens, not max_tokens {res.max_tokens} (ignore_eos not honoured?)"


async def run_http_load_async(base_url: str, work: Workload, backend: str = "http", model: str | None = None,
                              timeout_s: float = 600.0) -> tuple[LoadResult, list[HttpRequestResult]]:
    """Send the workload to base_url (".../v1") in real time; returns the metrics and each request's result.
    timeout_s: for connecting, and between two chunks of a stream (the first included)."""
    n = len(work.prompts)
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 60.0))
    async with httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", limits=limits, timeout=timeout) as client:
        results, tasks = [], []
        t0 = time.perf_counter()
        for i in range(n):
            due = t0 + work.arrival_s[i]
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            res = HttpRequestResult(work.output_lens[i], due)
            results.append(res)
            tasks.append(asyncio.create_task(_one(client, request_body(work.prompts[i], work.output_lens[i], model),
                                                 res)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    ok = [r for r in results if r.error is None]
    ttft = [(r.token_times[0] - r.arrival) * 1e3 for r in ok if r.token_times]
    itl = [g for r in ok for g in token_gaps_ms(r.token_times)]
    n_out = sum(r.completion_tokens for r in ok)
    row = LoadResult(backend, n, n_out, duration, n_out / duration, len(ok) / duration, pct(ttft, 50), pct(ttft, 99),
                     pct(itl, 50), pct(itl, 99), -1, -1, -1, errors=n - len(ok))
    return row, results


def run_http_load(base_url: str, work: Workload, backend: str = "http", model: str | None = None,
                  timeout_s: float = 600.0) -> tuple[LoadResult, list[HttpRequestResult]]:
    """run_http_load_async on a fresh event loop (uvloop's when installed, as uvicorn uses it)."""
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(run_http_load_async(base_url, work, backend, model, timeout_s))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def first_error(results: list[HttpRequestResult]) -> str | None:
    return next((r.error for r in results if r.error is not None), None)
