"""Summarisation accuracy in the manner of TensorRT-LLM's summarize.py: CNN/DailyMail-style articles, ROUGE of the
engine's summaries and of the Hugging Face reference's, and how closely the two backends agree.

Both backends get identical prompts (chatml, via make_context), the same sampling settings and the same stop ids.
The engine is given --batch_size prompts per call; its in-flight batching runtime runs them together, each
unpadded (exact for any mix of lengths), and more than its --max_batch_size wait in its queue. The reference runs
one example at a time without padding: batched Hugging Face generation needs left padding, whose shifted positions
and masked attention are not bit-for-bit the computation of an unpadded prompt, so batch 1 is the exact choice.

Articles longer than the input budget are cut at the END (news articles lead with their substance); the system
prompt and the instruction are always kept whole.

--check_accuracy fails when the engine's rouge1 is below the threshold, when the engine's and the reference's
rouge1 differ by 1 or more, or when the agreement (rouge1 of the engine's outputs scored against the reference's
outputs; 100 = identical) is below --agreement_threshold. With random weights ROUGE against the highlights is ~0
for a correct and a broken engine alike, so there only the agreement check can catch a bug.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from qwen_trtllm import QWenError
from qwen_trtllm.cli import atomic_write, check_output_file
from qwen_trtllm.dtypes import torch_dtype
from qwen_trtllm.runtime.request import QWEN_EOD_ID, SamplingParams

SAMPLE_PATH = Path(__file__).resolve().parent / "data" / "cnn_dailymail_sample.jsonl"
DEFAULT_SYSTEM = "You are a helpful assistant. You write short, factual summaries of news articles."
INSTRUCTION = "\n\nSummarize the article above in two or three sentences."
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass
class Example:
    id: str
    article: str
    highlights: str


# --- the data set --------------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl/.json/.csv/.parquet file or of a `datasets` directory saved with save_to_disk."""
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise QWenError(f"--dataset_path {path} is a directory (a Hugging Face dataset saved with save_to_disk?); "
                            "reading it needs the `datasets` package (pip install datasets), or pass a "
                            ".jsonl/.json/.csv/.parquet file") from None
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise QWenError(f"--dataset_path {path} is not a saved Hugging Face dataset ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["test"] if "test" in ds else ds[next(iter(ds))]
        return [dict(r) for r in ds]
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):  # columns of lists
                return [dict(zip(data, vals, strict=True)) for vals in zip(*data.values(), strict=True)]
            return data if isinstance(data, list) else [data]
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise QWenError(f"reading {path} needs pyarrow (pip install pyarrow); or pass a .jsonl/.csv "
                                "file") from None
            return pq.read_table(path).to_pylist()
    except (ValueError, UnicodeDecodeError) as e:
        raise QWenError(f"--dataset_path {path} could not be parsed as {suffix[1:]} ({e})") from None
    raise QWenError(f"--dataset_path {path}: use a .jsonl, .json, .csv or .parquet file or a saved dataset directory")


def load_examples(path: str | Path | None = None) -> list[Example]:
    """Articles with reference highlights; without a path, the shipped sample of ten fictional news articles."""
    p = Path(path) if path is not None else SAMPLE_PATH
    if not p.exists():
        raise QWenError(f"--dataset_path {p} does not exist")
    rows = _read_rows(p)
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise QWenError(f"--dataset_path {p} holds no records (need rows with the columns article and highlights)")
    missing = [c for c in ("article", "highlights") if c not in rows[0]]
    if missing:
        raise QWenError(f"--dataset_path {p} lacks the column(s) {', '.join(missing)} (it has "
                        f"{', '.join(map(str, rows[0])) or 'none'}); it needs article and highlights")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r.get("article"), str) or not isinstance(r.get("highlights"), str) or not r["article"]:
            raise QWenError(f"--dataset_path {p}: record {i} needs a non-empty text article and a text highlights")
        out.append(Example(str(r.get("id", i)), r["article"], r["highlights"]))
    return out


