"""The executor: the in-flight batching loop around the scheduler, KV cache manager, model runner and sampler.

Each `step()` cancels what clients cancelled, asks the scheduler for a batch (decode tokens of running requests
plus prefill chunks from the token budget), runs it, and hands every request its new tokens; finished,
cancelled and failed requests give their KV cache blocks back at once. Rank 0 decides; under tensor
parallelism every other rank runs `worker_loop()`, which executes the plans rank 0 broadcasts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from qwen_trtllm import QWenError
from qwen_trtllm.models.qwen.model import sequence_ntk_alpha
from qwen_trtllm.runtime.distributed import min_over_ranks
from qwen_trtllm.runtime.engine import Engine, use_triton_kernels
from qwen_trtllm.runtime.kv_cache import KvCacheConfig, KVCacheManager, pool_size_in_blocks
from qwen_trtllm.runtime.model_runner import BeamGroup, ModelRunner, StepOutput, StepPlan
from qwen_trtllm.runtime.request import (
    NON_FINITE_LOGITS,
    Beam,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
)
from qwen_trtllm.runtime.sampler import NON_FINITE
from qwen_trtllm.runtime.scheduler import Scheduler, SchedulerOutput

_IDLE = "idle"  # what rank 0 broadcasts when a generate call ends (workers return from worker_loop)
_BEAM_ROW = SamplingParams()  # a beam's row in the sampler: plain argmax (beam search reads the logits itself)


@dataclass(frozen=True)
class ExecutorConfig:
    """Runtime limits (TensorRT-LLM's names). None: the engine's build values (max_batch_size, max_num_tokens,
    max_input_len + max_output_len). num_scheduler_steps: decode steps run back to back when no waiting request can
    take a batch slot."""

    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    max_seq_len: int | None = None
    kv_cache: KvCacheConfig = field(default_factory=KvCacheConfig)
    num_scheduler_steps: int = 16
    cuda_graphs: bool | None = None


class Executor:
    def __init__(self, engine: Engine, config: ExecutorConfig | None = None, tokenizer=None):
        config = config or ExecutorConfig()
        for name in ("max_batch_size", "max_num_tokens", "max_seq_len"):
            v = getattr(config, name)
            if v is not None and v < 1:
                raise QWenError(f"--{name} must be >= 1, got {v}: leave it out for the engine's value")
        self.engine, self.tokenizer = engine, tokenizer
        build, cfg = engine.build, engine.config
        self.max_batch_size = config.max_batch_size or build.max_batch_size
        self.max_input_len, self.max_output_len = build.max_input_len, build.max_output_len
        self.max_seq_len = config.max_seq_len or self.max_input_len + self.max_output_len
        self.max_num_tokens = config.max_num_tokens or build.max_num_tokens
        kv = config.kv_cache
        if kv == KvCacheConfig():
            kv = KvCacheConfig(tokens_per_block=build.tokens_per_block)
        heads = cfg.num_attention_heads // engine.world_size
        per_block = KVCacheManager.bytes_per_block(cfg.num_hidden_layers, heads, cfg.kv_channels,
                                                   kv.tokens_per_block, engine.dtype, build.kv_cache_dtype)
        default_tokens = self.max_batch_size * -(-self.max_seq_len // kv.tokens_per_block) * kv.tokens_per_block
        blocks = pool_size_in_blocks(kv, per_block, engine.device, default_tokens, reserve=self.activation_bytes())
        if engine.world_size > 1:  # every rank must hold the same pool: the smallest
            blocks = min_over_ranks(blocks, engine.device)
        self.kv_cache = KVCacheManager(cfg.num_hidden_layers, heads, cfg.kv_channels, blocks, kv.tokens_per_block,
                                       engine.dtype, engine.device, use_triton_kernels(build, engine.device),
                                       build.kv_cache_dtype)
        self.scheduler = Scheduler(self.kv_cache, self.max_batch_size, self.max_num_tokens,
                                   config.num_scheduler_steps)
        self.runner = ModelRunner(engine, self.kv_cache, self.max_batch_size, self.max_seq_len, config.cuda_graphs)
        self._free_slots = list(range(self.max_batch_size - 1, -1, -1))
        self._slot: dict[int, int] = {}
        self.stats = {"steps": 0, "preemptions": 0, "max_blocks_used": 0, "block_copies": 0}

    def activation_bytes(self) -> int:
        """An upper estimate of one step's transient memory, kept free of the KV cache: per token of
        max_num_tokens the qkv, attention, gate/up, SiLU and residual activations (x2 for the allocator), per
        sequence of max_batch_size the float32 logits and the sampler's sort (values, int64 indices, probs, cdf)."""
        cfg, tp = self.engine.config, self.engine.world_size
        esize = torch.finfo(self.engine.dtype).bits // 8
        per_token = (8 * cfg.hidden_size + 3 * cfg.ffn_hidden_size // tp) * esize
        return 2 * self.max_num_tokens * per_token + self.max_batch_size * cfg.vocab_size * 24 + (1 << 30)

    def kv_cache_report(self) -> str:
        kv = self.kv_cache
        fmt = "" if kv.kv_cache_dtype == "auto" else f", {kv.kv_cache_dtype} + a scale per token and head"
        return (f"KV cache: {kv.num_blocks - 1} blocks x {kv.tokens_per_block} tokens = {kv.max_tokens} tokens "
                f"({kv.nbytes / 2**30:.2f} GiB{fmt}) on {self.engine.device}")

    # --- requests in -------------------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise QWenError when a request can never run on this engine (one line naming the fix)."""
        params.validate()
        ids, vocab = prompt_token_ids, self.engine.config.vocab_size
        if not ids:
            raise QWenError("an input prompt is empty: give at least one token")
        if len(ids) > self.max_input_len:
            raise QWenError(f"a prompt of {len(ids)} tokens exceeds the engine's max_input_len "
                            f"{self.max_input_len}: shorten it or rebuild with a larger --max_input_len")
        if min(ids) < 0 or max(ids) >= vocab:
            raise QWenError(f"token ids must lie in [0, {vocab}): got {min(ids)}..{max(ids)}; "
                            "is the tokenizer the engine's?")
        if params.max_tokens > self.max_output_len:
            raise QWenError(f"max_tokens (--max_output_len) {params.max_tokens} must be in 1..{self.max_output_len} "
                            "(the engine's limit): lower it or rebuild with a larger --max_output_len")
        total = len(ids) + params.max_tokens
        if total > self.max_seq_len:
            raise QWenError(f"prompt + output ({total} tokens) exceed max_seq_len {self.max_seq_len}")
        width = params.beam_width
        if width * self.kv_cache.blocks_for(total) > self.kv_cache.num_blocks - 1:
            beams = f" x {width} beams" if width > 1 else ""
            raise QWenError(f"prompt + output ({total} tokens{beams}) exceed the KV cache ({self.kv_cache.max_tokens} "
                            "tokens): raise --kv_cache_free_gpu_mem_fraction or lower the lengths")

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                    on_output: Callable[[RequestOutput], None] | None = None) -> Request:
        """Queue a request (validated first); on_output is called on this thread after each of its steps."""
        ids = [int(t) for t in prompt_token_ids]
        self.check_request(ids, params)
        r = Request(ids, params, on_output)
        r.ntk_alpha = sequence_ntk_alpha(self.engine.config, len(ids))
        self.scheduler.add(r)
        return r

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # --- one step ----------------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one scheduled step (or window of decode steps); returns the requests that finished in it."""
        finished = [r for r in self.scheduler.running + list(self.scheduler.waiting) if r.cancel_requested]
        for r in finished:
            self._finish(r, "cancelled")
        sched = self.scheduler.schedule()
        self.stats["preemptions"] += len(sched.preempted)
        for r in sched.preempted:
            self._release_slot(r)
        if not sched:
            return finished
        plan, new_rows, slots, params, groups = self._plan(sched)
        self.stats["steps"] += plan.num_steps
        self.stats["block_copies"] += len(plan.block_copies)
        self.stats["max_blocks_used"] = max(self.stats["max_blocks_used"], self.kv_cache.pool.num_used)
        try:
            if self.engine.world_size > 1:
                dist.broadcast_object_list([plan], src=0)
            out = self.runner.execute(plan, params, new_rows, slots, groups)
        except Exception as e:
            for r in sched.requests:
                self._finish(r, "error", error=str(e))
            raise
        return finished + self._update(sched, out)

    def _plan(self, sched: SchedulerOutput) -> tuple[StepPlan, list, list[int], list[SamplingParams],
                                                     list[BeamGroup]]:
        """The step's rows (a beam search's decode: one per beam) and what rank 0 samples them with."""
        ids, pos, qlens, ctx, tables, alphas, counters, new_rows, slots, params, groups = ([] for _ in range(11))

        def row(r: Request, table: list[int]) -> None:
            ctx.append(r.num_computed_tokens)
            tables.append(list(table))
            alphas.append(r.ntk_alpha)
            counters.append(len(r.output_token_ids))
            slots.append(self._slot[r.request_id])
            params.append(_BEAM_ROW if r.is_beam_search else r.params)

        for r in sched.decode:
            if r.beams:
                groups.append(self._beam_group(r, len(ids), [b.logprob for b in r.beams]))
            for tokens, table in [(b.token_ids, b.block_ids) for b in r.beams] or [(r.output_token_ids, r.block_ids)]:
                ids.append(tokens[-1])
                pos.append(r.num_tokens - 1)
                qlens.append(1)
                row(r, table)
        for r, n in sched.prefill:
            start = r.num_computed_tokens
            ids += r.all_token_ids[start: start + n]
            pos += range(start, start + n)
            qlens.append(n)
            if r.request_id not in self._slot:
                self._slot[r.request_id] = self._free_slots.pop()
            if start + n == r.num_tokens and r.is_beam_search:
                groups.append(self._beam_group(r, len(qlens) - 1, [0.0]))
            elif start + n == r.num_tokens and r.params.repetition_penalty != 1.0:
                new_rows.append((self._slot[r.request_id], r.all_token_ids))
            row(r, r.block_ids)
        plan = StepPlan(ids, pos, qlens, ctx, tables, alphas, counters, len(qlens) - len(sched.prefill),
                        sched.num_steps, sched.block_copies)
        return plan, new_rows, slots, params, groups

    def _beam_group(self, r: Request, first_row: int, logprobs: list[float]) -> BeamGroup:
        return BeamGroup(first_row, logprobs, r.num_beam_candidates)

    def _update(self, sched: SchedulerOutput, out: StepOutput) -> list[Request]:
        now, done, row, group = time.perf_counter(), [], 0, 0
        tokens = out.tokens
        for i, r in enumerate(sched.requests):
            first = row
            if i < len(sched.decode):
                row += max(len(r.beams), 1)
                new = [tokens[k][first] for k in range(len(tokens))]
            else:
                row += 1
                n = sched.prefill[i - len(sched.decode)][1]
                r.num_computed_tokens += n
                if r.num_computed_tokens < r.num_tokens:  # a chunk inside the prompt: nothing sampled
                    continue
                r.num_computed_tokens -= 1  # the newest token's K and V come with the next step
                new = [tokens[0][first]]
            if r.first_token_time is None:
                r.first_token_time = now
            if r.is_beam_search:
                reason = self._update_beams(r, [tokens[0][j] for j in range(first, row)], out.beam_logprobs[group],
                                            out.beam_indices[group], now)
                group += 1
            else:
                reason = self._update_tokens(r, new, now)
            if reason:
                done.append(r)
        return done

    def _update_tokens(self, r: Request, new: list[int], now: float) -> str | None:
        """Append a request's new tokens up to a stop; finish it (its reason returned) or report its progress."""
        reason = None
        for t in new:
            if t == NON_FINITE:  # the sampler's mark: this request's logits overflowed; the others go on
                reason = "error"
                break
            r.num_computed_tokens += 1
            r.output_token_ids.append(t)
            r.token_times.append(now)
            reason = self._stop_reason(r, t)
            if reason:
                break
        if reason == "error":
            self._fail_non_finite(r)
        elif reason:
            self._finish(r, reason)
        else:
            self._notify(r)
        return reason

    def _update_beams(self, r: Request, tokens: list[int], logprobs: list[float], indices: list[int],
                      now: float) -> str | None:
        """A beam-search request after a step (tokens: its rows' sampler marks); its finish reason when done."""
        if NON_FINITE in tokens:
            self._fail_non_finite(r)
            return "error"
        reason = self._beam_step(r, logprobs, indices, now)
        if reason:
            self._finish(r, reason)
        return reason

    def _beam_step(self, r: Request, logprobs: list[float], indices: list[int], now: float) -> str | None:
        """One step of Hugging Face's beam search (transformers GenerationMixin._beam_search, early-stop
        heuristic included) over the step's k best continuations of r's beams: candidates among the first
        beam-width that end (stop id or max_tokens) become done hypotheses scored logprob / length **
        length_penalty; the best beam-width that do not end run on, each taking a share of its parent's blocks.
        Returns the finish reason when the search is over (r's outputs: its best hypotheses), else None."""
        p, width, vocab = r.params, r.params.beam_width, self.engine.config.vocab_size
        parents = r.beams or [Beam([], r.block_ids, 0.0)]
        length = len(parents[0].token_ids) + 1
        k = r.num_beam_candidates  # the step's candidates: the first k (the batch's widest group may have more)
        cands = [(v, parents[j // vocab], j % vocab) for v, j in zip(logprobs[:k], indices[:k], strict=True)]
        ends = [length >= p.max_tokens or t in r.stop_ids for _, _, t in cands]
        if r.beam_can_improve and not (p.early_stopping is True and len(r.beam_hyps) == width):
            norm = np.float32(length ** p.length_penalty)
            r.beam_hyps += [(float(np.float32(v) / norm), b.token_ids + [t])
                            for (v, b, t), end in zip(cands[:width], ends[:width], strict=True) if end]
            r.beam_hyps.sort(key=lambda h: -h[0])
            del r.beam_hyps[width:]
        running = [c for c, end in zip(cands, ends, strict=True) if not end][:width]
        r.beams = []
        for v, b, t in running:
            self.kv_cache.pool.share(b.block_ids)
            r.beams.append(Beam(b.token_ids + [t], list(b.block_ids), v))
        for b in parents:
            self.kv_cache.free(b.block_ids)
        if running:
            horizon = p.max_tokens if p.early_stopping == "never" and p.length_penalty > 0 else length
            best = np.float32(running[0][0]) / np.float32(horizon ** p.length_penalty)
            r.beam_can_improve &= len(r.beam_hyps) < width or bool(best > r.beam_hyps[-1][0])
        r.num_computed_tokens += 1
        r.token_times.append(now)
        if r.beam_can_improve and running and not (p.early_stopping is True and len(r.beam_hyps) == width):
            r.output_token_ids[:] = r.beams[0].token_ids
            return None
        r.output_token_ids[:] = r.beam_hyps[0][1]
        return "stop" if r.output_token_ids[-1] in r.stop_ids else "length"

    def _fail_non_finite(self, r: Request) -> None:
        """End r with the non-finite-logits error at its next output token (the others go on)."""
        self._finish(r, "error", self.non_finite_message(len(r.output_token_ids) + 1), NON_FINITE_LOGITS)

    def non_finite_message(self, index: int) -> str:
        """The error of a request whose logits held NaN or inf at its index-th output token (1-based)."""
        if self.engine.dtype == torch.float16:
            return (f"non-finite logits (fp16 overflow?) at output token {index}: rebuild the engine with "
                    "--dtype bfloat16")
        return (f"non-finite logits at output token {index} of a {str(self.engine.dtype)[6:]} engine: the weights "
                "hold NaN/inf or overflow; check them with examples/qwen/compare_layers.py")

    def _notify(self, r: Request) -> None:
        """Hand r's snapshot to its on_output; a callback that raises fails that request alone."""
        if r.on_output is None:
            return
        try:
            r.on_output(r.snapshot())
        except Exception as e:  # the caller's code: its request ends with the error, the loop goes on
            if not r.finished:
                r.on_output, cb = None, r.on_output
                self._finish(r, "error", error=f"{type(e).__name__}: {e}")
                try:
                    cb(r.snapshot())
                except Exception:
                    pass

    def _stop_reason(self, r: Request, token: int) -> str | None:
        if token in r.stop_ids:
            return "stop"
        if r.params.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(r.output_token_ids)
            if any(s in text for s in r.params.stop):  # the text itself is cut by the caller's IncrementalText
                return "stop"
        if len(r.output_token_ids) >= r.params.max_tokens:
            return "length"
        return None

    def _finish(self, r: Request, reason: str, error: str | None = None, error_code: str | None = None) -> None:
        if r.finished:
            return
        self.scheduler.finish(r)
        self._release_slot(r)
        r.status, r.finish_reason, r.error, r.error_code = RequestStatus.FINISHED, reason, error, error_code
        self._notify(r)

    def _release_slot(self, r: Request) -> None:
        slot = self._slot.pop(r.request_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    # --- whole runs --------------------------------------------------------------------------------------
    def run_until_done(self) -> None:
        """Step until no request waits or runs; then release the other ranks' worker loops."""
        try:
            while self.has_work:
                self.step()
        finally:
            self.end_of_work()

    def end_of_work(self) -> None:
        if self.engine.world_size > 1 and self.engine.rank == 0:
            dist.broadcast_object_list([_IDLE], src=0)

    def worker_loop(self) -> None:
        """Ranks other than 0: run every plan rank 0 broadcasts, until it says the work is done."""
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] == _IDLE:
                return
            self.runner.execute(box[0])
