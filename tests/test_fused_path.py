"""The fused Triton path (prefill and decode) against the plain PyTorch path of the same engine.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET); on CUDA for real.
"""

import pytest
import torch

from qwen_trtllm.builder.build import build_engine
from qwen_trtllm.evaluation.teacher_forced import compare_logits, engine_logits
from qwen_trtllm.kernels import triton_available
from qwen_trtllm.runtime import LLM, Engine, ExecutorConfig, KvCacheConfig, SamplingParams


@pytest.fixture(scope="module")
def engine(make_checkpoint, tmp_path_factory):
    ckpt = make_checkpoint(seq_length=12, seed=3)  # prompts up to 17 tokens: NTK alpha 3 and logn in play
    out = build_engine(tmp_path_factory.mktemp("fused") / "e", hf_dir=ckpt, dtype="float32", max_batch_size=3,
                       max_input_len=24, max_output_len=8)
    return Engine.load(out)


def assert_fused_equals_plain(engine, llm, prompts: list[list[int]], forced: torch.Tensor, max_tokens: int) -> None:
    """The engine's Triton kernels and their PyTorch references (switched on the one engine): the same
    teacher-forced logits to float32 rounding and the same greedy tokens."""
    cfg = SamplingParams(max_tokens=max_tokens, top_k=1, ignore_eos=True)
    results, built = {}, engine.model.ops.triton
    try:
        for triton in (True, False):
            engine.model.set_kernels(triton)
            results[triton] = (engine_logits(llm.executor, prompts, forced),
                               [o.token_ids for o in llm.generate(prompts, cfg)])
    finally:
        engine.model.set_kernels(built)
    (fused, fused_ids), (plain, plain_ids) = results[True], results[False]
    stats = compare_logits(fused, plain)
    assert stats["max_rel_err"] < 1e-5 and stats["top1_agreement"] == 1.0, stats
    assert fused_ids == plain_ids


def test_fused_matches_plain(engine):
    if not triton_available(engine.device):
        pytest.skip("Triton kernels unavailable on this device")
    # a block per sequence: the CPU default pool, max_batch_size x max_seq_len = 96 tokens, is only 2 blocks
    llm = LLM.from_engine(engine, config=ExecutorConfig(kv_cache=KvCacheConfig(max_tokens=3 * 64),
                                                        cuda_graphs=False))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, engine.config.vocab_size, (n,), generator=g).tolist() for n in (17, 4, 9)]
    forced = torch.randint(0, engine.config.vocab_size, (3, 5), generator=g)
    assert_fused_equals_plain(engine, llm, prompts, forced, max_tokens=6)
