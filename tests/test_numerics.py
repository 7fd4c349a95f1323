"""Non-finite logits (issue 15 item 4): an fp16 engine whose activations pass 65504 stops the request it hits with
one line naming the fix, in the sampler (no raise on NaN / inf), the executor (the other requests go on), the
LLM API, run.py (plain and under torchrun), chat.py and the server (OpenAI's error shape, and it stays up)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from net import free_port
from safetensors.torch import load_file, save_file

from qwen_trtllm import QWenError
from qwen_trtllm.builder.build import build_engine
from qwen_trtllm.runtime import LLM, Engine, ExecutorConfig, SamplingParams
from qwen_trtllm.runtime.request import NON_FINITE_LOGITS
from qwen_trtllm.runtime.sampler import NON_FINITE, SamplingTensors, sample, sample_checked

ROOT = Path(__file__).resolve().parents[1]
FIX = "rebuild the engine with --dtype bfloat16"


def message(n: int) -> str:
    return f"non-finite logits (fp16 overflow?) at output token {n}: {FIX}"


def edited_copy(src: Path, dst: Path, name: str, edit) -> Path:
    """A copy of a safetensors checkpoint with tensor `name` replaced by edit(tensor)."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        t = load_file(str(f))
        if name in t:
            t[name] = edit(t[name])
            save_file(t, str(f), metadata={"format": "pt"})
            return dst
    raise AssertionError(f"{name} not in {src}")


C_PROJ = "transformer.h.1.mlp.c_proj.weight"


def overflowing(w: torch.Tensor) -> torch.Tensor:
    """w scaled to a largest |value| of 3e4: finite in fp16, but the MLP's outputs pass 65504."""
    return w * (3e4 / w.abs().max())


def build(ckpt: Path, out: Path, dtype: str = "float16", world_size: int = 1) -> Path:
    return build_engine(out, hf_dir=ckpt, dtype=dtype, max_batch_size=4, max_input_len=64, max_output_len=16,
                        world_size=world_size)


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint, tiktoken_file) -> Path:
    return make_checkpoint(vocab_size=151936, seq_length=2048, tokenizer_file=tiktoken_file, seed=5)


@pytest.fixture(scope="module")
def overflow_engine(checkpoint, tmp_path_factory) -> Path:
    """The issue's engine, fp16, with the last layer's mlp.c_proj scaled up until every token's activations
    overflow; its weights stay finite in fp16 (the issue's x 1e8 makes the weights themselves overflow, which
    build.py now refuses: tests/test_cli_workflow.py)."""
    d = tmp_path_factory.mktemp("overflow")
    return build(edited_copy(checkpoint, d / "ckpt", C_PROJ, overflowing), d / "engine")


# --- the sampler ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("greedy", [True, False])
def test_sample_checked_marks_non_finite_rows_and_never_raises(greedy):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g)
    logits[1, 7] = float("nan")
    logits[2, 0] = float("inf")
    logits[3] = float("-inf")
    params = [SamplingParams(top_k=1) if greedy else SamplingParams(temperature=0.8, top_k=0, top_p=0.9, seed=s)
              for s in range(5)]
    st = SamplingTensors.build(params, torch.device("cpu"))
    counter = torch.arange(5)
    fed, reported = sample_checked(logits, st, counter)
    assert reported.tolist()[1:4] == [NON_FINITE] * 3
    assert ((fed >= 0) & (fed < 300)).all()  # a valid id for the next step and the other ranks
    good = torch.tensor([0, 4])
    want = sample(logits[good], SamplingTensors.build([params[0], params[4]], torch.device("cpu")), counter[good])
    assert reported[good].tolist() == fed[good].tolist() == want.tolist()  # finite rows: sample()'s tokens


# --- the executor: only the request that overflowed stops ------------------------------------------------------
def greedy_runs(engine_dir: Path, prompts, max_tokens: int, steps: int = 16):
    """(the requests, run to the end together, greedy; their executor, whose plans' num_steps are in .windows)."""
    llm = LLM.from_engine(Engine.load(engine_dir), config=ExecutorConfig(num_scheduler_steps=steps))
    ex = llm.executor
    ex.windows, execute = [], ex.runner.execute
    ex.runner.execute = lambda plan, *a: ex.windows.append(plan.num_steps) or execute(plan, *a)
    reqs = [ex.add_request(p, SamplingParams(max_tokens=max_tokens, top_k=1, ignore_eos=True)) for p in prompts]
    ex.run_until_done()
    return reqs, ex


A, B = [5, 6, 7, 8, 9], [11, 12, 13]


@pytest.fixture(scope="module")
def token_x(checkpoint, tmp_path_factory):
    """(engine, X, A's and B's greedy tokens on the clean engine): in the engine token X's embedding row is past
    fp16's range, so a sequence overflows from the step X is fed in. A never meets X; B generates X as its 3rd
    token (so fails at its 4th)."""
    d = tmp_path_factory.mktemp("token_x")
    clean = build(checkpoint, d / "clean")
    (ra, rb), _ = greedy_runs(clean, [A, B], 10)
    want_a, want_b = ra.output_token_ids, rb.output_token_ids
    x = want_b[2]
    assert x not in A + want_a + B + want_b[:2], "pick other prompts: X must only enter B at its 4th step"
    # X's row as an fp16 overflow leaves it (inf), written into the engine file: build.py refuses such weights
    engine = shutil.copytree(clean, d / "engine")
    weights = load_file(str(engine / "rank0.safetensors"))
    weights["embed.weight"][x] = float("inf")
    save_file(weights, str(engine / "rank0.safetensors"), metadata={"format": "pt"})
    return engine, x, want_a, want_b


