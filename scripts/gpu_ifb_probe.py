"""GPU probe: paged decode attention bandwidth at serving shapes, and transformers' generate_batch on a few
requests (its API and error, if any)."""

import traceback

import torch
from triton.testing import do_bench

from qwen_trtllm.kernels import paged_decode_attention

H, D, bs = 32, 128, 64


def probe(B: int, ctx: int) -> None:
    nb = -(-ctx // bs)
    kc = torch.randn(B * nb + 1, H, bs, D, device="cuda", dtype=torch.float16)
    vc = torch.randn_like(kc)
    bt = (torch.randperm(B * nb, device="cuda") + 1).view(B, nb).int()
    q = torch.randn(B, H, D, device="cuda", dtype=torch.float16)
    lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
    ms = do_bench(lambda: paged_decode_attention(q, kc, vc, bt, lens, 0.088), return_mode="median")
    gb = 2 * B * ctx * H * D * 2 / 1e9
    print(f"paged decode attention B={B} ctx={ctx}: {ms * 1e3:.1f} us/layer, {gb / ms * 1e3:.0f} GB/s", flush=True)


for B, ctx in ((512, 192), (256, 192), (64, 1024), (64, 2048), (1, 256)):
    probe(B, ctx)

from qwen_trtllm.evaluation import benchmark as bm  # noqa: E402
from qwen_trtllm.evaluation import serving as sv  # noqa: E402

eng = bm.random_engine("qwen-7b", "float16", "cuda", max_batch_size=64)
hf = bm.hf_model_sharing_weights(eng)
work = sv.make_workload("128,32", 64, eng.config.vocab_size)
try:
    print(sv.format_results([sv.run_hf_continuous_batching(hf, work)]))
except Exception:
    traceback.print_exc()
