"""The OpenAI-compatible server, end to end: a real `examples/qwen/serve.py` process on 127.0.0.1 driven by the
official `openai` client and raw httpx, on a tiny random engine with the real tokenizer (CPU, fp32).

Checked: models / health / page / metrics; greedy answers equal run.py's; 16 concurrent clients with mixed
settings each equal to its single run; stop strings split across tokens (never returned, streamed or not); beam
search's n best beams; every bad request's status and OpenAI error body; a disconnect frees the request's KV cache
blocks; 429 at --max_queue; a bounded load test (loopback only); benchmark_serving.py --base_url's HTTP load
generator against the server and the in-process run; SIGTERM drains and exits 0, or past --shutdown_timeout
cancels cleanly. What needs no server process is in test_serve_in_process.py; shared helpers in serve_support.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from net import free_port
from serve_support import (
    EOD,
    MAX_INPUT_LEN,
    MAX_OUTPUT_LEN,
    MODEL,
    ROOT,
    USER,
    Server,
    chat_stops,
    client,
    finish_of,
    metrics,
    reference,
    script_env,
    sse_data,
    text_of,
    wait_healthy,
    wait_idle,
)

from qwen_trtllm.runtime import LLM, SamplingParams
from qwen_trtllm.tokenizer import DEFAULT_SYSTEM, make_context


# --- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_dir(serve_engine_dir) -> Path:
    return serve_engine_dir


RUN_PY_QUESTION = "你好，请问你叫什么？"
RUN_PY_MAX = 12


@pytest.fixture(scope="module")
def server(engine_dir, tmp_path_factory) -> Server:
    work = tmp_path_factory.mktemp("server")
    port, log, csv_path = free_port(), work / "server.log", work / "run_py.csv"
    cmd = [sys.executable, str(ROOT / "examples/qwen/serve.py"), "--engine_dir", str(engine_dir), "--host",
           "127.0.0.1", "--port", str(port), "--max_queue", "16", "--num_scheduler_steps", "4",
           "--shutdown_timeout", "30"]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=script_env(), cwd=work)
    run_py = subprocess.Popen([sys.executable, str(ROOT / "examples/qwen/run.py"), "--engine_dir", str(engine_dir),
                               "--max_output_len", str(RUN_PY_MAX), "--top_k", "1", "--input_text", RUN_PY_QUESTION,
                               "--output_csv", str(csv_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=script_env(), cwd=work)
    srv = Server(f"http://127.0.0.1:{port}", proc, log, run_py, csv_path)
    try:
        wait_healthy(srv.url, proc, srv.log_tail)
        yield srv
    finally:
        for p in (proc, run_py):
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


# --- basics ------------------------------------------------------------------------------------------------------
def test_models_health_page_and_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = client(server).models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client(server).models.retrieve(MODEL).id == MODEL
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text and "AbortController" in page.text
    m = metrics(server)
    for name in ("qwen_trtllm_num_requests_waiting", "qwen_trtllm_num_requests_running",
                 "qwen_trtllm_kv_cache_blocks_used", "qwen_trtllm_prompt_tokens_total",
                 "qwen_trtllm_generation_tokens_total", "qwen_trtllm_time_to_first_token_seconds_count",
                 "qwen_trtllm_inter_token_latency_seconds_count"):
        assert name in m, name
    assert m['qwen_trtllm_requests_total{endpoint="/health",status="200"}'] >= 1


# --- equal to run.py and to single runs --------------------------------------------------------------------------
def test_greedy_chat_equals_run_py(server, serve_tok):
    out, err = server.run_py.communicate(timeout=120)
    assert server.run_py.returncode == 0, err
    want = [int(t) for t in server.run_py_csv.read_text().split(",")]
    stops = chat_stops(serve_tok)
    c = client(server)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": RUN_PY_QUESTION}],
                                  max_tokens=RUN_PY_MAX, temperature=0)
    assert r.choices[0].message.content == text_of(serve_tok, want, stops)
    assert f'Output: "{r.choices[0].message.content.strip()}"' in out  # run.py prints Qwen's stripped response
    assert r.choices[0].finish_reason == finish_of(want, stops) and r.object == "chat.completion"
    prompt_len = len(make_context(serve_tok, RUN_PY_QUESTION)[1])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_len, len(want))
    assert r.usage.total_tokens == prompt_len + len(want)
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": RUN_PY_QUESTION}],
                                            max_tokens=RUN_PY_MAX, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text_of(serve_tok, want, stops)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == finish_of(want, stops)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)
    assert len({ch.id for ch in chunks}) == 1


@dataclass
class Spec:
    kind: str  # "chat" or "completion"
    prompt: str
    max_tokens: int
    stream: bool
    temperature: float
    seed: int | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    system: str | None = None


WORDS = ("the quick brown fox jumps over a lazy dog while seven small robots count prime numbers in the rain "
         "你好 世界 模型 推理 速度").split()


def specs(n: int = 16) -> list[Spec]:
    rng = random.Random(7)
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
        sampled = i % 2 == 1
        s = Spec(kind="chat" if i % 3 else "completion", prompt=prompt, max_tokens=rng.randint(2, 8),
                 stream=i % 4 in (1, 2), temperature=rng.choice([0.7, 1.0, 1.3]) if sampled else 0.0,
                 seed=1000 + i if sampled else None)
        if sampled:  # a top_k keeps draws far from CDF boundaries: batched and alone logits differ in the last bits
            s.top_p, s.top_k = rng.choice([None, 0.5, 0.95]), rng.choice([2, 5, 10])
        s.repetition_penalty = rng.choice([None, 1.0, 1.3])
        if s.kind == "chat" and i % 5 == 1:
            s.history = [("Hi there", "Hello! How can I help?"), ("Count to three", "one two three")]
            s.system = "You are a terse assistant."
        out.append(s)
    return out


def run_spec(srv: Server, s: Spec) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) of one spec through the openai client."""
    c = client(srv)
    kw = dict(model=MODEL, max_tokens=s.max_tokens, temperature=s.temperature)
    if s.seed is not None:
        kw["seed"] = s.seed
    if s.top_p is not None:
        kw["top_p"] = s.top_p
    extra = {k: v for k, v in (("top_k", s.top_k), ("repetition_penalty", s.repetition_penalty)) if v is not None}
    if extra:
        kw["extra_body"] = extra
    if s.stream:
        kw.update(stream=True, stream_options={"include_usage": True})
    if s.kind == "chat":
        messages = [{"role": "system", "content": s.system}] if s.system else []
        for q, a in s.history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        r = c.chat.completions.create(messages=messages + [{"role": "user", "content": s.prompt}], **kw)
        if not s.stream:
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
        chunks = list(r)
        pieces = [(ch.choices[0].delta.content or "", ch.choices[0].finish_reason) for ch in chunks if ch.choices]
    else:
        r = c.completions.create(prompt=s.prompt, **kw)
        if not s.stream:
            return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
        chunks = list(r)
        pieces = [(ch.choices[0].text, ch.choices[0].finish_reason) for ch in chunks if ch.choices]
    return "".join(p for p, _ in pieces), pieces[-1][1], chunks[-1].usage.completion_tokens


