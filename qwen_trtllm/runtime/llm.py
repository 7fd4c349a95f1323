"""The Python API, in the shape of TensorRT-LLM's and vLLM's `LLM`:

    llm = LLM("qwen_outputs")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))         # offline: everything at once
    async for out in llm.generate_async("Hello", SamplingParams(...)):        # online: one stream per request
        print(out.new_text, end="")

Offline calls run the executor on the caller's thread. The async form starts one background engine thread that
owns the executor (requests arrive through a thread-safe inbox); each stream is an asyncio queue fed from it;
leaving the `async for` early cancels the request and frees its KV cache blocks.
Under tensor parallelism every rank constructs the LLM and calls the same offline methods; rank 0 schedules and
returns the outputs, the other ranks follow its steps and return [].
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import numpy as np

from qwen_trtllm import QWenError
from qwen_trtllm.runtime.detokenizer import IncrementalText
from qwen_trtllm.runtime.engine import Engine
from qwen_trtllm.runtime.executor import Executor, ExecutorConfig
from qwen_trtllm.runtime.request import Request, RequestOutput, SamplingParams

Prompt = str | Sequence[int]
SWITCH_INTERVAL_S = 5e-4  # the GIL switch interval once the engine thread runs (see LLM.start)


class LLM:
    """An engine, its tokenizer (when the engine directory has qwen.tiktoken) and one in-flight batching executor."""

    def __init__(self, engine_dir: str | Path, tokenizer_dir: str | Path | None = None,
                 config: ExecutorConfig | None = None):
        from qwen_trtllm.runtime.distributed import init_distributed, load_engine_on_all_ranks
        from qwen_trtllm.runtime.runner import load_tokenizer

        tokenizer = load_tokenizer(engine_dir, tokenizer_dir, required=False)  # a wrong --tokenizer_dir: at once
        rank, world = init_distributed()
        engine = load_engine_on_all_ranks(engine_dir, rank, world)
        self._setup(engine, tokenizer, config or ExecutorConfig())

    @classmethod
    def from_engine(cls, engine: Engine, tokenizer=None, config: ExecutorConfig | None = None) -> LLM:
        """An LLM over an already loaded engine (tests, benchmarks)."""
        llm = cls.__new__(cls)
        llm._setup(engine, tokenizer, config or ExecutorConfig())
        return llm

    def _setup(self, engine: Engine, tokenizer, config: ExecutorConfig) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.executor = Executor(engine, config, tokenizer)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = False
        # outputs of the running step, per event loop of their streams (engine thread only; see _deliver)
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}

    @property
    def is_leader(self) -> bool:
        return self.engine.rank == 0

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise QWenError("this engine directory has no qwen.tiktoken: pass token ids or --tokenizer_dir")
            return self.tokenizer.encode_raw(prompt)  # a raw prompt: <|im_start|> etc. as the special ids, as Qwen
        return [int(t) for t in prompt]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids)) if self.tokenizer is not None else ""

    # --- offline -----------------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams]
                 | None = None, on_output: Callable[[int, RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion (all queued at once; the scheduler batches them in flight).

        prompts: a string, token ids, or a list of either. sampling_params: one for all, or one per prompt.
        on_output(i, output) is called for prompt i after each step that gives it tokens (streaming).
        Returns one finished RequestOutput per prompt, in order (rank 0; [] elsewhere). Raises QWenError for a
        request that cannot run (nothing is queued then)."""
        if not self.is_leader:
            self.executor.worker_loop()
            return []
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        if not prompts:
            raise QWenError("no input prompts given")
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params or SamplingParams()]
        params = list(params) * len(prompts) if len(params) == 1 else list(params)
        if len(params) != len(prompts):
            raise QWenError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = [self.encode(p) for p in prompts]
        try:
            for i, p in zip(ids, params, strict=True):
                self.executor.check_request(i, p)
        except QWenError:
            self.executor.end_of_work()
            raise
        views = [self._text_view(p) for p in params]
        if self._thread is not None:  # the engine thread owns the executor: hand it the requests
            return self._generate_on_engine_thread(ids, params, views, on_output)
        callback = (lambda i: (lambda out: on_output(i, views[i](out)))) if on_output else (lambda i: None)
        requests = [self.executor.add_request(i, p, callback(n))
                    for n, (i, p) in enumerate(zip(ids, params, strict=True))]
        self.executor.run_until_done()
        return self._results(requests, views)

    @staticmethod
    def _results(requests: list[Request], views: list[Callable[[RequestOutput], RequestOutput]]
                 ) -> list[RequestOutput]:
        errors = [r.error for r in requests if r.finish_reason == "error"]
        if errors:
            raise QWenError(errors[0])
        return [view(r.snapshot()) for r, view in zip(requests, views, strict=True)]

    def _generate_on_engine_thread(self, ids: list[list[int]], params: list[SamplingParams], views: list,
                                   on_output: Callable[[int, RequestOutput], None] | None) -> list[RequestOutput]:
        done = threading.Semaphore(0)

        def callback(i: int):
            def cb(out: RequestOutput) -> None:
                if on_output is not None:
                    on_output(i, views[i](out))
                if out.finished:
                    done.release()
            return cb

        futures = [self._submit(i, p, callback(n)) for n, (i, p) in enumerate(zip(ids, params, strict=True))]
        requests = [f.result() for f in futures]
        for _ in requests:
            done.acquire()
        return self._results(requests, views)

    def _text_view(self, params: SamplingParams) -> Callable[[RequestOutput], RequestOutput]:
        """For one request: fills each RequestOutput's text (stop tokens left out, cut before a stop string) and
        new_text (what earlier outputs had not shown; a partial UTF-8 character or the possible start of a stop
        string waits for the next tokens unless the request ended). Identity without a tokenizer."""
        if self.tokenizer is None:
            return lambda out: out
        text = IncrementalText(self.tokenizer, params.stop_ids(), params.stop)

        def view(out: RequestOutput) -> RequestOutput:
            out.new_text = text.update(out.token_ids, out.finished)
            out.text = text.text
            return out

        return view

    # --- online ------------------------------------------------------------------------------------------
    def _submit(self, ids: list[int], params: SamplingParams,
                on_output: Callable[[RequestOutput], None]) -> concurrent.futures.Future:
        """Hand a request to the engine thread; the future gives its Request once added (or the error)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(((ids, params, on_output), fut))
        self._wake.set()
        return fut

    def start(self) -> None:
        """Start the background engine thread (generate_async does it on first use).

        The thread shares the GIL with the caller's event loop. It drops the GIL while it waits for each step's
        tokens from the GPU; with Python's default 5 ms switch interval it may then wait that long to get it back
        from a busy event loop, a quarter of a decode step. The interval is lowered to 0.5 ms (never raised)."""
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        if self._thread is None:
            self._thread = threading.Thread(target=self._engine_loop, name="qwen-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the engine thread after the requests it holds (cancel them first for a fast stop)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _deliver(self) -> None:
        """Hand the step's outputs to their streams: one wake-up per event loop and step, not one per output."""
        box, self._outbox = self._outbox, {}
        for loop, items in box.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody reads these streams any more
                pass

    def _engine_loop(self) -> None:
        ex = self.executor
        while True:
            while not self._inbox.empty():
                req, fut = self._inbox.get()
                if not fut.set_running_or_notify_cancel():  # its caller left before it was taken
                    continue
                try:
                    request = ex.add_request(*req)
                except Exception as e:  # a request that cannot run: its caller gets the error
                    fut.set_exception(e)
                else:
                    fut.set_result(request)
            if ex.has_work:
                try:
                    ex.step()
                except Exception:  # the step's requests already failed with the error; the loop goes on
                    pass
                self._deliver()
                continue
            if self._stopping:
                ex.end_of_work()
                return
            self._wake.wait(0.05)
            self._wake.clear()

    async def generate_async(self, prompt: Prompt, sampling_params: SamplingParams | None = None
                             ) -> AsyncIterator[RequestOutput]:
        """Stream one request: a RequestOutput after each step that gave it tokens, the last with finished=True.
        Raises QWenError (before the first output) when the request cannot run."""
        self.start()
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        params = sampling_params or SamplingParams()
        view = self._text_view(params)
        push = lambda out: self._outbox.setdefault(loop, []).append((outputs, view(out)))
        fut = self._submit(self.encode(prompt), params, push)
        try:
            request: Request = await asyncio.wrap_future(fut)
        except asyncio.CancelledError:  # the engine may take it meanwhile: cancel it then
            fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() else f.result().cancel())
            self._wake.set()
            raise
        try:
            while True:
                out = await outputs.get()
                yield out
                if out.finished:
                    return
        finally:
            if not request.finished:
                request.cancel()
                self._wake.set()


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


def output_sequences(prompts: Sequence[Sequence[int]], outputs: Sequence[RequestOutput], end_id: int,
                     max_new_tokens: int, num_beams: int = 1) -> np.ndarray:
    """TensorRT-LLM's output array: int32 [B, max_input + max_new_tokens] (beam search: [B, num_beams, ...], the
    beams best first), prompt then output, padded with end_id."""
    width = max(len(p) for p in prompts) + max_new_tokens
    seqs = np.full((len(prompts), num_beams, width), end_id, dtype=np.int32)
    for b, (p, out) in enumerate(zip(prompts, outputs, strict=True)):
        for i, ids in enumerate(out.beams or [out.token_ids]):
            seqs[b, i, : len(p)] = p
            seqs[b, i, len(p): len(p) + len(ids)] = ids
    return seqs if num_beams > 1 else seqs[:, 0]
