"""GPU microbenchmark of the Triton kernels against PyTorch, on Qwen-7B shapes over a paged KV cache.

hidden 4096 = 32 heads x 128, ffn 11008. Decode: batch 1..512, context 128/2048, blocks of --block_size tokens
scattered over the pool in random order (a pool after churn). Prefill: packed chunks after cached context. Each
kernel is checked against its reference at the shape (attention: on the first sequences), then timed with
triton.testing.do_bench (median, L2 flushed between calls) against the PyTorch path (rms_norm, silu_mul,
rotary) or SDPA over contiguous copies of the same keys (attention: what a static cache would cost). GB/s counts
the bytes the operation must move (for decode attention: q, the valid keys and values, out), the same for both
columns; for prefill the last column is the triton kernel's TFLOP/s (causal: only the unmasked products).
On the GPU machine, from the repository root (the package is found through PYTHONPATH, not installed):

    PYTHONPATH=$PWD python3 scripts/gpu_kernel_bench.py [--dtype bf16] [--block_size 64] [--quick]
    PYTHONPATH=$PWD python3 scripts/gpu_kernel_bench.py --quick --batches 64,256,512 --contexts 192,1024,2048
                                                      # decode attention at serving shapes
"""

import math

import torch
import torch.nn.functional as F
import triton

from qwen_trtllm.cli import parser, require_cuda
from qwen_trtllm.kernels import (
    default_num_splits,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    rms_norm,
    rms_norm_reference,
    rotary_kv_write,
    rotary_kv_write_reference,
    silu_mul,
    silu_mul_reference,
)

H, HEADS, D, FFN = 4096, 32, 128, 11008
BATCHES, CONTEXTS, DEVICE = (1, 8, 64, 256, 512), (128, 2048), "cuda"
PREFILLS = ((1, 2048, 0), (4, 512, 1024), (16, 128, 512))  # (sequences, chunk tokens each, cached before)
CHECK_SEQS = 8  # attention is checked against its reference on this many sequences (the reference gathers all)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3  # microseconds


def row(name: str, shape: str, nbytes: int, t_tri: float, t_ref: float, err: float, tol: float,
        extra: str = "") -> None:
    flag = "" if err < tol else "  <-- MISMATCH"
    print(f"{name:<16} {shape:<28} {t_tri:9.1f} {t_ref:9.1f} {t_ref / t_tri:7.2f}x {nbytes / t_tri / 1e3:8.0f} "
          f"{nbytes / t_ref / 1e3:8.0f} {err:9.1e}{extra}{flag}", flush=True)


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


def gather(cache: torch.Tensor, tables: torch.Tensor, n: int) -> torch.Tensor:
    """The first n keys of each sequence, contiguous: [B, HEADS, n, D]."""
    bs = cache.shape[2]
    g = cache[tables[:, :triton.cdiv(n, bs)].long()]  # [B, blocks, HEADS, bs, D]
    return g.transpose(1, 2).flatten(2, 3)[:, :, :n]


