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

from qwen_trtllm.runtime.generation import GenerationSession


@torch.inference_mode()
def engine_logits(session: GenerationSession, prompts: Sequence[Sequence[int]], forced: Tensor) -> Tensor:
    """Logits [B, S, V] (float32, on the engine's device): position 0 after the prompt, then after each of the
    first S-1 forced tokens [B, S]."""
    lens = [len(p) for p in prompts]
    tokens, lengths, inv_freq = session.prepare(prompts)
    forced = forced.to(session.engine.device)
    out = [session.prefill(tokens, lengths, inv_freq).clone()]
    for s in range(forced.shape[1] - 1):
        out.append(session.decode(forced[:, s], lengths + s, inv_freq, attn_len=max(lens) + s + 1).clone())
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
