"""The seed's workflow, verbatim, on a tiny random checkpoint with the real tokenizer: convert -> build -> run."""

from __future__ import annotations

import csv
import json
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
    ("--max_output_len 5000", "exceeds the engine's max_output_len"),  # both said before the engine loads
    ("--input_tokens missing.csv", "does not exist"),
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


# --- issue 15: what real users hit ---------------------------------------------------------------------------
SCRIPTS = sorted(p.name for p in (ROOT / "examples" / "qwen").glob("*.py"))


def script_parser(name: str):
    """The argparse parser an examples/qwen script builds, captured where it would parse (nothing runs)."""
    import argparse
    import importlib.util

    class Captured(Exception):
        pass

    def capture(self, *args, **kwargs):
        raise Captured(self)

    spec = importlib.util.spec_from_file_location(f"_script_{name[:-3]}", ROOT / "examples" / "qwen" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entry = getattr(module, "build_parser", None) or getattr(module, "parse_args", None) or module.main
    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        parser = entry()
    except Captured as c:
        parser = c.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    assert isinstance(parser, argparse.ArgumentParser), name
    return parser


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_says_what_every_flag_does_and_its_default(name):
    import argparse

    parser = script_parser(name)
    formatter = parser._get_formatter()
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert options, name
    for action in options:
        text = formatter._expand_help(action) if action.help else ""
        assert text.strip(), f"{name} {action.option_strings[0]} has no help"
        if action.default not in (None, False):
            assert "default" in text, f"{name} {action.option_strings[0]}: {text!r} does not give its default"
    help_text = parser.format_help()
    for line in (parser.description or "").strip().splitlines():  # the description's commands stay on their lines
        assert line.rstrip() in help_text, (name, line)
        if "examples/qwen/" in line and "python3 " in line:  # and prose does not run into them
            assert line.lstrip().startswith(("python3 ", "printf ")), (name, line)


@pytest.mark.parametrize("name,args,dest", [
    ("build.py", ["--model_dir", "x", "--dtype"], "dtype"),
    ("build.py", ["--model_dir", "x", "--use_gemm_plugin"], "use_gemm_plugin"),
    ("hf_qwen_convert.py", ["-i", "x", "-o", "y", "-t"], "storage_type"),
    ("summarize.py", ["--data_type"], "data_type"),
    ("benchmark.py", ["--dtype"], "dtype"),
    ("quickstart.py", ["--dtype"], "dtype"),
    ("compare_layers.py", ["--hf_model_dir", "x", "--engine_dtype"], "engine_dtype"),
    ("eval_accuracy.py", ["--engine_dir", "x", "--hf_model_dir", "y", "--reference_dtype"], "reference_dtype"),
    ("make_random_checkpoint.py", ["--output_dir", "x", "--dtype"], "dtype"),
])
def test_dtype_aliases_are_the_same_everywhere(name, args, dest):
    parser = script_parser(name)
    for given, want in (("fp32", "float32"), ("float32", "float32"), ("fp16", "float16"), ("float16", "float16"),
                        ("bf16", "bfloat16"), ("BF16", "bfloat16"), ("bfloat16", "bfloat16")):
        assert getattr(parser.parse_args([*args, given]), dest) == want, (name, given)
    with pytest.raises(SystemExit):
        parser.parse_args([*args, "fp8"])


def test_generation_config_nulls_mean_not_set(tmp_path):
    """Real checkpoints ship "temperature": null; null is "not set" for every field the runtime reads."""
    from types import SimpleNamespace

    from qwen_trtllm import QWenError
    from qwen_trtllm.runtime.runner import generation_defaults, sampling_from_args
    from qwen_trtllm.serving.openai_api import window_size

    path = tmp_path / "generation_config.json"
    unset = SimpleNamespace(temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed=0)
    fields = ("temperature", "top_p", "top_k", "repetition_penalty", "max_window_size", "max_new_tokens")
    path.write_text(json.dumps({**dict.fromkeys(fields), "do_sample": True, "chat_format": "chatml"}))
    defaults = generation_defaults(tmp_path)
    assert defaults == {"do_sample": True, "chat_format": "chatml"}
    p = sampling_from_args(unset, defaults, 8)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (1.0, 0, 1.0, 1.0)
    assert window_size(defaults, 8192) == 6144 and window_size(defaults, 100) == 100
    path.write_text(json.dumps({"do_sample": None, "temperature": None, "top_p": 0.8, "max_window_size": 512}))
    defaults = generation_defaults(tmp_path)
    p = sampling_from_args(unset, defaults, 8)
    assert (p.temperature, p.top_k, p.top_p) == (1.0, 1, 0.8)  # do_sample unset: greedy, as transformers
    assert window_size(defaults, 8192) == 512
    p = sampling_from_args(SimpleNamespace(temperature=0.5, top_k=3, top_p=None, repetition_penalty=None, seed=0),
                           {"temperature": None, "top_p": None}, 8)  # a caller's own dict with nulls
    assert (p.temperature, p.top_k, p.top_p) == (0.5, 3, 1.0)
    path.write_text(json.dumps({"top_p": "high"}))
    with pytest.raises(QWenError, match=r"generation_config.json: top_p must be a number, got 'high'"):
        generation_defaults(tmp_path)
    path.write_text(json.dumps({"top_k": 1.5}))
    with pytest.raises(QWenError, match="top_k must be an integer"):
        generation_defaults(tmp_path)


def test_run_py_with_null_sampling_fields(workdir, tmp_path, run_script):
    """run.py on an engine whose generation_config.json has nulls: the built-in defaults (greedy, penalty 1)."""
    import os

    engine = shutil.copytree(workdir / "qwen_outputs", tmp_path / "engine", copy_function=os.link)
    gen = engine / "generation_config.json"
    gen.unlink()  # (a hard link: write a new file, not through the link)
    gen.write_text(json.dumps({"chat_format": "chatml", "do_sample": False, "temperature": None, "top_p": None,
                               "top_k": None, "repetition_penalty": None, "max_window_size": None}))
    out_csv = tmp_path / "o.csv"
    code, out, err = run_script("run.py", "--engine_dir", engine, "--max_output_len", 5, "--input_text", "Hello",
                                "--output_csv", out_csv)
    assert code == 0, err
    tok = QWenTokenizer.from_dir(engine)
    llm = LLM.from_engine(Engine.load(engine))
    params = SamplingParams(max_tokens=5, top_k=1, stop_token_ids=sorted(stop_token_ids(tok)), end_id=EOD)
    want = llm.generate([make_context(tok, "Hello")[1]], params)[0].token_ids
    with out_csv.open() as f:
        assert [[int(t) for t in row] for row in csv.reader(f)] == [want]


def test_random_checkpoint_has_todays_generation_config(make_checkpoint):
    from qwen_trtllm.runtime.runner import generation_defaults
    from qwen_trtllm.serving.openai_api import window_size

    d = generation_defaults(make_checkpoint(shard_bytes=1 << 18))
    assert d == {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
                 "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1,
                 "transformers_version": "4.31.0"}
    assert window_size(d, 8192) == 6144


# every output flag of every script, checked before any work: each case would otherwise fail (engine, checkpoint,
# GPU missing) only after its output check, so a check that came late would give another message
OUTPUT_FLAGS = [
    ("run.py", "--output_csv", ["--engine_dir", "missing"]),
    ("run.py", "--output_npy", ["--engine_dir", "missing"]),
    ("run.py", "--profile", ["--engine_dir", "missing"]),
    ("summarize.py", "--output_file", ["--test_trt_llm", "--engine_dir", "missing"]),
    ("eval_accuracy.py", "--json_output", ["--engine_dir", "missing", "--reference_engine_dir", "missing"]),
    ("benchmark.py", "--json_output", []),
    ("benchmark_serving.py", "--json_output", []),
    ("hf_qwen_convert.py", "-o", ["-i", "missing"]),
    ("build.py", "--output_dir", ["--model_dir", "missing"]),
    ("make_random_checkpoint.py", "--output_dir", ["--preset", "tiny"]),
    ("demo.py", "--workdir", []),
]


@pytest.mark.parametrize("script,flag,args", OUTPUT_FLAGS, ids=[f"{s}{f}" for s, f, _ in OUTPUT_FLAGS])
def test_unwritable_output_is_refused_before_any_work(script, flag, args, tmp_path, run_script):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    bad = blocker / "out.json"  # its parent is a file: nothing can be written there, not even by root
    code, out, err = run_script(script, *args, flag, bad)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag.split("/")[0] in lines[0], err
    assert "not a directory" in lines[0] and str(blocker) in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("make_bad,message", [
    (lambda d: d, "is a directory"),  # the path is a directory
    (lambda d: d / "no" / "o.csv", "does not exist"),  # the parent is missing
    (lambda d: Path("/sys/qwen_trtllm_test.csv"), "cannot write in /sys"),  # read-only (for root too)
])
def test_unwritable_output_csv_kinds(make_bad, message, tmp_path, run_script):
    code, _, err = run_script("run.py", "--engine_dir", "missing", "--output_csv", make_bad(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err and "--output_csv" in err, err


def test_outputs_are_written_atomically(tmp_path):
    from qwen_trtllm.cli import atomic_write

    target = tmp_path / "o.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["o.json"]
    with atomic_write(target) as f:
        f.write("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["o.json"]


def test_profile_never_claims_a_trace_it_did_not_write(tmp_path, monkeypatch, capsys):
    from torch.profiler import profile

    from qwen_trtllm import QWenError
    from qwen_trtllm.profiling import maybe_profile

    monkeypatch.setattr(profile, "export_chrome_trace", lambda self, path: None)  # fails silently, as torch does
    trace = tmp_path / "t.json"
    with pytest.raises(QWenError, match="could not write its trace"), maybe_profile(str(trace)):
        pass
    assert "trace written" not in capsys.readouterr().out and not list(tmp_path.iterdir())


@pytest.mark.parametrize("script,args,message", [
    ("run.py", ["--engine_dir", "missing", "--input_text", "Hi", "--input_tokens", "t.csv"],
     "--input_text and --input_tokens both given"),
    ("build.py", ["--model_dir", "missing", "--weight_only_precision", "int4"],
     "--weight_only_precision has no effect without --use_weight_only"),
    ("build.py", ["--model_dir", "missing", "--group_size", "64"], "--group_size has no effect without"),
    ("build.py", ["--model_dir", "missing", "--quantize_lm_head"], "--quantize_lm_head has no effect without"),
    ("build.py", ["--model_dir", "missing", "--use_weight_only", "--group_size", "64"], "--group_size applies to int4"),
    ("benchmark.py", ["--group_size", "64"], "--group_size applies to --quant int4 rows only"),
    ("benchmark.py", ["--quant", "int8", "--group_size", "64"], "--group_size applies to --quant int4 rows only"),
    ("benchmark.py", ["--quantize_lm_head"], "--quantize_lm_head applies to --quant rows only"),
    ("benchmark_serving.py", ["--engine_dir", "missing", "--quantize_lm_head"],
     "--quantize_lm_head applies to --model's random weights"),
    ("build.py", ["--model_dir", "missing", "--use_fp8", "--group_size", "64"],
     "--group_size does not apply to --use_fp8"),
    ("benchmark_serving.py", ["--quantize_lm_head"], "--quantize_lm_head applies to --quant's weights"),
    ("benchmark.py", ["--hf_batch_size", "1"], "--hf_batch_size applies to --compare_hf only"),
    ("eval_accuracy.py", ["--engine_dir", "missing", "--reference_engine_dir", "missing", "--reference_dtype", "fp16"],
     "--reference_dtype applies to the --hf_model_dir reference only"),
    ("eval_accuracy.py", ["--engine_dir", "missing", "--hf_model_dir", "missing", "--reference_kernels", "torch"],
     "--reference_kernels applies to --reference_engine_dir only"),
])
def test_ignored_or_conflicting_flags_are_refused(script, args, message, run_script):
    code, _, err = run_script(script, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_engine_without_tokenizer_names_tokenizer_dir(workdir, tmp_path, tiktoken_file, run_script):
    import os

    engine = shutil.copytree(workdir / "qwen_outputs", tmp_path / "engine", copy_function=os.link)
    (engine / "qwen.tiktoken").unlink()
    code, _, err = run_script("run.py", "--engine_dir", engine, "--max_output_len", 2)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "has no qwen.tiktoken" in err, err
    assert "--tokenizer_dir" in err
    for script, args in (("chat.py", []), ("serve.py", ["--port", 0])):  # these need it: said before any loading
        code, _, err = run_script(script, "--engine_dir", engine, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--tokenizer_dir" in err, (script, err)
    code, _, err = run_script("run.py", "--engine_dir", engine, "--tokenizer_dir", tmp_path, "--max_output_len", 2)
    assert code == 2 and f"--tokenizer_dir {tmp_path} has no qwen.tiktoken" in err, err
    code, out, err = run_script("run.py", "--engine_dir", engine, "--tokenizer_dir", tiktoken_file.parent,
                                "--max_output_len", 2, "--top_k", 1)
    assert code == 0 and 'Output: "' in out, err


def test_make_random_checkpoint_script(tmp_path, run_script, make_checkpoint):
    from qwen_trtllm.checkpoint.hf_checkpoint import HFCheckpoint

    out = tmp_path / "ckpt"
    code, stdout, err = run_script("make_random_checkpoint.py", "--output_dir", out, "--preset", "tiny", "--seed", 3)
    assert code == 0 and "RANDOM weights" in stdout, err
    HFCheckpoint(out).validate()
    want = make_checkpoint(seed=3)  # the library's checkpoint of the same preset and seed, file for file
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in want.iterdir())
    assert not (out / "qwen.tiktoken").exists()
    for f in want.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    code, _, err = run_script("make_random_checkpoint.py", "--output_dir", out, "--preset", "tiny")
    assert code == 2 and "is not empty" in err
    code, _, err = run_script("make_random_checkpoint.py", "--output_dir", tmp_path / "t", "--preset", "tiny",
                              "--tokenizer", "real")
    assert code == 2 and "too small for Qwen's tokenizer" in err and not (tmp_path / "t").exists()
