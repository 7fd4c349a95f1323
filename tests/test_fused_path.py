"""The fused Triton path (prefill and decode) against the plain PyTorch path of the same engine.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET); on CUDA for real.
"""

import pytest
import torch

from qwen_trtllm.builder.build import build_engine
from qwen_trtllm.evaluation.teacher_forced import compare_logits, engine_logits
from qwen_trtllm.kernels import triton_available
from qwen_trtllm.runtime import Engine, GenerationSession, SamplingConfig


@pytest.fixture(scope="module")
def engine(make_checkpoint, tmp_path_factory):
    ckpt = make_checkpoint(seq_length=12, seed=3)  # prompts up to 17 tokens: NTK alpha 3 and logn in play
    out = build_engine(tmp_path_factory.mktemp("fused") / "e", hf_dir=ckpt, dtype="float32", max_batch_size=3,
                       max_input_len=24, max_output_len=8)
    return Engine.load(out)


def test_fused_matches_plain(engine):
    if not triton_available(engine.device):
        pytest.skip("Triton kernels unavailable on this device")
    plain = GenerationSession(engine, use_triton=False, cuda_graphs=False)
    fused = GenerationSession(engine, use_triton=True, cuda_graphs=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, engine.config.vocab_size, (n,), generator=g).tolist() for n in (17, 4, 9)]
    forced = torch.randint(0, engine.config.vocab_size, (3, 5), generator=g)
    stats = compare_logits(engine_logits(fused, prompts, forced), engine_logits(plain, prompts, forced))
    assert stats["max_rel_err"] < 1e-5 and stats["top1_agreement"] == 1.0, stats
    cfg = SamplingConfig(top_k=1)
    assert fused.generate(prompts, 6, cfg, stop_ids=[-1]).output_ids == \
        plain.generate(prompts, 6, cfg, stop_ids=[-1]).output_ids
