"""GPU benchmark of the weight-only quantised matmuls on Qwen-7B's linear shapes: fp16 F.linear (cuBLAS) vs the
int8 and int4 (group 128) Triton kernels, M = 1, 16, 64 (decode batches) and 1024 (prefill).

Each variant is checked against an fp32 matmul with the dequantised weights, then timed as a CUDA graph of
back-to-back calls (as the decode engine runs them) that rotates over enough weight copies (> 4x the L2) for every
call to stream its weights from HBM; triton.testing.do_bench takes the median replay. GB/s counts the weight bytes
(qweight + scales; fp16 weights for F.linear) per call. Runs in well under 2 minutes on an H100. On the GPU
machine, from the repository root (the package is found through PYTHONPATH, not installed):

    PYTHONPATH=$PWD python3 scripts/gpu_quant_bench.py                # the table
    PYTHONPATH=$PWD python3 scripts/gpu_quant_bench.py --sweep        # also time alternative kernel configs
                                                                      # (tuning; minutes)
    PYTHONPATH=$PWD python3 scripts/gpu_quant_bench.py --layers 32 --ms   # 32 decoder layers' four matmuls
                          # chained in one graph, M=1: launch variants (PDL, L2 prefetch) and a race check
    ncu --kernel-name regex:_wo_mma_kernel --launch-count 1 --section SpeedOfLight \
        python3 scripts/gpu_quant_bench.py --ms 1 --shapes qkv --impls int4   # one kernel under Nsight Compute

Its config sweep and layer chain are tuning: they belong in scripts/gpu_gemv_tune.py (the tuner), where they
are to move; this script goes then.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen_trtllm.cli import require_cuda

SHAPES = {"qkv": (4096, 12288), "dense": (4096, 4096), "gate_up": (4096, 22016), "c_proj": (11008, 4096)}  # K, N
MS = (1, 16, 64, 1024)
GROUP = 128
L2_BYTES = 50 << 20


def graph_time_us(calls: list, reps: int) -> float:
    """Median time of one call, timed as a CUDA graph of `reps` calls cycling over `calls` (already warmed up)."""
    import triton

    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            for i in range(reps):
                calls[i % len(calls)]()
    torch.cuda.current_stream().wait_stream(stream)
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=40, return_mode="median")
    return ms * 1e3 / reps


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


class Case:
    """One weight shape: fp16 weights and their int8 / int4 quantisations, in enough copies to defeat the L2."""

    def __init__(self, K: int, N: int, gen: torch.Generator):
        from qwen_trtllm.quantization import quantize_weight

        w = (torch.randn(N, K, device="cuda", generator=gen) * K**-0.5).half()
        self.K, self.N = K, N
        self.q = {p: quantize_weight(w, p, GROUP) for p in ("int8", "int4")}
        self.nbytes = {"fp16": w.numel() * 2}
        for p, d in self.q.items():
            self.nbytes[p] = sum(t.numel() * t.element_size() for t in d.values())
        copies = {k: max(2, min(48, 4 * L2_BYTES // b + 1)) for k, b in self.nbytes.items()}
        self.w16 = [w] + [w.clone() for _ in range(copies["fp16"] - 1)]
        self.qs = {p: [d] + [{k: t.clone() for k, t in d.items()} for _ in range(copies[p] - 1)]
                   for p, d in self.q.items()}
        self.deq = {p: self._dequant(p) for p in self.q}

    def _dequant(self, p: str) -> torch.Tensor:
        from qwen_trtllm.quantization import dequantize_weight

        return dequantize_weight(self.q[p]["qweight"], self.q[p]["scales"], p, GROUP)

    def calls(self, impl: str, x: torch.Tensor, config=None) -> list:
        from qwen_trtllm.kernels.weight_only_gemm import weight_only_matmul

        if impl == "fp16":
            return [lambda w=w: F.linear(x, w) for w in self.w16]
        return [lambda d=d: weight_only_matmul(x, d["qweight"], d["scales"], impl, GROUP, config=config)
                for d in self.qs[impl]]

    def check(self, impl: str, x: torch.Tensor, config=None) -> float:
        y = self.calls(impl, x, config)[0]()
        ref = x.float() @ (self.w16[0].float() if impl == "fp16" else self.deq[impl]).T
        return rel_err(y, ref)

    def time(self, impl: str, x: torch.Tensor, config=None) -> float:
        calls = self.calls(impl, x, config)
        for c in calls[:2]:
            c()
        reps = len(calls) if x.shape[0] <= 64 else 4
        return graph_time_us(calls, max(reps, 8))


def sweep_configs(M: int, precision: str) -> list:
    """Alternative configs around select_config's choices (each one is a separate compile: keep the list short)."""
    from qwen_trtllm.kernels.weight_only_gemm import WOConfig

    int4 = precision == "int4"
    out = []
    if M <= 4 and not int4:
        for bn, bk, w in ((8, 512, 8), (16, 512, 8)):
            out.append(WOConfig("gemv", triton_next_pow2(M), bn, bk, 1, w, 3))
    if M <= 16:
        bk = 128 if int4 else 256
        grid = itertools.product((64, 128), (2, 4, 8) if int4 else (1, 2, 4), (3, 4), (None, 128, 96))
        out += [WOConfig("mma", 16, bn, bk, split, 4, st, 1, prefetch=256, maxnreg=reg) for bn, split, st, reg in grid]
    elif M <= 64:
        grid = itertools.product((64, 128), (128,), (1, 2, 4), (3, 5))
        out += [WOConfig("mma", 64, bn, bk, split, 4, st, 1) for bn, bk, split, st in grid]
    elif int4:
        for bm, bn, bk, w, st in ((64, 128, 128, 4, 3), (64, 128, 128, 4, 4), (128, 128, 128, 8, 3),
                                  (64, 256, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 64, 8, 3)):
            out.append(WOConfig("mma", bm, bn, bk, 1, w, st, 8))
    else:
        for bm, bn, bk, w, st in ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                                  (64, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 128, 4, 3)):
            out.append(WOConfig("mma", bm, bn, bk, 1, w, st, 8))
    return out


