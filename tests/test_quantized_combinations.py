"""Every quantised weight format combined with every quantised KV cache (build.py --use_weight_only int8 / int4,
--use_fp8, each with --int8_kv_cache / --fp8_kv_cache) on a tiny fp32 checkpoint: the combination builds, records
both formats, and its teacher-forced logits error against the fp32 engine is the quadrature sum of the errors of
its two parts measured alone.

Why quadrature: the weight rounding and the KV cache rounding are independent, so their effects on the logits add
like independent noise, sqrt(e_w^2 + e_kv^2). Measured on this model (64 prompts x 32 positions, docs/PERF.md has
the 7B rows): every combination within 0.4% of that prediction, e.g. int8 weights 9.7e-3, fp8 KV 1.48e-2, both
1.774e-2 against 1.768e-2 predicted. A combination that dropped one of its formats would give the other part's
error alone (int8 + fp8 KV: 0.55x the prediction); one that broke it (a wrong scale, a layout mismatch between the
quantised linears and the cache kernels) would give errors near 1.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from qwen_trtllm.builder.build import build_engine
from qwen_trtllm.evaluation.teacher_forced import batched, compare_logits, engine_logits, random_prompts
from qwen_trtllm.runtime import Engine, Executor, ExecutorConfig, KvCacheConfig

WEIGHTS = {"fp32": {}, "int8": {"weight_only_precision": "int8"},
           "int4": {"weight_only_precision": "int4", "group_size": 16}, "fp8": {"use_fp8": True}}
KV_CACHES = ("auto", "int8", "fp8")
PROMPTS, PROMPT_LEN, STEPS, BATCH = 64, 16, 32, 16


@pytest.fixture(scope="module")
def errors(tiny_checkpoint, tmp_path_factory) -> dict[tuple[str, str], dict[str, float]]:
    """{(weights, kv cache): compare_logits against the fp32 engine} for all 12 engines, and each config.json."""
    d = tmp_path_factory.mktemp("combos")
    common = dict(hf_dir=tiny_checkpoint, dtype="float32", max_batch_size=BATCH, max_input_len=PROMPT_LEN,
                  max_output_len=STEPS)
    logits, stats = {}, {}
    for w, flags in WEIGHTS.items():
        for kv in KV_CACHES:
            path = build_engine(d / f"{w}_{kv}", kv_cache_dtype=kv, **flags, **common)
            build = json.loads((path / "config.json").read_text())["build"]
            engine = Engine.load(path, device="cpu")
            seq = PROMPT_LEN + STEPS  # each sequence takes whole 64-token blocks
            executor = Executor(engine, ExecutorConfig(max_batch_size=BATCH, max_seq_len=seq,
                                                       kv_cache=KvCacheConfig(max_tokens=BATCH * -(-seq // 64) * 64)))
            prompts, forced = random_prompts(engine.config.vocab_size, PROMPTS, PROMPT_LEN, STEPS)
            logits[w, kv] = batched(lambda p, f, ex=executor: engine_logits(ex, p, f), prompts, forced, BATCH)
            stats[w, kv] = {"build": build}
    for key, got in logits.items():
        stats[key].update(compare_logits(got, logits["fp32", "auto"]))
    return stats


@pytest.mark.parametrize("weights", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_combination_error_is_the_quadrature_of_its_parts(errors, weights, kv):
    both, w_alone, kv_alone = errors[weights, kv], errors[weights, "auto"], errors["fp32", kv]
    quant = both["build"]["quantization"]
    assert both["build"]["kv_cache_dtype"] == kv and quant["precision"] == weights
    predicted = math.hypot(w_alone["rel_err"], kv_alone["rel_err"])
    ratio = both["rel_err"] / predicted
    print(f"{weights} + {kv} KV: {both['rel_err']:.4e} vs quadrature {predicted:.4e} (ratio {ratio:.4f}), "
          f"top-1 {both['top1_agreement']:.4f}")
    assert 0.95 < ratio < 1.05, (both["rel_err"], w_alone["rel_err"], kv_alone["rel_err"])
    assert both["rel_err"] > w_alone["rel_err"]  # the KV cache's rounding is there, not only the weights'


def test_the_parts_are_what_their_formats_imply(errors):
    """The single formats' own errors, ordered as their per-element errors (int8 KV 0.65%, fp8 2.6%, int8 weights
    ~0.3% per weight but in every matmul, int4 g16 ~8%): what the quadrature test builds on is not noise."""
    e = {key: s["rel_err"] for key, s in errors.items()}
    assert e["fp32", "auto"] == 0.0
    assert 0 < e["fp32", "int8"] < e["fp32", "fp8"] < e["int4", "auto"]
    assert e["int8", "auto"] < e["fp8", "auto"] < e["int4", "auto"]
    assert torch.isfinite(torch.tensor(list(e.values()))).all()