# --- prompts ---------------------------------------------------------------------------------------------
def build_prompt(tokenizer, article: str, system: str = DEFAULT_SYSTEM, max_input_length: int = 923,
                 instruction: str = INSTRUCTION) -> list[int]:
    """The chatml prompt for one article, at most max_input_length tokens: the article's end is cut if needed."""
    from qwen_trtllm.tokenizer import make_context

    context = lambda text: make_context(tokenizer, text + instruction, system=system,
                                        max_window_size=max_input_length)[1]
    ids = context(article)
    art = tokenizer.encode(article)
    for _ in range(8):  # re-tokenising the cut text can merge differently: shrink until it fits
        if len(ids) <= max_input_length:
            return ids
        keep = len(art) - (len(ids) - max_input_length)
        if keep <= 0:
            raise QWenError(f"--max_input_length {max_input_length} leaves no room for the article: the system "
                            "prompt and the instruction alone take most of it; raise it or shorten --system")
        text = tokenizer.decode(art[:keep]).rstrip("\ufffd")
        ids, art = context(text), tokenizer.encode(text)
    raise QWenError(f"could not fit an article into --max_input_length {max_input_length} tokens")


def response_text(ids: Sequence[int], tokenizer) -> str:
    """The response of generated ids (cut at the first stop token); ids the tokenizer lacks (the unused padding
    rows of Qwen's 151936-row embedding, which only random weights emit) are dropped."""
    from qwen_trtllm.tokenizer import decode_response

    known = len(tokenizer)
    return decode_response([i for i in ids if i < known], tokenizer, "chatml")


def cut_after_stop(ids: list[int], stop_ids) -> list[int]:
    """ids up to and including the first stop id (all of them when none occurs), as the engine returns them."""
    return next((ids[: i + 1] for i, t in enumerate(ids) if t in stop_ids), ids)


def check_token_ids(prompts: Sequence[Sequence[int]], stop_ids: set[int], vocab_size: int, what: str) -> None:
    """Token ids beyond the model's vocabulary mean that the tokenizer is not the model's."""
    top = max(max(max(p) for p in prompts), max(stop_ids))
    if top >= vocab_size:
        raise QWenError(f"the tokenizer produced token id {top} but the {what} has a vocabulary of {vocab_size}: "
                        "the tokenizer does not belong to it (pass the model's own --tokenizer_dir)")


# --- the two backends --------------------------------------------------------------------------------------
@dataclass
class BackendResult:
    """One backend's outputs: beams[i][e] = beam i's output ids for example e (one beam without beam search),
    each cut after its first stop id (inclusive); texts alike."""

    name: str
    beams: list[list[list[int]]] = field(default_factory=lambda: [[]])
    beam_texts: list[list[str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def output_ids(self) -> list[list[int]]:
        return self.beams[0]

    @property
    def texts(self) -> list[str]:
        return self.beam_texts[0]

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.output_ids)


def run_engine(llm, prompts: list[list[int]], batch_size: int, output_len: int, sampling: SamplingParams,
               stop_ids: set[int], end_id: int = QWEN_EOD_ID, progress: bool = True) -> BackendResult:
    """Generate with the engine (an LLM), batch_size prompts per call (as TensorRT-LLM's summarize.py iterates;
    prompts beyond the runtime's max_batch_size wait in its queue). Each output ends at its first stop id
    (inclusive). Under tensor parallelism every rank calls this; the other ranks' result has no outputs."""
    params = replace(sampling, max_tokens=output_len, stop_token_ids=sorted(stop_ids), end_id=end_id,
                     ignore_eos=False)
    res = BackendResult("engine", [[] for _ in range(params.n)])
    batches = [prompts[i: i + batch_size] for i in range(0, len(prompts), batch_size)]
    for batch in tqdm(batches, desc="engine", disable=not (progress and llm.is_leader and sys.stderr.isatty()),
                      file=sys.stderr):
        t0 = time.perf_counter()
        outputs = llm.generate(batch, params)
        res.seconds += time.perf_counter() - t0
        for out in outputs:
            for i, ids in enumerate(out.beams or [out.token_ids]):
                res.beams[i].append(ids)
    return res


@torch.inference_mode()
def run_reference(model, prompts: list[list[int]], output_len: int, sampling: SamplingParams, stop_ids: set[int],
                  end_id: int = QWEN_EOD_ID, progress: bool = True) -> BackendResult:
    """Generate with the Hugging Face model one prompt at a time (no padding: exact, see the module doc); beam
    search as generate(num_beams=N, num_return_sequences=N)."""
    res = BackendResult("hf", [[] for _ in range(sampling.n)])
    device = next(model.parameters()).device
    kw: dict = dict(max_new_tokens=output_len, eos_token_id=sorted(stop_ids), pad_token_id=end_id)
    if sampling.greedy or sampling.use_beam_search:
        kw.update(do_sample=False, top_k=None, top_p=None, temperature=None)
    else:
        kw.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k or None,
                  top_p=sampling.top_p)
    if sampling.use_beam_search:
        kw.update(num_beams=sampling.beam_width, num_return_sequences=sampling.n,
                  length_penalty=sampling.length_penalty, early_stopping=sampling.early_stopping,
                  repetition_penalty=1.0)
    elif sampling.repetition_penalty != 1.0:
        kw["repetition_penalty"] = sampling.repetition_penalty
    for i, p in enumerate(tqdm(prompts, desc="hf", disable=not (progress and sys.stderr.isatty()),
                                      file=sys.stderr)):
        torch.manual_seed(sampling.seed + i)
        t0 = time.perf_counter()
        out = model.generate(torch.tensor([p], device=device), **kw)
        res.seconds += time.perf_counter() - t0
        for b, seq in enumerate(out):  # shorter beams are padded with end_id, a stop id: cut there
            res.beams[b].append(cut_after_stop(seq[len(p):].tolist(), stop_ids))
    return res