@pytest.mark.parametrize("steps", [1, 16])  # one decode step per host read, and windows of several
def test_one_overflowing_request_stops_and_the_others_finish(token_x, steps):
    engine, x, want_a, want_b = token_x
    (ra, rb, rc), ex = greedy_runs(engine, [A, B, [x, 3, 4]], 10, steps)  # C's prompt holds X: fails at once
    assert ra.finish_reason == "length" and ra.error is None and ra.output_token_ids == want_a
    assert (rb.finish_reason, rb.error, rb.error_code) == ("error", message(4), NON_FINITE_LOGITS)
    assert rb.output_token_ids == want_b[:3]
    assert (rc.finish_reason, rc.error, rc.output_token_ids) == ("error", message(1), [])
    assert ex.kv_cache.pool.num_used == 0 and not ex.has_work
    assert ex.windows[:2] == ([1, 9] if steps == 16 else [1, 1])  # B failed inside a window of 9 decode steps


# --- the LLM API, run.py, chat.py --------------------------------------------------------------------------------
def test_llm_generate_raises_and_generate_async_ends_with_the_error(overflow_engine):
    import asyncio

    llm = LLM(overflow_engine)
    for params in (SamplingParams(max_tokens=4, top_k=1), SamplingParams(max_tokens=4, top_k=0, top_p=0.8),
                   SamplingParams(max_tokens=4, use_beam_search=True, n=2)):
        with pytest.raises(QWenError) as e:
            llm.generate(["Hello", [1, 2, 3]], params)
        assert str(e.value) == message(1)

    async def stream():
        return [out async for out in llm.generate_async("Hello", SamplingParams(max_tokens=4))]

    outs = asyncio.run(stream())
    llm.shutdown()
    assert len(outs) == 1 and outs[0].finished and outs[0].token_ids == []
    assert (outs[0].finish_reason, outs[0].error, outs[0].error_code) == ("error", message(1), NON_FINITE_LOGITS)


def script(name: str, *args: str, stdin: str | None = None, torchrun: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun)] if torchrun \
        else [sys.executable]
    return subprocess.run([*launcher, str(ROOT / "examples/qwen" / name), *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.parametrize("flags", [["--top_k", "1"], [], ["--streaming"]])  # greedy; top_p 0.8 from the config
def test_run_py_exits_2_with_one_line(overflow_engine, flags):
    r = script("run.py", "--engine_dir", str(overflow_engine), "--max_output_len", "8", *flags)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {message(1)}"] and "Traceback" not in r.stderr
    assert "!!!" not in r.stdout and "tokens/s" not in r.stdout


def test_summarize_py_exits_2_with_one_line(overflow_engine):
    r = script("summarize.py", "--test_trt_llm", "--engine_dir", str(overflow_engine), "--max_ite", "1",
               "--output_len", "4", "--max_input_length", "60", "--no_progress")
    assert r.returncode == 2, r.stderr[-2000:]
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [f"error: {message(1)}"]
    assert "Traceback" not in r.stderr and "rouge" not in r.stdout


def test_run_py_under_torchrun_fails_once_without_hanging(checkpoint, tmp_path):
    ckpt = edited_copy(checkpoint, tmp_path / "ckpt", C_PROJ, overflowing)
    tp2 = build(ckpt, tmp_path / "tp2", world_size=2)
    r = script("run.py", "--engine_dir", str(tp2), "--max_output_len", "6", "--input_text", "hi", "hello",
               torchrun=2)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {message(1)}"]  # rank 0 alone prints


def test_chat_py_reports_the_error_and_keeps_chatting(overflow_engine):
    r = script("chat.py", "--engine_dir", str(overflow_engine), "--max_output_len", "4", stdin="Hello\nHi\n:quit\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count(f"error: {message(1)}") == 2  # each question answered with the error, then :quit


# --- the server ------------------------------------------------------------------------------------------------
def test_server_answers_500_and_an_error_event_and_stays_up(overflow_engine, token_x):
    from fastapi.testclient import TestClient

    from qwen_trtllm.serving.server import create_app

    want = {"message": message(1), "type": "server_error", "param": None, "code": NON_FINITE_LOGITS}
    user = {"role": "user", "content": "Hello"}
    for engine, bodies in ((overflow_engine, [("/v1/chat/completions", {"messages": [user]}),
                                              ("/v1/completions", {"prompt": "Hi"})]),
                           (token_x[0], [("/v1/completions", {"prompt": [token_x[1], 3, 4]})])):
        llm = LLM(engine)
        app = create_app(llm, model_name="m")
        try:
            with TestClient(app) as tc:
                for path, body in bodies:
                    r = tc.post(path, json={**body, "max_tokens": 4})
                    assert r.status_code == 500 and r.json() == {"error": want}
                    r = tc.post(path, json={**body, "max_tokens": 4, "stream": True})
                    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
                    assert r.status_code == 200 and events[-1] == "[DONE]"
                    assert json.loads(events[-2]) == {"error": want}
                assert tc.get("/health").status_code == 200 and app.state.server.in_flight == 0
                assert f'qwen_trtllm_requests_finished_total{{finish_reason="error"}} {2.0 * len(bodies)}' in \
                    tc.get("/metrics").text
                if engine == token_x[0]:  # and the next request is answered
                    r = tc.post("/v1/completions", json={"prompt": A, "max_tokens": 4, "temperature": 0})
                    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        finally:
            llm.shutdown()
