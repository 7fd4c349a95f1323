"""Tensor parallelism on CPU: gloo process groups, each rank loading only its own rank file."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from net import free_port

from qwen_trtllm.builder.build import build_engine
from qwen_trtllm.evaluation.teacher_forced import engine_logits
from qwen_trtllm.models.qwen.reference import load_reference
from qwen_trtllm.runtime import LLM, Engine, ExecutorConfig, KvCacheConfig, SamplingParams
from qwen_trtllm.runtime.distributed import leave_distributed

ROOT = Path(__file__).resolve().parents[1]


def _prompts(vocab: int) -> tuple[list[list[int]], torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (9, 4, 14)]
    return prompts, torch.randint(0, vocab, (3, 8), generator=g)


# a block per sequence: the CPU default pool, max_batch_size x max_seq_len = 84 tokens, is only 2 blocks
CONFIG = ExecutorConfig(kv_cache=KvCacheConfig(max_tokens=3 * 64))
SAMPLED = SamplingParams(max_tokens=10, temperature=0.8, top_k=0, top_p=0.9, seed=0, ignore_eos=True)
GREEDY = SamplingParams(max_tokens=10, top_k=1, ignore_eos=True)
BEAMS = SamplingParams(max_tokens=10, use_beam_search=True, n=2, end_id=None)  # beams share blocks: copy-on-write


def _worker(rank: int, world: int, engine_dir: str, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    llm = LLM.from_engine(Engine.load(engine_dir, device="cpu", rank=rank, world_size=world), config=CONFIG)
    prompts, forced = _prompts(llm.engine.config.vocab_size)
    logits = engine_logits(llm.executor, prompts, forced)
    # every rank calls generate; rank 0 samples (the other ranks' settings, here another seed, are not used) and
    # returns the outputs, the others follow its steps with its tokens and return []
    outputs = llm.generate(prompts, replace(SAMPLED, seed=rank))
    greedy = llm.generate(prompts, GREEDY)
    beams = llm.generate(prompts, BEAMS)
    torch.save({"logits": logits, "ids": [o.token_ids for o in outputs], "greedy": [o.token_ids for o in greedy],
                "beams": [o.beams for o in beams]}, f"{out_file}.{rank}")
    leave_distributed()  # barrier, then destroy: a rank tearing down while its peer still sends can abort


def run_tp(engine_dir: Path, world: int, tmp: Path) -> list[dict]:
    mp.spawn(_worker, args=(world, str(engine_dir), str(tmp / f"pg{world}"), str(tmp / "out")), nprocs=world)
    return [torch.load(tmp / f"out.{r}") for r in range(world)]


@pytest.fixture(scope="module")
def tp_engines(tiny_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    kw = dict(hf_dir=tiny_checkpoint, dtype="float32", max_batch_size=3, max_input_len=16, max_output_len=12)
    return {w: build_engine(d / f"tp{w}", world_size=w, **kw) for w in (1, 2, 4)}


@pytest.mark.parametrize("world", [2, 4])
def test_tp_logits_and_tokens_match_tp1(tp_engines, tiny_checkpoint, world, tmp_path):
    llm = LLM.from_engine(Engine.load(tp_engines[1], device="cpu"), config=CONFIG)
    prompts, forced = _prompts(llm.engine.config.vocab_size)
    want = engine_logits(llm.executor, prompts, forced)
    results = run_tp(tp_engines[world], world, tmp_path)
    for res in results:
        rel = (res["logits"] - want).norm(dim=-1) / want.norm(dim=-1)
        assert rel.max() < 1e-5
    # rank 0 alone returns outputs; every rank continued with its sampled tokens (a rank feeding other tokens
    # would corrupt the all-reduced activations): the same tokens as at tp 1 with rank 0's settings
    assert all(res["ids"] == [] for res in results[1:])
    assert results[0]["ids"] == [o.token_ids for o in llm.generate(prompts, SAMPLED)]
    assert all(len(ids) == 10 for ids in results[0]["ids"])
    # greedy ids against an independent implementation: the Hugging Face reference's own greedy search
    reference = load_reference(tiny_checkpoint, dtype=torch.float32)
    assert results[1]["greedy"] == [] and results[0]["greedy"] == [
        reference.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    # beam search (every rank copies the blocks rank 0's plan names) against the reference's beam search
    assert results[1]["beams"] == [] and results[0]["beams"] == [
        reference.generate(torch.tensor([p]), max_new_tokens=10, num_beams=2, num_return_sequences=2, do_sample=False,
                           pad_token_id=0, eos_token_id=None)[:, len(p):].tolist() for p in prompts]


def test_rank_files_hold_only_their_shard(tp_engines):
    from safetensors import safe_open

    with safe_open(str(tp_engines[2] / "rank1.safetensors"), "pt") as f:
        full = Engine.load(tp_engines[1], device="cpu").model.state_dict()
        qkv = f.get_tensor("layers.0.attn.qkv.weight")
        assert qkv.shape[0] == full["layers.0.attn.qkv.weight"].shape[0] // 2
        vocab = full["lm_head.weight"].shape[0]  # lm_head is vocab-parallel: rank 1 holds the second half
        assert torch.equal(f.get_tensor("lm_head.weight"), full["lm_head.weight"][vocab // 2:])
        assert f.get_tensor("embed.weight").shape[0] == vocab  # the embedding is replicated


def test_an_engine_with_the_whole_lm_head_per_rank_asks_for_a_rebuild(tp_engines, tmp_path):
    """Rank files from before lm_head became vocab-parallel (the whole lm_head on every rank): one line naming it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qwen_trtllm import QWenError

    old = tmp_path / "old_tp2"
    shutil.copytree(tp_engines[2], old)
    state = load_file(str(old / "rank0.safetensors"))
    state["lm_head.weight"] = load_file(str(tp_engines[1] / "rank0.safetensors"))["lm_head.weight"]
    save_file(state, str(old / "rank0.safetensors"))
    with pytest.raises(QWenError, match="built before lm_head became vocab-parallel"):
        Engine.load(old, device="cpu", rank=0, world_size=2)


