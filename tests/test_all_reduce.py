"""The one-shot all-reduce kernel (kernels/all_reduce.py).

On one device (CPU interpreter or one GPU) a rank's kernel runs against simulated peers: their partials already
in their buffers and their barrier flags already set. With two or more GPUs, ranks under NCCL compare it with
dist.all_reduce, eagerly and replayed in CUDA graphs, and a tensor-parallel engine (one-shot all-reduce in its
decode graphs) with the tp 1 engine of the same random weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import triton
from net import free_port

from qwen_trtllm import QWenError
from qwen_trtllm.kernels import interpreted, rms_norm, rms_norm_reference, triton_available
from qwen_trtllm.kernels.all_reduce import (
    BLOCK,
    MAX_PROGRAMS,
    AllReduce,
    OneShotAllReduce,
    _one_shot_all_reduce_kernel,
    _one_shot_all_reduce_rms_norm_kernel,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(DEVICE) or (DEVICE == "cpu" and not interpreted()),
                                reason="needs the Triton kernels (CUDA, or the interpreter on CPU)")


def _peers_arrived(xs: list[torch.Tensor], rank: int, slot_elems: int, slot: int, programs: int):
    """Every rank's buffer (filled with 7) and signal pad, peers other than `rank` having arrived: their partials
    in their buffers' slot, their flags set in this rank's pad for the first `programs` programs."""
    world, n, dtype = len(xs), xs[0].numel(), xs[0].dtype
    buffers = [torch.full((2 * slot_elems,), 7.0, dtype=dtype, device=DEVICE) for _ in range(world)]
    pads = [torch.zeros(MAX_PROGRAMS * world, dtype=torch.int32, device=DEVICE) for _ in range(world)]
    for r in range(world):
        if r != rank:
            buffers[r][slot * slot_elems:slot * slot_elems + n] = xs[r].flatten()
            pads[rank][torch.arange(programs) * world + r] = 1
    pad_ptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64, device=DEVICE)
    return buffers, pads, [buffers[rank], *buffers, *[buffers[0]] * (8 - world)], pad_ptrs


def _check_barrier(xs, rank, buffers, pads, slot_elems, slot, programs):
    """This rank's partial in its slot (the other slot untouched), every flag in its pad consumed, its own flag
    set once per program in every other rank's pad."""
    n, world = xs[0].numel(), len(xs)
    assert torch.equal(buffers[rank][slot * slot_elems:slot * slot_elems + n], xs[rank].flatten())
    assert (buffers[rank][:slot * slot_elems] == 7).all()
    assert (pads[rank] == 0).all()
    for r in range(world):
        if r != rank:
            want = torch.zeros(MAX_PROGRAMS * world, dtype=torch.int32)
            want[torch.arange(programs) * world + rank] = 1
            assert torch.equal(pads[r].cpu(), want)


def _sum_like_kernel(xs: list[torch.Tensor]) -> torch.Tensor:
    """The ranks' partials summed in float32 in rank order, rounded to their dtype as the kernel rounds."""
    acc = sum(x.float() for x in xs)
    if xs[0].dtype == torch.bfloat16 and DEVICE == "cpu":  # Triton 3.6's interpreter truncates float32 -> bf16
        acc = (acc.view(torch.int32) & -65536).view(torch.float32)
    return acc.to(xs[0].dtype)


DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# one row, a short row (every rank and dtype); more chunks than programs, so programs loop (two cases: slow on CPU)
CASES = [(w, r, dt, n) for w, r in [(2, 0), (2, 1), (4, 2)] for dt in DTYPES for n in (4096, 72)] + \
    [(2, 1, torch.float16, MAX_PROGRAMS * BLOCK + 56), (4, 2, torch.float32, MAX_PROGRAMS * BLOCK + 56)]


@pytest.mark.parametrize("world,rank,dtype,n", CASES)
def test_one_shot_kernel_against_simulated_peers(world, rank, dtype, n):
    slot_elems, slot = n + 64, 1
    g = torch.Generator().manual_seed(n + world)
    xs = [torch.randn(n, generator=g).to(dtype).to(DEVICE) for _ in range(world)]
    programs = min(triton.cdiv(n, BLOCK), MAX_PROGRAMS)
    buffers, pads, args, pad_ptrs = _peers_arrived(xs, rank, slot_elems, slot, programs)
    out = torch.empty_like(xs[rank])
    _one_shot_all_reduce_kernel[(programs,)](xs[rank], out, *args, pad_ptrs, slot * slot_elems, n, rank,
                                             WORLD=world, BLOCK=BLOCK, num_warps=4)
    assert torch.equal(out, _sum_like_kernel(xs))
    _check_barrier(xs, rank, buffers, pads, slot_elems, slot, programs)


