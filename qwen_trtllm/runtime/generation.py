"""Generation: batched prefill of right-padded prompts, then decode steps over a static KV cache.

The token loop never waits on the device: sampling runs there, stop checks are batched (one host read every
few steps), and on CUDA each decode step is a replayed CUDA graph (one per batch-size bucket).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from qwen_trtllm import QWenError
from qwen_trtllm.models.qwen.model import StepContext, ntk_alpha, rotary_inv_freq
from qwen_trtllm.profiling import nvtx_range
from qwen_trtllm.runtime.engine import Engine
from qwen_trtllm.runtime.sampling import SamplingConfig, sample

STOP_CHECK_EVERY = 8  # decode steps between host reads of the "all finished" flag
PREFILL_GRAPH_TOKENS = 16384  # longer prefills are GPU-bound and run eagerly


@dataclass
class GenerationOutput:
    output_ids: list[list[int]]  # per sequence: generated ids up to and including the first stop id
    sequences: Tensor  # int32 [B, max_input + max_new_tokens]: prompt + output, padded with end_id (CPU)
    input_lengths: list[int]


class GenerationSession:
    """A KV cache for max_batch_size x max_seq_len tokens on the engine's device, and the generate loop."""

    def __init__(self, engine: Engine, max_batch_size: int | None = None, max_seq_len: int | None = None,
                 use_triton: bool | None = None, cuda_graphs: bool | None = None):
        self.engine, cfg, build = engine, engine.config, engine.build
        self.max_batch = max_batch_size or build["max_batch_size"]
        self.max_input_len, self.max_output_len = build["max_input_len"], build["max_output_len"]
        self.max_seq = max_seq_len or self.max_input_len + self.max_output_len
        on_cuda = engine.device.type == "cuda"
        if use_triton is None:
            use_triton = on_cuda and build.get("kernels", {}).get("decode", "triton") == "triton"
        if use_triton:
            from qwen_trtllm.kernels import triton_available

            use_triton = triton_available(engine.device)
        self.use_triton = use_triton
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        heads = cfg.num_attention_heads // engine.world_size
        shape = (cfg.num_hidden_layers, self.max_batch, heads, self.max_seq, cfg.kv_channels)
        self.k_cache = torch.zeros(shape, dtype=engine.dtype, device=engine.device)
        self.v_cache = torch.zeros(shape, dtype=engine.dtype, device=engine.device)
        self._graphs: dict[tuple, GraphedStep] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    # --- one forward pass each ---------------------------------------------------------------------
    def prefill(self, tokens: Tensor, lengths: Tensor, inv_freq: Tensor) -> Tensor:
        """tokens [B, T] right-padded; returns the logits [B, V] at each prompt's last token.

        On CUDA, prompts of up to PREFILL_GRAPH_TOKENS tokens run as a CUDA graph per (batch, length) bucket:
        rows and columns of padding change nothing for the real tokens (causal attention, right padding)."""
        B, T = tokens.shape
        with nvtx_range("prefill"):
            bb, tb = _bucket(B, self.max_batch), _length_bucket(T, min(self.max_input_len, self.max_seq))
            if not self.cuda_graphs or bb * tb > PREFILL_GRAPH_TOKENS:
                return self._prefill_eager(tokens, lengths, inv_freq)
            padded = (_pad(tokens, (bb, tb), 0), _pad(lengths, (bb,), 1), _pad(inv_freq, (bb, inv_freq.shape[1]), 0))
            return self._graphed(("prefill", bb, tb), self._prefill_eager, padded)[:B]

    def _prefill_eager(self, tokens: Tensor, lengths: Tensor, inv_freq: Tensor) -> Tensor:
        B, T = tokens.shape
        positions = torch.arange(T, device=tokens.device)[None].expand(B, T)
        ctx = StepContext(positions, inv_freq, self.k_cache, self.v_cache, prefill=True, use_triton=self.use_triton)
        return self.engine.model(tokens, ctx, last_only=lengths - 1)[:, 0]

    def decode(self, tokens: Tensor, positions: Tensor, inv_freq: Tensor, attn_len: int) -> Tensor:
        """One new token per sequence at positions [B]; returns logits [B, V]."""
        if not self.cuda_graphs:
            return self._decode_eager(tokens, positions, inv_freq, attn_len)
        B, bb = tokens.shape[0], _bucket(tokens.shape[0], self.max_batch)
        padded = (_pad(tokens, (bb,), 0), _pad(positions, (bb,), 0), _pad(inv_freq, (bb, inv_freq.shape[1]), 0))
        step = lambda t, p, f: self._decode_eager(t, p, f, self.max_seq)
        return self._graphed(("decode", bb), step, padded)[:B]

    def _decode_eager(self, tokens: Tensor, positions: Tensor, inv_freq: Tensor, attn_len: int) -> Tensor:
        ctx = StepContext(positions[:, None], inv_freq, self.k_cache, self.v_cache, prefill=False,
                          seq_lens=(positions + 1).to(torch.int32), attn_len=attn_len, use_triton=self.use_triton)
        return self.engine.model(tokens[:, None], ctx)[:, 0]

    def _graphed(self, key: tuple, fn: Callable[..., Tensor], inputs: tuple[Tensor, ...]) -> Tensor:
        if key not in self._graphs:
            self._graphs[key] = GraphedStep(fn, inputs, self._pool)
        return self._graphs[key].run(*inputs)

    def prepare(self, batch_input_ids: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded tokens [B, T], lengths [B] and each sequence's rotary inv_freq (dynamic NTK from its prompt
        length) on the device. Padding repeats the row's first token: never attended to, and nothing new for the
        repetition-penalty set."""
        dev, cfg = self.engine.device, self.engine.config
        lens = [len(i) for i in batch_input_ids]
        tokens = torch.zeros((len(lens), max(lens)), dtype=torch.long)
        for b, ids in enumerate(batch_input_ids):
            tokens[b] = ids[0]
            tokens[b, : lens[b]] = torch.tensor(ids)
        alpha = torch.tensor([ntk_alpha(n, cfg.seq_length) if cfg.use_dynamic_ntk else 1.0 for n in lens], device=dev)
        return tokens.to(dev), torch.tensor(lens, device=dev), rotary_inv_freq(cfg, alpha)

    # --- the generate loop -------------------------------------------------------------------------
    def check_inputs(self, batch_input_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        if not batch_input_ids:
            raise QWenError("no input prompts given")
        if len(batch_input_ids) > self.max_batch:
            raise QWenError(f"{len(batch_input_ids)} prompts exceed the engine's max_batch_size {self.max_batch}: "
                            "pass fewer prompts or rebuild with a larger --max_batch_size")
        for ids in batch_input_ids:
            if not ids:
                raise QWenError("an input prompt is empty: give at least one token")
            if len(ids) > self.max_input_len:
                raise QWenError(f"a prompt of {len(ids)} tokens exceeds the engine's max_input_len "
                                f"{self.max_input_len}: shorten it or rebuild with a larger --max_input_len")
            if min(ids) < 0 or max(ids) >= self.engine.config.vocab_size:
                raise QWenError(f"token ids must lie in [0, {self.engine.config.vocab_size}): got {min(ids)}.."
                                f"{max(ids)}; is the tokenizer the engine's?")
        if not 0 < max_new_tokens <= self.max_output_len:
            raise QWenError(f"max_output_len {max_new_tokens} must be in 1..{self.max_output_len} (the engine's "
                            "limit): lower it or rebuild with a larger --max_output_len")
        if max(len(i) for i in batch_input_ids) + max_new_tokens > self.max_seq:
            raise QWenError(f"prompt + output exceed this session's KV cache of {self.max_seq} tokens")

    @torch.inference_mode()
    def generate(self, batch_input_ids: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingConfig | None = None, stop_ids: Sequence[int] = (), end_id: int = 151643,
                 streamer: Callable[[list[int]], None] | None = None) -> GenerationOutput:
        """Generate for a batch of prompts (lists of token ids). streamer, if given, is called after each step
        with the new token of every sequence (end_id for finished ones)."""
        sampling = sampling or SamplingConfig()
        sampling.validate()
        self.check_inputs(batch_input_ids, max_new_tokens)
        dev, cfg = self.engine.device, self.engine.config
        B, lens = len(batch_input_ids), [len(i) for i in batch_input_ids]
        tokens, lengths, inv_freq = self.prepare(batch_input_ids)
        gen = torch.Generator(device=dev).manual_seed(sampling.seed)
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=dev)
            seen.scatter_(1, tokens, True)
        stops = torch.tensor(sorted(set(stop_ids)) or [end_id], device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        out = torch.full((B, max_new_tokens), end_id, dtype=torch.long, device=dev)

        timer = StepTimer(dev)
        logits = self.prefill(tokens, lengths, inv_freq)
        timer.mark()
        for step in range(max_new_tokens):
            nxt = torch.where(finished, end_id, sample(logits, sampling, gen, seen))
            if self.engine.world_size > 1:  # every rank continues with rank 0's tokens
                torch.distributed.broadcast(nxt, src=0)
            out[:, step] = nxt
            finished |= torch.isin(nxt, stops)
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            if streamer is not None:
                streamer(nxt.tolist())
            if step == max_new_tokens - 1 or (step % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1 and finished.all()):
                break
            with nvtx_range(f"decode step {step}"):
                logits = self.decode(nxt, lengths + step, inv_freq, attn_len=max(lens) + step + 1)
        timer.mark()
        result = self._outputs(out[:, : step + 1].cpu(), batch_input_ids, stops.tolist(), end_id, max_new_tokens)
        self.last_timing = {"prefill_ms": timer.elapsed_ms(0, 1), "decode_ms": timer.elapsed_ms(1, 2),
                            "decode_steps": step}
        return result

    @staticmethod
    def _outputs(out: Tensor, prompts: Sequence[Sequence[int]], stops: list[int], end_id: int,
                 max_new_tokens: int) -> GenerationOutput:
        lens = [len(p) for p in prompts]
        seqs = torch.full((len(prompts), max(lens) + max_new_tokens), end_id, dtype=torch.int32)
        output_ids = []
        for b, row in enumerate(out.tolist()):
            kept = cut_after_stop(row, stops)
            output_ids.append(kept)
            seqs[b, : lens[b]] = torch.tensor(prompts[b], dtype=torch.int32)
            seqs[b, lens[b]: lens[b] + len(kept)] = torch.tensor(kept, dtype=torch.int32)
        return GenerationOutput(output_ids, seqs, lens)


class StepTimer:
    """Marks on the device's timeline (CUDA events; host clock on CPU), read once at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def elapsed_ms(self, a: int, b: int) -> float:
        if self.cuda:
            self.marks[b].synchronize()
            return self.marks[a].elapsed_time(self.marks[b])
        return (self.marks[b] - self.marks[a]) * 1e3


