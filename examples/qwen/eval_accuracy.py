"""Teacher-forced accuracy of an engine against the Hugging Face reference or against another engine:

python3 examples/qwen/eval_accuracy.py --engine_dir qwen_outputs --hf_model_dir ./Qwen-7B-Chat --min_top1 0.98
python3 examples/qwen/eval_accuracy.py --engine_dir qwen_int8 --reference_engine_dir qwen_outputs --min_top1 0.97

Both sides see the same random prompts and the same forced continuation; the logits at every generated position
are compared (top-1 agreement and relative error). Exits 1 when top-1 agreement is below --min_top1.
"""

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

try:
    import qwen_trtllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from qwen_trtllm.cli import atomic_write, check_output_file, parser, run_cli  # noqa: E402
from qwen_trtllm.dtypes import add_dtype_argument, torch_dtype  # noqa: E402
from qwen_trtllm.runtime.runner import add_runtime_args, executor_config_from_args  # noqa: E402


def number_formats(build) -> str:
    """An engine's number formats for the report: "float16", "float16, fp8 weights, fp8 KV cache",
    "float16, int8 weights and lm_head", ..."""
    q = build.quantization
    weights = [f"{q.precision} weights" + (" and lm_head" if q.quantize_lm_head else "")] if q is not None else []
    return ", ".join([build.dtype] + weights +
                     ([f"{build.kv_cache_dtype} KV cache"] if build.kv_cache_dtype != "auto" else []))


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--engine_dir", required=True, help="the engine under test")
    p.add_argument("--kernels", default=None, choices=["triton", "torch"],
                   help="kernels of the engine under test (default: the engine's build)")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--hf_model_dir", help="reference: the checkpoint in transformers' Qwen2 (contexts <= "
                     "seq_length)")
    ref.add_argument("--reference_engine_dir", help="reference: another engine (e.g. the fp16 one for int8)")
    add_dtype_argument(p, "--reference_dtype", default=None,
                       help="dtype of the --hf_model_dir reference (default: float32)")
    p.add_argument("--reference_kernels", default=None, choices=["triton", "torch"],
                   help="kernels of the --reference_engine_dir engine (default: its build's)")
    p.add_argument("--num_prompts", type=int, default=64, help="random prompts")
    p.add_argument("--prompt_len", type=int, default=64, help="tokens per prompt")
    p.add_argument("--steps", type=int, default=32, help="teacher-forced positions compared per prompt")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per teacher-forced pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--min_top1", type=float, default=0.0, help="exit 1 when top-1 agreement is below this (0..1)")
    p.add_argument("--json_output", default=None, help="write the statistics and flags here as JSON")
    add_runtime_args(p)  # --max_batch_size defaults to --batch_size; the KV cache to one batch's tokens
    args = p.parse_args()

    from qwen_trtllm import QWenError

    check_output_file(args.json_output, "--json_output")
    if args.reference_dtype is not None and not args.hf_model_dir:
        raise QWenError("--reference_dtype applies to the --hf_model_dir reference only: drop it (an engine "
                        "reference runs in the dtype it was built with)")
    if args.reference_kernels is not None and not args.reference_engine_dir:
        raise QWenError("--reference_kernels applies to --reference_engine_dir only: drop it")
    args.reference_dtype = args.reference_dtype or "float32"
    from qwen_trtllm.evaluation.teacher_forced import (
        batched,
        compare_logits,
        engine_logits,
        random_prompts,
        reference_logits,
    )
    from qwen_trtllm.kernels import triton_available
    from qwen_trtllm.runtime import Engine, Executor
    from qwen_trtllm.runtime.distributed import init_distributed, load_engine_on_all_ranks
    from qwen_trtllm.runtime.engine import use_triton_kernels

    # under torchrun/mpirun the engine under test is tensor-parallel; rank 0 alone runs the reference and reports
    rank, world = init_distributed()
    if world > 1 and args.reference_engine_dir == args.engine_dir:
        raise QWenError("under several ranks, compare with another (single-rank) engine or --hf_model_dir")

    def use_kernels(engine: Engine, kernels: str | None) -> None:
        """--kernels triton (where Triton can run) or torch; None: the engine's build choice."""
        triton = use_triton_kernels(engine.build, engine.device) if kernels is None else \
            kernels == "triton" and triton_available(engine.device)
        engine.model.set_kernels(triton)

    def executor(engine: Engine, kernels: str | None) -> Executor:
        use_kernels(engine, kernels)
        seq = args.prompt_len + args.steps
        cfg = executor_config_from_args(args, engine.build)
        if args.max_tokens_in_paged_kv_cache is None:  # one batch's blocks, not a share of the GPU memory
            tpb = cfg.kv_cache.tokens_per_block
            cfg = replace(cfg, kv_cache=replace(cfg.kv_cache, max_tokens=args.batch_size * -(-seq // tpb) * tpb))
        return Executor(engine, replace(cfg, max_batch_size=args.max_batch_size or args.batch_size, max_seq_len=seq))

    test = executor(load_engine_on_all_ranks(args.engine_dir, rank, world), args.kernels)
    prompts, forced = random_prompts(test.engine.config.vocab_size, args.num_prompts, args.prompt_len, args.steps,
                                     args.seed)
    t0 = time.perf_counter()
    got = batched(lambda pr, fo: engine_logits(test, pr, fo), prompts, forced, args.batch_size)
    t_test = time.perf_counter() - t0
    if rank:
        return 0
    if args.hf_model_dir:
        from qwen_trtllm.models.qwen.reference import load_reference

        model = load_reference(args.hf_model_dir, torch_dtype(args.reference_dtype), test.engine.device)
        reference = lambda pr, fo: reference_logits(model, pr, fo)
        label = f"Hugging Face reference ({args.reference_dtype})"
    else:
        same = args.reference_engine_dir == args.engine_dir
        if same:  # the same engine and KV cache, its kernels switched for the reference pass
            ref_executor = test
            use_kernels(test.engine, args.reference_kernels)
        else:
            ref_executor = executor(Engine.load(args.reference_engine_dir), args.reference_kernels)
        reference = lambda pr, fo: engine_logits(ref_executor, pr, fo)
        label = f"engine {args.reference_engine_dir} ({args.reference_kernels or 'as built'}, " \
                f"{number_formats(ref_executor.engine.build)})"
    t0 = time.perf_counter()
    want = batched(reference, prompts, forced, args.batch_size)
    t_ref = time.perf_counter() - t0
    stats = compare_logits(got, want)
    print(f"{args.engine_dir} ({args.kernels or 'as built'}, {number_formats(test.engine.build)}) vs {label}: "
          f"{args.num_prompts} prompts x {args.steps} tokens teacher-forced")
    print(f"top-1 agreement {100 * stats['top1_agreement']:.2f}%  logits rel. error {stats['rel_err']:.2e} "
          f"(worst position {stats['max_rel_err']:.2e})  [{t_test:.1f} s vs {t_ref:.1f} s]")
    if args.json_output:
        with atomic_write(args.json_output) as f:
            f.write(json.dumps({**stats, **vars(args)}, indent=2))
    if stats["top1_agreement"] < args.min_top1:
        print(f"accuracy check failed: top-1 agreement {stats['top1_agreement']:.4f} < --min_top1 {args.min_top1}")
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
