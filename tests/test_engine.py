"""The engine against the Hugging Face reference on tiny random checkpoints (CPU)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from qwen_trtllm import QWenError
from qwen_trtllm.builder.build import build_engine
from qwen_trtllm.checkpoint.hf_checkpoint import HFCheckpoint
from qwen_trtllm.evaluation.teacher_forced import compare_logits, engine_logits, reference_logits
from qwen_trtllm.models.qwen.reference import load_reference
from qwen_trtllm.runtime import LLM, Engine, ExecutorConfig, KvCacheConfig, SamplingParams

PROMPT_LENS = (11, 5, 17)
STEPS = 9  # logits at the prefill and after 8 decode steps


def make_llm(engine_dir, kv_cache_blocks: int | None = None) -> LLM:
    """An LLM over the engine; kv_cache_blocks: a pool of that many 64-token blocks instead of the default."""
    kv = KvCacheConfig(max_tokens=64 * kv_cache_blocks) if kv_cache_blocks else KvCacheConfig()
    return LLM.from_engine(Engine.load(engine_dir), config=ExecutorConfig(kv_cache=kv))


def random_prompts(vocab: int, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module")
def engines(tiny_checkpoint, tmp_path_factory):
    out = {}
    for dtype in ("float32", "float16", "bfloat16"):
        d = tmp_path_factory.mktemp(f"engine_{dtype}")
        out[dtype] = build_engine(d / "engine", hf_dir=tiny_checkpoint, dtype=dtype, max_batch_size=4,
                                  max_input_len=32, max_output_len=16)
    return out


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return load_reference(tiny_checkpoint, dtype=torch.float32)


def test_fp32_logits_match_reference_prefill_and_decode(engines, reference):
    llm = make_llm(engines["float32"])
    prompts = random_prompts(llm.engine.config.vocab_size)
    forced = torch.randint(0, llm.engine.config.vocab_size, (len(prompts), STEPS))
    got = engine_logits(llm.executor, prompts, forced).cpu()  # the reference runs on the CPU
    want = reference_logits(reference, prompts, forced)
    for s in range(STEPS):  # every step, every sequence, within 1e-4 relative
        per_seq = (got[:, s] - want[:, s]).norm(dim=-1) / want[:, s].norm(dim=-1)
        assert per_seq.max() < 1e-4, (s, per_seq)
    assert compare_logits(got, want)["top1_agreement"] == 1.0


def test_greedy_ids_identical_to_reference(engines, reference):
    llm = make_llm(engines["float32"])
    prompts = random_prompts(llm.engine.config.vocab_size, seed=1)
    res = llm.generate(prompts, SamplingParams(max_tokens=12, top_k=1, end_id=0))
    for p, ids in zip(prompts, [o.token_ids for o in res], strict=True):
        ref = reference.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                 pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
        assert ids == ref


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-2), ("bfloat16", 4e-2)])
def test_half_precision_engines_run_on_cpu(engines, reference, dtype, tol):
    llm = make_llm(engines[dtype])
    assert llm.engine.model.embed.weight.dtype == getattr(torch, dtype)
    prompts = random_prompts(llm.engine.config.vocab_size, seed=2)
    forced = torch.randint(0, llm.engine.config.vocab_size, (len(prompts), 4))
    stats = compare_logits(engine_logits(llm.executor, prompts, forced).cpu(),
                           reference_logits(reference, prompts, forced))
    assert stats["rel_err"] < tol, stats


@pytest.mark.parametrize("tp", [1, 2])
def test_ft_and_hf_sources_build_identical_engines(tiny_checkpoint, engines, tp, tmp_path):
    """Every rank file alike from either source; at tp 2 the FT directory holds lm_head whole (a global tensor, as
    TensorRT-LLM's converter writes it) and the builder splits it like the checkpoint's."""
    from qwen_trtllm.checkpoint.ft_format import convert_checkpoint

    ft = convert_checkpoint(tiny_checkpoint, tmp_path / "ft", tp=tp, storage_type="float32")
    assert (ft / "lm_head.weight.bin").is_file() and not (ft / "lm_head.weight.0.bin").exists()
    kw = dict(dtype="float32", max_batch_size=4, max_input_len=32, max_output_len=16, world_size=tp)
    eng = build_engine(tmp_path / "engine", ft_dir=ft, **kw)
    ref = engines["float32"] if tp == 1 else build_engine(tmp_path / "hf", hf_dir=tiny_checkpoint, **kw)
    for r in range(tp):
        a, b = load_file(str(eng / f"rank{r}.safetensors")), load_file(str(ref / f"rank{r}.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_batch_equals_single_sequences(engines, penalty):
    llm = make_llm(engines["float32"])
    prompts = random_prompts(llm.engine.config.vocab_size, seed=3)
    cfg = SamplingParams(max_tokens=10, top_k=1, repetition_penalty=penalty, end_id=151643,  # beyond the vocab
                         stop_token_ids=[7])
    batch = [o.token_ids for o in llm.generate(prompts, cfg)]
    for p, ids in zip(prompts, batch, strict=True):
        assert llm.generate([p], cfg)[0].token_ids == ids


def test_sampling_is_seeded_and_respects_stops(engines):
    llm = make_llm(engines["float32"])
    prompts = random_prompts(llm.engine.config.vocab_size, seed=4)
    cfg = SamplingParams(max_tokens=12, temperature=0.9, top_k=0, top_p=0.8, repetition_penalty=1.1, seed=5,
                         end_id=None)  # no stop at all: each request's whole random stream
    raw = [o.token_ids for o in llm.generate(prompts, cfg)]
    assert raw == [o.token_ids for o in llm.generate(prompts, cfg)] and all(len(ids) == 12 for ids in raw)
    assert raw != [o.token_ids for o in llm.generate(prompts, replace(cfg, seed=6))]  # the seed is used
    # stop on the 5th token of each raw stream: the same stream, cut right after that token's first occurrence
    stops = [ids[4] for ids in raw]
    outs = llm.generate(prompts, [replace(cfg, stop_token_ids=[t]) for t in stops])
    for ids, t, out in zip(raw, stops, outs, strict=True):
        assert out.finish_reason == "stop" and out.token_ids == ids[: ids.index(t) + 1]


# --- long context: dynamic NTK and logn attention against a direct implementation of Qwen's formulas ---
def qwen_v1_direct(ckpt: HFCheckpoint, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Qwen (v1) forward in float64 written from the formulas: NTK alpha from the prompt length, logn on q."""
    c = ckpt.config
    W = lambda n: ckpt.get(n).double()
    nh, D, T = c.num_attention_heads, c.kv_channels, len(ids)
    alpha = max(2 ** math.ceil(math.log2(prompt_len / c.seq_length) + 1) - 1, 1)
    base = c.rotary_emb_base * alpha ** (D / (D - 2))
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = lambda x: x * cos + torch.cat([-x[..., D // 2:], x[..., : D // 2]], -1) * sin
    logn = torch.tensor([math.log(p + 1) / math.log(c.seq_length) if p + 1 > c.seq_length else 1.0
                         for p in range(T)], dtype=torch.float64)
    norm = lambda x, w: x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.layer_norm_epsilon) * w
    x = W("transformer.wte.weight")[torch.tensor(ids)]
    for i in range(c.num_hidden_layers):
        p = f"transformer.h.{i}."
        qkv = norm(x, W(p + "ln_1.weight")) @ W(p + "attn.c_attn.weight").T + W(p + "attn.c_attn.bias")
        q, k, v = (t.view(T, nh, D).transpose(0, 1) for t in qkv.split(c.hidden_size, -1))
        q, k = rot(q) * logn[None, :, None], rot(k)
        s = (q @ k.transpose(1, 2)) / math.sqrt(D) + torch.full((T, T), float("-inf")).triu(1).double()
        a = (s.softmax(-1) @ v).transpose(0, 1).reshape(T, -1)
        x = x + a @ W(p + "attn.c_proj.weight").T
        h = norm(x, W(p + "ln_2.weight"))
        up, gate = h @ W(p + "mlp.w1.weight").T, h @ W(p + "mlp.w2.weight").T
        x = x + (up * torch.nn.functional.silu(gate)) @ W(p + "mlp.c_proj.weight").T
    return norm(x, W("transformer.ln_f.weight")) @ W("lm_head.weight").T


def test_long_context_ntk_and_logn(make_checkpoint, tmp_path):
    ckpt_dir = make_checkpoint(seq_length=8, seed=7)  # prompts of 11..30 tokens: alpha 3 and 7, logn active
    engine = build_engine(tmp_path / "e", hf_dir=ckpt_dir, dtype="float32", max_batch_size=3, max_input_len=32,
                          max_output_len=8)
    # a block per sequence: the CPU default pool, max_batch_size x max_seq_len = 120 tokens, is only 2 blocks
    llm = make_llm(engine, kv_cache_blocks=3)
    ckpt = HFCheckpoint(ckpt_dir)
    prompts = random_prompts(ckpt.config.vocab_size, lens=(30, 11, 6), seed=8)
    forced = torch.randint(0, ckpt.config.vocab_size, (3, 6))
    got = engine_logits(llm.executor, prompts, forced).cpu()
    for b, p in enumerate(prompts):
        want = qwen_v1_direct(ckpt, p + forced[b, :5].tolist(), len(p))[len(p) - 1:]
        assert ((got[b].double() - want).norm() / want.norm()) < 1e-5, b
    ref = load_reference(ckpt_dir)  # beyond seq_length the Qwen2 reference (no NTK/logn) must differ
    assert compare_logits(got[:1], reference_logits(ref, prompts[:1], forced[:1]))["rel_err"] > 1e-2


# --- bad input ---
def test_bad_inputs(engines, tmp_path):
    llm = make_llm(engines["float32"])
    with pytest.raises(QWenError, match="max_input_len"):
        llm.generate([[1] * 33], SamplingParams(max_tokens=4))
    with pytest.raises(QWenError, match="max_output_len"):
        llm.generate([[1]], SamplingParams(max_tokens=17))
    with pytest.raises(QWenError, match="does not exist"):
        Engine.load(tmp_path / "nope")
    with pytest.raises(QWenError, match="world size"):
        Engine.load(engines["float32"], world_size=2, rank=0)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(QWenError, match="corrupt"):
        Engine.load(broken)


def test_more_prompts_than_max_batch_size_queue(engines):
    llm = make_llm(engines["float32"])  # max_batch_size 4
    prompts = random_prompts(llm.engine.config.vocab_size, lens=(11, 5, 17, 3, 9, 14), seed=9)
    cfg = SamplingParams(max_tokens=8, top_k=1, ignore_eos=True)
    outs = llm.generate(prompts, cfg)
    assert [len(o.token_ids) for o in outs] == [8] * 6 and all(o.finish_reason == "length" for o in outs)
    for p, out in zip(prompts, outs, strict=True):
        assert llm.generate([p], cfg)[0].token_ids == out.token_ids


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    from qwen_trtllm.runtime import engine as engine_mod

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(QWenError, match="cannot run bfloat16"):
        engine_mod.check_dtype_supported(torch.bfloat16, torch.device("cuda", 0))
