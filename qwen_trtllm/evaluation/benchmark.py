"""Speed measurement in TensorRT-LLM's benchmark conventions: time to first token, decode ms/token, tokens/s,
percentage of the measured copy bandwidth, peak memory; Hugging Face eager on the same weights alongside.

Timings come from the in-flight batching executor itself: a batch of requests submitted together (greedy, no
stop tokens), TTFT = until every request has its first token, decode = the host time of the decode-only steps
(CUDA-graph replays, sampling, the one host read per window of steps) per step; median over runs after warm-up.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch

from qwen_trtllm import QWenError
from qwen_trtllm.builder.build import runtime_weights_from_hf
from qwen_trtllm.builder.engine_format import DTYPES, BuildConfig, QuantizationConfig
from qwen_trtllm.checkpoint.random_checkpoint import PRESETS, random_tensor
from qwen_trtllm.config import QWenConfig
from qwen_trtllm.dtypes import dtype_name
from qwen_trtllm.models.qwen.weights import engine_to_qwen2, hf_shapes
from qwen_trtllm.runtime.engine import Engine, check_kv_cache_supported, model_skeleton, use_triton_kernels
from qwen_trtllm.runtime.executor import ExecutorConfig
from qwen_trtllm.runtime.kv_cache import KvCacheConfig, KVCacheManager
from qwen_trtllm.runtime.llm import LLM
from qwen_trtllm.runtime.request import SamplingParams


@dataclass
class BenchRow:
    backend: str
    batch: int
    input_len: int
    output_len: int
    ttft_ms: float
    decode_ms_per_token: float
    tokens_per_s: float
    bandwidth_pct: float
    peak_mem_gb: float


def random_engine(preset: str, dtype: str = "float16", device: str = "cuda", max_batch_size: int = 64,
                  max_input_len: int = 2048, max_output_len: int = 128, seed: int = 0,
                  kernels: str = "triton", kv_cache_dtype: str = "auto", rank: int = 0,
                  world_size: int = 1) -> Engine:
    """An engine with random weights of a named shape, created directly on the device (no checkpoint files);
    kv_cache_dtype as build.py's --int8_kv_cache / --fp8_kv_cache ("int8" / "fp8").

    The weights are the random checkpoints' (random_tensor per Hugging Face name, drawn in file order from one
    generator seeded with `seed`), split for tensor-parallel rank `rank` of `world_size` as build.py splits a
    checkpoint: every rank draws every full tensor and keeps its shard, so the ranks together hold the tp 1 model.
    """
    shape = PRESETS[preset]
    config = QWenConfig(**shape)
    config.check_tensor_parallel(world_size)
    dtype = dtype_name(dtype, flag="--dtype")
    gen = torch.Generator(device=device).manual_seed(seed)
    hf_shape = hf_shapes(config.hidden_size, config.vocab_size, config.ffn_hidden_size, config.num_hidden_layers)

    def draw(name: str) -> torch.Tensor:  # called once per name, in file order
        return random_tensor(name, hf_shape[name], gen, device).to(DTYPES[dtype])

    with torch.no_grad():
        state = {k: v.clone() for k, v in runtime_weights_from_hf(draw, config, rank, world_size).items()}
    model = model_skeleton(config, world_size, None)
    model.load_state_dict(state, assign=True)
    model.eval().requires_grad_(False).set_kernels(kernels == "triton")
    build = BuildConfig(dtype, world_size=world_size, max_batch_size=max_batch_size, max_input_len=max_input_len,
                        max_output_len=max_output_len, kernels=kernels, kv_cache_dtype=kv_cache_dtype)
    check_kv_cache_supported(kv_cache_dtype, torch.device(device), kernels == "triton")
    return Engine(engine_dir=None, config=config, build=build, model=model, device=torch.device(device),
                  dtype=DTYPES[dtype], rank=rank, world_size=world_size)


def quantized_engine(engine: Engine, precision: str, group_size: int = 128, quantize_lm_head: bool = False) -> Engine:
    """A quantised copy of an engine (the original is kept), as build.py --use_weight_only (precision int8 / int4)
    or --use_fp8 (precision fp8) makes."""
    from qwen_trtllm.quantization import quantize_state_dict

    if precision == "fp8":
        from qwen_trtllm.quantization.fp8 import check_fp8_supported

        check_fp8_supported(engine.device)

    build = replace(engine.build, quantization=QuantizationConfig(precision, group_size, quantize_lm_head))
    state = engine.model.state_dict()
    quantized = quantize_state_dict(state, precision, group_size, quantize_lm_head)
    if engine.device.type == "cuda":
        # The new tensors are made again after the quantiser's temporaries went back to the device: left where they
        # were made, they pin the temporaries' cached segments (30 GiB for int8 7B on an H200), which the KV cache
        # pool, sized from the device's free memory, then cannot take.
        made = {k: v.cpu() for k, v in quantized.items() if v is not state.get(k)}
        quantized.update({k: None for k in made})
        torch.cuda.empty_cache()
        quantized.update({k: v.to(engine.device) for k, v in made.items()})
    model = model_skeleton(engine.config, engine.world_size, build.quantization)
    model.load_state_dict(quantized, assign=True)
    model.set_kernels(use_triton_kernels(build, engine.device))
    return Engine(engine.engine_dir, engine.config, build, model.eval(), engine.device, engine.dtype, engine.rank,
                  engine.world_size)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written (median of 10)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    del a, b
    return 2 * nbytes / (statistics.median(times[2:]) * 1e-3) / 1e9


def decode_step_bytes(engine: Engine, batch: int, context: int) -> int:
    """Fewest bytes one decode step must move: every weight but the embedding table, plus the KV cache read."""
    weights = sum(t.numel() * t.element_size() for n, t in engine.model.state_dict().items() if n != "embed.weight")
    return weights + kv_cache_bytes(engine, batch, context)


def static_batch_kv_tokens(batch: int, seq_len: int, tokens_per_block: int) -> int:
    """KV cache tokens a static batch of `batch` sequences of seq_len tokens takes: whole blocks per sequence."""
    return batch * -(-seq_len // tokens_per_block) * tokens_per_block


def static_batch_llm(engine: Engine, batch: int, input_len: int, output_len: int,
                     tokens_per_block: int = 64) -> LLM:
    """An LLM sized for one static batch: `batch` requests of input_len prompt tokens and output_len output tokens,
    every prompt in one prefill step (max_num_tokens = batch x input_len), a KV cache of exactly their blocks."""
    seq = input_len + output_len
    kv = KvCacheConfig(max_tokens=static_batch_kv_tokens(batch, seq, tokens_per_block),
                       tokens_per_block=tokens_per_block)
    llm = LLM.from_engine(engine, config=ExecutorConfig(max_batch_size=batch, max_num_tokens=batch * input_len,
                                                        max_seq_len=seq, kv_cache=kv))
    llm.executor.max_input_len, llm.executor.max_output_len = input_len, output_len
    return llm


def bench_engine(engine: Engine, batch: int, input_len: int, output_len: int, runs: int = 3,
                 copy_gbs: float | None = None) -> BenchRow:
    """A static batch through the in-flight batching runtime: `batch` requests of input_len submitted together,
    all prompts in one prefill step (max_num_tokens = batch x input_len), output_len tokens each. Tensor parallel:
    every rank calls this, rank 0 times and returns the row, the other ranks follow its steps and return a row
    of NaN.

    QWenError (on every rank: the ranks agree on the pool) when the KV cache pool, sized from the free device
    memory less the prefill's activation reserve, cannot hold the whole batch: the requests would run in waves
    and decode ms/token would count the later waves' prefill and decode too. RuntimeError if a prefill step
    leaves a request without its first token (a scheduler bug)."""
    dev = engine.device
    llm = static_batch_llm(engine, batch, input_len, output_len)  # QWenError: not one block fits
    ex = llm.executor
    kv, seq = ex.kv_cache, input_len + output_len
    needed = static_batch_kv_tokens(batch, seq, kv.tokens_per_block)
    if kv.max_tokens < needed:
        tokens, tpb = kv.max_tokens, kv.tokens_per_block
        release(llm)
        raise QWenError(f"the KV cache holds {tokens} tokens, {batch} x {seq} needs {needed} in {tpb}-token blocks, "
                        f"beside the weights and a {batch * input_len}-token prefill's activations: lower --batch_size")
    g = torch.Generator().manual_seed(batch * 1000 + input_len)
    prompts = torch.randint(0, engine.config.vocab_size, (batch, input_len), generator=g).tolist()
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    torch.cuda.reset_peak_memory_stats(dev)
    ttfts, per_step, totals = [], [], []
    for i in range(runs + 1):  # the first run warms up (CUDA graph capture, Triton compilation)
        if engine.rank != 0:  # tensor parallel: follow rank 0's steps; rank 0 alone times and reports
            ex.worker_loop()
            continue
        reqs = [ex.add_request(p, params) for p in prompts]
        t0 = time.perf_counter()
        ex.step()  # the prefill step
        t1 = time.perf_counter()
        if any(len(r.output_token_ids) != 1 for r in reqs):  # TTFT and decode ms/token would mix waves
            raise RuntimeError(f"the prefill step gave {sum(len(r.output_token_ids) == 1 for r in reqs)} of {batch} "
                               "requests their first token although the KV cache holds them all: a scheduler bug")
        while ex.has_work:
            ex.step()
        t2 = time.perf_counter()
        ex.end_of_work()  # releases the other ranks' worker loops
        assert all(len(r.output_token_ids) == output_len for r in reqs)
        if i:
            ttfts.append((t1 - t0) * 1e3)
            per_step.append((t2 - t1) * 1e3 / max(output_len - 1, 1))
            totals.append(t2 - t0)
    if engine.rank != 0:
        release(llm)
        return BenchRow("engine", batch, input_len, output_len, *[float("nan")] * 5)
    ttft, per_tok = statistics.median(ttfts), statistics.median(per_step)
    bw = decode_step_bytes(engine, batch, input_len + output_len // 2) / (per_tok * 1e-3) / 1e9
    q = engine.build.quantization
    quant = "" if q is None else q.precision + ("+lm_head" if q.quantize_lm_head else "")
    if engine.build.kv_cache_dtype != "auto":
        quant += ("+" if quant else "") + engine.build.kv_cache_dtype + "_kv"
    if engine.world_size > 1:
        quant += ("+" if quant else "") + f"tp{engine.world_size}"
    row = BenchRow(f"engine-{quant}" if quant else "engine", batch, input_len, output_len, ttft, per_tok,
                   batch * output_len / statistics.median(totals),
                   100 * bw / copy_gbs if copy_gbs else float("nan"), torch.cuda.max_memory_allocated(dev) / 2**30)
    release(llm)
    return row


def release(llm: LLM) -> None:
    """Free an LLM's KV cache and CUDA graphs (they hold reference cycles through the captured steps)."""
    llm.executor.runner.release()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def kv_cache_bytes(engine: Engine, batch: int, seq_len: int) -> int:
    """Bytes of this rank's K and V caches (the engine's KV cache format, scales included) for batch x seq_len
    tokens."""
    cfg = engine.config
    per_token = KVCacheManager.bytes_per_block(cfg.num_hidden_layers, cfg.num_attention_heads // engine.world_size,
                                               cfg.kv_channels, 1, engine.dtype, engine.build.kv_cache_dtype)
    return batch * seq_len * per_token