LAYER = ("qkv", "dense", "gate_up", "c_proj")
VARIANTS = {"no PDL, no prefetch": dict(pdl=False, prefetch=0), "PDL, no prefetch": dict(prefetch=0),
            "PDL + prefetch 256 B/row (default)": dict(), "PDL + prefetch 1 KiB/row": dict(prefetch=1024),
            "PDL + prefetch whole slice": dict(prefetch=1 << 20)}


def layer_chain(precision: str, layers: int, gen: torch.Generator) -> list[dict]:
    """Decode-step matmuls of `layers` decoder layers (qkv -> dense -> gate_up -> c_proj, each output sliced
    into the next input) chained in one CUDA graph, M = 1, for each launch variant: us per layer, and whether the
    output is bit-identical to the first variant's on every replay (a race check)."""
    from dataclasses import replace

    from qwen_trtllm.kernels.weight_only_gemm import select_config, weight_only_matmul
    from qwen_trtllm.quantization import quantize_weight

    weights = []
    for _ in range(layers):
        layer = []
        for name in LAYER:
            K, N = SHAPES[name]
            w = (torch.randn(N, K, device="cuda", generator=gen) * K**-0.5).half()
            layer.append(quantize_weight(w, precision, GROUP))
        weights.append(layer)
    nbytes = sum(t.numel() * t.element_size() for d in weights[0] for t in d.values())
    x = torch.randn(1, SHAPES["qkv"][0], device="cuda", generator=gen).half()

    def chain(variant: dict) -> torch.Tensor:
        h = x
        for layer in weights:
            for name, d in zip(LAYER, layer, strict=True):
                K, N = SHAPES[name]
                cfg = replace(select_config(1, N, K, precision, GROUP, x.device), **variant)
                h = weight_only_matmul(h[:, :K], d["qweight"], d["scales"], precision, GROUP, config=cfg)
        return h

    rows, ref = [], None
    for label, variant in VARIANTS.items():
        chain(variant)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(variant)
        same = True
        for _ in range(5):
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            ref = out.clone() if ref is None else ref
            same &= bool(torch.equal(out, ref)) and bool(out.isfinite().all())
        import triton

        us = triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median") * 1e3 / layers
        rows.append(dict(precision=precision, variant=label, us_per_layer=us, gbps=nbytes / us / 1e3,
                         bit_identical=same))
        print(f"{precision} {label:<34} {us:7.1f} us/layer {nbytes / us / 1e3:6.0f} GB/s identical={same}",
              flush=True)
        del graph
    return rows


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def copy_gbps() -> float:
    """Device-to-device copy bandwidth (bytes read + written), the ceiling for streaming the weights."""
    import triton

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=5, rep=50, return_mode="median")
    return 2 * a.numel() / ms / 1e6


