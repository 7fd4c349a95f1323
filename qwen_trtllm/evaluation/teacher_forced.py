"""Teacher-forced comparison of the engine with the Hugging Face reference.

Free-running sequences diverge after the first near-tie, so accuracy is measured with the same tokens fed to
both: the engine runs its real prefill and decode path (KV cache, kernels, CUDA graphs) on prompt + forced
tokens, the reference runs one full forward over the same ids; the logits at every generated position are
compared (top-1 agreement and relative error).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qwen_trtllm import QWenError
from qwen_trtllm.models.qwen.model import sequence_ntk_alpha
from qwen_trtllm.runtime.executor import Executor
from qwen_trtllm.runtime.model_runner import StepPlan


@torch.inference_mode()
def engine_logits(executor: Executor, prompts: Sequence[Sequence[int]], forced: Tensor) -> Tensor:
    """Logits [B, S, V] (float32, on the engine's device): position 0 after the prompt, then after each of the
    first S-1 forced tokens [B, S]. One batched prefill step, then S-1 decode steps (CUDA graphs on CUDA),
    through the executor's KV cache blocks (returned to the pool at the end)."""
    kv, runner, cfg = executor.kv_cache, executor.runner, executor.engine.config
    lens, S = [len(p) for p in prompts], forced.shape[1]
    alphas = [sequence_ntk_alpha(cfg, n) for n in lens]
    tables: list[list[int]] = [[] for _ in prompts]
    try:
        for t, n in zip(tables, lens, strict=True):
            if not kv.can_grow(t, n + S):
                raise QWenError(f"{len(prompts)} prompts of up to {max(lens) + S} tokens exceed the KV cache: "
                                "use a smaller batch")
            kv.grow(t, n + S)
        plan = StepPlan.prefill(prompts, tables, alphas)
        out = [runner.logits(plan).clone()]
        for s in range(S - 1):
            plan = StepPlan(forced[:, s].tolist(), [n + s for n in lens], [1] * len(lens), [n + s for n in lens],
                            tables, alphas, [0] * len(lens), num_decode=len(lens))
            out.append(runner.logits(plan).clone())
    finally:
        for t in tables:
            kv.free(t)
    return torch.stack(out, dim=1)


@torch.inference_mode()
def reference_logits(model, prompts: Sequence[Sequence[int]], forced: Tensor, device=None) -> Tensor:
    """The same logits from a Hugging Face causal LM (one sequence at a time, no padding)."""
    device = device or next(model.parameters()).device
    S = forced.shape[1]
    rows = []
    for b, p in enumerate(prompts):
        ids = torch.cat([torch.tensor(p), forced[b, : S - 1].cpu()])[None].to(device)
        rows.append(model(ids).logits[0, len(p) - 1:].float())
    return torch.stack(rows)


def compare_logits(test: Tensor, ref: Tensor) -> dict[str, float]:
    """Top-1 agreement and relative error ||test - ref|| / ||ref|| (overall and worst position)."""
    test, ref = test.float().to(ref.device), ref.float()
    per_pos = (test - ref).norm(dim=-1) / ref.norm(dim=-1)
    return {"top1_agreement": (test.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "rel_err": ((test - ref).norm() / ref.norm()).item(), "max_rel_err": per_pos.max().item(),
            "positions": int(per_pos.numel())}


def random_prompts(vocab: int, n: int, prompt_len: int, steps: int, seed: int = 0) -> tuple[list[list[int]], Tensor]:
    """n random prompts of prompt_len ids and [n, steps] random forced ids (seeded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, prompt_len + steps), generator=g)
    return ids[:, :prompt_len].tolist(), ids[:, prompt_len:]


def batched(fn, prompts: list[list[int]], forced: Tensor, batch_size: int) -> Tensor:
    """fn(prompts, forced) over batches of batch_size rows, logits moved to the CPU and concatenated."""
    return torch.cat([fn(prompts[i:i + batch_size], forced[i:i + batch_size]).float().cpu()
                      for i in range(0, len(prompts), batch_size)])