# --- scores ------------------------------------------------------------------------------------------------
def _sentences(text: str) -> str:
    """rougeLsum scores sentence by sentence: one sentence a line."""
    return "\n".join(s.strip() for s in text.strip().replace(". ", ".\n").split("\n") if s.strip())


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE F-measures x 100 (rouge-score, Porter stemming), as TensorRT-LLM reports them."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(_sentences(ref), _sentences(pred))
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    return {k: 100.0 * v / max(len(predictions), 1) for k, v in totals.items()}


class _AnyScriptTokenizer:
    """Words and single symbols of any script (rouge-score's default keeps only ASCII letters and digits, which
    leaves nothing of the multilingual gibberish a random-weight model writes)."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text.lower())


def agreement_score(engine_texts: Sequence[str], hf_texts: Sequence[str]) -> float:
    """Mean rouge1 F x 100 of the engine's outputs scored against the reference's outputs; 100 = identical.
    Identical outputs (also identical empty ones) score 100."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], tokenizer=_AnyScriptTokenizer())
    total = 0.0
    for e, h in zip(engine_texts, hf_texts, strict=True):
        total += 1.0 if e == h else scorer.score(h, e)["rouge1"].fmeasure
    return 100.0 * total / max(len(engine_texts), 1)


def accuracy_failure(engine: dict[str, float] | None, hf: dict[str, float] | None, agreement: float | None,
                     rouge1_threshold: float, agreement_threshold: float = 0.0) -> str | None:
    """The reason --check_accuracy fails, or None when it passes."""
    if engine is not None and engine["rouge1"] < rouge1_threshold:
        return f"engine rouge1 {engine['rouge1']:.2f} < --tensorrt_llm_rouge1_threshold {rouge1_threshold}"
    if engine is not None and hf is not None and abs(engine["rouge1"] - hf["rouge1"]) >= 1.0:
        return f"engine rouge1 {engine['rouge1']:.2f} and Hugging Face rouge1 {hf['rouge1']:.2f} differ by >= 1"
    if agreement is not None and agreement < agreement_threshold:
        return f"agreement rouge1 {agreement:.2f} (engine vs Hugging Face outputs) < --agreement_threshold " \
               f"{agreement_threshold}"
    return None


# --- the whole run (examples/qwen/summarize.py) ------------------------------------------------------------
@dataclass
class SummarizeOptions:
    """The command-line flags of examples/qwen/summarize.py (TensorRT-LLM's names)."""

    test_trt_llm: bool = False
    test_hf: bool = False
    hf_model_dir: str | None = None
    engine_dir: str = "qwen_outputs"
    tokenizer_dir: str | None = None
    data_type: str = "fp16"
    max_ite: int = 20
    batch_size: int = 1
    output_len: int = 100
    max_input_length: int = 923
    check_accuracy: bool = False
    tensorrt_llm_rouge1_threshold: float = 15.0
    agreement_threshold: float = 0.0
    dataset_path: str | None = None
    system: str = DEFAULT_SYSTEM
    top_k: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: int = 0
    output_file: str | None = None
    progress: bool = True
    # the runtime's flags (qwen_trtllm.runtime.runner.add_runtime_args; None: the engine's)
    kv_cache_free_gpu_mem_fraction: float = 0.9
    max_tokens_in_paged_kv_cache: int | None = None
    max_num_tokens: int | None = None
    max_batch_size: int | None = None