def describe(cfg) -> str:
    return "" if cfg is None else f"{cfg.kernel} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} split {cfg.split_k}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also time alternative kernel configs")
    ap.add_argument("--ms", type=int, nargs="*", default=list(MS), help="rows of x (default: 1 16 64 1024)")
    ap.add_argument("--impls", nargs="*", default=["fp16", "int8", "int4"])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--json", type=Path, help="write all results (and sweep results) to this file")
    ap.add_argument("--layers", type=int, default=0, help="also time this many decoder layers' matmuls chained")
    args = ap.parse_args()
    require_cuda("gpu_quant_bench.py")
    if args.layers:
        gen = torch.Generator(device="cuda").manual_seed(0)
        chains = [r for p in args.impls if p != "fp16" for r in layer_chain(p, args.layers, gen)]
        print(f"\n{'precision':<9} {'variant':<34} {'us/layer':>9} {'GB/s':>6}  identical")
        for r in chains:
            print(f"{r['precision']:<9} {r['variant']:<34} {r['us_per_layer']:9.1f} {r['gbps']:6.0f}  "
                  f"{r['bit_identical']}")
        if not all(r["bit_identical"] for r in chains):
            sys.exit("a launch variant changed the chained result: a race")
        if not args.ms:
            return
    from qwen_trtllm.kernels.weight_only_gemm import select_config

    gen = torch.Generator(device="cuda").manual_seed(0)
    peak = copy_gbps()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {peak:.0f} GB/s",
          flush=True)
    rows, sweep = [], []
    for name in args.shapes:
        K, N = SHAPES[name]
        case = Case(K, N, gen)
        for M in args.ms:
            x = torch.randn(M, K, device="cuda", generator=gen).half()
            base = None
            for impl in args.impls:
                err = case.check(impl, x)
                us = case.time(impl, x)
                base = us if impl == "fp16" else base
                cfg = select_config(M, N, K, impl, GROUP, x.device) if impl != "fp16" else None
                gbps = case.nbytes[impl] / us / 1e3
                rows.append(dict(shape=name, K=K, N=N, M=M, impl=impl, us=us, gbps=gbps, peak_pct=100 * gbps / peak,
                                 tflops=2 * M * N * K / us / 1e6, speedup=base / us if base else float("nan"),
                                 err=err, config=describe(cfg)))
                print(f"{name:<8} M={M:<5} {impl:<5} {us:9.1f} us {gbps:7.0f} GB/s err {err:.1e} {describe(cfg)}",
                      flush=True)
                if args.sweep and impl != "fp16":
                    sweep += sweep_one(case, impl, x, us)
        del case
        torch.cuda.empty_cache()
    print(f"\nweight bytes per call over the median time of one call (CUDA graph of back-to-back calls, L2 defeated);"
          f" % of the {peak:.0f} GB/s copy bandwidth")
    print(f"{'shape':<8} {'K':>6} {'N':>6} {'M':>5} {'impl':<5} {'us':>8} {'GB/s':>6} {'%copy':>6} {'TFLOP/s':>8} "
          f"{'vs fp16':>8} {'rel err':>8}  config")
    for r in rows:
        print(f"{r['shape']:<8} {r['K']:>6} {r['N']:>6} {r['M']:>5} {r['impl']:<5} {r['us']:8.1f} {r['gbps']:6.0f} "
              f"{r['peak_pct']:5.0f}% {r['tflops']:8.1f} {r['speedup']:7.2f}x {r['err']:8.1e}  {r['config']}")
    if args.json:
        args.json.write_text(json.dumps({"copy_gbps": peak, "rows": rows, "sweep": sweep}, indent=1))
    bad = [r for r in rows if not r["err"] < 3e-3]  # fp16 output rounding alone is ~2e-4
    if bad:
        sys.exit(f"{len(bad)} results over the error tolerance 3e-3: {bad}")


def sweep_one(case: Case, impl: str, x: torch.Tensor, default_us: float) -> list:
    results = []
    for cfg in sweep_configs(x.shape[0], impl):
        try:
            err = case.check(impl, x, cfg)
            us = case.time(impl, x, cfg)
        except Exception as e:  # a config that does not compile or fit is reported and skipped
            print(f"   skip {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        results.append(dict(K=case.K, N=case.N, M=x.shape[0], impl=impl, us=us, err=err, config=cfg.__dict__))
    results.sort(key=lambda r: r["us"])
    for r in results[:3]:
        print(f"   best {r['us']:8.1f} us (default {default_us:.1f}) err {r['err']:.1e} {r['config']}", flush=True)
    return results


if __name__ == "__main__":
    main()
