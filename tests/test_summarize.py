"""summarize.py on a tiny random checkpoint with the real tokenizer (CPU): the engine and the Hugging Face
reference agree exactly, a planted weight bug fails --check_accuracy, batching changes nothing, bad input gives
one error line."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_trtllm import QWenError
from qwen_trtllm.builder.build import build_engine
from qwen_trtllm.checkpoint.random_checkpoint import swap_mlp_weights
from qwen_trtllm.evaluation import summarize as sm

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples/qwen/summarize.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--no_progress", *map(str, args)], capture_output=True,
                          text=True, timeout=180)


def run_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The same script and flags in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--no_progress", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def scores(stdout: str, backend: str, beam: int = 0) -> dict[str, float]:
    """One beam's ROUGE from the report ("[engine] beam 0 result" then "[engine]   rouge1 : 12.3456" lines)."""
    block = stdout.split(f"[{backend}] beam {beam} result\n", 1)[1]
    return {k: float(v) for k, v in re.findall(rf"^\[{backend}\]   (rouge\w+) : ([\d.]+)$",
                                               "\n".join(block.splitlines()[: len(sm.ROUGE_TYPES)]), re.M)}


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint, tiktoken_file) -> Path:
    return make_checkpoint(vocab_size=151936, tokenizer_file=tiktoken_file, seq_length=2048,
                           max_position_embeddings=2048)


def engine_from(ckpt: Path, out: Path) -> Path:
    return build_engine(out, hf_dir=ckpt, dtype="float32", max_batch_size=3, max_input_len=512, max_output_len=16)


@pytest.fixture(scope="module")
def engine_dir(checkpoint, tmp_path_factory) -> Path:
    return engine_from(checkpoint, tmp_path_factory.mktemp("sum") / "engine")


COMMON = ("--data_type", "fp32", "--max_ite", "3", "--output_len", "12", "--check_accuracy",
          "--tensorrt_llm_rouge1_threshold", "0", "--agreement_threshold", "99")


@pytest.fixture(scope="module")
def both(checkpoint, engine_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sum_out") / "out.jsonl"
    proc = run("--test_trt_llm", "--test_hf", "--hf_model_dir", checkpoint, "--engine_dir", engine_dir,
               "--batch_size", "1", "--output_file", out, *COMMON)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    return proc, rows


def test_engine_and_reference_agree(both):
    proc, rows = both
    assert proc.returncode == 0, proc.stderr
    assert "accuracy check passed" in proc.stdout
    assert len(rows) == 3 and all(r["engine_ids"] == r["hf_ids"] and r["engine_ids"] for r in rows)
    assert all(r["engine_output"] == r["hf_output"] for r in rows)
    eng, hf = scores(proc.stdout, "engine"), scores(proc.stdout, "hf")
    assert set(eng) == set(sm.ROUGE_TYPES) and eng == hf
    assert "[agreement] rouge1 of engine outputs against HF outputs: 100.0000 (3/3" in proc.stdout
    assert re.search(r"^\[engine\] total latency: [\d.]+ s, \d+ output tokens, [\d.]+ tokens/s$", proc.stdout, re.M)


def test_beam_search_per_beam_equals_hugging_face(checkpoint, engine_dir, tmp_path, monkeypatch, capsys):
    """--num_beams 2: every beam of the engine equals Hugging Face's generate(num_beams=2), and each beam's ROUGE is
    reported as TensorRT-LLM's "beam i result"."""
    out = tmp_path / "beams.jsonl"
    code, stdout, err = run_in_process(monkeypatch, capsys, "--test_trt_llm", "--test_hf", "--hf_model_dir",
                                       checkpoint, "--engine_dir", engine_dir, "--num_beams", "2", "--output_file",
                                       out, *COMMON, "--max_ite", "2")
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["engine_beam_ids"]) == 2 for r in rows)
    assert [r["engine_beam_ids"] for r in rows] == [r["hf_beam_ids"] for r in rows]
    assert all(r["engine_beam_ids"][0] != r["engine_beam_ids"][1] for r in rows)
    for beam in (0, 1):
        assert set(scores(stdout, "engine", beam)) == set(sm.ROUGE_TYPES)
        assert scores(stdout, "engine", beam) == scores(stdout, "hf", beam)