@pytest.mark.parametrize("world,rank,dtype,rows",  # and more rows than programs, so a program loops (two cases)
                         [(w, r, dt, m) for w, r in [(2, 1), (4, 3)] for dt in DTYPES for m in (1, 5)] +
                         [(2, 1, torch.bfloat16, MAX_PROGRAMS + 3), (4, 3, torch.float16, MAX_PROGRAMS + 3)])
def test_one_shot_rms_norm_kernel_against_simulated_peers(world, rank, dtype, rows):
    """The fused all-reduce + residual add + RMSNorm equals rms_norm(sum of the partials, ...) bit for bit."""
    H, slot, eps = 96, 0, 1e-6
    slot_elems = rows * H + 32
    g = torch.Generator().manual_seed(rows * 10 + world)
    xs = [torch.randn(rows, H, generator=g).to(dtype).to(DEVICE) for _ in range(world)]
    residual = torch.randn(rows, H, generator=g).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype).to(DEVICE)
    programs = min(rows, MAX_PROGRAMS)
    buffers, pads, args, pad_ptrs = _peers_arrived(xs, rank, slot_elems, slot, programs)
    out, h = torch.empty_like(xs[rank]), torch.empty_like(xs[rank])
    _one_shot_all_reduce_rms_norm_kernel[(programs,)](xs[rank], residual, weight, out, h, *args, pad_ptrs,
                                                      slot * slot_elems, rows, H, eps, rank, WORLD=world,
                                                      BLOCK=triton.next_power_of_2(H), num_warps=4)
    want_out, want_h = rms_norm(_sum_like_kernel(xs), weight, eps, residual=residual)  # the unfused kernels
    assert torch.equal(h, want_h) and torch.equal(out, want_out)
    ref_out, ref_h = rms_norm_reference(sum(x.float() for x in xs).to(dtype), weight, eps, residual=residual)
    assert torch.allclose(out.float(), ref_out.float(), rtol=2e-2, atol=2e-2)
    _check_barrier(xs, rank, buffers, pads, slot_elems, slot, programs)


def test_all_reduce_is_the_identity_at_tp1():
    x = torch.randn(3, 8)
    assert AllReduce(1)(x, slot=0) is x


def _stub(max_bytes: int = 1 << 12) -> OneShotAllReduce:
    """A OneShotAllReduce without symmetric memory (its checks run before any launch)."""
    o = object.__new__(OneShotAllReduce)
    o.world, o.rank, o.max_bytes, o.max_programs = 2, 0, max_bytes, MAX_PROGRAMS
    o._peers = {dt: [torch.zeros(2 * max_bytes, dtype=torch.uint8).view(dt)] * 2 for dt in DTYPES}
    return o


def test_one_shot_refusals():
    o, x = _stub(), torch.zeros(2, 64, dtype=torch.float16)
    for bad in (torch.zeros(2, 2048, dtype=torch.float16), x.t(), x.int(), torch.zeros(3, dtype=torch.float16)):
        assert not o.fits(bad)  # too big, not contiguous, not float, not a multiple of 16 bytes
        with pytest.raises(ValueError, match="one-shot all-reduce takes contiguous"):
            o(bad, 0)
    with pytest.raises(ValueError, match="slot must be 0 or 1"):
        o(x, 2)
    w = torch.ones(64, dtype=torch.float16)
    for residual in (torch.zeros(2, 64), torch.zeros(1, 64, dtype=torch.float16), torch.zeros(64, 2).half().t()):
        assert not o.takes_residual(x, residual)
        with pytest.raises(ValueError, match="must be contiguous and match x"):
            o.rms_norm(x, w, 1e-6, residual, 0)
    with pytest.raises(ValueError, match=r"weight \(32,\) must be contiguous of shape \(64,\)"):
        o.rms_norm(x, w[:32], 1e-6, torch.zeros_like(x), 0)


def test_one_shot_is_set_up_at_the_first_all_reduce_not_at_load(monkeypatch):
    from qwen_trtllm.kernels import all_reduce
    from qwen_trtllm.models.qwen.model import Kernels

    calls = []
    monkeypatch.setattr(all_reduce, "one_shot_all_reduce", lambda device: calls.append(device))
    ops = Kernels(triton=True, tp=2, device=torch.device("cuda", 0))  # what loading an engine makes
    assert calls == []  # no collective while the ranks may still disagree on load errors
    assert ops.all_reduce.one_shot is None and ops.all_reduce.one_shot is None
    assert calls == [torch.device("cuda", 0)]  # once
    late = Kernels(triton=True, tp=2, device=torch.device("cuda", 0)).all_reduce
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="outside CUDA-graph capture first"):
        _ = late.one_shot