def bench_context(B: int, ctx: int, kc: torch.Tensor, vc: torch.Tensor, tables: torch.Tensor, tol: float) -> None:
    """rotary_kv_write at position ctx - 1 (logn on), then paged_decode_attention over ctx keys per sequence."""
    dev, dt, es, bs = DEVICE, kc.dtype, 2, kc.shape[2]
    tables = tables[:B]
    qkv = torch.randn(B, 3 * H, device=dev, dtype=dt)
    inv_freq = (1.0 / 10000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D)).repeat(B, 1)
    pos = torch.full((B,), ctx - 1, device=dev, dtype=torch.long)
    slots = tables[:, (ctx - 1) // bs].long() * bs + (ctx - 1) % bs
    q = rotary_kv_write(qkv, inv_freq, pos, slots, kc, vc, HEADS, D, D, 2048)
    rows, off = torch.arange(B, device=dev), slots % bs
    k_ref = torch.zeros(B, HEADS, bs, D, device=dev)  # the reference writes sequence b's token into block b
    q_ref = rotary_kv_write_reference(qkv.float(), inv_freq, pos, rows * bs + off, k_ref, torch.zeros_like(k_ref),
                                      HEADS, D, D, 2048)
    err = max(rel_err(q, q_ref), rel_err(kc[slots // bs, :, off], k_ref[rows, :, off]))
    row("rotary_kv_write", f"B={B} pos={ctx - 1}", 6 * B * H * es,
        bench(lambda: rotary_kv_write(qkv, inv_freq, pos, slots, kc, vc, HEADS, D, D, 2048)),
        bench(lambda: rotary_kv_write_reference(qkv, inv_freq, pos, slots, kc, vc, HEADS, D, D, 2048)), err, tol)

    lens = torch.full((B,), ctx, device=dev, dtype=torch.int32)
    scale = 1 / math.sqrt(D)
    splits = default_num_splits(B, HEADS, tables.shape[1] * bs, dev, bs)
    c = min(B, CHECK_SEQS)
    err = rel_err(paged_decode_attention(q, kc, vc, tables, lens, scale)[:c],
                  paged_decode_attention_reference(q[:c], kc, vc, tables[:c, :triton.cdiv(ctx, bs)], lens[:c], scale))
    k_valid, v_valid, q4 = gather(kc, tables, ctx), gather(vc, tables, ctx), q[:, :, None]
    row("paged_decode", f"B={B} ctx={ctx} bs={bs} s={splits}", (2 * B * HEADS * ctx * D + 2 * B * H) * es,
        bench(lambda: paged_decode_attention(q, kc, vc, tables, lens, scale)),  # vs SDPA over contiguous copies
        bench(lambda: F.scaled_dot_product_attention(q4, k_valid, v_valid)), err, tol)


def bench_prefill(P: int, qlen: int, ctx: int, kc: torch.Tensor, vc: torch.Tensor, tables: torch.Tensor,
                  tol: float) -> None:
    """paged_prefill_attention of P chunks of qlen tokens after ctx cached ones (keys already written)."""
    dev, dt, bs = DEVICE, kc.dtype, kc.shape[2]
    tables = tables[:P]
    q = torch.randn(P * qlen, HEADS, D, device=dev, dtype=dt)
    qsl = torch.arange(0, P * qlen + 1, qlen, device=dev, dtype=torch.int32)
    ctx_lens = torch.full((P,), ctx, device=dev, dtype=torch.int32)
    scale = 1 / math.sqrt(D)
    c = min(P, 2)
    out = paged_prefill_attention(q, kc, vc, tables, qsl, ctx_lens, scale, qlen)
    err = rel_err(out[:c * qlen], paged_prefill_attention_reference(q[:c * qlen], kc, vc, tables[:c], qsl[:c + 1],
                                                                    ctx_lens[:c], scale))
    n = ctx + qlen
    k, v = gather(kc, tables, n), gather(vc, tables, n)  # [P, HEADS, n, D]
    q4 = q.view(P, qlen, HEADS, D).transpose(1, 2)
    if ctx == 0:
        ref = lambda: F.scaled_dot_product_attention(q4, k, v, is_causal=True)
    else:
        mask = torch.arange(n, device=dev)[None, :] <= ctx + torch.arange(qlen, device=dev)[:, None]
        ref = lambda: F.scaled_dot_product_attention(q4, k, v, attn_mask=mask)
    flops = 4 * P * HEADS * D * sum(ctx + i + 1 for i in range(qlen))
    nbytes = (2 * P * qlen * H + 2 * P * HEADS * n * D) * 2
    t_tri = bench(lambda: paged_prefill_attention(q, kc, vc, tables, qsl, ctx_lens, scale, qlen))
    row("paged_prefill", f"P={P} q={qlen} ctx={ctx} bs={bs}", nbytes, t_tri, bench(ref), err, tol,
        f" {flops / t_tri / 1e6:6.0f} TFLOP/s")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--block_size", type=int, default=64, choices=[16, 32, 64, 128])
    ap.add_argument("--quick", action="store_true", help="attention only, fewer shapes")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="decode batch sizes (comma-separated)")
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="decode context lengths")
    args = ap.parse_args()
    require_cuda("gpu_kernel_bench.py")
    batches, contexts = (tuple(int(v) for v in a.split(",")) for a in (args.batches, args.contexts))
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    bs = args.block_size
    tol = 2e-3 if dt == torch.float16 else 1e-2
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    print(f"{name}  {dt}  block_size {bs}  (times in us; GB/s of required traffic)")
    print(f"{'kernel':<16} {'shape':<28} {'triton':>9} {'torch':>9} {'speedup':>8} {'GB/s tri':>8} {'GB/s ref':>8} "
          f"{'rel err':>9}")
    max_ctx = max(max(contexts), max(q + c for _, q, c in PREFILLS))
    max_blocks = triton.cdiv(max_ctx, bs)
    max_seqs = max(max(batches), max(p for p, _, _ in PREFILLS))
    num_blocks = max_seqs * max_blocks + 1
    tables = (torch.randperm(num_blocks - 1, device=DEVICE)[:max_seqs * max_blocks] + 1).view(max_seqs, max_blocks)
    tables = tables.to(torch.int32)
    kc = torch.randn(num_blocks, HEADS, bs, D, device=DEVICE, dtype=dt)
    vc = torch.randn_like(kc)
    for B in batches:
        if not args.quick:
            bench_batch(B, dt, tol)
        for ctx in contexts:
            bench_context(B, ctx, kc, vc, tables, tol)
    for P, qlen, ctx in PREFILLS:
        bench_prefill(P, qlen, ctx, kc, vc, tables, tol)


if __name__ == "__main__":
    main()
