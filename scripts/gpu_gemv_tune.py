"""Tune the decode GEMV on the GPU the way it runs: 32 layers' worth of distinct weights back to back in one CUDA
graph (no L2 reuse, no launch gaps), per 7B shape and config. Prints GB/s of weight bytes: the current config's,
then the best three configs, best first.

python3 scripts/gpu_gemv_tune.py [--rows 1] [--format fp16|fp8] [--gated] [--prefetch BYTES]

--format fp8 sweeps the FP8 GEMV (kernels/fp8_gemv.py: e4m3 weights, 1 byte each, fp16 activations) instead: its
elementwise kernel for --rows 1-4, its tl.dot kernel for 5-16, each over that kernel's configs
(Fp8GemvConfig); the fp8 engine's shapes (no lm_head: --use_fp8 keeps it fp16). GB/s count the e4m3 bytes, so
they compare with the fp16 sweep's per byte. --gated times c_proj as the MLP runs it (x = [gate | up], SiLU*mul
fused); --prefetch sets the bytes of each weight row prefetched into L2 before the PDL wait (default: the kernel
module's PREFETCH_BYTES).
"""

import itertools

import torch

from qwen_trtllm.cli import parser, require_cuda
from qwen_trtllm.kernels import fp8_gemv as F
from qwen_trtllm.kernels import gemv as G


def time_graph(fn, reps: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def report(name: str, results: list, current, copies: int, nbytes: int) -> None:
    """results [(ms, config)]: the current config's line, then the best three (best first, as the fp16 sweep)."""
    results.sort(key=lambda r: r[0])
    for ms, cfg in results:
        if cfg == current:
            print(f"{name:<8} current {cfg}  {ms * 1e3 / copies:7.1f} us {nbytes / ms / 1e6:6.0f} GB/s", flush=True)
    for ms, cfg in results[:3]:
        print(f"{name:<8} {cfg}  {ms * 1e3 / copies:7.1f} us {nbytes / ms / 1e6:6.0f} GB/s", flush=True)


def tune(name: str, N: int, K: int, rows: int, gated: bool = False) -> None:
    copies = 32 if N * K * 2 * 32 <= 8 << 30 else 4  # distinct weights: no L2 reuse between calls
    ws = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
    x = torch.randn(rows, 2 * K if gated else K, device="cuda", dtype=torch.float16)
    nbytes = copies * N * K * 2
    if not gated:
        ms = time_graph(lambda: [torch.nn.functional.linear(x, w) for w in ws])
        print(f"{name:<8} cublas                  {ms * 1e3 / copies:7.1f} us {nbytes / ms / 1e6:6.0f} GB/s",
              flush=True)
    configs = [c for c in itertools.product((8, 16), (256, 512, 1024), (4, 8), (2, 3, 4))
               if 1024 <= c[0] * c[1] <= 16384]
    results = [(time_graph(lambda c=c: [G.gemv(x, w, gated=gated, config=c) for w in ws]), c) for c in configs]
    report(name, results, G.default_config(N, K, x.device), copies, nbytes)


def fp8_configs(rows: int) -> list:
    """The sweep of one fp8 kernel: the elementwise one (<= GEMV_ROWS rows) keeps its float32 accumulator tile at
    <= 128 registers per thread; the tl.dot one takes 16-row tiles of up to 16K weights."""
    if rows <= F.GEMV_ROWS:
        grid = itertools.product((4, 8, 16), (512, 1024, 2048), (2, 4, 8), (2, 3))
        keep = lambda bn, bk, w, s: 2048 <= bn * bk <= 16384 and bn * bk <= 4096 * w
    else:
        grid = itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4))
        keep = lambda bn, bk, w, s: bn * bk <= 16384
    return [F.Fp8GemvConfig(*c) for c in grid if keep(*c)]


def tune_fp8(name: str, N: int, K: int, rows: int, gated: bool = False) -> None:
    from qwen_trtllm.quantization.fp8 import quantize_fp8_weight

    copies = 32 if N * K * 32 <= 8 << 30 else 4  # distinct weights: no L2 reuse between calls
    ws = [quantize_fp8_weight(torch.randn(N, K, device="cuda") * 0.02) for _ in range(copies)]
    x = torch.randn(rows, 2 * K if gated else K, device="cuda", dtype=torch.float16)
    nbytes = copies * N * K

    def timed(cfg: F.Fp8GemvConfig) -> tuple[float, F.Fp8GemvConfig]:
        return time_graph(lambda: [F.fp8_gemv(x, q, s, gated=gated, config=cfg) for q, s in ws]), cfg

    results = [timed(cfg) for cfg in fp8_configs(rows)]
    report(name, results, F.default_config(N, K, x.device, rows, gated), copies, nbytes)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=1, help="rows of x (decode batch)")
    ap.add_argument("--shapes", default=None, help="default qkv,dense,gate_up,c_proj,lm_head (fp8: no lm_head)")
    ap.add_argument("--format", choices=("fp16", "fp8"), default="fp16")
    ap.add_argument("--gated", action="store_true", help="c_proj with SiLU*mul fused, as the MLP runs it")
    ap.add_argument("--prefetch", type=int, default=None, help="L2 prefetch bytes per weight row (sm_90+)")
    args = ap.parse_args()
    require_cuda("gpu_gemv_tune.py")
    shapes = {"qkv": (12288, 4096), "dense": (4096, 4096), "gate_up": (22016, 4096), "c_proj": (4096, 11008),
              "lm_head": (151936, 4096)}
    fp8 = args.format == "fp8"
    if fp8 and not 1 <= args.rows <= F.MAX_ROWS:
        ap.error(f"--format fp8 takes --rows 1-{F.MAX_ROWS} (above, the engine runs torch._scaled_mm)")
    if fp8 and args.gated and args.rows > F.GEMV_ROWS:
        ap.error(f"--format fp8 --gated takes --rows 1-{F.GEMV_ROWS} (above, silu_mul runs before the GEMV)")
    if args.prefetch is not None:
        (F if fp8 else G).PREFETCH_BYTES = args.prefetch
    default = "qkv,dense,gate_up,c_proj" + ("" if fp8 else ",lm_head")
    for name in (args.shapes or default).split(","):
        N, K = shapes[name]
        (tune_fp8 if fp8 else tune)(name, N, K, args.rows, gated=args.gated and name == "c_proj")


if __name__ == "__main__":
    main()
