"""Chat with a Qwen engine in the terminal:

python3 examples/qwen/chat.py --engine_dir qwen_outputs

Multi-turn: the history goes into every prompt (chatml, make_context) and the oldest turns are dropped to fit the
window, as Qwen's chat() does. Answers stream as they are generated. Commands: `:clear` (forget the
conversation), `:system <text>` (a new system prompt; `:system` alone shows it), `:help`, `:quit` (or end of
input). Ctrl-C stops an answer. Reads lines from a pipe too:

printf 'Hello\\n:quit\\n' | python3 examples/qwen/chat.py
"""

import argparse
import asyncio
import signal
import sys
import threading
from pathlib import Path

try:
    import qwen_trtllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qwen_trtllm import QWenError  # noqa: E402
from qwen_trtllm.cli import parser, run_cli  # noqa: E402
from qwen_trtllm.runtime.runner import (  # noqa: E402
    QWEN_EOD_ID,
    add_runtime_args,
    executor_config_from_args,
    generation_defaults,
    sampling_from_args,
    tokenizer_path,
)
from qwen_trtllm.tokenizer import DEFAULT_SYSTEM  # noqa: E402

HELP = ":clear forgets the conversation, :system <text> sets the system prompt, :quit ends (so does end of input)"


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--engine_dir", default="qwen_outputs", help="the engine directory written by build.py")
    p.add_argument("--tokenizer_dir", default=None, help="directory with qwen.tiktoken (default: the engine dir)")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt (:system changes it)")
    p.add_argument("--max_output_len", type=int, default=None, help="tokens per answer at most (default: "
                   "min(512, the engine's limit))")
    p.add_argument("--temperature", type=float, default=None, help="default: generation_config.json's, else 1.0")
    p.add_argument("--top_k", type=int, default=None, help="1 = greedy, 0 = off (default: generation_config)")
    p.add_argument("--top_p", type=float, default=None, help="default: generation_config.json's, else 1.0")
    p.add_argument("--repetition_penalty", type=float, default=None,
                   help="default: generation_config.json's, else 1.0")
    p.add_argument("--seed", type=int, default=0, help="random seed of sampling")
    p.add_argument("--max_window_size", type=int, default=None, help="history window in tokens (default: "
                   "generation_config.json's max_window_size or 6144, at most the engine's max_input_len)")
    p.add_argument("--num_scheduler_steps", type=int, default=4, help="decode steps run back to back")
    add_runtime_args(p)
    return p.parse_args(argv)


def read_line(interactive: bool) -> str | None:
    """The next input line; None at the end of input."""
    if interactive:
        try:
            return input("User: ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line if line else None


def answer(llm, ids: list[int], params, tokenizer, stops) -> str:
    """Stream one answer to stdout and return its text (what was shown, if Ctrl-C stopped it)."""
    from qwen_trtllm.runtime.detokenizer import IncrementalText

    text, stop = IncrementalText(tokenizer, stops), threading.Event()

    async def stream() -> None:
        async for out in llm.generate_async(ids, params):  # leaving early cancels the request
            delta = text.update(out.token_ids, out.finished)
            if delta:
                sys.stdout.write(delta)
                sys.stdout.flush()
            if stop.is_set():
                sys.stdout.write(" (stopped)")
                break
            if out.finish_reason == "error":  # e.g. non-finite logits: main() prints it and keeps chatting
                raise QWenError(out.error or "generation failed")

    # Ctrl-C while answering stops the answer at its next tokens (not the program)
    main_thread = threading.current_thread() is threading.main_thread()  # (signal handlers live there only)
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set()) if main_thread else None
    sys.stdout.write("Qwen: ")
    sys.stdout.flush()
    try:
        asyncio.run(stream())
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return text.text[: text.sent]


def main() -> int:
    args = parse_args()
    from dataclasses import replace

    from qwen_trtllm.runtime import LLM
    from qwen_trtllm.runtime.engine import read_engine_config
    from qwen_trtllm.serving.openai_api import window_size
    from qwen_trtllm.tokenizer import make_context, stop_token_ids

    if args.num_scheduler_steps < 1:
        raise QWenError(f"--num_scheduler_steps must be >= 1, got {args.num_scheduler_steps}")
    _, build = read_engine_config(args.engine_dir)
    defaults = generation_defaults(args.engine_dir)
    if args.max_output_len is not None and args.max_output_len < 1:
        raise QWenError(f"--max_output_len {args.max_output_len} must be >= 1")
    params = sampling_from_args(args, defaults, args.max_output_len or min(512, build.max_output_len))
    config = replace(executor_config_from_args(args, build), num_scheduler_steps=args.num_scheduler_steps)
    tokenizer_path(args.engine_dir, args.tokenizer_dir)  # chat needs one: say so before the engine loads
    llm = LLM(args.engine_dir, args.tokenizer_dir, config)
    if not llm.is_leader:  # tensor parallelism: follow rank 0's steps until it quits
        llm.executor.worker_loop()
        return 0
    tokenizer = llm.tokenizer
    if tokenizer is None:
        llm.start()
        llm.shutdown()
        raise QWenError("chat needs the tokenizer: the engine directory has no qwen.tiktoken; pass --tokenizer_dir")
    stops = sorted(stop_token_ids(tokenizer, "chatml"))
    params.stop_token_ids, params.end_id = stops, QWEN_EOD_ID
    window = window_size(defaults, llm.executor.max_input_len, args.max_window_size)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"Chat with {Path(args.engine_dir).resolve().name}. {HELP}.")
    system, history = args.system, []
    try:
        while True:
            line = read_line(interactive)
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith(":"):
                command, _, rest = line.partition(" ")
                if command in (":quit", ":exit", ":q"):
                    break
                if command == ":clear":
                    history.clear()
                    print("(history cleared)")
                elif command == ":system":
                    if rest.strip():
                        system = rest.strip()
                        print("(system prompt set)")
                    else:
                        print(f"(system prompt: {system})")
                elif command == ":help":
                    print(f"({HELP})")
                else:
                    print(f"(unknown command {command}: {HELP})")
                sys.stdout.flush()
                continue
            _, ids = make_context(tokenizer, line, history, system=system, max_window_size=window)
            try:
                llm.executor.check_request(ids, params)
                text = answer(llm, ids, params, tokenizer, stops)
            except QWenError as e:  # e.g. a question longer than the engine takes: say so, keep chatting
                print(f"error: {e}", file=sys.stderr, flush=True)
                continue
            history.append((line, text.strip()))  # as Qwen's chat() keeps it
    finally:
        llm.shutdown()
    return 0


if __name__ == "__main__":
    run_cli(main)
