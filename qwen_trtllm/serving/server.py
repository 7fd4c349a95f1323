"""The OpenAI-compatible HTTP server: a FastAPI app around one LLM (one engine loop shared by every connection).

    app = create_app(LLM("qwen_outputs"), max_queue=256)
    serve(app, "127.0.0.1", 8000)                         # uvicorn; SIGTERM drains, then exits 0

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (plain and SSE streaming), GET /health,
GET /metrics (Prometheus), GET / (the chat page, static/index.html). Each request becomes one
`llm.generate_async` stream; leaving it (client gone, stop string, shutdown) cancels the request in the engine,
which frees its KV cache blocks at the next step. Errors are answered in OpenAI's shape
{"error": {"message", "type", "param", "code"}}: 400 bad input (FastAPI's 422 included), 404 unknown model or
route, 429 --max_queue requests in flight, 503 shutting down, 500 (no traceback; it goes to the log).
Without a tokenizer (an engine directory without qwen.tiktoken, or serve.py --model) only /v1/completions with
token-id prompts works: the text is empty and every choice carries its token ids (return_token_ids).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_trtllm import QWenError
from qwen_trtllm.runtime.detokenizer import IncrementalText
from qwen_trtllm.runtime.llm import LLM
from qwen_trtllm.runtime.request import QWEN_EOD_ID, RequestOutput, SamplingParams
from qwen_trtllm.serving.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    UsageInfo,
    chat_prompt,
    check_unsupported,
    generation_error,
    invalid,
    new_id,
    now,
    resolve_sampling,
    window_size,
)
from qwen_trtllm.serving.responses import ChatShape, CompletionShape, SSEResponse, sse
from qwen_trtllm.tokenizer import stop_token_ids

logger = logging.getLogger("qwen_trtllm.serving")
STATIC_DIR = Path(__file__).resolve().parent / "static"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")


# --- metrics ---------------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of one server (its own registry, so that several apps can live in one process)."""

    def __init__(self, llm: LLM, in_flight: Callable[[], int]):
        disable_created_metrics()  # no *_created series beside every counter and histogram
        self.registry = r = CollectorRegistry()
        p = "qwen_trtllm_"
        self.requests = Counter(p + "requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
                                registry=r)
        self.finished = Counter(p + "requests_finished", "generation requests by how they ended (stop, length, "
                                "cancelled: client gone or shutdown, error)", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "tokens generated", registry=r)
        sched, pool = llm.executor.scheduler, llm.executor.kv_cache.pool
        Gauge(p + "num_requests_waiting", "requests in the engine's waiting queue (queue depth)",
              registry=r).set_function(lambda: len(sched.waiting))
        Gauge(p + "num_requests_running", "requests in the engine's running batch",
              registry=r).set_function(lambda: len(sched.running))
        Gauge(p + "num_requests_in_flight", "requests accepted by the server and not finished (--max_queue counts "
              "these)", registry=r).set_function(in_flight)
        Gauge(p + "kv_cache_blocks_used", "KV cache blocks in use", registry=r).set_function(lambda: pool.num_used)
        Gauge(p + "kv_cache_blocks_total", "KV cache blocks in the pool", registry=r).set(pool.num_blocks - 1)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "time from a request's arrival to its first token",
                              buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                                       7.5, 10.0, 20.0, 40.0, 80.0), registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "time between consecutive tokens of a request (a "
                             "window of k tokens delivered together after a gap t counts k times t/k)",
                             buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                                      0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5), registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "time from a request's arrival to its end",
                             buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0),
                             registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _CountRequests:
    """ASGI middleware: qwen_trtllm_requests_total{endpoint, status} (status as sent; 500 when none was)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"
        status = None

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status or 500)).inc()


# --- responses -------------------------------------------------------------------------------------------------
def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@dataclass
class _Slot:
    """One accepted request's place among --max_queue; released exactly once."""

    server: OpenAIServer
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.server.in_flight -= 1


class ClientGone(Exception):
    pass