def _bucket(n: int, cap: int) -> int:
    return min(next((b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b >= n), n), max(cap, n))


def _length_bucket(n: int, cap: int) -> int:
    step = 32 if n <= 256 else 128
    return min(-(-n // step) * step, max(cap, n))


def _pad(x: Tensor, shape: tuple[int, ...], value: float) -> Tensor:
    if tuple(x.shape) == shape:
        return x
    out = torch.full(shape, value, dtype=x.dtype, device=x.device)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def cut_after_stop(ids: list[int], stop_ids) -> list[int]:
    """ids up to and including the first stop id (all of them when none occurs)."""
    return next((ids[: i + 1] for i, t in enumerate(ids) if t in stop_ids), ids)


class GraphedStep:
    """fn(*inputs) captured once in a CUDA graph over static input buffers of the bucket's shape; run() copies
    new inputs (already padded to that shape) in and replays. Padding rows write only to KV-cache rows that no
    real sequence of the call uses."""

    def __init__(self, fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], pool):
        self.inputs = tuple(x.clone() for x in inputs)
        stream = torch.cuda.Stream(inputs[0].device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton compilation, cuBLAS workspaces
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.inputs)

    def run(self, *inputs: Tensor) -> Tensor:
        for static, x in zip(self.inputs, inputs, strict=True):
            static.copy_(x)
        self.graph.replay()
        return self.output