def test_bad_all_reduce_strategy_is_refused(monkeypatch):
    monkeypatch.setenv("QWEN_TRTLLM_ALL_REDUCE", "NCCL")
    with pytest.raises(QWenError, match="QWEN_TRTLLM_ALL_REDUCE=NCCL is not one of auto, nccl"):
        AllReduce(2, torch.device("cuda", 0))
    AllReduce(2, None)  # no one-shot wanted (CPU, torch kernels): the variable is not read


def _ranks(fn, world: int, *args) -> None:
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world)


def _init(rank: int, world: int, port: int) -> torch.device:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    return torch.device("cuda", rank)


def _one_shot_worker(rank: int, world: int, port: int) -> None:
    from qwen_trtllm.kernels.all_reduce import OneShotAllReduce

    dev = _init(rank, world, port)
    ar = OneShotAllReduce(dist.group.WORLD, dev)
    calls = 0  # consecutive all-reduces alternate slots
    try:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for rows in (1, 3, 128 if dtype != torch.float32 else 64):  # up to MAX_BYTES
                g = torch.Generator(device=dev).manual_seed(rows * 10 + rank)
                x = torch.randn(rows, 4096, generator=g, device=dev).to(dtype)
                residual = torch.randn(rows, 4096, generator=g, device=dev).to(dtype)
                parts = [torch.empty_like(x) for _ in range(world)]
                dist.all_gather(parts, x)
                want = sum(p.float() for p in parts).to(dtype)
                weight = torch.rand(4096, generator=g, device=dev).to(dtype)
                for _ in range(3):
                    assert torch.equal(ar(x, calls % 2), want), (dtype, rows)
                    fused = ar.rms_norm(x, weight, 1e-6, residual, (calls + 1) % 2)
                    unfused = rms_norm(want, weight, 1e-6, residual=residual)
                    assert all(torch.equal(a, b) for a, b in zip(fused, unfused, strict=True)), (dtype, rows)
                    calls += 2
        # captured in a CUDA graph: 40 all-reduces alternating slots, each feeding the next, replayed with new inputs
        x = torch.zeros(2, 4096, dtype=torch.float16, device=dev)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            y = x
            for i in range(40):
                y = ar(y * 0.5, i % 2)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = x
            for i in range(40):
                y = ar(y * 0.5, i % 2)
        for trial in range(5):
            g = torch.Generator(device=dev).manual_seed(trial * 7 + rank)
            x.copy_(torch.randint(-8, 8, x.shape, generator=g, device=dev).half() * 64)
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x)
            want = sum(p.float() for p in parts) * 0.5  # then x 0.5 x world per step: exact in fp16 here
            for _ in range(39):
                want = want * 0.5 * world
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y.float(), want), trial
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_one_shot_all_reduce_on_two_gpus():
    _ranks(_one_shot_worker, 2)


def _tp_engine_worker(rank: int, world: int, port: int, out: str) -> None:
    from qwen_trtllm.evaluation.benchmark import random_engine
    from qwen_trtllm.evaluation.teacher_forced import engine_logits
    from qwen_trtllm.runtime import LLM, SamplingParams
    from qwen_trtllm.runtime.distributed import leave_distributed

    dev = _init(rank, world, port)
    llm = LLM.from_engine(random_engine("tiny", "float32", str(dev), max_batch_size=4, max_input_len=32,
                                        max_output_len=16, rank=rank, world_size=world))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 17, 9)]
    logits = engine_logits(llm.executor, prompts, torch.randint(0, 1000, (3, 8), generator=g))
    assert llm.engine.model.ops.all_reduce.one_shot is not None  # set up at the first all-reduce
    greedy = llm.generate(prompts, SamplingParams(max_tokens=12, top_k=1, ignore_eos=True))
    torch.save({"logits": logits.cpu(), "greedy": [o.token_ids for o in greedy]}, f"{out}.{rank}")
    leave_distributed()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_parallel_engine_with_one_shot_all_reduce_matches_tp1(tmp_path):
    from qwen_trtllm.evaluation.benchmark import random_engine
    from qwen_trtllm.evaluation.teacher_forced import engine_logits
    from qwen_trtllm.runtime import LLM, SamplingParams

    _ranks(_tp_engine_worker, 2, str(tmp_path / "out"))
    results = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    llm = LLM.from_engine(random_engine("tiny", "float32", "cuda:0", max_batch_size=4, max_input_len=32,
                                        max_output_len=16))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 17, 9)]
    want = engine_logits(llm.executor, prompts, torch.randint(0, 1000, (3, 8), generator=g)).cpu()
    greedy = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=12, top_k=1, ignore_eos=True))]
    rel = (results[0]["logits"] - want).norm(dim=-1) / want.norm(dim=-1)
    assert rel.max() < 1e-5
    assert torch.equal(results[0]["logits"], results[1]["logits"])  # every rank the same bits
    assert results[0]["greedy"] == greedy and results[1]["greedy"] == []