def test_planted_weight_bug_fails_the_check(checkpoint, tmp_path, monkeypatch, capsys):
    bad_engine = engine_from(swap_mlp_weights(checkpoint, tmp_path / "bad", layer=1), tmp_path / "engine")
    code, out, err = run_in_process(monkeypatch, capsys, "--test_trt_llm", "--test_hf", "--hf_model_dir", checkpoint,
                                    "--engine_dir", bad_engine, *COMMON)
    assert code == 1, out
    assert err.strip().splitlines()[-1].startswith("accuracy check failed: agreement rouge1")


@pytest.mark.parametrize("runtime", [(), ("--max_batch_size", "2")])  # 2: the third prompt waits in the queue
def test_batch_of_three_equals_batch_one(both, engine_dir, tmp_path, monkeypatch, capsys, runtime):
    out = tmp_path / "b3.jsonl"
    code, _, err = run_in_process(monkeypatch, capsys, "--test_trt_llm", "--engine_dir", engine_dir, "--batch_size",
                                  "3", "--max_ite", "1", "--output_len", "12", "--output_file", out, *runtime)
    assert code == 0, err
    batched = [json.loads(line)["engine_ids"] for line in out.read_text().splitlines()]
    assert batched == [r["engine_ids"] for r in both[1]]


@pytest.mark.parametrize("kind", ["missing", "columns"])
def test_bad_dataset_is_one_error_line(engine_dir, tmp_path, kind, monkeypatch, capsys):
    path = tmp_path / "data.jsonl"
    if kind == "columns":
        path.write_text(json.dumps({"title": "a", "summary": "b"}) + "\n")
    code, _, err = run_in_process(monkeypatch, capsys, "--test_trt_llm", "--engine_dir", engine_dir,
                                  "--dataset_path", path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --dataset_path"), err
    assert ("does not exist" if kind == "missing" else "lacks the column(s) article, highlights") in lines[0]


# --- library pieces, in process ---
def test_dataset_formats(tmp_path):
    sample = sm.load_examples()
    assert len(sample) == 10 and all(e.article and e.highlights and e.id for e in sample)
    (tmp_path / "d.csv").write_text("article,highlights\nOne. Two.,One.\n")
    (tmp_path / "d.json").write_text(json.dumps({"article": ["A b."], "highlights": ["A."], "id": ["x"]}))
    assert sm.load_examples(tmp_path / "d.csv")[0] == sm.Example("0", "One. Two.", "One.")
    assert sm.load_examples(tmp_path / "d.json")[0] == sm.Example("x", "A b.", "A.")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(QWenError, match="use a .jsonl"):
        sm.load_examples(tmp_path / "d.txt")


def test_prompt_truncation_keeps_the_start(checkpoint):
    from qwen_trtllm.tokenizer import QWenTokenizer

    tok = QWenTokenizer.from_dir(checkpoint)
    article = " ".join(f"Sentence number {i} of a long article." for i in range(200))
    full = sm.build_prompt(tok, article, max_input_length=100_000)
    cut = sm.build_prompt(tok, article, max_input_length=120)
    assert len(full) > 1000 and 110 <= len(cut) <= 120
    text = tok.decode(cut)
    assert "Sentence number 0 of" in text and "number 199" not in text and text.endswith(
        sm.INSTRUCTION.strip() + "<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(QWenError, match="no room"):
        sm.build_prompt(tok, article, max_input_length=20)


def test_scores_and_check():
    assert sm.rouge_scores(["The cat sat. It slept."], ["The cat sat.\nIt slept."])["rougeLsum"] == 100.0
    assert sm.agreement_score(["", "你好 世界"], ["", "你好 世界"]) == 100.0
    assert 0 < sm.agreement_score(["你好 世界"], ["你好 朋友"]) < 100
    ok = dict.fromkeys(sm.ROUGE_TYPES, 20.0)
    assert sm.accuracy_failure(ok, ok, 100.0, 15.0, 99.0) is None
    assert "threshold" in sm.accuracy_failure(ok, ok, 100.0, 25.0)
    assert "differ" in sm.accuracy_failure(ok, {**ok, "rouge1": 21.0}, 100.0, 15.0)
    assert "agreement" in sm.accuracy_failure(ok, ok, 98.0, 15.0, 99.0)


def test_tokenizer_that_is_not_the_engines(make_checkpoint, tiktoken_file, tmp_path):
    small = engine_from(make_checkpoint(), tmp_path / "engine")  # vocabulary of 1024
    opts = sm.SummarizeOptions(test_trt_llm=True, engine_dir=str(small), tokenizer_dir=str(tiktoken_file),
                               max_ite=1, output_len=4, progress=False)
    with pytest.raises(QWenError, match="does not belong"):
        sm.run_summarize(opts)
