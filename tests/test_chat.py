"""examples/qwen/chat.py driven through a pipe: commands, streamed answers equal to the runtime's greedy answers
for the same chatml prompts, the history kept between turns and forgotten by :clear, bad input survived."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_trtllm.builder.build import build_engine
from qwen_trtllm.runtime import LLM, Engine, SamplingParams
from qwen_trtllm.tokenizer import QWenTokenizer, make_context, stop_token_ids

ROOT = Path(__file__).resolve().parents[1]
EOD = 151643
MAX_NEW = 6


@pytest.fixture(scope="module")
def engine_dir(make_checkpoint, tiktoken_file, tmp_path_factory) -> Path:
    ckpt = make_checkpoint(vocab_size=151936, seq_length=2048, tokenizer_file=tiktoken_file, seed=5)
    return build_engine(tmp_path_factory.mktemp("chat") / "qwen-tiny", hf_dir=ckpt, dtype="float32",
                        max_batch_size=2, max_input_len=256, max_output_len=32, tokens_per_block=16)


@pytest.fixture(scope="module")
def answer_of(engine_dir):
    """answer_of(question, history, system) -> the greedy answer text the runtime gives that chatml prompt."""
    tok = QWenTokenizer.from_dir(engine_dir)
    llm = LLM.from_engine(Engine.load(engine_dir, device="cpu"))
    stops = sorted(stop_token_ids(tok, "chatml"))
    params = SamplingParams(max_tokens=MAX_NEW, top_k=1, top_p=0.8, repetition_penalty=1.1, stop_token_ids=stops,
                            end_id=EOD)

    def answer(question: str, history=(), system: str = "You are a helpful assistant.") -> str:
        ids = make_context(tok, question, list(history), system=system, max_window_size=256)[1]
        out = llm.generate([ids], params)[0].token_ids
        return tok.decode([t for t in out if t not in stops])

    return answer


def command(engine_dir: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "examples/qwen/chat.py"), "--engine_dir", str(engine_dir), "--top_k", "1",
            *args]


ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def chat(engine_dir: Path, stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(engine_dir, "--max_output_len", str(MAX_NEW), *args), input=stdin,
                          capture_output=True, text=True, timeout=300, env=ENV)


def test_chat_through_a_pipe(engine_dir, answer_of):
    pirate = "You are a pirate."
    r = chat(engine_dir, f":system {pirate}\n:system\nHello\n\nHow are you?\n:clear\nHello\n:bogus\n:quit\nNever\n")
    assert r.returncode == 0, r.stderr
    a1 = answer_of("Hello", system=pirate)
    a2 = answer_of("How are you?", [("Hello", a1.strip())], system=pirate)  # the first turn is in the prompt
    want = (f"(system prompt set)\n(system prompt: {pirate})\nQwen: {a1}\nQwen: {a2}\n(history cleared)\n"
            f"Qwen: {a1}\n")  # after :clear the same question gets the first answer again
    assert r.stdout.startswith(want), (r.stdout, want)
    rest = r.stdout[len(want):]
    assert rest.startswith("(unknown command :bogus") and "Qwen:" not in rest  # nothing after :quit


def test_chat_survives_bad_input_and_ends_at_eof(engine_dir, answer_of):
    r = chat(engine_dir, "word " * 300 + "\nHi\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("error:") == 1 and "max_input_len" in r.stderr
    assert r.stdout == f"Qwen: {answer_of('Hi')}\n"  # the question that was too long left no history behind


def test_ctrl_c_stops_the_answer_not_the_chat(engine_dir):
    p = subprocess.Popen(command(engine_dir, "--max_output_len", "32", "--num_scheduler_steps", "1"),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        p.stdin.write(b"Tell me a long story\n")
        p.stdin.flush()
        seen = b""
        while not seen.endswith(b"Qwen: "):  # the answer has started (its Ctrl-C handler is in place)
            byte = p.stdout.read(1)
            assert byte, p.stderr.read().decode()
            seen += byte
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(b"Hi\n", timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err.decode()
    text = (seen + out).decode()
    assert " (stopped)\nQwen: " in text and text.count("Qwen: ") == 2  # the next question got its answer