def hf_model_sharing_weights(engine: Engine):
    """transformers' Qwen2ForCausalLM over the engine's own weight tensors (views, no copy); tp = 1 only."""
    from qwen_trtllm.models.qwen.reference import qwen2_from_state

    cfg = engine.config
    hf = engine_to_qwen2(engine.model.state_dict(), cfg.num_hidden_layers)
    return qwen2_from_state(cfg, hf, engine.device)


@torch.inference_mode()
def bench_hf(model, batch: int, input_len: int, output_len: int, copy_gbs: float | None,
             step_bytes: int) -> BenchRow:
    """Hugging Face eager generate (greedy, no early stop): TTFT from a 1-token generate, decode from the rest."""
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, input_len), device=dev)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n: int) -> float:
        torch.cuda.synchronize(dev)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize(dev)
        return (time.perf_counter() - t) * 1e3

    torch.cuda.reset_peak_memory_stats(dev)
    timed(2)  # warm-up
    ttft = timed(1)
    per_tok = (timed(output_len) - ttft) / (output_len - 1)
    total_s = (ttft + per_tok * (output_len - 1)) / 1e3
    bw = step_bytes / (per_tok * 1e-3) / 1e9
    return BenchRow("hf-eager", batch, input_len, output_len, ttft, per_tok, batch * output_len / total_s,
                    100 * bw / copy_gbs if copy_gbs else float("nan"), torch.cuda.max_memory_allocated(dev) / 2**30)


def format_table(rows: list[BenchRow]) -> str:
    w = max([10] + [len(r.backend) for r in rows])
    head = f"{'backend':<{w}} {'batch':>5} {'in':>5} {'out':>4} {'TTFT ms':>8} {'ms/token':>9} {'tokens/s':>9} " \
           f"{'%copyBW':>8} {'peak GB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.backend:<{w}} {r.batch:>5} {r.input_len:>5} {r.output_len:>4} {r.ttft_ms:>8.2f} "
                     f"{r.decode_ms_per_token:>9.3f} {r.tokens_per_s:>9.1f} {r.bandwidth_pct:>8.1f} "
                     f"{r.peak_mem_gb:>8.2f}")
    return "\n".join(lines)


def rows_to_json(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