# --- the engine glue -------------------------------------------------------------------------------------------
class OpenAIServer:
    """Requests in OpenAI's shapes -> prompt ids + SamplingParams -> llm.generate_async -> responses / SSE."""

    def __init__(self, llm: LLM, model_name: str | None = None, defaults: dict | None = None,
                 max_queue: int | None = None, shutdown_timeout: float = 10.0, max_window_size: int | None = None):
        if max_queue is not None and max_queue < 1:
            raise QWenError(f"--max_queue must be >= 1, got {max_queue}")
        self.llm, self.tokenizer, self.executor = llm, llm.tokenizer, llm.executor
        engine_dir = llm.engine.engine_dir
        self.model_name = model_name or (Path(engine_dir).resolve().name if engine_dir is not None else "qwen")
        self.defaults = dict(defaults or {})
        self.max_queue, self.shutdown_timeout = max_queue, shutdown_timeout
        self.window = window_size(self.defaults, self.executor.max_input_len, max_window_size)
        tok = self.tokenizer  # None: token ids in and out (/v1/completions only), <|endoftext|> ends a request
        self.chat_stops = sorted(stop_token_ids(tok, "chatml")) if tok is not None else []
        self.raw_stops = sorted(stop_token_ids(tok, "raw")) if tok is not None else [QWEN_EOD_ID]
        self.in_flight = 0
        self.stopping = False
        self.created = now()
        self.metrics = Metrics(llm, lambda: self.in_flight)

    # --- admission and validation ------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist: this server serves `{self.model_name}`",
                           "invalid_request_error", "model", "model_not_found")

    def admit(self) -> _Slot:
        if self.stopping:
            raise APIError(503, "the server is shutting down", "server_error", None, "shutting_down")
        if self.max_queue is not None and self.in_flight >= self.max_queue:
            raise APIError(429, f"too many requests in flight ({self.in_flight}, --max_queue {self.max_queue}): "
                           "retry later", "rate_limit_error", None, "rate_limit_exceeded")
        self.in_flight += 1
        return _Slot(self)

    def sampling(self, req, ids: list[int], max_tokens: int | None, stops: list[int]) -> SamplingParams:
        ex = self.executor
        if max_tokens is None:  # as many as the engine allows (OpenAI's default: up to the context length)
            max_tokens = max(1, min(ex.max_output_len, ex.max_seq_len - len(ids)))
        elif max_tokens < 1 or max_tokens > ex.max_output_len:
            raise invalid(f"max_tokens {max_tokens} must be in 1..{ex.max_output_len} (the engine's max_output_len)",
                          "max_tokens")
        params = resolve_sampling(req, self.defaults, max_tokens, stops, QWEN_EOD_ID)
        try:
            ex.check_request(ids, params)  # the executor's own checks (one line each), before anything is queued
        except QWenError as e:
            raise invalid(str(e)) from None
        return params

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, max_model_len=self.executor.max_seq_len)

    # --- endpoints -----------------------------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        t0 = time.perf_counter()
        self.check_model(req.model)
        check_unsupported(req)
        if self.tokenizer is None:
            raise invalid("chat needs a tokenizer and this server has none (an engine without qwen.tiktoken, or "
                          "serve.py --model without --tokenizer_dir): send token ids to /v1/completions", "messages")
        _, ids = chat_prompt(self.tokenizer, req.messages, self.window)
        max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        params = self.sampling(req, ids, max_tokens, self.chat_stops)
        shape = ChatShape(new_id("chatcmpl"), now(), self.model_name)
        return await self._respond(req, raw, ids, params, t0, shape, self.chat_stops)

    async def completion(self, req: CompletionRequest, raw: Request) -> Response:
        t0 = time.perf_counter()
        self.check_model(req.model)
        check_unsupported(req)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise invalid(f"{len(prompt)} prompts in one request are not supported: send one prompt per "
                              "request (they are batched in flight anyway)", "prompt")
            prompt = prompt[0]
        if self.tokenizer is None:
            for name, bad in (("prompt", isinstance(prompt, str)), ("stop", bool(req.stop)), ("echo", req.echo)):
                if bad:
                    raise invalid(f"{'a text prompt' if name == 'prompt' else name} needs a tokenizer and this "
                                  "server has none: token ids in (the prompt) and out (token_ids) only", name)
        if isinstance(prompt, str):
            ids = self.tokenizer.encode_raw(prompt)  # raw, as Qwen encodes it: special token text -> special ids
        else:
            ids = [int(t) for t in prompt]
            vocab = self.llm.engine.config.vocab_size
            if ids and (min(ids) < 0 or max(ids) >= vocab):
                raise invalid(f"prompt token ids must lie in [0, {vocab})", "prompt")
        if not ids:
            raise invalid("the prompt is empty: give at least one token", "prompt")
        params = self.sampling(req, ids, req.max_tokens, self.raw_stops)
        echo = (prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)) if req.echo else ""
        with_ids = req.return_token_ids if req.return_token_ids is not None else self.tokenizer is None
        shape = CompletionShape(new_id("cmpl"), now(), self.model_name, echo, with_ids)
        return await self._respond(req, raw, ids, params, t0, shape, self.raw_stops)

    async def _respond(self, req, raw: Request, ids: list[int], params: SamplingParams, t0: float,
                       shape: ChatShape, stops: list[int]) -> Response:
        """stops: the format's stop ids, never part of the text (with ignore_eos too, where they end nothing)."""
        slot = self.admit()
        text = IncrementalText(self.tokenizer, stops, params.stop)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return SSEResponse(self._events(ids, params, t0, shape, text, include_usage, slot), slot.release)
        try:
            final = await _unless_disconnected(raw, self._run(ids, params, t0, text))
        except ClientGone:
            return Response(status_code=499)
        finally:
            slot.release()
        if final.finish_reason == "cancelled":
            raise APIError(503, "the request was cancelled: the server is shutting down", "server_error")
        if final.finish_reason == "error":
            logger.error("generation failed: %s", final.error)
            raise generation_error(final)
        if final.beams:  # beam search: one choice per beam, best first
            choices = [(IncrementalText(self.tokenizer, stops).update(b, True), "stop" if b and b[-1] in stops
                        else "length", b) for b in final.beams]
        else:
            choices = [(text.text, text.finish_reason(final.finish_reason), final.token_ids)]
        usage = UsageInfo.of(len(ids), sum(len(c[2]) for c in choices))
        return JSONResponse(shape.response(choices, usage))

    async def _outputs(self, ids: list[int], params: SamplingParams, t0: float) -> AsyncIterator[RequestOutput]:
        """llm.generate_async with the metrics; closing this generator cancels the request."""
        m = self.metrics
        m.prompt_tokens.inc(len(ids))
        last, reason = None, "cancelled"
        try:
            async with aclosing(self.llm.generate_async(ids, params)) as stream:
                async for out in stream:
                    n = len(out.new_token_ids)
                    if n:
                        t = time.perf_counter()
                        if last is None:
                            m.ttft.observe(t - t0)
                        else:
                            for _ in range(n):
                                m.itl.observe((t - last) / n)
                        last = t
                        m.generation_tokens.inc(n)
                    if out.finished:
                        reason = out.finish_reason or "stop"
                    yield out
        except QWenError:
            reason = "error"
            raise
        finally:
            m.finished.labels(reason).inc()
            m.e2e.observe(time.perf_counter() - t0)

    async def _run(self, ids: list[int], params: SamplingParams, t0: float, text: IncrementalText) -> RequestOutput:
        """Run a request to its end (or to a stop string); the last output."""
        final = None
        async with aclosing(self._outputs(ids, params, t0)) as outs:
            async for out in outs:
                text.update(out.token_ids, out.finished)
                final = out
                if out.finished or text.stopped:
                    break
        return final

    async def _events(self, ids: list[int], params: SamplingParams, t0: float, shape: ChatShape, text: IncrementalText,
                      include_usage: bool, slot: _Slot) -> AsyncIterator[str]:
        """The SSE stream: first chunk, content deltas, the chunk with finish_reason, [usage], [DONE]."""
        try:
            first = shape.first()
            if first is not None:
                yield sse(first)
            final = None
            try:
                async with aclosing(self._outputs(ids, params, t0)) as outs:
                    async for out in outs:
                        delta = text.update(out.token_ids, out.finished)
                        if delta or (shape.token_ids and out.new_token_ids):
                            yield sse(shape.delta(delta, out.new_token_ids))
                        final = out
                        if out.finished or text.stopped:
                            break
            except QWenError as e:  # the engine refused it after all
                final, error = None, invalid(str(e))
            except Exception as e:  # the headers are out: the error goes into the stream (the traceback to the log)
                logger.error("internal error while streaming: %s", e, exc_info=e)
                final, error = None, APIError(500, "internal server error", "server_error", None, "internal_error")
            else:
                error = None
                if final is None or final.finish_reason == "cancelled":
                    error = APIError(503, "the request was cancelled: the server is shutting down", "server_error")
                elif final.finish_reason == "error":
                    logger.error("generation failed: %s", final.error)
                    error = generation_error(final)
            if error is not None:
                yield sse(json.dumps(error.body(), ensure_ascii=False))
            else:
                yield sse(shape.last(text.finish_reason(final.finish_reason)))
                if include_usage:
                    yield sse(shape.usage(UsageInfo.of(len(ids), len(final.token_ids))))
            yield sse("[DONE]")
        finally:
            slot.release()

    # --- shutdown -----------------------------------------------------------------------------------------------
    def cancel_all(self) -> None:
        """Cancel every request the engine holds (called from the event loop; the engine thread frees them)."""
        sched = self.executor.scheduler
        for _ in range(10):
            try:
                requests = list(sched.running) + list(sched.waiting)
                break
            except RuntimeError:  # the engine thread changed a queue while we copied it
                continue
        else:
            requests = []
        for r in requests:
            r.cancel()

    async def shutdown(self) -> None:
        """After uvicorn stopped accepting and waited (--shutdown_timeout) for in-flight requests: cancel what is
        left and stop the engine thread (under tensor parallelism this releases the other ranks)."""
        self.stopping = True
        self.cancel_all()
        await asyncio.to_thread(self.llm.shutdown, self.shutdown_timeout)


