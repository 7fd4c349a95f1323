"""The server's parts in this process, no serve.py: the app in TestClient, text deltas, chunks, CLI flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serve_support import EOD, MODEL, ROOT, USER, sse_data, text_of

from qwen_trtllm.runtime import LLM, Engine, SamplingParams
from qwen_trtllm.runtime.detokenizer import IncrementalText
from qwen_trtllm.tokenizer import QWenTokenizer


# --- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_dir(serve_engine_dir) -> Path:
    return serve_engine_dir


# --- text and chunks ---------------------------------------------------------------------------------------------
def test_incremental_text_holds_back_partial_characters_and_stop_prefixes(serve_tok):
    text = "ab龘c𠀀, the end is near"
    ids = serve_tok.encode(text)
    assert any("\ufffd" in serve_tok.decode(ids[:i]) for i in range(1, len(ids)))  # the emoji spans byte tokens
    inc = IncrementalText(serve_tok)
    deltas = [inc.update(ids[: i + 1], finished=i == len(ids) - 1) for i in range(len(ids))]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    inc = IncrementalText(serve_tok, stop=["end is"])
    deltas = [inc.update(ids[: i + 1]) for i in range(len(ids))]
    assert "".join(deltas) == "ab龘c𠀀, the " and inc.stopped and inc.text == "ab龘c𠀀, the "
    assert inc.finish_reason("length") == "stop"
    inc = IncrementalText(serve_tok, stop=["end of"])  # a prefix that turns out not to be the stop string is released
    assert "".join(inc.update(ids[: i + 1], finished=i == len(ids) - 1) for i in range(len(ids))) == text


@pytest.mark.parametrize("text", ["", "plain", 'quote " backslash \\ newline \n tab \t', "汉字 é \u2028 \x01", "@@"])
def test_streamed_chunk_template_equals_the_pydantic_chunk(text):
    """The per-token chunk is pydantic's JSON made once with markers and filled in: the same object as the model's."""
    from qwen_trtllm.serving.responses import ChatShape, CompletionShape

    for shape in (ChatShape("chatcmpl-1", 7, "m"), CompletionShape("cmpl-1", 7, "m"),
                  CompletionShape("cmpl-2", 7, "m", "", True)):
        for ids in ([], [3], [151643, 42]):
            assert json.loads(shape.delta(text, ids)) == json.loads(shape.delta_model(text, ids))


# --- the app in this process (FastAPI's TestClient) --------------------------------------------------------------
def test_internal_errors_are_500_without_a_traceback(engine_dir, serve_llm, monkeypatch):
    from fastapi.testclient import TestClient

    from qwen_trtllm.serving.server import create_app

    serve_llm = LLM.from_engine(serve_llm.engine, tokenizer=QWenTokenizer.from_dir(engine_dir))
    app = create_app(serve_llm, model_name=MODEL)

    async def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")
        yield  # an async generator, as generate_async

    monkeypatch.setattr(serve_llm, "generate_async", broken)
    tc = TestClient(app, raise_server_exceptions=False)
    r = tc.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 2})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert "secret" not in r.text and "Traceback" not in r.text
    r = tc.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error" and "secret" not in r.text
    assert app.state.server.in_flight == 0


def test_without_a_tokenizer_token_ids_in_and_out(serve_llm):
    """An engine without qwen.tiktoken (serve.py --model): /v1/completions on token ids, answered with token ids
    and empty text; whatever needs text is a clear 400."""
    from fastapi.testclient import TestClient

    from qwen_trtllm.serving.server import create_app

    ids = [11, 22, 33, 44, 55]
    params = SamplingParams(max_tokens=6, top_k=1, stop_token_ids=[EOD], end_id=EOD)
    want = serve_llm.generate([ids], params)[0].token_ids
    with TestClient(create_app(LLM.from_engine(serve_llm.engine), model_name=MODEL)) as tc:
        r = tc.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert (choice["text"], choice["token_ids"]) == ("", want)
        r = tc.post("/v1/completions", json={"prompt": [ids], "max_tokens": 6, "temperature": 0, "stream": True,
                                             "stream_options": {"include_usage": True}})
        data = sse_data(r.text.splitlines())
        assert r.status_code == 200 and data[-1] == "[DONE]"
        events = [json.loads(d) for d in data[:-1]]
        chunks = [e["choices"][0] for e in events if e["choices"]]
        assert all(c["token_ids"] and c["text"] == "" for c in chunks[:-1])  # a chunk for every step's tokens
        assert sum((c["token_ids"] for c in chunks), []) == want and chunks[-1]["finish_reason"] == "length"
        assert events[-1]["usage"]["completion_tokens"] == len(want)
        for path, body, param in [("/v1/chat/completions", {"messages": [USER]}, "messages"),
                                  ("/v1/completions", {"prompt": "hello"}, "prompt"),
                                  ("/v1/completions", {"prompt": ids, "stop": ["x"]}, "stop"),
                                  ("/v1/completions", {"prompt": ids, "echo": True}, "echo")]:
            r = tc.post(path, json=body)
            err = r.json()["error"]
            assert r.status_code == 400 and "tokenizer" in err["message"] and err["param"] == param, r.text


def test_ignore_eos_runs_to_max_tokens(engine_dir, serve_tok):
    """vLLM's ignore_eos: the stop tokens (here <|endoftext|>, made the greedy first token) end nothing."""
    import torch
    from fastapi.testclient import TestClient

    from qwen_trtllm.serving.server import create_app

    engine = Engine.load(engine_dir, device="cpu")
    prompt = serve_tok.encode("The weather today is")
    first = LLM.from_engine(engine).generate([prompt], SamplingParams(max_tokens=1, top_k=1))[0].token_ids[0]
    with torch.no_grad():  # <|endoftext|>'s logit: twice the greedy token's
        engine.model.lm_head.weight[EOD] = 2 * engine.model.lm_head.weight[first]
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0}
    with TestClient(create_app(LLM.from_engine(engine, tokenizer=serve_tok), model_name=MODEL)) as tc:
        r = tc.post("/v1/completions", json=body).json()
        assert (r["choices"][0]["finish_reason"], r["usage"]["completion_tokens"]) == ("stop", 1)
        assert "token_ids" not in r["choices"][0]  # only when asked, on a server with a tokenizer
        r = tc.post("/v1/completions", json={**body, "ignore_eos": True, "return_token_ids": True}).json()
        choice = r["choices"][0]
        assert (choice["finish_reason"], r["usage"]["completion_tokens"]) == ("length", 6)
        assert len(choice["token_ids"]) == 6 and choice["token_ids"][0] == EOD
        assert choice["text"] == text_of(serve_tok, choice["token_ids"], [EOD])  # stop tokens never become text
        r = tc.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 5, "temperature": 0,
                                                  "ignore_eos": True, "stream": True,
                                                  "stream_options": {"include_usage": True}})
        events = [json.loads(d) for d in sse_data(r.text.splitlines())[:-1]]
        assert events[-1]["usage"]["completion_tokens"] == 5
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"


# --- flags -------------------------------------------------------------------------------------------------------
def test_parse_rates_and_serve_model_flags(engine_dir):
    import importlib.util

    import torch

    from qwen_trtllm import QWenError
    from qwen_trtllm.evaluation.serving import parse_rates

    assert parse_rates("4, 8:200,inf", 300) == [(4.0, 300), (8.0, 200), (float("inf"), 300)]
    for bad in ("fast", "0", "4:0", "4:x"):
        with pytest.raises(QWenError, match="request_rates"):
            parse_rates(bad, 10)
    spec = importlib.util.spec_from_file_location("serve_script", ROOT / "examples/qwen/serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    with pytest.raises(QWenError, match="exclude each other"):
        serve.parse_args(["--model", "qwen-7b", "--engine_dir", str(engine_dir)])
    args = serve.parse_args(["--model", "tiny", "--max_batch_size", "4"])
    assert (args.model, args.dtype, args.max_batch_size) == ("tiny", "float16", 4)
    if not torch.cuda.is_available():
        with pytest.raises(QWenError, match="on one GPU"):
            serve.random_model_llm(args, 1)
    with pytest.raises(QWenError, match="choose one of"):
        serve.random_model_llm(serve.parse_args(["--model", "qwen-3b"]), 1)
