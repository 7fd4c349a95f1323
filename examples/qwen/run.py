"""Chat with a Qwen engine (one or more prompts, or token ids), TensorRT-LLM's run.py:

python3 examples/qwen/run.py --max_output_len 8
"""

import argparse
import sys
import time
from pathlib import Path

try:
    import qwen_trtllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qwen_trtllm import QWenError  # noqa: E402
from qwen_trtllm.cli import check_output_file, parser, run_cli  # noqa: E402
from qwen_trtllm.runtime import LLM  # noqa: E402
from qwen_trtllm.runtime.engine import read_engine_config  # noqa: E402
from qwen_trtllm.runtime.llm import output_sequences  # noqa: E402
from qwen_trtllm.runtime.runner import (  # noqa: E402
    QWEN_EOD_ID,
    StreamPrinter,
    add_beam_search_args,
    add_runtime_args,
    beam_search_from_args,
    executor_config_from_args,
    generation_defaults,
    load_tokenizer,
    read_input_tokens,
    sampling_from_args,
    write_outputs,
)

DEFAULT_QUESTION = "你好，请问你叫什么？"


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--engine_dir", default="qwen_outputs", help="the engine directory written by build.py")
    p.add_argument("--tokenizer_dir", default=None, help="directory with qwen.tiktoken (default: the engine dir)")
    p.add_argument("--input_text", nargs="+", default=None,
                   help=f"one or more prompts (more than --max_batch_size wait in the queue; default: "
                        f"{DEFAULT_QUESTION}); not with --input_tokens")
    p.add_argument("--input_tokens", default=None, help="prompt token ids (.csv rows or .npy [B, T]), raw")
    p.add_argument("--max_output_len", type=int, default=None, help="default: min(512, the engine's limit)")
    p.add_argument("--chat_format", default="chatml", choices=["chatml", "raw"],
                   help="chatml: Qwen's chat template around --input_text, stop at <|im_end|>; raw: the text as is")
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt of the chatml template")
    p.add_argument("--temperature", type=float, default=None, help="default: generation_config.json's, else 1.0")
    p.add_argument("--top_k", type=int, default=None, help="1 = greedy, 0 = off (default: generation_config)")
    p.add_argument("--top_p", type=float, default=None, help="default: generation_config.json's, else 1.0")
    p.add_argument("--repetition_penalty", type=float, default=None,
                   help="default: generation_config.json's, else 1.0")
    p.add_argument("--seed", type=int, default=0, help="random seed of sampling")
    p.add_argument("--streaming", action="store_true", help="print tokens as they come")
    p.add_argument("--output_csv", default=None,
                   help="write the generated ids here, one row per prompt (beam search: per beam)")
    p.add_argument("--output_npy", default=None,
                   help="write int32 [batch, input + output] sequences here ([batch, beams, input + output] with "
                        "beam search), padded with the end id")
    p.add_argument("--profile", default=None, metavar="TRACE_JSON",
                   help="write a torch profiler trace (open in Perfetto) and print a per-phase summary")
    add_beam_search_args(p)
    add_runtime_args(p)
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.num_beams > 1 and args.streaming:
        raise QWenError("--streaming does not apply to beam search (--num_beams > 1): a beam is final only when "
                        "the search ends; leave out one of the two")
    if args.max_output_len is not None and args.max_output_len < 1:
        raise QWenError(f"--max_output_len {args.max_output_len} must be >= 1")
    if args.input_text is not None and args.input_tokens is not None:
        raise QWenError("--input_text and --input_tokens both given: pass one of them")
    for flag in ("output_csv", "output_npy", "profile"):
        check_output_file(getattr(args, flag), f"--{flag}")
    _, build = read_engine_config(args.engine_dir)
    if args.max_output_len is not None and args.max_output_len > build.max_output_len:  # said before loading
        raise QWenError(f"--max_output_len {args.max_output_len} exceeds the engine's max_output_len "
                        f"{build.max_output_len}: lower it or rebuild with a larger --max_output_len")
    max_new = args.max_output_len or min(512, build.max_output_len)
    defaults = generation_defaults(args.engine_dir)
    sampling = beam_search_from_args(args, sampling_from_args(args, defaults, max_new))
    token_prompts = read_input_tokens(args.input_tokens) if args.input_tokens is not None else None

    from qwen_trtllm.tokenizer import decode_response, make_context, stop_token_ids

    tokenizer = load_tokenizer(args.engine_dir, args.tokenizer_dir, required=args.input_tokens is None)
    llm = LLM(args.engine_dir, args.tokenizer_dir, executor_config_from_args(args, build))
    engine, rank = llm.engine, llm.engine.rank
    if rank == 0:
        print(llm.executor.kv_cache_report(), file=sys.stderr)
    if args.input_tokens is not None:
        prompts, texts = token_prompts, None
        stops = stop_token_ids(tokenizer, args.chat_format) if tokenizer else {QWEN_EOD_ID}
    else:
        texts = args.input_text or [DEFAULT_QUESTION]
        prompts = [make_context(tokenizer, t, system=args.system, chat_format=args.chat_format)[1] for t in texts]
        stops = stop_token_ids(tokenizer, args.chat_format)
    sampling.stop_token_ids, sampling.end_id = sorted(stops), QWEN_EOD_ID
    show = rank == 0
    streamer = StreamPrinter(tokenizer, stops) if args.streaming and tokenizer and show else None
    if streamer:
        print(f'Input: "{texts[0] if texts else prompts[0]}"\nOutput: "', end="", flush=True)

    from qwen_trtllm.profiling import maybe_profile

    with maybe_profile(args.profile if show else None):
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, sampling, on_output=streamer)
        elapsed = time.perf_counter() - t0
    if not show:
        return 0
    if streamer:
        print('"')
    beams = args.num_beams > 1
    for b, o in enumerate(outputs):
        if streamer and b == 0:
            continue
        print(f'Input: "{texts[b] if texts else prompts[b]}"')
        for i, ids in enumerate(o.beams if beams else [o.token_ids]):
            out = decode_response(ids, tokenizer, args.chat_format) if tokenizer else ids
            print(f'Output [beam {i}, score {o.beam_scores[i]:.4f}]: "{out}"' if beams else f'Output: "{out}"')
    output_ids = [ids for o in outputs for ids in (o.beams if beams else [o.token_ids])]
    n = sum(len(o.token_ids) for o in outputs)
    print(f"generated {n} tokens in {elapsed:.3f} s ({n / elapsed:.1f} tokens/s) on {engine.device}")
    write_outputs(output_ids, output_sequences(prompts, outputs, QWEN_EOD_ID, max_new, args.num_beams),
                  args.output_csv, args.output_npy)
    return 0


if __name__ == "__main__":
    run_cli(main)