def spec_reference(serve_llm: LLM, serve_tok, s: Spec) -> tuple[str, str, int]:
    if s.kind == "chat":
        ids = make_context(serve_tok, s.prompt, s.history, system=s.system or DEFAULT_SYSTEM,
                           max_window_size=MAX_INPUT_LEN)[1]
        stops = chat_stops(serve_tok)
    else:
        ids, stops = serve_tok.encode(s.prompt), [EOD]
    out = reference(serve_llm, ids, stops, s.max_tokens, s.temperature, s.top_p, s.top_k, s.repetition_penalty,
                    s.seed or 0)
    return text_of(serve_tok, out, stops), finish_of(out, stops), len(out)


def test_16_concurrent_clients_equal_their_single_runs(server, serve_llm, serve_tok):
    cases = specs(16)
    want = [spec_reference(serve_llm, serve_tok, s) for s in cases]
    got: list = [None] * len(cases)
    barrier = threading.Barrier(len(cases))

    def worker(i: int) -> None:
        barrier.wait()
        try:
            got[i] = run_spec(server, cases[i])
        except Exception as e:  # reported below with the case
            got[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for s, g, w in zip(cases, got, want, strict=True):
        assert g == w, f"{s}: got {g!r}, alone {w!r}"
    assert len({w[0] for w in want}) > 8  # different requests, different answers
    wait_idle(server)


# --- stop strings ------------------------------------------------------------------------------------------------
def split_stop(serve_tok, ids: list[int]) -> tuple[str, int, int]:
    """A stop string made of the last 2 characters of one output token and the first 2 of the next, whose first
    occurrence is there: (stop, position in the text, tokens through the one that completes it)."""
    full = text_of(serve_tok, ids)
    for i in range(1, len(ids) - 1):
        before, upto = text_of(serve_tok, ids[:i]), text_of(serve_tok, ids[: i + 1])
        b = len(before)
        if "\ufffd" in upto or len(before) < 2 or len(upto) - b < 2 or not full.startswith(upto):
            continue
        stop = full[b - 2: b + 2]
        if full.find(stop) == b - 2 and stop.strip() == stop:
            return stop, b - 2, i + 1
    raise AssertionError(f"no stop string candidate in {full!r}")


def test_stop_string_split_across_tokens_stops_and_is_not_returned(server, serve_llm, serve_tok):
    prompt = "Once upon a time there was a small robot who"
    ids = reference(serve_llm, serve_tok.encode(prompt), [EOD], 24)
    assert EOD not in ids
    stop, pos, n_tokens = split_stop(serve_tok, ids)
    want = text_of(serve_tok, ids)[:pos]
    c = client(server)
    for stop_arg in (stop, [stop, "never appears 12345"]):
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop_arg)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
        assert r.usage.completion_tokens == n_tokens  # generation ended at the token that completed it
        pieces = [ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                                                    temperature=0, stop=stop_arg, stream=True)
                  if ch.choices]
        assert "".join(pieces) == want
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=["never appears 12345"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text_of(serve_tok, ids), "length")
    # the same in a chat, streamed: the held-back start of the stop string never reaches the client
    chat_ids = reference(serve_llm, make_context(serve_tok, prompt)[1], chat_stops(serve_tok), 24)
    stop, pos, _ = split_stop(serve_tok, [t for t in chat_ids if t not in chat_stops(serve_tok)])
    chunks = [ch.choices[0] for ch in c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0, stop=[stop],
        stream=True) if ch.choices]
    assert "".join(ch.delta.content or "" for ch in chunks) == text_of(serve_tok, chat_ids, chat_stops(serve_tok))[:pos]
    assert chunks[-1].finish_reason == "stop"


