"""Summarisation accuracy (ROUGE) of the engine and of the Hugging Face reference, TensorRT-LLM's flags:

python3 examples/qwen/summarize.py --test_trt_llm --test_hf --hf_model_dir <ckpt> --engine_dir qwen_outputs \
    --data_type fp16 --max_ite 20 --batch_size 1 --output_len 100 --check_accuracy --tensorrt_llm_rouge1_threshold 15

Without --dataset_path it uses the shipped sample of ten fictional news articles (CNN/DailyMail's columns).
"""

import argparse
import sys
from pathlib import Path

try:
    import qwen_trtllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qwen_trtllm.cli import parser, run_cli  # noqa: E402
from qwen_trtllm.dtypes import add_dtype_argument  # noqa: E402
from qwen_trtllm.evaluation.summarize import DEFAULT_SYSTEM, SummarizeOptions, run_summarize  # noqa: E402
from qwen_trtllm.runtime.runner import add_beam_search_args, add_runtime_args  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--test_trt_llm", action="store_true", help="evaluate the engine")
    p.add_argument("--test_hf", action="store_true", help="evaluate the Hugging Face reference (needs --hf_model_dir)")
    p.add_argument("--hf_model_dir", default=None, help="the Hugging Face Qwen checkpoint directory (for --test_hf)")
    p.add_argument("--engine_dir", default="qwen_outputs", help="the engine directory (for --test_trt_llm)")
    p.add_argument("--tokenizer_dir", default=None, help="directory with qwen.tiktoken (default: engine, then HF dir)")
    add_dtype_argument(p, "--data_type", default="fp16",
                       help="dtype of the Hugging Face reference (the engine's is fixed at build)")
    p.add_argument("--max_ite", type=int, default=20, help="number of batches to evaluate")
    p.add_argument("--batch_size", type=int, default=1,
                   help="prompts given to the engine at once (beyond its --max_batch_size they queue)")
    p.add_argument("--output_len", type=int, default=100, help="most new tokens per summary")
    p.add_argument("--max_input_length", type=int, default=923,
                   help="prompt budget in tokens; longer articles lose their end")
    p.add_argument("--check_accuracy", action="store_true", help="exit 1 when a threshold below is missed")
    p.add_argument("--tensorrt_llm_rouge1_threshold", type=float, default=15.0,
                   help="least rouge1 of the engine against the reference highlights (meaningless with random "
                        "weights: set 0 and use --agreement_threshold)")
    p.add_argument("--agreement_threshold", type=float, default=0.0,
                   help="least rouge1 of the engine's outputs against the reference's (100 = identical; 0 = off); "
                        "the check that still means something with random weights")
    p.add_argument("--dataset_path", default=None,
                   help=".jsonl/.json/.csv/.parquet with columns article and highlights, or a saved `datasets` dir")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt of the chatml context")
    p.add_argument("--top_k", type=int, default=1, help="1 = greedy, 0 = off")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="random seed of sampling")
    p.add_argument("--output_file", default=None, help="write one json line per example (texts and ids)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    add_beam_search_args(p)
    add_runtime_args(p)
    return p.parse_args(argv)


def main() -> int:
    args = vars(parse_args())
    args["progress"] = not args.pop("no_progress")
    return run_summarize(SummarizeOptions(**args))


if __name__ == "__main__":
    run_cli(main)
