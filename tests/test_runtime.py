"""The in-flight batching runtime: block pool, scheduler invariants, requests in flight equal to each run alone
(greedy and sampled, chunked prefill, preemption), cancel / error paths, the async API, and the model runner's
mixed prefill + decode steps with and without CUDA graphs (the graph cases on CUDA only)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from qwen_trtllm import QWenError
from qwen_trtllm.builder.build import build_engine
from qwen_trtllm.runtime import LLM, Engine, ExecutorConfig, KvCacheConfig, SamplingParams
from qwen_trtllm.runtime.kv_cache import BlockPool
from qwen_trtllm.runtime.model_runner import StepPlan
from qwen_trtllm.runtime.request import RequestStatus

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    d = build_engine(tmp_path_factory.mktemp("rt") / "engine", hf_dir=tiny_checkpoint, dtype="float32",
                     max_batch_size=4, max_input_len=32, max_output_len=16)
    return Engine.load(d, device=DEVICE)


def make_llm(engine, **kw) -> LLM:
    kv = KvCacheConfig(tokens_per_block=16, max_tokens=kw.pop("max_tokens", None))
    return LLM.from_engine(engine, config=ExecutorConfig(kv_cache=kv, **kw))


def prompts_and_params(vocab: int, n: int = 8, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 30))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(1, 16), ignore_eos=True, seed=i,
                             top_k=rng.choice([1, 0, 5]), top_p=rng.choice([1.0, 0.9, 0.5]),
                             temperature=rng.choice([0.7, 1.0, 1.3]), repetition_penalty=rng.choice([1.0, 1.2]))
              for i in range(n)]
    return prompts, params


@pytest.fixture(scope="module")
def alone(engine):
    prompts, params = prompts_and_params(engine.config.vocab_size)
    return [make_llm(engine).generate([p], sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]


def check_pool(llm: LLM) -> None:
    """Every block not held by a running request is free; nothing is owned twice."""
    ex = llm.executor
    held = [b for r in ex.scheduler.running for b in r.block_ids]
    assert len(held) == len(set(held))
    assert not any(r.block_ids for r in ex.scheduler.waiting)
    assert ex.kv_cache.pool.num_used == len(held)


def test_block_pool_reference_counts():
    pool = BlockPool(5)
    a = pool.allocate(2)
    assert 0 not in a and pool.num_free == 2
    pool.share(a)
    pool.release(a)
    assert pool.num_free == 2  # still owned once
    pool.release(a)
    assert pool.num_free == 4
    with pytest.raises(QWenError, match="exhausted"):
        pool.allocate(5)
    with pytest.raises(AssertionError):
        pool.release(a)


@pytest.mark.parametrize("config", [
    {},  # everything fits: one prefill step, then decode windows
    {"max_num_tokens": 7},  # chunked prefill: prompts split over steps, decodes beside them
    {"max_num_tokens": 9, "max_tokens": 64, "num_scheduler_steps": 3},  # 4 blocks: preemption and recompute
    {"max_batch_size": 2, "max_tokens": 48, "num_scheduler_steps": 1},
    {"max_batch_size": 2, "max_tokens": 48, "num_scheduler_steps": 4},  # a full batch, a queue: decode windows
])
def test_in_flight_outputs_equal_each_request_alone(engine, alone, config):
    prompts, params = prompts_and_params(engine.config.vocab_size)
    llm = make_llm(engine, **config)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == alone
    assert all(o.finish_reason == "length" and len(o.token_ids) == p.max_tokens for o, p in zip(outs, params,
                                                                                              strict=True))
    if "max_tokens" in config and config["max_tokens"] == 64:
        assert llm.executor.stats["preemptions"] > 0
    pool = llm.executor.kv_cache.pool
    assert pool.num_free == pool.num_blocks - 1


def test_decode_windows_while_requests_wait_only_when_the_batch_is_full(engine, monkeypatch):
    """With a queue behind a full batch no waiting request can be admitted before one finishes: the scheduler
    runs windows of num_scheduler_steps decode steps (each ending by the first max_tokens), one host round trip
    per window. With room in the batch a newcomer is admitted at the next step."""
    def run(max_batch_size: int) -> list[int]:
        llm = make_llm(engine, max_batch_size=max_batch_size, max_tokens=48, num_scheduler_steps=4)
        ex = llm.executor
        real, seen = ex.scheduler.schedule, []

        def spy():
            out = real()
            seen.append(out.num_steps)
            return out

        monkeypatch.setattr(ex.scheduler, "schedule", spy)
        reqs = [ex.add_request([1, 2, 3], SamplingParams(max_tokens=n, top_k=1, ignore_eos=True)) for n in (12, 12)]
        while ex.has_work:
            ex.step()
            if len(reqs) == 2:  # a third request arrives after the first step
                reqs.append(ex.add_request([4, 5, 6], SamplingParams(max_tokens=5, top_k=1, ignore_eos=True)))
        assert [len(r.output_token_ids) for r in reqs] == [12, 12, 5]
        check_pool(llm)
        return seen

    # batch of 2, the third waits: windows 4 + 4 + 3 until the first two finish, its prefill, a window of 4
    assert run(2) == [1, 4, 4, 3, 1, 4]
    # batch of 3: the third is admitted at once (a mixed step), then windows to the first max_tokens and beyond
    assert run(3) == [1, 1, 4, 4, 2]


def test_random_arrivals_and_cancels_keep_the_invariants(engine, alone):
    """Requests arrive at random steps, some are cancelled; after every step the pool and the queues agree,
    the step respects max_batch_size, and finished requests equal their single runs."""
    prompts, params = prompts_and_params(engine.config.vocab_size)
    llm = make_llm(engine, max_num_tokens=10, max_tokens=96, max_batch_size=3, num_scheduler_steps=2)
    ex, rng = llm.executor, random.Random(3)
    order, reqs = list(range(len(prompts))), {}
    rng.shuffle(order)
    cancelled = set(order[:2])
    while order or ex.has_work:
        if order and rng.random() < 0.5:
            i = order.pop()
            reqs[i] = ex.add_request(prompts[i], params[i])
        if ex.has_work:
            ex.step()
        assert len(ex.scheduler.running) <= 3
        assert all(r.status is RequestStatus.RUNNING for r in ex.scheduler.running)
        assert all(r.status is RequestStatus.WAITING for r in ex.scheduler.waiting)
        check_pool(llm)
        for i in cancelled & reqs.keys():
            reqs[i].cancel()
    for i, r in reqs.items():
        if i in cancelled:
            assert r.finish_reason == "cancelled"
        else:
            assert r.output_token_ids == alone[i], i
    assert ex.kv_cache.pool.num_free == ex.kv_cache.num_blocks - 1


def test_a_failing_step_returns_every_block(engine, monkeypatch):
    llm = make_llm(engine)
    ex = llm.executor
    reqs = [ex.add_request([1, 2, 3], SamplingParams(max_tokens=4)) for _ in range(3)]

    def boom(*a, **k):
        raise RuntimeError("device fault")

    monkeypatch.setattr(ex.runner, "execute", boom)
    with pytest.raises(RuntimeError, match="device fault"):
        ex.step()
    assert all(r.finish_reason == "error" and "device fault" in r.error for r in reqs)
    assert ex.kv_cache.pool.num_free == ex.kv_cache.num_blocks - 1 and not ex.has_work


def test_requests_that_can_never_run_are_refused(engine):
    llm = make_llm(engine, max_tokens=32)  # 2 blocks of 16
    with pytest.raises(QWenError, match="exceed the KV cache"):
        llm.executor.add_request([1] * 30, SamplingParams(max_tokens=8))
    with pytest.raises(QWenError, match="max_input_len"):
        llm.executor.add_request([1] * 33, SamplingParams(max_tokens=1))
    with pytest.raises(QWenError, match="temperature"):
        llm.executor.add_request([1], SamplingParams(temperature=-1))
    with pytest.raises(QWenError, match="max_batch_size"):
        make_llm(engine, max_batch_size=0)
    assert not llm.executor.has_work


def test_async_stream_equals_offline_and_leaving_early_cancels(engine):
    llm = make_llm(engine)
    prompt, params = [5, 6, 7, 8], SamplingParams(max_tokens=12, ignore_eos=True)
    want = make_llm(engine).generate([prompt], params)[0].token_ids

    async def main():
        got, seen = [], []
        async for out in llm.generate_async(prompt, params):
            seen.extend(out.new_token_ids)
            got = out.token_ids
        early = []
        async for out in llm.generate_async(prompt, params):
            early.append(out)
            break
        return got, seen, early

    try:
        got, seen, early = asyncio.run(main())
        assert got == want and seen == want
        assert early and not early[0].finished
        for _ in range(200):  # the engine thread drops the abandoned request
            if not llm.executor.has_work:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert not llm.executor.has_work
        assert llm.executor.kv_cache.pool.num_free == llm.executor.kv_cache.num_blocks - 1
    finally:
        llm.shutdown(timeout=10)


def _plans(engine, llm):
    """A mixed step (two decode rows, then two prefill chunks, one of them after cached tokens) and the same
    sequences run one by one: the rows' logits must agree."""
    ex, cfg = llm.executor, engine.config
    g = torch.Generator().manual_seed(5)
    V = cfg.vocab_size
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (9, 20, 13, 30)]
    tables = []
    for s in seqs:
        t: list[int] = []
        ex.kv_cache.grow(t, len(s) + 1)
        tables.append(t)
    runner = ex.runner
    # cache the first tokens of every sequence: all but the last of 0 and 1 (they decode next), 5 of 3
    cached = [len(seqs[0]) - 1, len(seqs[1]) - 1, 0, 5]
    warm = StepPlan([t for s, c in zip(seqs, cached, strict=True) for t in s[:c] if c],
                    [i for c in cached for i in range(c) if c], [c for c in cached if c], [0, 0, 0],
                    [tables[i] for i in (0, 1, 3)], [1.0] * 3, [0] * 3, 0)
    runner.forward_plan(warm)
    mixed = StepPlan([seqs[0][-1], seqs[1][-1]] + seqs[2] + seqs[3][5:],
                     [len(seqs[0]) - 1, len(seqs[1]) - 1] + list(range(13)) + list(range(5, 30)),
                     [1, 1, 13, 25], cached, tables, [1.0] * 4, [0] * 4, 2)
    return runner, mixed, tables


