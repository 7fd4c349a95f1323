"""Qwen's GPTQ int4 checkpoint layout (qweight/qzeros/scales/g_idx) loaded into the int4 engine."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_trtllm import QWenError
from qwen_trtllm.builder.build import build_engine
from qwen_trtllm.checkpoint.gptq import unpack_gptq, write_gptq_checkpoint
from qwen_trtllm.checkpoint.hf_checkpoint import HFCheckpoint
from qwen_trtllm.evaluation.teacher_forced import compare_logits, engine_logits, random_prompts
from qwen_trtllm.runtime import Engine, Executor, ExecutorConfig, KvCacheConfig


@pytest.fixture(scope="module")
def gptq_dir(tiny_checkpoint, tmp_path_factory):
    return write_gptq_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("gptq") / "ckpt", group_size=16)


def test_gptq_engine_equals_our_own_int4_engine(tiny_checkpoint, gptq_dir, tmp_path):
    """Same quantiser, two routes (GPTQ file layout vs build-time quantisation): identical weights and logits."""
    ours = build_engine(tmp_path / "ours", hf_dir=tiny_checkpoint, dtype="float16", weight_only_precision="int4",
                        group_size=16, max_batch_size=4, max_input_len=32, max_output_len=8)
    gptq = build_engine(tmp_path / "gptq", hf_dir=gptq_dir, dtype="float16", max_batch_size=4, max_input_len=32,
                        max_output_len=8)
    cfg = json.loads((gptq / "config.json").read_text())["build"]
    assert cfg["quantization"]["precision"] == "int4" and cfg["quantization"]["group_size"] == 16
    a, b = Engine.load(ours), Engine.load(gptq)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        if k.endswith((".qweight", ".scales")):
            assert torch.equal(sa[k], sb[k]), k
    prompts, forced = random_prompts(a.config.vocab_size, 4, 12, 5)
    # a block per sequence: the CPU default pool, max_batch_size x max_seq_len = 160 tokens, is only 3 blocks
    cfg = ExecutorConfig(kv_cache=KvCacheConfig(max_tokens=4 * 64))
    la = engine_logits(Executor(a, cfg), prompts, forced)
    lb = engine_logits(Executor(b, cfg), prompts, forced)
    assert compare_logits(lb, la)["rel_err"] < 1e-3  # only the fp16 copies of embedding/norms/bias differ


def test_unpack_refuses_act_order_and_asymmetric(gptq_dir):
    ckpt = HFCheckpoint(gptq_dir)
    p = "transformer.h.0.mlp.w1"
    qweight, qzeros, g_idx = ckpt.get(p + ".qweight"), ckpt.get(p + ".qzeros"), ckpt.get(p + ".g_idx")
    assert unpack_gptq(qweight, qzeros, g_idx, 16, p).abs().max() <= 8
    with pytest.raises(QWenError, match="act-order"):
        unpack_gptq(qweight, qzeros, g_idx.flip(0), 16, p)
    with pytest.raises(QWenError, match="symmetric"):
        unpack_gptq(qweight, qzeros + 1, g_idx, 16, p)