def _find_tokenizer_dir(opts: SummarizeOptions) -> Path:
    """--tokenizer_dir, else the engine directory, else the checkpoint: the first holding qwen.tiktoken."""
    if opts.tokenizer_dir:
        if not Path(opts.tokenizer_dir).is_file() and not (Path(opts.tokenizer_dir) / "qwen.tiktoken").is_file():
            raise QWenError(f"--tokenizer_dir {opts.tokenizer_dir} has no qwen.tiktoken: point it at the Hugging Face "
                            "checkpoint directory that holds qwen.tiktoken")
        return Path(opts.tokenizer_dir)
    candidates = ([opts.engine_dir] if opts.test_trt_llm else []) + ([opts.hf_model_dir] if opts.hf_model_dir else [])
    for d in candidates:
        if (Path(d) / "qwen.tiktoken").is_file():
            return Path(d)
    raise QWenError(f"no qwen.tiktoken in {' or '.join(map(str, candidates))}: pass --tokenizer_dir")


def _print_result(label: str, res: BackendResult, beam_scores: list[dict[str, float]]) -> None:
    """TensorRT-LLM's summarize.py report: the latency, then each beam's ROUGE ("beam i result")."""
    rate = res.tokens / res.seconds if res.seconds else 0.0
    print(f"[{label}] total latency: {res.seconds:.3f} s, {res.tokens} output tokens, {rate:.1f} tokens/s")
    for i, scores in enumerate(beam_scores):
        print(f"[{label}] beam {i} result")
        for k in ROUGE_TYPES:
            print(f"[{label}]   {k} : {scores[k]:.4f}")


