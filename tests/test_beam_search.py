"""Beam search on the paged KV cache: the beams and their scores equal Hugging Face's generate(num_beams=N) on the
reference model, in flight beside other requests, across preemption, with blocks shared between beams and no leaks."""

from __future__ import annotations

import random

import pytest
import torch

from qwen_trtllm import QWenError
from qwen_trtllm.builder.build import build_engine
from qwen_trtllm.models.qwen.reference import load_reference
from qwen_trtllm.runtime import LLM, Engine, ExecutorConfig, KvCacheConfig, SamplingParams

EOD = 151643
MAX_NEW = 10
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    d = build_engine(tmp_path_factory.mktemp("beam") / "engine", hf_dir=tiny_checkpoint, dtype="float32",
                     max_batch_size=4, max_input_len=40, max_output_len=16)
    return Engine.load(d, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return load_reference(tiny_checkpoint, torch.float32, torch.device("cpu"))


def make_llm(engine, max_tokens: int | None = None, **kw) -> LLM:
    kv = KvCacheConfig(tokens_per_block=16, max_tokens=max_tokens)
    return LLM.from_engine(engine, config=ExecutorConfig(kv_cache=kv, **kw))


def beam_params(n: int, stop_ids=(), length_penalty: float = 1.0, early_stopping=False,
                max_tokens: int = MAX_NEW) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, use_beam_search=True, n=n, stop_token_ids=list(stop_ids),
                          length_penalty=length_penalty, early_stopping=early_stopping,
                          temperature=0.7, top_k=0, top_p=0.5, repetition_penalty=1.3, seed=5)  # ignored by beams


def prompts(vocab: int, n: int = 3, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(3, 37))] for _ in range(n)]


def hf_beams(model, prompt: list[int], params: SamplingParams):
    """(beam ids, sequences_scores) from Hugging Face's beam search with the same stop ids and lengths."""
    stops = sorted(params.stop_ids())
    out = model.generate(torch.tensor([prompt]), num_beams=params.n, num_return_sequences=params.n, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, max_new_tokens=params.max_tokens,
                         eos_token_id=stops, pad_token_id=stops[0], length_penalty=params.length_penalty,
                         early_stopping=params.early_stopping, top_k=None, top_p=None, temperature=None,
                         repetition_penalty=1.0)
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    ids = [out.sequences[i, len(prompt): len(prompt) + n].tolist() for i, n in enumerate(lengths)]
    return ids, out.sequences_scores.tolist()


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("length_penalty", [1.0, -0.5])
def test_beams_equal_hugging_face(engine, reference, n, length_penalty):
    """Each prompt's N beams (ids) and scores equal HF's, once without a stop id reached and once with one of
    the beams' own tokens made a stop id (the search then ends hypotheses early, and keeps 3N candidates)."""
    llm = make_llm(engine)
    reached = {False: 0, True: 0}
    for prompt in prompts(engine.config.vocab_size):
        free = beam_params(n, length_penalty=length_penalty)
        first = llm.generate([prompt], free)[0]
        assert len(first.beams) == n and first.token_ids == first.beams[0]
        stop = first.beams[0][2]  # a token the best beam produces: as a stop id it ends hypotheses early
        for params in (free, beam_params(n, [stop], length_penalty)):
            got = llm.generate([prompt], params)[0] if params is not free else first
            want_ids, want_scores = hf_beams(reference, prompt, params)
            assert got.beams == want_ids
            assert got.beam_scores == pytest.approx(want_scores, abs=1e-4)
            assert got.beam_scores == sorted(got.beam_scores, reverse=True)
            hit = any(b[-1] in params.stop_ids() for b in got.beams)
            reached[hit] += 1
            assert got.finish_reason == ("stop" if got.beams[0][-1] in params.stop_ids() else "length")
        assert llm.executor.kv_cache.pool.num_used == 0
    assert reached[True] and reached[False]  # both kinds of search were compared


@pytest.mark.parametrize("early_stopping", [True, "never"])
def test_early_stopping_modes_equal_hugging_face(engine, reference, early_stopping):
    llm = make_llm(engine)
    prompt = prompts(engine.config.vocab_size, 1, seed=3)[0]
    stop = llm.generate([prompt], beam_params(3))[0].beams[1][1]
    params = beam_params(3, [stop], length_penalty=1.5, early_stopping=early_stopping)
    got = llm.generate([prompt], params)[0]
    want_ids, want_scores = hf_beams(reference, prompt, params)
    assert got.beams == want_ids
    assert got.beam_scores == pytest.approx(want_scores, abs=1e-4)


