"""Tune the decode GEMV and the weight-only matmuls on the GPU the way they run: 32 layers' worth of distinct
weights back to back in one CUDA graph (no L2 reuse, no launch gaps), per 7B shape and config. Prints GB/s of weight
bytes: the current config's, then the best three configs, best first.

python3 scripts/gpu_gemv_tune.py [--rows 1] [--shapes qkv,...] [--format fp16|fp8|int8|int4] [--gated]
                                 [--prefetch BYTES] [--tp 1|2|4|8]

--format fp8 sweeps the FP8 GEMV (kernels/fp8_gemv.py: e4m3 weights, 1 byte each, fp16 activations) instead: its
elementwise kernel for --rows 1, its tl.dot kernel for 2-16, each over that kernel's configs
(Fp8GemvConfig), on the fp8 engine's shapes (its lm_head is e4m3 with build.py --use_fp8 --quantize_lm_head).
GB/s count the e4m3 bytes, so they compare with the fp16 sweep's per byte. --gated times c_proj as the MLP runs
it (x = [gate | up], SiLU*mul fused); --prefetch sets the bytes of each weight row prefetched into L2 before the
PDL wait (default: the kernel module's PREFETCH_BYTES).

--format int8 at --rows 1 sweeps what the engine runs there: the FP8 GEMV's elementwise kernel on int8 codes
(kernels/fp8_gemv.py int8_gemv, the fp8 configs; --gated and --prefetch as for fp8). The fp8 and int8 GEMV
sweeps also print the cuBLAS fp16 line first (not --gated) and check each config as below; their GB/s count the
codes and scales.
--format int8 above 1 row, and int4, sweep the weight-only matmul (kernels/weight_only_gemm.py: int8 per output
channel, int4 in groups of 128, as build.py --use_weight_only quantises) over configs around select_config's
choice (each one a compile): the engine runs it at those --rows, decode and prefill alike (select_config: up to
16 rows 16-row tensor-core tiles split over K; 17-64 rows one tile of the rows rounded up to a power of two;
above that 64- or 128-row prefill tiles). lm_head is the
--quantize_lm_head engine's. Each config's result is checked once against a float32 matmul with the
dequantised weights before it is timed; a config that fails to compile or launch, or is off by a relative error of
3e-3 or more, is printed as skipped. A cuBLAS fp16 line for the same shape comes first as the reference, as for
--format fp16. GB/s count qweight + scales bytes (fp16 bytes for cuBLAS): compare the us. fp16 against what the
engine runs for int8 / int4, per shape and batch (cublas line against current line):

    for f in int8 int4; do for m in 1 16 64 1024; do python3 scripts/gpu_gemv_tune.py --format $f --rows $m; done; done

One weight-only kernel under Nsight Compute (its first launch is the current config's correctness check):

    ncu --kernel-name regex:_wo_mma_kernel --launch-count 1 --section SpeedOfLight \\
        python3 scripts/gpu_gemv_tune.py --format int4 --rows 1 --shapes qkv
"""

import itertools

import torch
import triton

from qwen_trtllm.cli import parser, require_cuda
from qwen_trtllm.kernels import fp8_gemv as F
from qwen_trtllm.kernels import gemv as G

GROUP = 128  # int4 group size (build.py's --group_size default)
MAX_REL_ERR = 3e-3  # weight-only result against float32 with the dequantised weights; fp16 output rounding ~2e-4


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


def distinct_copies(weight_bytes: int) -> int:
    """Weight copies to cycle through so no call finds its weights in L2: 32 layers' worth, 4 above 8 GiB."""
    return 32 if weight_bytes * 32 <= 8 << 30 else 4


def report(name: str, results: list, current, copies: int, nbytes: int) -> None:
    """results [(ms, config)]: the current config's line, then the best three (best first, as the fp16 sweep)."""
    results.sort(key=lambda r: r[0])
    for ms, cfg in results:
        if cfg == current:
            print(f"{name:<8} current {cfg}  {ms * 1e3 / copies:7.1f} us {nbytes / ms / 1e6:6.0f} GB/s", flush=True)
    for ms, cfg in results[:3]:
        print(f"{name:<8} {cfg}  {ms * 1e3 / copies:7.1f} us {nbytes / ms / 1e6:6.0f} GB/s", flush=True)


def cublas(name: str, x: torch.Tensor, ws: list) -> None:
    """The reference line: F.linear (cuBLAS) over the same fp16 weights."""
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    ms = time_graph(lambda: [torch.nn.functional.linear(x, w) for w in ws])
    print(f"{name:<8} cublas                  {ms * 1e3 / len(ws):7.1f} us {nbytes / ms / 1e6:6.0f} GB/s", flush=True)