def test_no_garbage_collection_inside_a_graph_capture(monkeypatch):
    """A dead reference cycle holding CUDA graphs, collected while another graph captures, destroys them mid-capture:
    CUDA refuses that and invalidates the capture. _capture collects before it and holds the collector off until the
    capture has ended, also when the captured function raises (the CUDA calls faked: this runs on CPU)."""
    import contextlib
    import gc

    from qwen_trtllm.runtime import model_runner as mr

    events: list[tuple[str, bool]] = []

    class FakeStream:
        def wait_stream(self, other):
            pass

    class FakeCapture:
        def __init__(self, graph, pool=None):
            pass

        def __enter__(self):
            events.append(("capture", gc.isenabled()))

        def __exit__(self, *exc):
            events.append(("end", gc.isenabled()))

    monkeypatch.setattr(mr.torch.cuda, "Stream", lambda device: FakeStream())
    monkeypatch.setattr(mr.torch.cuda, "current_stream", lambda: FakeStream())
    monkeypatch.setattr(mr.torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(mr.torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(mr.torch.cuda, "graph", FakeCapture)
    monkeypatch.setattr(mr.gc, "collect", lambda: events.append(("collect", gc.isenabled())) or 0)
    _, out = mr._capture(lambda x: events.append(("fn", gc.isenabled())) or x + 1, (1,), "cuda", None)
    assert out == 2 and gc.isenabled()
    assert events == [("fn", True), ("fn", True), ("collect", True), ("capture", False), ("fn", False), ("end", False)]

    def fails_in_capture(x):
        if events and events[-1][0] == "capture":
            raise RuntimeError("captured op failed")
        events.append(("fn", gc.isenabled()))

    events.clear()
    with pytest.raises(RuntimeError, match="captured op failed"):
        mr._capture(fails_in_capture, (1,), "cuda", None)
    assert gc.isenabled() and events[-1] == ("end", False)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need CUDA")
def test_a_graph_dying_in_a_dead_cycle_during_a_capture_does_not_break_it():
    """An older CUDA graph whose last reference becomes a dead cycle during a capture, with a collector that would
    run at nearly every allocation: the capture succeeds (no collection inside it) and its replay is right; the old
    graph is collected afterwards."""
    import gc
    import weakref

    from qwen_trtllm.runtime.model_runner import _capture

    x = torch.zeros(4, device=DEVICE)
    old = torch.cuda.CUDAGraph()
    with torch.cuda.graph(old):
        x.add_(1.0)
    holder, calls, gone = [old], [], weakref.ref(old)
    del old

    def fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(t)
        if len(calls) == 3:  # the captured call (after two warm-ups): the old graph's last reference dies in a cycle
            cycle = {"graph": holder.pop()}
            cycle["self"] = cycle
            del cycle
            _ = [[] for _ in range(100)]  # allocations that trigger the collector when it is on
        return t * 2.0

    threshold = gc.get_threshold()
    gc.set_threshold(1)
    try:
        graph, out = _capture(fn, (x,), torch.device(DEVICE), None)
    finally:
        gc.set_threshold(*threshold)
    x.fill_(3.0)
    graph.replay()
    assert torch.equal(out, torch.full_like(x, 6.0))
    gc.collect()
    assert not holder and gone() is None  # the old graph died in the cycle and was collected after the capture


@pytest.mark.parametrize("graphs", [False, True])
def test_model_runner_mixed_prefill_and_decode(engine, graphs):
    if graphs and DEVICE != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    llm = make_llm(engine, cuda_graphs=graphs)
    runner, mixed, tables = _plans(engine, llm)
    together = runner.forward_plan(mixed).float().cpu()  # eager, one flat batch
    D = mixed.num_decode
    rows = []
    for i in range(mixed.num_seqs):  # each sequence alone, through the path generation uses (graphs if on)
        start = sum(mixed.query_lens[:i])
        n = mixed.query_lens[i]
        one = StepPlan(mixed.input_ids[start:start + n], mixed.positions[start:start + n], [n],
                       [mixed.context_lens[i]], [tables[i]], [1.0], [0], 1 if i < D else 0)
        rows.append(runner.logits(one).float().cpu()[0])
    alone = torch.stack(rows)
    assert ((together - alone).norm(dim=-1) / alone.norm(dim=-1)).max() < 1e-5
    graphed = runner.logits(mixed).float().cpu()  # two prefill chunks: one eager step
    assert ((graphed - alone).norm(dim=-1) / alone.norm(dim=-1)).max() < 1e-5
    keep = [0, 1, 3]  # decode rows + one prefill chunk: the decode graph, then the chunk's graph (on CUDA)
    one_chunk = StepPlan(mixed.input_ids[:2] + mixed.input_ids[15:], mixed.positions[:2] + mixed.positions[15:],
                         [mixed.query_lens[i] for i in keep], [mixed.context_lens[i] for i in keep],
                         [tables[i] for i in keep], [1.0] * 3, [0] * 3, 2)
    got = runner.logits(one_chunk).float().cpu()
    assert ((got - alone[keep]).norm(dim=-1) / alone[keep].norm(dim=-1)).max() < 1e-5


def test_streamed_new_text_adds_up_and_offline_calls_share_the_engine_thread(engine, tiktoken_file):
    """new_text pieces add up to the final text (no partial UTF-8 character); llm.generate while the async engine
    thread runs goes through that thread and equals a plain offline run; ids past the tokenizer decode to ''."""
    from qwen_trtllm.tokenizer import QWenTokenizer

    tok = QWenTokenizer.from_dir(tiktoken_file)
    prompts = [[5, 6, 7, 8], [9, 10], [11] * 12]
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.9, top_k=0, seed=3)
    want = make_llm(engine).generate(prompts, params)
    llm = LLM.from_engine(engine, tokenizer=tok, config=ExecutorConfig(kv_cache=KvCacheConfig(tokens_per_block=16),
                                                                       num_scheduler_steps=1))

    async def stream():
        pieces, final = [], None
        async for out in llm.generate_async(prompts[0], params):
            pieces.append(out.new_text)
            final = out
        return pieces, final

    try:
        pieces, final = asyncio.run(stream())
        assert final.token_ids == want[0].token_ids
        # a piece once handed out is never rewritten (a partial UTF-8 character waits for its next token)
        assert "".join(pieces) == final.text == tok.decode(final.token_ids)
        assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in want]
    finally:
        llm.shutdown(timeout=10)
    assert tok.decode([151870, 15]) == tok.decode([15])  # an embedding row the tokenizer lacks: nothing
