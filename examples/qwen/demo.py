"""The embedded demo: a small random Qwen (v1) checkpoint with the real tokenizer, through the seed's workflow.

convert (hf_qwen_convert.py) -> build (build.py) -> chat (run.py), then the engine's greedy tokens against the
Hugging Face reference. The weights are random, so the chat answer is gibberish: the point is that every stage
runs and that the engine computes exactly what the model defines.
"""

import subprocess
import sys
import time
from pathlib import Path

try:
    import qwen_trtllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from qwen_trtllm.checkpoint.random_checkpoint import PRESETS, write_random_checkpoint  # noqa: E402
from qwen_trtllm.checkpoint.tokenizer_file import packaged_qwen_tiktoken  # noqa: E402
from qwen_trtllm.cli import check_output_dir, parser, run_cli  # noqa: E402

HERE = Path(__file__).resolve().parent
DEMO_SHAPE = PRESETS["tiny-chat"]
QUESTION = "你好，请问你叫什么？"


def step(title: str, script: str, *args: str) -> None:
    print(f"\n$ python3 examples/qwen/{script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--workdir", default="demo_outputs", help="where the checkpoint, FT directory and engine go "
                   "(replaced when run again)")
    p.add_argument("--max_output_len", type=int, default=32, help="tokens of the answer")
    args = p.parse_args()
    work = check_output_dir(args.workdir, "--workdir")
    t0 = time.perf_counter()
    ckpt = write_random_checkpoint(work / "Qwen-7B-Chat-random", DEMO_SHAPE, seed=0,
                                   tokenizer_file=packaged_qwen_tiktoken())
    print(f"wrote a random Qwen (v1) checkpoint to {ckpt} (RANDOM weights: the answer will be gibberish)")
    step("convert", "hf_qwen_convert.py", "-i", str(ckpt), "-o", str(work / "c-model"), "--tensor-parallelism",
         "1", "--storage-type", "float32", "--force")
    step("build", "build.py", "--model_dir", str(work / "c-model" / "1-gpu"), "--dtype", "float32",
         "--max_batch_size", "1", "--max_input_len", "256", "--max_output_len", str(args.max_output_len),
         "--output_dir", str(work / "engine"), "--force")
    step("run", "run.py", "--engine_dir", str(work / "engine"), "--max_output_len", str(args.max_output_len),
         "--input_text", QUESTION, "--top_k", "1", "--streaming")

    from qwen_trtllm.models.qwen.reference import load_reference
    from qwen_trtllm.runtime import LLM, SamplingParams
    from qwen_trtllm.tokenizer import QWenTokenizer, make_context

    tok = QWenTokenizer.from_dir(work / "engine")
    ids = make_context(tok, QUESTION)[1]
    llm = LLM(work / "engine")
    t1 = time.perf_counter()
    got = llm.generate([ids], SamplingParams(max_tokens=args.max_output_len, top_k=1))[0].token_ids
    rate = len(got) / (time.perf_counter() - t1)
    ref = load_reference(ckpt).generate(torch.tensor([ids]), max_new_tokens=args.max_output_len, do_sample=False,
                                        min_new_tokens=args.max_output_len, eos_token_id=None,
                                        pad_token_id=0)[0, len(ids):].tolist()
    same = sum(a == b for a, b in zip(got, ref, strict=True))
    print(f"\nengine vs Hugging Face reference: {same}/{len(ref)} tokens identical (greedy, {llm.engine.device})")
    print(f"engine speed: {rate:.1f} tokens/s; whole demo {time.perf_counter() - t0:.1f} s")
    return 0 if same == len(ref) else 1


if __name__ == "__main__":
    run_cli(main)
