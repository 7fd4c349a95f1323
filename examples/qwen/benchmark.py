"""Benchmark the engine (and Hugging Face eager on the same weights) on the GPU:

python3 examples/qwen/benchmark.py --model qwen-7b --batch_size 1,8,64 --input_output_len "128,128;2048,128" \
    --dtype float16 --compare_hf
torchrun --nproc-per-node 2 examples/qwen/benchmark.py --model qwen-7b --batch_size 1,64   # tensor parallel 2
"""

import json
import sys
from pathlib import Path

try:
    import qwen_trtllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from qwen_trtllm import QWenError  # noqa: E402
from qwen_trtllm.cli import atomic_write, check_output_file, parser, run_cli  # noqa: E402
from qwen_trtllm.dtypes import add_dtype_argument  # noqa: E402


def parse_pairs(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in pair.split(",")) for pair in text.split(";") if pair.strip()]
    except ValueError:
        raise QWenError(f'--input_output_len "{text}" must look like "128,128;2048,128"') from None


def main() -> int:
    p = parser(__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="qwen-7b", help="random weights of a named shape: tiny, qwen-1.8b, qwen-7b, "
                     "qwen-14b (created directly on the GPU; under torchrun/mpirun each rank makes its "
                     "tensor-parallel shard)")
    src.add_argument("--engine_dir", default=None, help="an engine directory built by build.py")
    p.add_argument("--batch_size", default="1,8,64", help="comma-separated batch sizes")
    p.add_argument("--input_output_len", default="128,128;2048,128",
                   help='semicolon-separated "input,output" token lengths')
    add_dtype_argument(p, "--dtype", default="float16", help="dtype of the random weights (--model)")
    p.add_argument("--kernels", default="triton", choices=["triton", "torch"],
                   help="fused Triton kernels or plain PyTorch ops")
    p.add_argument("--kv_cache_dtype", default="auto", choices=["auto", "int8", "fp8"],
                   help="--model: the KV cache's format (build.py --int8_kv_cache / --fp8_kv_cache)")
    p.add_argument("--quant", default="", help="also time quantised copies: int8, int4 (weight-only), fp8 "
                   "(build.py --use_fp8), comma-separated")
    p.add_argument("--group_size", type=int, default=None, help="int4 rows of --quant: input channels per scale "
                   "(default: 128)")
    p.add_argument("--quantize_lm_head", action="store_true", help="--quant rows also quantise the lm_head")
    p.add_argument("--runs", type=int, default=3, help="timed runs per row (the median is reported)")
    p.add_argument("--compare_hf", action="store_true", help="also time Hugging Face eager on the same weights "
                   "(one rank only)")
    p.add_argument("--hf_batch_size", default=None, help="batch sizes for --compare_hf (eager is slow; default: 1,8)")
    p.add_argument("--json_output", default=None, help="write the rows here as JSON")
    args = p.parse_args()
    check_output_file(args.json_output, "--json_output")
    quants = [q for q in args.quant.split(",") if q]
    if args.group_size is not None and "int4" not in quants:
        raise QWenError("--group_size applies to --quant int4 rows only: add int4 to --quant or drop it")
    if args.quantize_lm_head and not quants:
        raise QWenError("--quantize_lm_head applies to --quant rows only: add --quant int8|int4|fp8 or drop it")
    if args.hf_batch_size is not None and not args.compare_hf:
        raise QWenError("--hf_batch_size applies to --compare_hf only: add --compare_hf or drop it")
    args.group_size, args.hf_batch_size = args.group_size or 128, args.hf_batch_size or "1,8"
    if not torch.cuda.is_available():
        raise QWenError("benchmark.py times CUDA kernels and needs an NVIDIA GPU; on CPU run examples/qwen/run.py")

    from qwen_trtllm.evaluation import benchmark as bm
    from qwen_trtllm.runtime.distributed import init_distributed, load_engine_on_all_ranks

    pairs, batches = parse_pairs(args.input_output_len), [int(b) for b in args.batch_size.split(",")]
    rank, world = init_distributed()  # under torchrun/mpirun: a tensor-parallel engine, rank 0 reports
    if args.compare_hf and world > 1:
        raise QWenError("--compare_hf runs Hugging Face on one GPU: drop it under torchrun/mpirun, or run one rank")
    show = print if rank == 0 else (lambda *a, **k: None)
    if args.engine_dir:
        engine = load_engine_on_all_ranks(args.engine_dir, rank, world)
        if args.kernels == "torch":
            from dataclasses import replace

            engine.build = replace(engine.build, kernels="torch")
            engine.model.set_kernels(False)
    else:  # under torchrun/mpirun: this rank's shard of the random model (tensor parallel, as build.py splits)
        engine = bm.random_engine(args.model, args.dtype, f"cuda:{torch.cuda.current_device()}",
                                  max_batch_size=max(batches), max_input_len=max(i for i, _ in pairs),
                                  max_output_len=max(o for _, o in pairs), kernels=args.kernels,
                                  kv_cache_dtype=args.kv_cache_dtype, rank=rank, world_size=world)
    copy_gbs = bm.copy_bandwidth_gbs(engine.device)
    show(f"device {torch.cuda.get_device_name()}, copy bandwidth {copy_gbs:.0f} GB/s, "
          f"weights {bm.decode_step_bytes(engine, 0, 0) / 1e9:.2f} GB moved per decode step")
    rows = []
    for quant in [None] + quants:
        eng = engine if quant is None else bm.quantized_engine(engine, quant, args.group_size, args.quantize_lm_head)
        for inp, out in pairs:
            for b in batches:
                try:
                    rows.append(bm.bench_engine(eng, b, inp, out, args.runs, copy_gbs))
                except QWenError as e:  # the KV cache cannot hold the batch: on every rank (they agree on the pool)
                    show(f"skipped batch {b} x {inp + out} tokens: {e}", flush=True)
                    continue
                show(bm.format_table(rows[-1:]).splitlines()[-1], flush=True)
        if quant is not None:
            del eng
    if args.compare_hf:
        hf = bm.hf_model_sharing_weights(engine)
        for inp, out in pairs[:1]:
            for b in [int(v) for v in args.hf_batch_size.split(",")]:
                rows.append(bm.bench_hf(hf, b, inp, out, copy_gbs, bm.decode_step_bytes(engine, b, inp + out // 2)))
                print(bm.format_table(rows[-1:]).splitlines()[-1], flush=True)
    show()
    show(bm.format_table(rows))
    if args.json_output and rank == 0:
        with atomic_write(args.json_output) as f:
            f.write(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs,
                                "rows": bm.rows_to_json(rows)}, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
