"""The scheduler: which requests run in the next step, and how many of their tokens (in-flight batching).

First come, first served, as TensorRT-LLM's capacity scheduler with chunked context and vLLM's scheduler:
1. every running request in decode gets its one token; when the pool has no block for it, the newest running
   request is preempted (its blocks freed; it goes back to the front of the waiting queue and is recomputed
   later from its prompt and the tokens it already produced);
2. running requests whose prompt is not fully in the cache get the next chunk from the token budget
   (max_num_tokens);
3. waiting requests are admitted, oldest first, while the batch has room (max_batch_size), the budget has tokens
   and the pool has blocks for their first chunk.
When every running request is in decode and no waiting request can take a batch slot (none waits, or the batch
is full), one schedule covers up to `num_scheduler_steps` decode steps (blocks reserved ahead, the window ending by
the first request's max_tokens), which the model runner runs without returning to the host in between. Under
load (a full batch with a queue behind it) this is most steps: one host round trip per window, not per step.
A beam-search request decodes one row per beam; each beam's block table shares the blocks of its ancestors, and
the block that receives a beam's next token is copied first when another beam shares it (copy-on-write). The
host picks the beams after every step, so such requests run one step per schedule.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qwen_trtllm.runtime.kv_cache import KVCacheManager
from qwen_trtllm.runtime.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """One scheduled step (or window of decode steps). decode: requests with one token each, in batch order;
    prefill: (request, number of prompt tokens this step) in batch order after the decodes."""

    decode: list[Request] = field(default_factory=list)
    prefill: list[tuple[Request, int]] = field(default_factory=list)
    num_steps: int = 1
    preempted: list[Request] = field(default_factory=list)
    block_copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src, dst, tokens) before the step

    @property
    def requests(self) -> list[Request]:
        return self.decode + [r for r, _ in self.prefill]

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    """Waiting and running queues over one KV cache manager."""

    def __init__(self, kv_cache: KVCacheManager, max_batch_size: int, max_num_tokens: int,
                 num_scheduler_steps: int = 1):
        self.kv = kv_cache
        self.max_batch_size, self.max_num_tokens = max_batch_size, max_num_tokens
        self.num_scheduler_steps = max(1, num_scheduler_steps)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is the first preempted

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request) -> None:
        """Take a request out of the queues and give its blocks back (finished, cancelled or failed)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._free_blocks(request)

    def _free_blocks(self, request: Request) -> None:
        for table in request.block_tables():
            self.kv.free(table)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self._free_blocks(request)
        if request.is_beam_search:
            request.restart()
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_tokens
        decoding = [r for r in self.running if not r.in_prefill]
        steps = 1
        beams = any(r.is_beam_search for r in self.running)
        # a window of decode steps when no request can be admitted before its end: none waits, or the batch is
        # full (a slot frees only when a request finishes, and the window ends by the first max_tokens)
        admissible = self.waiting and len(self.running) < self.max_batch_size
        if not admissible and len(decoding) == len(self.running) and self.running and not beams:
            left = min(r.params.max_tokens - len(r.output_token_ids) for r in self.running)
            steps = max(1, min(self.num_scheduler_steps, left))
            need = sum(self.kv.blocks_for(r.num_tokens + steps - 1) - len(r.block_ids) for r in self.running)
            if need > self.kv.pool.num_free:
                steps = 1
        # 1. decode tokens, preempting the newest requests when blocks run out
        for r in list(self.running):  # a request preempted earlier in this loop is WAITING (no O(n) list lookups)
            if r.in_prefill or r.status is not RequestStatus.RUNNING:
                continue
            while self._decode_cost(r, steps) > self.kv.pool.num_free:
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is r:
                    break
            if r.status is RequestStatus.RUNNING:
                out.block_copies += self._reserve_decode(r, steps)
                out.decode.append(r)
                budget -= max(len(r.beams), 1)
        # 2. the next chunk of running requests still in prefill, then 3. admission of waiting requests
        for r in [r for r in self.running if r.in_prefill]:
            if budget <= 0:
                break
            n = self._chunk(r, budget)
            if n:
                out.prefill.append((r, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            r = self.waiting[0]
            n = self._chunk(r, budget)
            if not n:
                break
            self.waiting.popleft()
            r.status = RequestStatus.RUNNING
            self.running.append(r)
            out.prefill.append((r, n))
            budget -= n
        out.num_steps = steps if not out.prefill else 1
        return out

    def _decode_cost(self, r: Request, steps: int) -> int:
        """Free blocks r's next decode step(s) take (a beam search: every beam's)."""
        if r.beams:
            return sum(self.kv.append_cost(b.block_ids, r.num_tokens) for b in r.beams)
        return max(self.kv.blocks_for(r.num_tokens + steps - 1) - len(r.block_ids), 0)

    def _reserve_decode(self, r: Request, steps: int) -> list[tuple[int, int, int]]:
        """Blocks for r's decode step(s); the copy-on-write block copies its beams need first."""
        if not r.beams:
            self.kv.grow(r.block_ids, r.num_tokens + steps - 1)
            return []
        return [c for b in r.beams for c in self.kv.append(b.block_ids, r.num_tokens)]

    def _chunk(self, r: Request, budget: int) -> int:
        """Tokens of r's prompt to compute next (allocating their blocks), 0 when no block is free."""
        n = min(r.num_tokens - r.num_computed_tokens, budget)
        while n > 0 and not self.kv.can_grow(r.block_ids, r.num_computed_tokens + n):
            # fewer tokens, down to whatever the free blocks and the last partial block hold
            n = min(n - 1, (len(r.block_ids) + self.kv.pool.num_free) * self.kv.tokens_per_block
                    - r.num_computed_tokens)
        if n > 0:
            self.kv.grow(r.block_ids, r.num_computed_tokens + n)
        return max(n, 0)
