"""OpenAI-compatible server for a Qwen engine:

python3 examples/qwen/serve.py --engine_dir qwen_outputs --port 8000
python3 examples/qwen/serve.py --model qwen-7b     # random 7B-shaped weights on the GPU, for load tests (token ids)

Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics (Prometheus), and a chat page at
/. One engine loop (in-flight batching) serves every connection. Under torchrun with a tensor-parallel engine,
rank 0 serves HTTP and the other ranks follow its steps. SIGTERM: stop accepting, let in-flight requests finish
(--shutdown_timeout, then cancel them), exit 0.
"""

import argparse
import signal
import socket
import sys
from dataclasses import replace
from pathlib import Path

try:
    import qwen_trtllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qwen_trtllm import QWenError  # noqa: E402
from qwen_trtllm.cli import parser, run_cli  # noqa: E402
from qwen_trtllm.runtime.runner import (  # noqa: E402
    add_runtime_args,
    executor_config_from_args,
    generation_defaults,
    tokenizer_path,
)

# An idle server broadcasts nothing to the other tensor-parallel ranks, which wait in a collective meanwhile:
# their process group must not time out in between (a day without a request restarts nothing either).
DIST_TIMEOUT_S = 30 * 24 * 3600.0


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--engine_dir", default="qwen_outputs", help="the engine directory written by build.py")
    p.add_argument("--tokenizer_dir", default=None, help="directory with qwen.tiktoken (default: the engine dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (0: any free port)")
    p.add_argument("--served_model_name", default=None, help="the model id of the API (default: the engine dir's "
                   "name)")
    p.add_argument("--max_queue", type=int, default=None, help="requests in flight (running + waiting) at most; "
                   "more get 429 (default: no limit)")
    p.add_argument("--num_scheduler_steps", type=int, default=4, help="decode steps run back to back when no "
                   "waiting request can take a batch slot; small values stream smoothly")
    p.add_argument("--shutdown_timeout", type=float, default=10.0, help="seconds that in-flight requests get to "
                   "finish after SIGTERM before they are cancelled")
    p.add_argument("--max_window_size", type=int, default=None, help="chat history window in tokens (default: "
                   "generation_config.json's max_window_size or 6144, at most the engine's max_input_len)")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    add_runtime_args(p)
    p.add_argument("--model", default=None, help="instead of --engine_dir: random weights of a named shape (tiny, "
                   "qwen-1.8b, qwen-7b, qwen-14b) made on the GPU as benchmark_serving.py makes them (max_input_len "
                   "2048, max_output_len 1024, max_batch_size 512 unless --max_batch_size), warmed up with every "
                   "decode CUDA graph captured before serving; greedy sampling defaults. No tokenizer unless "
                   "--tokenizer_dir: then only /v1/completions with token-id prompts works (default: none, "
                   "--engine_dir)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="--model's weight dtype "
                   "(default: %(default)s)")
    args = p.parse_args(argv)
    if args.model is not None:  # --engine_dir has a default: was it given?
        probe = argparse.ArgumentParser(add_help=False)
        probe.add_argument("--engine_dir")
        if probe.parse_known_args(argv)[0].engine_dir is not None:
            raise QWenError("--model and --engine_dir exclude each other: random weights or an engine directory")
    if not 0 <= args.port <= 65535:
        raise QWenError(f"--port {args.port} must be in 0..65535")
    for name in ("max_queue", "num_scheduler_steps", "max_window_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise QWenError(f"--{name} must be >= 1, got {v}")
    if args.shutdown_timeout < 0:
        raise QWenError(f"--shutdown_timeout must be >= 0, got {args.shutdown_timeout}")
    return args


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the engine loads (a busy port fails at once, with one line)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise QWenError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port / --host") from None
    sock.set_inheritable(True)
    return sock


def random_model_llm(args, world: int):
    """--model: benchmark_serving.py's random engine on the GPU, warmed up, every decode CUDA graph captured."""
    import torch

    from qwen_trtllm.checkpoint.random_checkpoint import PRESETS
    from qwen_trtllm.evaluation import benchmark as bm
    from qwen_trtllm.evaluation import serving as sv
    from qwen_trtllm.runtime import LLM

    if args.model not in PRESETS:
        raise QWenError(f"--model {args.model}: choose one of {', '.join(PRESETS)}")
    if not torch.cuda.is_available() or world > 1:
        raise QWenError("--model makes random weights on one GPU: run it on a GPU machine without torchrun, or "
                        "serve an --engine_dir")
    tokenizer = None
    if args.tokenizer_dir:
        from qwen_trtllm.tokenizer import QWenTokenizer

        tokenizer = QWenTokenizer.from_dir(args.tokenizer_dir)
    engine = bm.random_engine(args.model, args.dtype, "cuda", max_batch_size=args.max_batch_size or 512,
                              max_input_len=2048, max_output_len=1024)
    config = replace(executor_config_from_args(args, engine.build), num_scheduler_steps=args.num_scheduler_steps)
    llm = LLM.from_engine(engine, tokenizer, config)
    print(f"random {args.model} ({args.dtype}): {sv.warm_up(llm)} CUDA graphs captured after the warm-up",
          file=sys.stderr, flush=True)
    return llm


def main() -> int:
    args = parse_args()
    from qwen_trtllm.runtime import LLM
    from qwen_trtllm.runtime.distributed import all_ranks_agree, init_distributed
    from qwen_trtllm.runtime.engine import read_engine_config

    rank, world = init_distributed(timeout_s=DIST_TIMEOUT_S)
    error, sock = None, None
    if rank == 0:
        try:
            sock = bind(args.host, args.port)
        except QWenError as e:
            error = str(e)
    all_ranks_agree(error)
    if args.model is not None:
        llm, defaults = random_model_llm(args, world), {}
    else:
        _, build = read_engine_config(args.engine_dir)
        tokenizer_path(args.engine_dir, args.tokenizer_dir)  # chat needs one: say so before the engine loads
        config = replace(executor_config_from_args(args, build), num_scheduler_steps=args.num_scheduler_steps)
        llm, defaults = LLM(args.engine_dir, args.tokenizer_dir, config), generation_defaults(args.engine_dir)
    app, error = None, None
    if llm.is_leader:
        from qwen_trtllm.serving.server import create_app

        try:
            app = create_app(llm, model_name=args.served_model_name or args.model, defaults=defaults,
                             max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout,
                             max_window_size=args.max_window_size)
        except QWenError as e:
            error = str(e)
    all_ranks_agree(error)
    if not llm.is_leader:  # follow rank 0's steps until its engine loop ends (its shutdown); it decides when
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        llm.executor.worker_loop()
        return 0

    from qwen_trtllm.serving.server import serve

    server = app.state.server
    print(llm.executor.kv_cache_report(), file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {server.model_name} on http://{host}:{sock.getsockname()[1]} (chat page: /, API: /v1)",
          file=sys.stderr, flush=True)
    try:
        serve(app, args.host, args.port, sock=sock, shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)
    finally:
        llm.start()  # (a no-op when the server ran) so that shutdown() always ends the engine loop, which
        llm.shutdown(args.shutdown_timeout)  # releases the other ranks' worker loops
    return 0


if __name__ == "__main__":
    run_cli(main)