def run_summarize(opts: SummarizeOptions) -> int:
    """Load data, build prompts, run the selected backends, print ROUGE; 1 when --check_accuracy fails."""
    if not (opts.test_trt_llm or opts.test_hf):
        raise QWenError("nothing to test: pass --test_trt_llm and/or --test_hf")
    if opts.test_hf and not (opts.hf_model_dir and Path(opts.hf_model_dir).is_dir()):
        raise QWenError(f"--test_hf needs --hf_model_dir, a Hugging Face Qwen checkpoint directory (got "
                        f"{opts.hf_model_dir})")
    reference_dtype = torch_dtype(opts.data_type, flag="--data_type")
    check_output_file(opts.output_file, "--output_file")
    for name in ("max_ite", "batch_size", "output_len", "max_input_length"):
        if getattr(opts, name) < 1:
            raise QWenError(f"--{name} must be >= 1, got {getattr(opts, name)}")
    from qwen_trtllm.runtime.runner import beam_search_from_args

    sampling = SamplingParams(opts.output_len, opts.temperature, opts.top_k, opts.top_p, opts.repetition_penalty,
                              opts.seed)
    sampling.validate()
    sampling = beam_search_from_args(opts, sampling)
    examples = load_examples(opts.dataset_path)[: opts.max_ite * opts.batch_size]

    max_input, device, rank = opts.max_input_length, None, 0
    if opts.test_trt_llm:  # under torchrun/mpirun every rank runs the engine; rank 0 alone prints and scores
        from qwen_trtllm.runtime.distributed import init_distributed, load_engine_on_all_ranks

        rank, world = init_distributed()
        engine = load_engine_on_all_ranks(opts.engine_dir, rank, world)
        build = engine.build
        if opts.output_len > build.max_output_len:
            raise QWenError(f"--output_len {opts.output_len} exceeds the engine's max_output_len "
                            f"{build.max_output_len}: lower it or rebuild the engine")
        if max_input > build.max_input_len:
            print(f"note: --max_input_length {max_input} lowered to the engine's max_input_len "
                  f"{build.max_input_len}", file=sys.stderr)
            max_input = build.max_input_len
        device = engine.device

    from qwen_trtllm.tokenizer import QWenTokenizer, stop_token_ids

    tokenizer = QWenTokenizer.from_dir(_find_tokenizer_dir(opts))
    stops, end_id = set(stop_token_ids(tokenizer, "chatml")), tokenizer.eod_id
    prompts = [build_prompt(tokenizer, ex.article, opts.system, max_input) for ex in examples]
    if rank == 0:
        print(f"{len(examples)} examples from {opts.dataset_path or SAMPLE_PATH}; prompts of "
              f"{min(map(len, prompts))}..{max(map(len, prompts))} tokens; {sampling}")

    engine_res = hf_res = engine_scores = hf_scores = agreement = None
    refs = [ex.highlights for ex in examples]
    if opts.test_trt_llm:
        check_token_ids(prompts, stops, engine.config.vocab_size, f"engine {opts.engine_dir}")
        from qwen_trtllm.runtime import LLM
        from qwen_trtllm.runtime.runner import executor_config_from_args

        llm = LLM.from_engine(engine, config=executor_config_from_args(opts, build))
        engine_res = run_engine(llm, prompts, opts.batch_size, opts.output_len, sampling, stops, end_id,
                                opts.progress)
        del llm, engine  # the KV cache and the weights make room for the reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if rank:
            return 0
        engine_res.beam_texts = [[response_text(ids, tokenizer) for ids in beam] for beam in engine_res.beams]
        engine_scores = [rouge_scores(texts, refs) for texts in engine_res.beam_texts]
    if opts.test_hf:
        from qwen_trtllm.models.qwen.reference import load_reference

        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_reference(opts.hf_model_dir, reference_dtype, device)
        check_token_ids(prompts, stops, model.config.vocab_size, f"checkpoint {opts.hf_model_dir}")
        from qwen_trtllm.config import QWenConfig

        seq_length = QWenConfig.from_hf_dir(opts.hf_model_dir).seq_length
        if max(map(len, prompts)) + opts.output_len > seq_length:
            print(f"note: prompt + output may exceed the checkpoint's seq_length {seq_length}; beyond it Qwen applies "
                  "dynamic NTK/logn scaling that the Hugging Face reference lacks", file=sys.stderr)
        hf_res = run_reference(model, prompts, opts.output_len, sampling, stops, end_id, opts.progress)
        hf_res.beam_texts = [[response_text(ids, tokenizer) for ids in beam] for beam in hf_res.beams]
        hf_scores = [rouge_scores(texts, refs) for texts in hf_res.beam_texts]
        del model

    if engine_res is not None:
        _print_result("engine", engine_res, engine_scores)
    if hf_res is not None:
        _print_result("hf", hf_res, hf_scores)
    if engine_res is not None and hf_res is not None:
        agreement = agreement_score(engine_res.texts, hf_res.texts)
        same = sum(a == b for a, b in zip(engine_res.output_ids, hf_res.output_ids, strict=True))
        print(f"[agreement] rouge1 of engine outputs against HF outputs: {agreement:.4f} "
              f"({same}/{len(examples)} outputs token-identical)")
    if opts.output_file:
        _write_outputs(opts.output_file, examples, prompts, engine_res, hf_res)
    if opts.check_accuracy:
        reason = accuracy_failure(engine_scores and engine_scores[0], hf_scores and hf_scores[0], agreement,
                                  opts.tensorrt_llm_rouge1_threshold, opts.agreement_threshold)
        if reason:
            print(f"accuracy check failed: {reason}", file=sys.stderr)
            return 1
        print("accuracy check passed")
    return 0


def _write_outputs(path: str, examples: list[Example], prompts: list[list[int]], engine: BackendResult | None,
                   hf: BackendResult | None) -> None:
    """One json line per example: id, reference highlights, prompt length, each backend's text and ids."""
    with atomic_write(path, encoding="utf-8") as f:
        for i, ex in enumerate(examples):
            row: dict = {"id": ex.id, "highlights": ex.highlights, "prompt_tokens": len(prompts[i])}
            for res in (engine, hf):
                if res is not None:
                    row.update({f"{res.name}_output": res.texts[i], f"{res.name}_ids": res.output_ids[i]})
                    if len(res.beams) > 1:
                        row.update({f"{res.name}_beam_outputs": [t[i] for t in res.beam_texts],
                                    f"{res.name}_beam_ids": [b[i] for b in res.beams]})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
