"""Convert a Hugging Face Qwen (v1) checkpoint into the FT directory that build.py reads:

python3 examples/qwen/hf_qwen_convert.py -i Qwen/Qwen-7B-Chat -o ./c-model/Qwen --tensor-parallelism 1 \\
    --storage-type float16

writes ./c-model/Qwen/1-gpu/ (config.ini, one raw file per tensor and rank, the tokenizer files). An existing
FT directory there is replaced only with --force (as build.py replaces an engine).
"""

import argparse
import sys
from pathlib import Path

try:
    import qwen_trtllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qwen_trtllm.checkpoint.ft_format import convert_checkpoint  # noqa: E402
from qwen_trtllm.cli import parser, run_cli  # noqa: E402
from qwen_trtllm.dtypes import add_dtype_argument  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("-i", "--in-file", "--in_file", dest="in_file", required=True,
                   help="Hugging Face Qwen checkpoint directory, local (e.g. Qwen/Qwen-7B-Chat)")
    p.add_argument("-o", "--out-dir", "--out_dir", dest="out_dir", required=True,
                   help="output root; the FT directory is <out-dir>/<tp>-gpu")
    add_dtype_argument(p, "-t", "--storage-type", "--storage_type", dest="storage_type", default="float16",
                       help="dtype of the stored weights")
    p.add_argument("-tp", "--tensor-parallelism", "--tensor_parallelism", dest="tensor_parallelism", type=int,
                   default=1, help="number of tensor-parallel ranks (must divide the attention heads)")
    p.add_argument("-p", "--processes", type=int, default=1,
                   help="worker processes converting tensors in parallel (each adds ~200 MiB: its own torch runtime)")
    p.add_argument("--force", action="store_true", help="replace an existing FT directory <out-dir>/<tp>-gpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = convert_checkpoint(args.in_file, args.out_dir, tp=args.tensor_parallelism, storage_type=args.storage_type,
                             processes=args.processes, force=args.force)
    print(f"FT checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