async def _unless_disconnected(raw: Request, work):
    """Await `work`; if the client disconnects first, cancel it (which cancels its request) and raise ClientGone."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        try:
            while (await raw.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a server that cannot tell: never report a disconnect
            await asyncio.Event().wait()

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task in done:
        return task.result()
    try:
        await task
    except asyncio.CancelledError:
        pass
    raise ClientGone()


# --- the app ---------------------------------------------------------------------------------------------------
def create_app(llm: LLM, *, model_name: str | None = None, defaults: dict | None = None,
               max_queue: int | None = None, shutdown_timeout: float = 10.0,
               max_window_size: int | None = None) -> FastAPI:
    """The FastAPI app serving `llm`. defaults: generation_config.json (runner.generation_defaults)."""
    server = OpenAIServer(llm, model_name, defaults, max_queue, shutdown_timeout, max_window_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        llm.start()
        yield
        await server.shutdown()

    app = FastAPI(title="qwen_trtllm", summary="OpenAI-compatible API for a Qwen (v1) engine", lifespan=lifespan)
    app.state.server = server
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(QWenError)
    async def _qwen_error(request: Request, e: QWenError):  # a request the runtime refused (one-line message)
        return error_response(invalid(str(e)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif param is None and first.get("type") == "missing":
            message = "the request body must be a JSON object"
        else:
            message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        return error_response(invalid(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = f"{e.detail}: {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(APIError(e.status_code, message, kind))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        logger.error("internal error on %s %s: %s", request.method, request.url.path, e, exc_info=e)
        return error_response(APIError(500, "internal server error", "server_error", None, "internal_error"))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        thread = llm._thread
        if server.stopping or (thread is not None and not thread.is_alive()):
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[server.model_card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def model(model_id: str):
        server.check_model(model_id)
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await server.chat(body, raw)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await server.completion(body, raw)

    app.add_middleware(_CountRequests, metrics=server.metrics)
    return app


CANCEL_GRACE_S = 5.0  # after the drain timeout cancels what is left: time for handlers to send 503s / [DONE]


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, sock=None, shutdown_timeout: float = 10.0,
          log_level: str = "info") -> None:
    """Run uvicorn until SIGTERM / SIGINT. SIGTERM: stop accepting, wait up to shutdown_timeout for in-flight
    requests, then cancel the rest in the engine (streams end with an error event and [DONE], other requests get a
    503 in OpenAI's shape), stop the engine; the call then returns (exit status 0 for the caller).
    sock: an already bound socket (bind errors are then the caller's, before the engine loads)."""
    import signal

    import uvicorn

    openai_server: OpenAIServer = app.state.server

    class DrainingServer(uvicorn.Server):
        """uvicorn's shutdown, with the engine's requests cancelled at the drain timeout: uvicorn's own timeout
        (CANCEL_GRACE_S later) would cancel the handlers mid-response instead."""

        async def shutdown(self, sockets=None) -> None:
            def cancel() -> None:
                openai_server.stopping = True
                openai_server.cancel_all()

            timer = asyncio.get_running_loop().call_later(shutdown_timeout, cancel)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout + CANCEL_GRACE_S)
    server = DrainingServer(config)
    # uvicorn re-raises the signal it caught once it has shut down; with this handler a SIGTERM ends the process
    # normally (exit 0) instead of by the signal's default action
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        signal.signal(signal.SIGTERM, previous)
