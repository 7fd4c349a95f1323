"""The seed's workflow, verbatim, on a tiny random checkpoint with the real tokenizer: convert -> build -> run."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen_trtllm.runtime import LLM, Engine, SamplingParams
from qwen_trtllm.tokenizer import QWenTokenizer, make_context, stop_token_ids

ROOT = Path(__file__).resolve().parents[1]
EOD = 151643


def sh(cwd: Path, command: str) -> subprocess.CompletedProcess:
    """A README command line, with python3 meaning this interpreter and examples/ this checkout's."""
    args = command.split()
    args = [sys.executable if a == "python3" else str(ROOT / a) if a.startswith("examples/") else a for a in args]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


def check_sequence(row: np.ndarray, prompt: list[int], output: list[int]) -> None:
    """One row of TensorRT-LLM's output array: the prompt, the output, then the end id to the end."""
    row = row.tolist()
    assert row[: len(prompt)] == prompt and row[len(prompt): len(prompt) + len(output)] == output
    assert all(t == EOD for t in row[len(prompt) + len(output):])


@pytest.fixture(scope="module")
def workdir(make_checkpoint, tiktoken_file, tmp_path_factory) -> Path:
    ckpt = make_checkpoint(vocab_size=151936, seq_length=2048, tokenizer_file=tiktoken_file, seed=5)
    work = tmp_path_factory.mktemp("seed")
    shutil.copytree(ckpt, work / "Qwen" / "Qwen-7B-Chat")  # so `-i Qwen/Qwen-7B-Chat` runs as written
    for cmd in ("python3 examples/qwen/hf_qwen_convert.py -i Qwen/Qwen-7B-Chat -o ./c-model/Qwen "
                "--tensor-parallelism 1 --storage-type float16",
                "python3 examples/qwen/build.py --model_dir ./c-model/Qwen/1-gpu --use_gpt_attention_plugin float16 "
                "--dtype float16 --use_layernorm_plugin float16 --use_gemm_plugin float16 --max_batch_size 2"):
        r = sh(work, cmd)
        assert r.returncode == 0, r.stderr
    return work


def test_seed_commands_verbatim(workdir):
    r = sh(workdir, "python3 examples/qwen/run.py --max_output_len 8")
    assert r.returncode == 0, r.stderr
    assert 'Input: "你好，请问你叫什么？"' in r.stdout and 'Output: "' in r.stdout
    engine = workdir / "qwen_outputs"
    assert (engine / "config.json").is_file() and (engine / "qwen.tiktoken").is_file()


def test_run_outputs_match_the_library_and_trtllm_layout(workdir):
    npy, out_csv = workdir / "o.npy", workdir / "o.csv"
    r = sh(workdir, f"python3 examples/qwen/run.py --max_output_len 6 --top_k 1 --input_text 你好 Hello "
                    f"--output_npy {npy} --output_csv {out_csv}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Output:") == 2
    tok = QWenTokenizer.from_dir(workdir / "qwen_outputs")
    prompts = [make_context(tok, q)[1] for q in ("你好", "Hello")]
    llm = LLM.from_engine(Engine.load(workdir / "qwen_outputs"))
    # run.py takes repetition_penalty 1.1 from the checkpoint's generation_config.json; --top_k 1 makes it greedy
    params = SamplingParams(max_tokens=6, top_k=1, repetition_penalty=1.1, stop_token_ids=sorted(stop_token_ids(tok)),
                            end_id=EOD)
    want = [o.token_ids for o in llm.generate(prompts, params)]
    seqs = np.load(npy)
    assert seqs.dtype == np.int32 and seqs.shape == (2, max(map(len, prompts)) + 6)
    for b, (p, ids) in enumerate(zip(prompts, want, strict=True)):
        check_sequence(seqs[b], p, ids)
    with out_csv.open() as f:
        assert [[int(t) for t in row] for row in csv.reader(f)] == want


def test_run_beam_search_outputs_every_beam(workdir):
    """--num_beams 3: three outputs per prompt, npy [batch, beams, input + output], csv one row per beam, equal
    to the library's beam search (the checkpoint's sampling defaults do not apply to it)."""
    npy, out_csv = workdir / "beams.npy", workdir / "beams.csv"
    r = sh(workdir, f"python3 examples/qwen/run.py --max_output_len 5 --num_beams 3 --input_text 你好 Hello "
                    f"--output_npy {npy} --output_csv {out_csv}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Output [beam") == 6
    tok = QWenTokenizer.from_dir(workdir / "qwen_outputs")
    prompts = [make_context(tok, q)[1] for q in ("你好", "Hello")]
    llm = LLM.from_engine(Engine.load(workdir / "qwen_outputs"))
    params = SamplingParams(max_tokens=5, use_beam_search=True, n=3, stop_token_ids=sorted(stop_token_ids(tok)),
                            end_id=EOD)
    want = [o.beams for o in llm.generate(prompts, params)]
    seqs = np.load(npy)
    assert seqs.dtype == np.int32 and seqs.shape == (2, 3, max(map(len, prompts)) + 5)
    for b, p in enumerate(prompts):
        for i, ids in enumerate(want[b]):
            check_sequence(seqs[b, i], p, ids)
    with out_csv.open() as f:
        assert [[int(t) for t in row] for row in csv.reader(f)] == [ids for beams in want for ids in beams]


def test_streaming_prints_the_answer_once(workdir):
    r = sh(workdir, "python3 examples/qwen/run.py --max_output_len 5 --top_k 1 --streaming")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Output:") == 1 and "tokens/s" in r.stdout


def test_more_prompts_than_max_batch_size_queue(workdir):
    out_csv = workdir / "queued.csv"
    r = sh(workdir, f"python3 examples/qwen/run.py --max_output_len 4 --top_k 1 --input_text a b c "
                    f"--output_csv {out_csv}")  # the engine's max_batch_size is 2: the third prompt waits
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Output:") == 3
    tok = QWenTokenizer.from_dir(workdir / "qwen_outputs")
    llm = LLM.from_engine(Engine.load(workdir / "qwen_outputs"))
    params = SamplingParams(max_tokens=4, top_k=1, repetition_penalty=1.1, stop_token_ids=sorted(stop_token_ids(tok)),
                            end_id=EOD)
    with out_csv.open() as f:
        got = [[int(t) for t in row] for row in csv.reader(f)]
    assert got == [llm.generate([make_context(tok, q)[1]], params)[0].token_ids for q in "abc"]


@pytest.mark.parametrize("args,message", [
    ("--engine_dir missing", "does not exist"),
    ("--num_beams 2 --streaming", "beam search"),
    ("--num_beams 0", "--num_beams"),
])
def test_run_bad_input(workdir, args, message):
    r = sh(workdir, f"python3 examples/qwen/run.py --max_output_len 4 {args}")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_quickstart_answers_with_the_reference(workdir):
    r = sh(workdir, "python3 examples/qwen/quickstart.py --hf_model_dir Qwen/Qwen-7B-Chat --max_new_tokens 4")
    assert r.returncode == 0, r.stderr
    assert "Qwen2ForCausalLM" in r.stdout and 'Output: "' in r.stdout


def test_profile_writes_a_perfetto_trace(workdir):
    import json

    trace = workdir / "trace.json"
    r = sh(workdir, f"python3 examples/qwen/run.py --max_output_len 3 --top_k 1 --profile {trace}")
    assert r.returncode == 0, r.stderr
    assert "traceEvents" in json.loads(trace.read_text()) and "Self CPU time total" in r.stdout
