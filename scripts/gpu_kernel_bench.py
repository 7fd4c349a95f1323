"""GPU microbenchmark of the decode-step Triton kernels against their PyTorch references, on Qwen-7B shapes.

hidden 4096 = 32 heads x 128, ffn 11008, batch 1/8/64, context 128/2048 in a 4096-slot KV cache. Each kernel is
checked against its reference at the shape, then both are timed with triton.testing.do_bench (median, L2 flushed
between calls). GB/s counts the bytes the operation must move (for attention: q, the valid keys and values, out),
the same for both columns. Run on the GPU machine: python3 scripts/gpu_kernel_bench.py [--dtype bf16]
"""

import argparse
import math

import torch
import torch.nn.functional as F
import triton

from qwen_trtllm.kernels import (
    decode_attention,
    decode_attention_reference,
    default_num_splits,
    rms_norm,
    rms_norm_reference,
    rotary_kv_write,
    rotary_kv_write_reference,
    silu_mul,
    silu_mul_reference,
)

H, HEADS, D, FFN, MAX_SEQ = 4096, 32, 128, 11008, 4096
BATCHES, CONTEXTS, DEVICE = (1, 8, 64), (128, 2048), "cuda"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3  # microseconds


def row(name: str, shape: str, nbytes: int, t_tri: float, t_ref: float, err: float, tol: float) -> None:
    flag = "" if err < tol else "  <-- MISMATCH"
    print(f"{name:<16} {shape:<22} {t_tri:9.1f} {t_ref:9.1f} {t_ref / t_tri:7.2f}x {nbytes / t_tri / 1e3:8.0f} "
          f"{nbytes / t_ref / 1e3:8.0f} {err:9.1e}{flag}", flush=True)


def bench_batch(B: int, dt: torch.dtype, tol: float) -> None:
    """rms_norm with a residual and silu_mul on B rows."""
    dev, es = DEVICE, 2
    x, res = torch.randn(B, H, device=dev, dtype=dt), torch.randn(B, H, device=dev, dtype=dt)
    w = (1 + 0.1 * torch.randn(H, device=dev)).to(dt)
    err = rel_err(rms_norm(x, w, 1e-6, res)[0], rms_norm_reference(x.float(), w.float(), 1e-6, res.float())[0])
    row("rms_norm+res", f"B={B}", (4 * B * H + H) * es, bench(lambda: rms_norm(x, w, 1e-6, res)),
        bench(lambda: rms_norm_reference(x, w, 1e-6, res)), err, tol)
    gu = torch.randn(B, 2 * FFN, device=dev, dtype=dt)
    err = rel_err(silu_mul(gu), silu_mul_reference(gu.float()))
    row("silu_mul", f"B={B}", 3 * B * FFN * es, bench(lambda: silu_mul(gu)), bench(lambda: silu_mul_reference(gu)),
        err, tol)


def bench_context(B: int, ctx: int, kc: torch.Tensor, vc: torch.Tensor, tol: float) -> None:
    """rotary_kv_write at position ctx - 1 (logn on), then decode_attention over ctx keys per sequence."""
    dev, dt, es = DEVICE, kc.dtype, 2
    qkv = torch.randn(B, 3 * H, device=dev, dtype=dt)
    inv_freq = (1.0 / 10000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D)).repeat(B, 1)
    pos = torch.full((B,), ctx - 1, device=dev, dtype=torch.long)
    q = rotary_kv_write(qkv, inv_freq, pos, kc, vc, HEADS, D, D, 2048)
    k_ref, v_ref = kc[:B, :, :ctx].float(), vc[:B, :, :ctx].float()
    q_ref = rotary_kv_write_reference(qkv.float(), inv_freq, pos, k_ref, v_ref, HEADS, D, D, 2048)
    rows = torch.arange(B, device=dev)
    err = max(rel_err(q, q_ref), rel_err(kc[rows, :, pos], k_ref[rows, :, pos]))
    del k_ref, v_ref
    row("rotary_kv_write", f"B={B} pos={ctx - 1}", 6 * B * H * es,
        bench(lambda: rotary_kv_write(qkv, inv_freq, pos, kc, vc, HEADS, D, D, 2048)),
        bench(lambda: rotary_kv_write_reference(qkv, inv_freq, pos, kc, vc, HEADS, D, D, 2048)), err, tol)

    lens = torch.full((B,), ctx, device=dev, dtype=torch.int32)
    scale = 1 / math.sqrt(D)
    splits = default_num_splits(B, HEADS, MAX_SEQ, dev)
    err = rel_err(decode_attention(q, kc, vc, lens, scale),
                  decode_attention_reference(q, kc[:B, :, :ctx], vc[:B, :, :ctx], lens, scale))
    k_valid, v_valid, q4 = kc[:B, :, :ctx], vc[:B, :, :ctx], q[:, :, None]
    mask = (torch.arange(ctx, device=dev)[None, :] < lens[:, None])[:, None, None, :]
    row("decode_attention", f"B={B} ctx={ctx} s={splits}", (2 * B * HEADS * ctx * D + 2 * B * H) * es,
        bench(lambda: decode_attention(q, kc, vc, lens, scale)),  # vs the PyTorch decode path: SDPA over ctx slots
        bench(lambda: F.scaled_dot_product_attention(q4, k_valid, v_valid, attn_mask=mask)), err, tol)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[ap.parse_args().dtype]
    tol = 2e-3 if dt == torch.float16 else 1e-2
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(f"{name}  {dt}  (times in us; GB/s of required traffic)")
    print(f"{'kernel':<16} {'shape':<22} {'triton':>9} {'torch':>9} {'speedup':>8} {'GB/s tri':>8} {'GB/s ref':>8} "
          f"{'rel err':>9}")
    kc = torch.randn(max(BATCHES), HEADS, MAX_SEQ, D, device=DEVICE, dtype=dt)
    vc = torch.randn_like(kc)
    for B in BATCHES:
        bench_batch(B, dt, tol)
        for ctx in CONTEXTS:
            bench_context(B, ctx, kc, vc, tol)


if __name__ == "__main__":
    main()
