"""Compare the engine with the Hugging Face reference tensor by tensor and name the first one over tolerance:

python3 examples/qwen/compare_layers.py --engine_dir qwen_outputs --hf_model_dir <ckpt> --input_text "Hello"

Exit status 0 when no tensor is over tolerance, 1 when one is, 2 on bad input.
"""

import argparse
import sys
from pathlib import Path

try:
    import qwen_trtllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from qwen_trtllm import QWenError  # noqa: E402
from qwen_trtllm.cli import parser, run_cli  # noqa: E402
from qwen_trtllm.dtypes import add_dtype_argument, torch_dtype  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--engine_dir", default="qwen_outputs", help="the engine directory to compare")
    p.add_argument("--hf_model_dir", required=True, help="the Hugging Face Qwen checkpoint the engine was built from")
    p.add_argument("--tokenizer_dir", default=None, help="directory with qwen.tiktoken (default: engine, then HF dir)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input_text", default="Tell me about the history of the printing press.",
                     help="the prompt (through the tokenizer)")
    src.add_argument("--input_tokens", default=None,
                     help='token ids: "1,2,3" or a .csv/.npy file (as run.py reads them; the first row)')
    p.add_argument("--chat_format", default="chatml", choices=["chatml", "raw"], help="how --input_text is wrapped")
    add_dtype_argument(p, "--engine_dtype", default=None,
                       help="run the engine's weights cast to this dtype (default: the dtype it was built with)")
    add_dtype_argument(p, "--reference_dtype", default="float32", allowed=("float32", "float64"),
                       help="dtype of the Hugging Face reference")
    p.add_argument("--rtol", type=float, default=None,
                   help="relative-error tolerance per tensor (default by engine dtype: fp32 1e-4, fp16 2e-2, "
                        "bf16 5e-2)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    return p.parse_args(argv)


def input_ids(args: argparse.Namespace) -> list[int]:
    """The prompt's token ids: --input_tokens as given, or --input_text through the tokenizer."""
    if args.input_tokens is not None:
        if Path(args.input_tokens).suffix in (".csv", ".npy"):
            from qwen_trtllm.runtime.runner import read_input_tokens

            return read_input_tokens(args.input_tokens)[0]
        try:
            return [int(t) for t in args.input_tokens.replace(",", " ").split()]
        except ValueError:
            raise QWenError(f'--input_tokens "{args.input_tokens}" must be integers like "1,2,3" or a .csv/.npy '
                            "file") from None
    from qwen_trtllm.tokenizer import QWenTokenizer, make_context

    dirs = [args.tokenizer_dir] if args.tokenizer_dir else [args.engine_dir, args.hf_model_dir]
    tok_dir = next((d for d in dirs if (Path(d) / "qwen.tiktoken").is_file()), None)
    if tok_dir is None:
        raise QWenError(f"no qwen.tiktoken in {' or '.join(dirs)}: pass --tokenizer_dir or --input_tokens")
    tok = QWenTokenizer.from_dir(tok_dir)
    return make_context(tok, args.input_text, chat_format=args.chat_format)[1]


def main() -> int:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise QWenError("--device cuda but no CUDA GPU is available: use --device cpu")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    from qwen_trtllm.evaluation.compare_layers import compare_layers, first_flagged, format_table
    from qwen_trtllm.runtime import Engine
    from qwen_trtllm.runtime.engine import read_engine_config

    read_engine_config(args.engine_dir)  # a missing engine and bad input fail before the engine loads
    ids = input_ids(args)
    engine = Engine.load(args.engine_dir, device=device)
    if args.engine_dtype is not None and torch_dtype(args.engine_dtype) != engine.dtype:
        engine.model.to(torch_dtype(args.engine_dtype))
        engine.dtype = torch_dtype(args.engine_dtype)

    from qwen_trtllm.models.qwen.reference import load_reference

    reference = load_reference(args.hf_model_dir, torch_dtype(args.reference_dtype, ("float32", "float64")), device)
    if reference.config.vocab_size != engine.config.vocab_size:
        raise QWenError(f"the engine's vocabulary ({engine.config.vocab_size}) differs from the checkpoint's "
                        f"({reference.config.vocab_size}): was the engine built from --hf_model_dir?")
    diffs = compare_layers(engine, reference, ids, args.rtol)
    storage = engine.build.source.get("storage_dtype")  # the weights' precision sets the tolerance too
    built = engine.build.dtype + (f" from {storage} FT files" if storage else "")
    print(f"{len(ids)} tokens; engine {str(engine.dtype)[6:]} (built {built}) vs reference {args.reference_dtype} "
          f"on {device}; tolerance: relative error {diffs[0].tol:g}")
    print(format_table(diffs))
    bad = first_flagged(diffs)
    if bad is None:
        print("no tensor over tolerance")
        return 0
    print(f"first tensor over tolerance: {bad.name} (relative error {bad.rel_err:.3e} > {bad.tol:g}); "
          f"{sum(d.flagged for d in diffs)} of {len(diffs)} flagged")
    return 1


if __name__ == "__main__":
    run_cli(main)