def test_tensor_parallel_must_divide_the_vocabulary():
    from qwen_trtllm import QWenError
    from qwen_trtllm.checkpoint.random_checkpoint import PRESETS
    from qwen_trtllm.config import QWenConfig

    config = QWenConfig(**{**PRESETS["tiny"], "vocab_size": 1025})
    config.check_tensor_parallel(1)
    with pytest.raises(QWenError, match=r"vocabulary \(1025"):
        config.check_tensor_parallel(2)


def _torchrun(engine: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           str(ROOT / "examples/qwen/run.py"), "--engine_dir", str(engine), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_run_py_under_torchrun(tp_engines, tmp_path):
    out = tmp_path / "o.npy"
    r = _torchrun(tp_engines[2], 2, "--input_tokens", str(_write_tokens(tmp_path)), "--max_output_len", "6",
                  "--top_k", "1", "--output_npy", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("Output:") == 2  # rank 0 prints, once per prompt
    single = tmp_path / "s.npy"
    r1 = subprocess.run([sys.executable, str(ROOT / "examples/qwen/run.py"), "--engine_dir", str(tp_engines[1]),
                         "--input_tokens", str(_write_tokens(tmp_path)), "--max_output_len", "6", "--top_k", "1",
                         "--output_npy", str(single)], capture_output=True, text=True)
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert np.array_equal(np.load(out), np.load(single))


def test_world_size_mismatch_fails_on_all_ranks(tp_engines, tmp_path):
    r = _torchrun(tp_engines[4], 2, "--input_tokens", str(_write_tokens(tmp_path)))
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "world size" in errors[0]


def test_missing_rank_file_fails_without_hanging(tp_engines, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tp_engines[2], broken)
    (broken / "rank1.safetensors").unlink()
    r = _torchrun(broken, 2, "--input_tokens", str(_write_tokens(tmp_path)))
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank1.safetensors" in errors[0]


def _write_tokens(tmp: Path) -> Path:
    p = tmp / "tokens.csv"
    p.write_text("5,6,7,8\n9,10\n")
    return p


def test_summarize_under_torchrun_matches_tp1(make_checkpoint, tiktoken_file, tmp_path):
    import json

    ckpt = make_checkpoint(vocab_size=151936, seq_length=2048, tokenizer_file=tiktoken_file)
    outputs = []
    for world in (1, 2):
        eng = build_engine(tmp_path / f"e{world}", hf_dir=ckpt, dtype="float32", max_batch_size=2, max_input_len=256,
                           max_output_len=8, world_size=world)
        out = tmp_path / f"o{world}.jsonl"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                            str(ROOT / "examples/qwen/summarize.py"), "--test_trt_llm", "--engine_dir", str(eng),
                            "--max_ite", "2", "--output_len", "6", "--no_progress", "--output_file", str(out)],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.count("[engine]   rouge1") == 1  # rank 0 alone prints
        outputs.append([json.loads(line)["engine_ids"] for line in out.read_text().splitlines()])
    assert outputs[0] == outputs[1]


def test_eval_accuracy_under_torchrun(tp_engines):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        str(ROOT / "examples/qwen/eval_accuracy.py"), "--engine_dir", str(tp_engines[2]),
                        "--reference_engine_dir", str(tp_engines[1]), "--num_prompts", "6", "--prompt_len", "8",
                        "--steps", "4", "--batch_size", "3", "--min_top1", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert r.stdout.count("top-1 agreement 100.00%") == 1


def _cli_worker(rank: int, init_file: str, out_file: str) -> None:
    from qwen_trtllm.cli import run_cli

    def main() -> int:
        if rank == 0:  # still busy when rank 1 is done
            for _ in range(50):
                torch.randn(200, 200).sum()
        return 0

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        run_cli(main)
    except SystemExit as e:
        Path(f"{out_file}.{rank}").write_text(f"{e.code} {dist.is_initialized()}")


def test_run_cli_leaves_the_process_group_on_every_rank(tmp_path):
    # rank 1 finishes first; both must exit 0 with the group torn down (a rank leaving a live gloo group could abort)
    mp.spawn(_cli_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    assert [(tmp_path / f"out.{r}").read_text() for r in (0, 1)] == ["0 False", "0 False"]


def _random_engine_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    from qwen_trtllm.evaluation.benchmark import random_engine

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    engine = random_engine("tiny", "float32", "cpu", max_batch_size=3, max_input_len=16, max_output_len=12,
                           rank=rank, world_size=world)
    llm = LLM.from_engine(engine, config=CONFIG)
    prompts, forced = _prompts(engine.config.vocab_size)
    torch.save(engine_logits(llm.executor, prompts, forced), f"{out_file}.{rank}")
    leave_distributed()


def test_random_engine_shards_make_the_tp1_model(tmp_path):
    """benchmark.py --model under torchrun: each rank's random_engine is its shard of the same random model."""
    from qwen_trtllm.evaluation.benchmark import random_engine

    llm = LLM.from_engine(random_engine("tiny", "float32", "cpu", max_batch_size=3, max_input_len=16,
                                        max_output_len=12), config=CONFIG)
    prompts, forced = _prompts(llm.engine.config.vocab_size)
    want = engine_logits(llm.executor, prompts, forced)
    mp.spawn(_random_engine_worker, args=(2, str(tmp_path / "pg"), str(tmp_path / "out")), nprocs=2)
    for r in range(2):
        got = torch.load(tmp_path / f"out.{r}")
        assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < 1e-5