def test_beam_search_returns_the_n_best_beams(server, serve_llm, serve_tok):
    """use_beam_search (vLLM's extension) with n = 3: three choices, best first, each equal to the runtime's beam
    search of the same prompt (chatml, stop ids); the sampling fields do not apply; usage counts every beam."""
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    prompt = make_context(serve_tok, "Tell me about lighthouses")[1]
    want = serve_llm.generate([prompt], SamplingParams(max_tokens=12, use_beam_search=True, n=3, length_penalty=0.5,
                                                 stop_token_ids=chat_stops(serve_tok), end_id=EOD))[0].beams
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me about lighthouses"}],
                                  max_tokens=12, n=3, temperature=0.9, top_p=0.5,
                                  extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert [ch.index for ch in r.choices] == [0, 1, 2] and len(set(map(tuple, want))) == 3
    assert [ch.message.content for ch in r.choices] == [text_of(serve_tok, b, chat_stops(serve_tok)) for b in want]
    stops = chat_stops(serve_tok)
    assert [ch.finish_reason for ch in r.choices] == ["stop" if b[-1] in stops else "length" for b in want]
    assert r.usage.completion_tokens == sum(map(len, want))
    raw = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, n=3, best_of=4,
                               extra_body={"use_beam_search": True, "return_token_ids": True})
    want4 = serve_llm.generate([prompt], SamplingParams(max_tokens=12, use_beam_search=True, n=3, best_of=4,
                                                  stop_token_ids=chat_stops(serve_tok), end_id=EOD))[0].beams
    assert [ch.model_extra["token_ids"] for ch in raw.choices] == want4
    for body, param in (({"n": 2, "use_beam_search": True, "stream": True}, "stream"),
                        ({"n": 2, "use_beam_search": True, "stop": ["x"]}, None)):
        r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", **body}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# --- errors ------------------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("chat", {"messages": [{"role": "tool", "content": "x"}]}, 400, "unknown role"),
    ("chat", {"messages": []}, 400, "at least one message"),
    ("chat", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "must follow a user message"),
    ("chat", {"messages": [USER, {"role": "assistant", "content": "y"}]}, 400, "last message"),
    ("chat", {"messages": [USER], "n": 2}, 400, "n=2 is not supported by this server"),
    ("chat", {"messages": [USER], "temperature": -1}, 400, "temperature"),
    ("chat", {"messages": [USER], "top_p": 0}, 400, "top_p"),
    ("chat", {"messages": [USER], "top_k": -1}, 400, "top_k"),
    ("chat", {"messages": [USER], "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("chat", {"messages": [USER], "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"messages": [USER], "max_tokens": 100000}, 400, "max_output_len"),
    ("chat", {"messages": [USER], "stop": [""]}, 400, "stop"),
    ("chat", {"messages": [USER], "stream": True, "n": 3}, 400, "not supported"),
    ("chat", {"messages": [{"role": "user", "content": "word " * 400}]}, 400, "max_input_len"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "text only"),
    ("completion", {"prompt": "hello " * 400, "stream": True}, 400, "max_input_len"),
    ("completion", {"prompt": [1, 2, 10**7]}, 400, "token ids"),
    ("completion", {"prompt": ""}, 400, "empty"),
    ("completion", {"prompt": ["a", "b"]}, 400, "one prompt"),
    ("completion", {"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ("chat", {"model": "gpt-4", "messages": [USER]}, 404, "does not exist"),
    ("completion", {"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
    ("chat", {}, 400, "messages"),  # FastAPI's 422 validation errors come back as 400
    ("chat", {"messages": [USER], "temperature": "hot"}, 400, "temperature"),
    ("chat", {"messages": [{"content": "no role"}]}, 400, "role"),
    ("chat", "{not json", 400, "JSON"),
]


@pytest.mark.parametrize("kind,body,status,message", BAD_REQUESTS,
                         ids=[f"{i}-{b[0]}-{b[3]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_errors(server, kind, body, status, message):
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and message in err["message"], err
    assert err["type"] == "invalid_request_error" and "Traceback" not in r.text
    if status == 404:
        assert err["code"] == "model_not_found" and err["param"] == "model"
    if message in ("temperature", "top_p"):  # the bad sampling field is named, alone
        assert err["param"] == message and err["message"].startswith(message), err


def test_unknown_routes_and_methods_and_the_client_error_types(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405
    c = client(server)
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported by this server"):
        c.chat.completions.create(model=MODEL, messages=[USER], n=2)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4", messages=[USER])
    assert httpx.get(server.url + "/health").status_code == 200  # none of it took the server down


# --- cancellation, admission, load --------------------------------------------------------------------------------
def test_disconnect_mid_stream_cancels_and_frees_the_blocks(server):
    before = wait_idle(server)
    body = {"model": MODEL, "prompt": "tell me a very long story " * 8, "max_tokens": MAX_OUTPUT_LEN,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not any('"text":"' in d and '"text":""' not in d for d in sse_data([next(lines)])):
                pass
            during = metrics(server)
            assert during["qwen_trtllm_kv_cache_blocks_used"] > 0
            assert during["qwen_trtllm_num_requests_in_flight"] == 1
        # leaving the block closes the connection mid-stream
    after = wait_idle(server, timeout=10)
    generated = after["qwen_trtllm_generation_tokens_total"] - before["qwen_trtllm_generation_tokens_total"]
    assert generated < MAX_OUTPUT_LEN  # cancelled, not run to its end
    key = 'qwen_trtllm_requests_finished_total{finish_reason="cancelled"}'
    assert after.get(key, 0) == before.get(key, 0) + 1


def test_clients_leaving_before_the_engine_takes_their_requests(server):
    """Disconnects while the engine is busy with a step (the request still in the engine's inbox) cancel cleanly
    and leave the engine thread alive."""
    wait_idle(server)
    busy = {"model": MODEL, "prompt": "tell me a very long story " * 8, "max_tokens": MAX_OUTPUT_LEN,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as h, h.stream("POST", server.url + "/v1/completions", json=busy) as r:
        next(r.iter_lines())
        for i in range(12):
            try:
                httpx.post(server.url + "/v1/completions", timeout=httpx.Timeout(10, read=0.002),
                           json={"model": MODEL, "prompt": f"quick {i}", "max_tokens": 8, "stream": i % 2 == 0})
            except httpx.ReadTimeout:
                pass
    quick = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=20)
    assert quick.completions.create(model=MODEL, prompt="still there?", max_tokens=2).choices  # the engine lives
    wait_idle(server)
    assert httpx.get(server.url + "/health").status_code == 200


def test_max_queue_in_flight_requests_then_429(server):
    wait_idle(server)
    body = {"model": MODEL, "messages": [USER], "max_tokens": MAX_OUTPUT_LEN, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=32)) as h:
        streams = []
        try:
            for _ in range(16):  # --max_queue 16
                r = h.send(h.build_request("POST", server.url + "/v1/chat/completions", json=body), stream=True)
                assert r.status_code == 200
                streams.append(r)
            r = h.post(server.url + "/v1/chat/completions", json=body)
            assert r.status_code == 429, r.text
            assert r.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                client(server).chat.completions.create(model=MODEL, messages=[USER], max_tokens=2)
        finally:
            for r in streams:
                r.close()
    m = wait_idle(server)
    assert m['qwen_trtllm_requests_total{endpoint="/v1/chat/completions",status="429"}'] == 2
    assert client(server).chat.completions.create(model=MODEL, messages=[USER], max_tokens=2).choices


def test_load_200_requests_at_concurrency_8(server):
    n, concurrency = 200, 8
    before = wait_idle(server)
    rng = random.Random(3)
    jobs = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        common = {"model": MODEL, "max_tokens": rng.randint(1, 3), "temperature": 0, "stream": i % 3 == 0}
        if i % 2:
            jobs.append(("/v1/chat/completions", {**common, "messages": [{"role": "user", "content": words}]}))
        else:
            jobs.append(("/v1/completions", {**common, "prompt": words}))

    async def main() -> list[str]:
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as h:
            async def one(path: str, body: dict) -> str:
                async with sem:
                    if body["stream"]:
                        async with h.stream("POST", path, json=body) as r:
                            data = sse_data([line async for line in r.aiter_lines()])
                            ok = r.status_code == 200 and data[-1] == "[DONE]" and \
                                json.loads(data[-2])["choices"][0]["finish_reason"] in ("stop", "length")
                            return "ok" if ok else f"{r.status_code} {data[-2:]}"
                    r = await h.post(path, json=body)
                    ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
                    return "ok" if ok else f"{r.status_code} {r.text}"

            return await asyncio.gather(*(one(p, b) for p, b in jobs))

    t0 = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    assert results == ["ok"] * n, [r for r in results if r != "ok"][:3]
    after = wait_idle(server)
    done = sum(v - before.get(k, 0) for k, v in after.items()
               if k.startswith("qwen_trtllm_requests_finished_total"))
    assert done == n
    print(f"{n} requests at concurrency {concurrency} in {elapsed:.1f} s")


# --- the HTTP load generator -------------------------------------------------------------------------------------
def test_http_load_generator_against_the_server(server, serve_llm):
    """benchmark_serving.py --base_url's client: 20 requests at 5 requests/s, each exactly its max_tokens, the
    same greedy tokens as the in-process LLM; its row prints beside run_load's."""
    import numpy as np

    from qwen_trtllm.evaluation import http_load
    from qwen_trtllm.evaluation import serving as sv

    wait_idle(server)
    rng = np.random.default_rng(11)
    n, rate = 20, 5.0
    prompts = [rng.integers(0, 151936, int(rng.integers(4, 48))).tolist() for _ in range(n)]
    outs = [int(m) for m in rng.integers(1, 9, n)]
    work = sv.Workload(prompts, outs, [i / rate for i in range(n)])
    row, results = http_load.run_http_load(server.url + "/v1", work, "http", model=MODEL, timeout_s=120)
    assert row.errors == 0, http_load.first_error(results)
    assert [r.completion_tokens for r in results] == outs
    assert [len(r.token_ids) for r in results] == outs and [len(r.token_times) for r in results] == outs
    assert all(r.finish_reason == "length" for r in results)
    assert (row.requests, row.output_tokens) == (n, sum(outs)) and row.duration_s >= (n - 1) / rate
    for r in results:
        assert r.token_times[0] > r.arrival and r.token_times == sorted(r.token_times)
    assert 0 < row.ttft_p50_ms <= row.ttft_p99_ms < 120e3
    assert 0 <= row.itl_p50_ms <= row.itl_p99_ms and row.itl_p99_ms > 0
    assert row.output_tok_s == pytest.approx(sum(outs) / row.duration_s)
    want = serve_llm.generate(prompts, [SamplingParams(max_tokens=m, top_k=1, ignore_eos=True) for m in outs])
    assert [r.token_ids for r in results] == [w.token_ids for w in want]
    engine_row, requests = sv.run_load(serve_llm, work)
    assert [len(q.output_token_ids) for q in requests] == outs and engine_row.output_tokens == row.output_tokens
    row.request_rate = engine_row.request_rate = rate
    table = sv.format_results([engine_row, row]).splitlines()
    assert table[-1].startswith("http ") and table[-1].split()[-1] == "0"
    overhead = sv.format_overhead([row], [engine_row]).splitlines()
    assert len(overhead) == 3 and overhead[-1].split()[0] == "5"
    assert sv.results_from_json(json.loads(json.dumps(sv.results_to_json([row])))) == [row]
    # a server that is not there: every request an error, counted
    dead = sv.Workload(prompts[:2], outs[:2], [0.0, 0.0])
    row, results = http_load.run_http_load(f"http://127.0.0.1:{free_port()}/v1", dead, timeout_s=5)
    assert row.errors == 2 and row.output_tokens == 0 and "ConnectError" in http_load.first_error(results)


# --- shutdown (last: it stops the module's server) ----------------------------------------------------------------
def test_sigterm_lets_in_flight_requests_finish_and_exits_0(server):
    body = {"model": MODEL, "prompt": "A story about a lighthouse:", "max_tokens": 40, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=60) as h, h.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = sse_data([next(lines)])
        server.proc.send_signal(signal.SIGTERM)
        data = first + sse_data(lines)
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["choices"][0]["finish_reason"] in ("stop", "length")  # drained, not cut off
    assert server.proc.wait(timeout=60) == 0, server.log_tail()
    assert "Shutting down" in server.log_tail()


def test_sigterm_past_the_drain_timeout_cancels_cleanly(engine_dir, tmp_path):
    """--shutdown_timeout 0: SIGTERM cancels in-flight requests in the engine at once; a stream still ends with an
    error event and [DONE], a plain request gets a 503 in OpenAI's shape (not uvicorn's bare 500), exit 0."""
    import threading

    port, log = free_port(), tmp_path / "server.log"
    cmd = [sys.executable, str(ROOT / "examples/qwen/serve.py"), "--engine_dir", str(engine_dir), "--host",
           "127.0.0.1", "--port", str(port), "--num_scheduler_steps", "1", "--shutdown_timeout", "0"]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=script_env(), cwd=tmp_path)
    url, tail = f"http://127.0.0.1:{port}", lambda: log.read_text(errors="replace")[-3000:]
    try:
        wait_healthy(url, proc, tail)
        body = {"model": MODEL, "prompt": "tell me a very long story " * 20, "max_tokens": MAX_OUTPUT_LEN,
                "temperature": 0, "ignore_eos": True}
        plain: dict = {}
        worker = threading.Thread(target=lambda: plain.update(r=httpx.post(url + "/v1/completions", json=body,
                                                                            timeout=60)))
        worker.start()
        with httpx.Client(timeout=60) as h, h.stream("POST", url + "/v1/completions",
                                                     json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            first = sse_data([next(lines)])
            proc.send_signal(signal.SIGTERM)
            data = first + sse_data(lines)
        worker.join(60)
        assert data[-1] == "[DONE]", data[-3:]
        assert "shutting down" in json.loads(data[-2])["error"]["message"], data[-2]
        assert plain["r"].status_code == 503 and "shutting down" in plain["r"].json()["error"]["message"]
        assert proc.wait(timeout=60) == 0, tail()
        assert "Traceback" not in tail(), tail()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