def test_beams_in_flight_with_greedy_and_preemption(engine):
    """Beam requests batched with greedy ones give what each gives alone, also when a small KV cache preempts
    them; every block is back in the pool at the end."""
    vocab = engine.config.vocab_size
    ps = prompts(vocab, 6, seed=7)
    params = [beam_params(2), beam_params(4, length_penalty=0.5), SamplingParams(max_tokens=MAX_NEW, ignore_eos=True),
              beam_params(3, early_stopping=True), SamplingParams(max_tokens=7, ignore_eos=True), beam_params(2)]
    alone = [make_llm(engine).generate([p], sp)[0] for p, sp in zip(ps, params, strict=True)]
    for llm in (make_llm(engine), make_llm(engine, max_tokens=16 * 12, max_num_tokens=24)):
        together = llm.generate(ps, params)
        for a, t in zip(alone, together, strict=True):
            assert (t.token_ids, t.beams) == (a.token_ids, a.beams)
            # the float32 sums of differently shaped batches round differently (~1e-6)
            assert t.beam_scores == pytest.approx(a.beam_scores, abs=1e-5)
        assert llm.executor.kv_cache.pool.num_used == 0
    assert llm.executor.stats["preemptions"] > 0


def test_beams_share_prompt_blocks_and_copy_the_partial_one(engine):
    """After the first decode step, the beams hold the prompt's full blocks by reference count (one copy in the
    pool) and each its own copy of the block that held the prompt's partial tail."""
    llm = make_llm(engine)
    ex = llm.executor
    prompt = prompts(engine.config.vocab_size, 1, seed=11)[0][:1] * 37  # 2 full blocks of 16 + 5 tokens
    r = ex.add_request(prompt, beam_params(4, max_tokens=16))
    ex.step()  # prefill: 3 blocks, then the first 4 beams take a share each
    assert len(r.beams) == 4 and not r.block_ids
    assert [ex.kv_cache.pool.ref_counts[b] for b in r.beams[0].block_ids] == [4, 4, 4]
    ex.step()  # the first decode step writes position 37 into the shared third block: 3 copies (+ the original)
    tables = [b.block_ids for b in r.beams]
    shared = {t[0] for t in tables} | {t[1] for t in tables}
    assert len(shared) == 2
    assert ex.kv_cache.pool.num_used <= 2 + 4
    ex.run_until_done()
    assert ex.kv_cache.pool.num_used == 0


def test_beam_search_settings_are_checked(engine):
    llm = make_llm(engine)
    with pytest.raises(QWenError, match="use_beam_search"):
        llm.generate([[1, 2]], SamplingParams(n=2))
    with pytest.raises(QWenError, match="early_stopping"):
        llm.generate([[1, 2]], SamplingParams(n=2, use_beam_search=True, early_stopping="sometimes"))
    with pytest.raises(QWenError, match="stop strings"):
        llm.generate([[1, 2]], SamplingParams(n=2, use_beam_search=True, stop=["x"]))
    with pytest.raises(QWenError, match="beams"):
        make_llm(engine, max_tokens=64).generate([[1] * 40], SamplingParams(max_tokens=16, n=4, use_beam_search=True))


@pytest.mark.parametrize("tokens_per_block,head_dim", [(16, 16), (64, 128)])
def test_copy_kv_blocks_kernel_equals_reference(tokens_per_block, head_dim):
    """The copy-on-write kernel (Triton; its interpreter on the CPU) copies exactly the first n tokens of every
    layer and head, K and V, and nothing else."""
    from qwen_trtllm.kernels import copy_kv_blocks, copy_kv_blocks_reference, triton_available

    if not triton_available(DEVICE):
        pytest.skip("Triton cannot run here")
    g = torch.Generator().manual_seed(0)
    shape = (2, 7, 3, tokens_per_block, head_dim)
    k, v = (torch.randn(shape, generator=g).to(DEVICE) for _ in range(2))
    copies = torch.tensor([[1, 4, 5], [2, 5, tokens_per_block], [6, 3, 1]], dtype=torch.int64)
    want_k, want_v = k.clone(), v.clone()
    copy_kv_blocks_reference(want_k, want_v, copies)
    copy_kv_blocks(k, v, copies.to(DEVICE))
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    assert torch.equal(want_k[:, 4, :, :5], want_k[:, 1, :, :5]) and not torch.equal(want_k[:, 4], want_k[:, 1])