def tune(name: str, N: int, K: int, rows: int, gated: bool = False) -> None:
    copies = distinct_copies(N * K * 2)
    ws = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
    x = torch.randn(rows, 2 * K if gated else K, device="cuda", dtype=torch.float16)
    nbytes = copies * N * K * 2
    if not gated:
        cublas(name, x, ws)
    configs = [c for c in itertools.product((8, 16), (256, 512, 1024), (4, 8), (2, 3, 4))
               if 1024 <= c[0] * c[1] <= 16384]
    results = [(time_graph(lambda c=c: [G.gemv(x, w, gated=gated, config=c) for w in ws]), c) for c in configs]
    report(name, results, G.default_config(N, K, x.device), copies, nbytes)


def fp8_configs(rows: int) -> list:
    """The sweep of one fp8 kernel: the elementwise one (<= GEMV_ROWS rows) keeps its float32 accumulator tile at
    <= 128 registers per thread, with and without summing 16 adjacent products first (sum_vec); the tl.dot one
    takes 16-row tiles of up to 16K weights."""
    if rows <= F.GEMV_ROWS:
        grid = itertools.product((4, 8, 16), (512, 1024, 2048), (2, 4, 8), (2, 3), (1, 16))
        keep = lambda bn, bk, w, s, v: 2048 <= bn * bk <= 16384 and bn * bk <= 4096 * w
    else:
        grid = itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4))
        keep = lambda bn, bk, w, s: bn * bk <= 16384
    return [F.Fp8GemvConfig(*c) for c in grid if keep(*c)]


def tune_fp8(name: str, N: int, K: int, rows: int, gated: bool = False, int8: bool = False) -> None:
    """The 1-byte-code GEMV (kernels/fp8_gemv.py): e4m3 codes, or int8 weight-only codes (int8_gemv, <= GEMV_ROWS
    rows) with int8=True; the cuBLAS fp16 line first (not gated), each config checked before it is timed."""
    from qwen_trtllm.kernels import silu_mul_reference
    from qwen_trtllm.quantization import dequantize_int8, quantize_int8
    from qwen_trtllm.quantization.fp8 import dequantize_fp8, quantize_fp8_weight

    copies = distinct_copies(N * K)
    ws = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
    x = torch.randn(rows, 2 * K if gated else K, device="cuda", dtype=torch.float16)
    if not gated:
        cublas(name, x, ws)
    qs = [(quantize_int8 if int8 else quantize_fp8_weight)(w) for w in ws]
    del ws
    ref = (silu_mul_reference(x) if gated else x).float() @ (dequantize_int8 if int8 else dequantize_fp8)(*qs[0]).T
    nbytes = copies * sum(t.numel() * t.element_size() for t in qs[0])
    gemv = F.int8_gemv if int8 else F.fp8_gemv
    results = checked_runs(name, fp8_configs(rows), lambda q, cfg: gemv(x, *q, gated=gated, config=cfg), qs, ref)
    report(name, results, F.default_config(N, K, x.device, rows, gated, int8), copies, nbytes)


def checked_runs(name: str, configs: list, run, qs: list, ref: torch.Tensor) -> list:
    """[(ms, config)] of the configs whose run(qs[0], config) compiles, launches and is within MAX_REL_ERR of ref
    (float32 with the dequantised weights), each timed over all of qs; the others printed as skipped."""
    results = []
    for cfg in configs:
        try:  # the first call compiles and launches the config outside the graph
            y = run(qs[0], cfg)
        except Exception as e:  # a config that does not compile or fit is reported and skipped
            print(f"{name:<8} skip {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err < MAX_REL_ERR:
            print(f"{name:<8} skip {cfg}: relative error {err:.1e} against float32 with the dequantised weights",
                  flush=True)
            continue
        results.append((time_graph(lambda cfg=cfg: [run(q, cfg) for q in qs]), cfg))
    return results


def wo_configs(rows: int, precision: str) -> list:
    """Alternative weight-only configs around select_config's choices for `rows` (each one is a separate compile:
    keep the list short)."""
    from qwen_trtllm.kernels.weight_only_gemm import WOConfig

    int4 = precision == "int4"
    out = []
    if rows <= 16:
        bk = 128 if int4 else 256
        grid = itertools.product((64, 128), (2, 4, 8) if int4 else (1, 2, 4), (3, 4), (None, 128, 96))
        out += [WOConfig("mma", 16, bn, bk, split, 4, st, 1, prefetch=256, maxnreg=reg) for bn, split, st, reg in grid]
    elif rows <= 64:
        grid = itertools.product((64, 128), (128,), (1, 2, 4), (3, 5))
        out += [WOConfig("mma", triton.next_power_of_2(rows), bn, bk, split, 4, st, 1) for bn, bk, split, st in grid]
    elif int4:
        for bm, bn, bk, w, st in ((64, 128, 128, 4, 3), (64, 128, 128, 4, 4), (128, 128, 128, 8, 3),
                                  (64, 256, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 64, 8, 3)):
            out.append(WOConfig("mma", bm, bn, bk, 1, w, st, 8))
    else:
        for bm, bn, bk, w, st in ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                                  (64, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 128, 4, 3)):
            out.append(WOConfig("mma", bm, bn, bk, 1, w, st, 8))
    return out


