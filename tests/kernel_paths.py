"""Test helper: an engine's teacher-forced logits through its Triton kernels and through its PyTorch path."""

from __future__ import annotations

import torch

from qwen_trtllm.evaluation.teacher_forced import compare_logits, engine_logits


def assert_triton_path_matches_plain(engine, llm, prompts: list[list[int]], forced: torch.Tensor) -> None:
    """engine_logits with set_kernels(True), then (False), on the same executor; the kernels the engine was built
    with are restored. Asserts float32-rounding agreement: max relative error < 1e-5, every top-1 equal."""
    logits, built = {}, engine.model.ops.triton
    try:
        for triton in (True, False):
            engine.model.set_kernels(triton)
            logits[triton] = engine_logits(llm.executor, prompts, forced)
    finally:
        engine.model.set_kernels(built)
    stats = compare_logits(logits[True], logits[False])
    assert stats["max_rel_err"] < 1e-5 and stats["top1_agreement"] == 1.0, stats
