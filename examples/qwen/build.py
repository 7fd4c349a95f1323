"""Build a Qwen engine directory (config.json, rank{r}.safetensors, the tokenizer files):

python3 examples/qwen/build.py --model_dir ./c-model/Qwen/1-gpu --dtype float16
python3 examples/qwen/build.py --hf_model_dir ./Qwen-7B-Chat --dtype float16 --output_dir qwen_outputs

An existing engine at --output_dir is replaced only with --force (as hf_qwen_convert.py replaces an FT directory).
"""

import argparse
import sys
from pathlib import Path

try:
    import qwen_trtllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qwen_trtllm import QWenError  # noqa: E402
from qwen_trtllm.builder.build import PLUGIN_FLAGS, build_engine  # noqa: E402
from qwen_trtllm.cli import parser, run_cli  # noqa: E402
from qwen_trtllm.dtypes import add_dtype_argument, choices_text, dtype_arg  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model_dir", help="FT directory written by hf_qwen_convert.py (e.g. ./c-model/Qwen/1-gpu)")
    src.add_argument("--hf_model_dir", help="Hugging Face Qwen checkpoint directory (converted on the fly)")
    add_dtype_argument(p, "--dtype", default="float16", help="dtype of the engine's weights and activations")
    p.add_argument("--max_batch_size", type=int, default=8, help="requests in flight at once")
    p.add_argument("--max_input_len", type=int, default=2048, help="tokens per prompt at most")
    p.add_argument("--max_output_len", type=int, default=2048, help="new tokens per request at most")
    p.add_argument("--max_num_tokens", type=int, default=8192,
                   help="tokens per in-flight batching step (decode tokens + prefill chunks)")
    p.add_argument("--tokens_per_block", type=int, default=64, choices=[16, 32, 64, 128],
                   help="tokens per paged KV cache block")
    p.add_argument("--world_size", type=int, default=1, help="tensor-parallel ranks")
    p.add_argument("--output_dir", default="qwen_outputs", help="the engine directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing engine at --output_dir")
    p.add_argument("--tokenizer_dir", default=None, help="directory with qwen.tiktoken, for a checkpoint that lacks "
                   "it (default: the checkpoint's own tokenizer files)")
    p.add_argument("--kernels", default="triton", choices=["triton", "torch"],
                   help="kernels on CUDA: fused Triton kernels or plain PyTorch ops everywhere")
    # TensorRT-LLM's plugin flags: accepted, recorded in the engine config, mapped as the README describes.
    for flag, what in (("use_gpt_attention_plugin", "paged attention kernels (always on here)"),
                       ("use_gemm_plugin", "cuBLAS GEMMs (always on here)"),
                       ("use_layernorm_plugin", "the fused residual-add + RMSNorm kernel"),
                       ("use_rmsnorm_plugin", "the fused residual-add + RMSNorm kernel")):
        p.add_argument(f"--{flag}", nargs="?", const="float16", default=None, type=dtype_arg(),
                       metavar="{float16,float32,bfloat16}",
                       help=f"TensorRT-LLM's flag (its dtype: {choices_text()}), recorded in config.json: {what}")
    p.add_argument("--use_weight_only", action="store_true", help="store the linear layers as int8/int4")
    p.add_argument("--weight_only_precision", default=None, choices=["int8", "int4"],
                   help="with --use_weight_only (default: int8)")
    p.add_argument("--group_size", type=int, default=None,
                   help="with --use_weight_only --weight_only_precision int4: input channels per scale (default: 128)")
    p.add_argument("--quantize_lm_head", action="store_true",
                   help="with --use_weight_only or --use_fp8: quantise lm_head too, in the same format (it stays in "
                   "--dtype otherwise; the embedding always does)")
    p.add_argument("--use_fp8", action="store_true",
                   help="store the linear layers as fp8 e4m3 (per-channel scales; above 16 rows activations per token "
                   "at run time; sm_89+ GPUs or the CPU); lm_head stays in --dtype unless --quantize_lm_head, the "
                   "embedding always")
    p.add_argument("--enable_context_fmha", action="store_true",
                   help="TensorRT-LLM's flag, recorded: prefill attention is always the flash kernel here")
    p.add_argument("--remove_input_padding", action="store_true",
                   help="TensorRT-LLM's flag, recorded: tokens are always packed here")
    p.add_argument("--int8_kv_cache", action="store_true",
                   help="KV cache as int8 with a scale per token and head, computed as it is written")
    p.add_argument("--fp8_kv_cache", action="store_true",
                   help="KV cache as fp8 e4m3 with a scale per token and head (on a GPU sm_89+; the CPU runs it too)")
    args = p.parse_args(argv)
    if args.model_dir is None and args.hf_model_dir is None:
        raise QWenError("give --model_dir (FT directory) or --hf_model_dir (Hugging Face checkpoint)")
    if args.use_fp8 and args.use_weight_only:
        raise QWenError("--use_fp8 and --use_weight_only are mutually exclusive: give one of them")
    if not args.use_weight_only:
        given = [f for f in ("weight_only_precision", "group_size") if getattr(args, f) is not None]
        if given and args.use_fp8:
            raise QWenError(f"--{given[0]} does not apply to --use_fp8 (e4m3 with one scale per output channel): "
                            "drop it")
        if given:
            raise QWenError(f"--{given[0]} has no effect without --use_weight_only: add --use_weight_only or drop it")
        if args.quantize_lm_head and not args.use_fp8:
            raise QWenError("--quantize_lm_head has no effect without --use_weight_only or --use_fp8: add one or "
                            "drop it")
    return args


def main() -> int:
    args = parse_args()
    if args.int8_kv_cache and args.fp8_kv_cache:
        raise QWenError("--int8_kv_cache and --fp8_kv_cache are mutually exclusive: give one of them")
    plugins = {k: getattr(args, k) for k in PLUGIN_FLAGS if getattr(args, k)}
    precision = (args.weight_only_precision or "int8") if args.use_weight_only else None
    out = build_engine(args.output_dir, ft_dir=args.model_dir, hf_dir=args.hf_model_dir, dtype=args.dtype,
                       max_batch_size=args.max_batch_size, max_input_len=args.max_input_len,
                       max_output_len=args.max_output_len, world_size=args.world_size, plugins=plugins,
                       kernels=args.kernels, weight_only_precision=precision, group_size=args.group_size,
                       quantize_lm_head=args.quantize_lm_head, tokens_per_block=args.tokens_per_block,
                       max_num_tokens=args.max_num_tokens, tokenizer_dir=args.tokenizer_dir, force=args.force,
                       kv_cache_dtype="int8" if args.int8_kv_cache else "fp8" if args.fp8_kv_cache else "auto",
                       use_fp8=args.use_fp8)
    print(f"engine written to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