def tune_wo(name: str, N: int, K: int, rows: int, precision: str) -> None:
    from qwen_trtllm.kernels.weight_only_gemm import select_config, weight_only_matmul
    from qwen_trtllm.quantization import dequantize_weight, quantize_weight

    copies = distinct_copies(N * K * 2)  # as tune(): the same weights in fp16 for the cuBLAS line
    ws = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
    x = torch.randn(rows, K, device="cuda", dtype=torch.float16)
    cublas(name, x, ws)
    qs = [quantize_weight(w, precision, GROUP) for w in ws]
    del ws
    ref = x.float() @ dequantize_weight(qs[0]["qweight"], qs[0]["scales"], precision, GROUP).T
    nbytes = copies * sum(t.numel() * t.element_size() for t in qs[0].values())
    current = select_config(rows, N, K, precision, GROUP, x.device)
    configs = [current] + [c for c in wo_configs(rows, precision) if c != current]

    def run(q: dict, cfg) -> torch.Tensor:
        return weight_only_matmul(x, q["qweight"], q["scales"], precision, GROUP, config=cfg)

    report(name, checked_runs(name, configs, run, qs, ref), current, copies, nbytes)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=1,
                    help="rows of x: the decode batch (fp16: 1, fp8: 1-16; int8 / int4: any, prefill tokens too)")
    ap.add_argument("--shapes", default=None, help="default qkv,dense,gate_up,c_proj,lm_head")
    ap.add_argument("--format", choices=("fp16", "fp8", "int8", "int4"), default="fp16",
                    help="fp16 GEMV, fp8 GEMV, int8 at --rows 1: int8_gemv (the fp8 GEMV's kernel); otherwise "
                    "the int8 / int4 (group 128) weight-only matmul")
    ap.add_argument("--gated", action="store_true",
                    help="c_proj with SiLU*mul fused, as the MLP runs it (fp16; fp8 and int8 at --rows 1)")
    ap.add_argument("--prefetch", type=int, default=None,
                    help="L2 prefetch bytes per weight row (sm_90+; fp16, fp8, int8 at --rows 1: the weight-only "
                    "matmul's configs carry their own)")
    ap.add_argument("--tp", type=int, default=1, choices=(1, 2, 4, 8),
                    help="one tensor-parallel rank's shapes: qkv and gate_up rows / tp, dense and c_proj columns / tp "
                    "and lm_head rows / tp (vocab-parallel)")
    args = ap.parse_args()
    tp = args.tp
    shapes = {"qkv": (12288 // tp, 4096), "dense": (4096, 4096 // tp), "gate_up": (22016 // tp, 4096),
              "c_proj": (4096, 11008 // tp), "lm_head": (151936 // tp, 4096)}
    codes = args.format == "int8" and args.rows <= F.GEMV_ROWS  # int8 decode: the elementwise int8_gemv
    fp8 = args.format == "fp8" or codes
    weight_only = args.format == "int4" or (args.format == "int8" and not codes)
    if args.rows < 1:
        ap.error("--rows takes 1 or more")
    if args.format == "fp16" and args.rows > G.MAX_ROWS:
        ap.error(f"--format fp16 takes --rows {G.MAX_ROWS} (above, the engine runs cuBLAS)")
    if fp8 and not 1 <= args.rows <= F.MAX_ROWS:
        ap.error(f"--format fp8 takes --rows 1-{F.MAX_ROWS} (above, the engine runs torch._scaled_mm)")
    if fp8 and args.gated and args.rows > F.GEMV_ROWS:
        ap.error(f"--format fp8 --gated takes --rows {F.GEMV_ROWS} (above, silu_mul runs before the GEMV)")
    if weight_only and (args.gated or args.prefetch is not None):
        ap.error("--gated and --prefetch are for --format fp16 / fp8, and int8 at --rows 1 (the weight-only "
                 "matmul fuses no SiLU*mul; its configs carry their own prefetch)")
    names = (args.shapes if args.shapes is not None else "qkv,dense,gate_up,c_proj,lm_head").split(",")
    unknown = [n for n in names if n not in shapes]
    if unknown:
        ap.error(f"--shapes: unknown {','.join(unknown)}; choose from {','.join(shapes)}")
    require_cuda("gpu_gemv_tune.py")  # after the arguments: their errors show on any machine
    if args.prefetch is not None:
        (F if fp8 else G).PREFETCH_BYTES = args.prefetch
    for name in names:
        N, K = shapes[name]
        if weight_only:
            tune_wo(name, N, K, args.rows, args.format)
        else:
            gated = args.gated and name == "c_proj"
            if fp8:
                tune_fp8(name, N, K, args.rows, gated=gated, int8=codes)
            else:
                tune(name, N, K, args.rows, gated=gated)


if __name__ == "__main__":
    main()
