"""The model runner: turns a scheduled step into the model's flat inputs and attention metadata, runs it (decode
steps as CUDA graphs per batch-size bucket), samples, and returns the new tokens.

A `StepPlan` is everything a step needs, in host lists: the scheduler fills it on rank 0, and under tensor
parallelism it is broadcast so every rank runs the same step (rank 0 samples; its tokens are broadcast).
A plan of decode tokens only may cover `num_steps` steps: the sampled tokens feed the next step on the device
and the host reads all of them once at the end (blocks for every step were reserved by the scheduler).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from qwen_trtllm.models.qwen.model import AttentionMetadata, rotary_inv_freq
from qwen_trtllm.profiling import nvtx_range
from qwen_trtllm.runtime.engine import Engine
from qwen_trtllm.runtime.kv_cache import NULL_BLOCK, KVCacheManager
from qwen_trtllm.runtime.request import SamplingParams
from qwen_trtllm.runtime.sampler import SamplingTensors, beam_candidates, sample_checked

PREFILL_GRAPH_TOKENS = 2048  # longer prefill chunks are GPU-bound and run eagerly
PREFILL_GRAPH_STEP = 64  # prefill graph buckets: multiples of this many tokens
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


@dataclass
class StepPlan:
    """One step's batch: num_decode sequences with one token each, then prefill chunks (host lists).

    input_ids / positions: [N] per token; query_lens [S] (1 for decode rows); context_lens [S]: tokens cached
    before the step; block_tables [S] lists of block ids; ntk_alphas [S]; counters [S]: each sequence's output
    index (its random stream's position); num_steps: decode steps to run back to back (decode-only plans);
    block_copies: (source, destination, leading tokens) KV cache blocks to copy before the step (beam search's
    copy-on-write)."""

    input_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    ntk_alphas: list[float]
    counters: list[int]
    num_decode: int
    num_steps: int = 1
    block_copies: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @classmethod
    def prefill(cls, prompts: Sequence[Sequence[int]], block_tables: Sequence[Sequence[int]],
                ntk_alphas: Sequence[float]) -> StepPlan:
        """Whole prompts from position 0 with nothing cached: one prefill chunk each."""
        lens = [len(p) for p in prompts]
        return cls([t for p in prompts for t in p], [i for n in lens for i in range(n)], lens, [0] * len(lens),
                   [list(t) for t in block_tables], list(ntk_alphas), [0] * len(lens), num_decode=0)


@dataclass
class BeamGroup:
    """The rows of one beam-search request in a step: `rows` consecutive sequences from `first_row`, their
    cumulative log-probabilities, and how many best continuations to return (Hugging Face keeps
    max(2, 1 + number of stop ids) x beam width)."""

    first_row: int
    logprobs: list[float]
    k: int


@dataclass
class StepOutput:
    """What a step gives the host (rank 0): tokens [num_steps][S]; per beam group, its k best continuations'
    cumulative log-probabilities (float32 values) and indices `beam * vocab + token`, best first."""

    tokens: list[list[int]]
    beam_logprobs: list[list[float]] = field(default_factory=list)
    beam_indices: list[list[int]] = field(default_factory=list)


class ModelRunner:
    """Runs StepPlans on one rank's model and KV cache."""

    def __init__(self, engine: Engine, kv_cache: KVCacheManager, max_batch_size: int, max_seq_len: int,
                 cuda_graphs: bool | None = None):
        self.engine, self.kv = engine, kv_cache
        self.device, self.config = engine.device, engine.config
        self.max_batch_size = max_batch_size
        self.max_blocks = kv_cache.blocks_for(max_seq_len)
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self._graphs: dict[int, DecodeGraph] = {}
        self._prefill_graphs: dict[int, PrefillGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.seen: Tensor | None = None  # [max_batch_size, vocab] bool: repetition-penalty token sets (rank 0)

    # --- tensors from a plan -----------------------------------------------------------------------------
    def _tensor(self, values, dtype: torch.dtype) -> Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _block_table_tensor(self, tables: Sequence[Sequence[int]], rows: int) -> Tensor:
        """[rows, max_blocks] int32 on the device, NULL_BLOCK past each table (and in rows past len(tables)). Filled
        through numpy: one torch.tensor per row cost ~11 us each, 5.8 ms a step at batch 512 on the CI CPU."""
        bt = np.full((rows, self.max_blocks), NULL_BLOCK, dtype=np.int32)
        for i, t in enumerate(tables):
            bt[i, : len(t)] = t
        return torch.from_numpy(bt).to(self.device, non_blocking=True)

    def _inv_freq(self, alphas: Sequence[float], rows: int) -> Tensor:
        a = list(alphas) + [1.0] * (rows - len(alphas))
        return rotary_inv_freq(self.config, torch.tensor(a, dtype=torch.float64, device=self.device))

    def metadata(self, positions: Tensor, block_tables: Tensor, inv_freq: Tensor, num_decode: int,
                 seq_index: Tensor | None = None, query_lens: Tensor | None = None,
                 context_lens: Tensor | None = None, max_query_len: int = 0, capture: dict | None = None,
                 all_logits: bool = False) -> AttentionMetadata:
        """Attention metadata for a step (decode rows first) from device tensors only, so that a CUDA graph
        computes it inside: slot mapping, valid keys, query offsets and the rows whose logits are returned.
        seq_index None: decode only (token i is sequence i); else query_lens / context_lens [S] int32."""
        bs = self.kv.tokens_per_block
        rows = seq_index.long() if seq_index is not None else torch.arange(positions.shape[0], device=self.device)
        slots = block_tables[rows, positions // bs].long() * bs + positions % bs
        if seq_index is None:
            seq_lens = (positions + 1).to(torch.int32)
            ctx = qsl = None
            logits_idx = torch.arange(positions.shape[0], device=self.device)
        else:
            D = num_decode
            seq_lens = (context_lens + query_lens).to(torch.int32)
            ctx = context_lens
            qsl = torch.nn.functional.pad(query_lens[D:].cumsum(0), (1, 0)).to(torch.int32)
            if all_logits:
                logits_idx = torch.arange(positions.shape[0], device=self.device)
            else:
                logits_idx = torch.cat([torch.arange(D, device=self.device), D + qsl[1:].long() - 1])
        return AttentionMetadata(positions, seq_index, inv_freq, slots, block_tables, seq_lens, ctx, qsl,
                                 num_decode, max_query_len, logits_idx, self.kv.k_cache, self.kv.v_cache, capture,
                                 self.kv.k_scale, self.kv.v_scale)

    # --- forward passes ----------------------------------------------------------------------------------
    def forward_plan(self, plan: StepPlan, capture: dict | None = None, all_logits: bool = False) -> Tensor:
        """The logits [S, vocab] (float32) of one eager step of `plan` (its first step only)."""
        seq_index = [i for i, n in enumerate(plan.query_lens) for _ in range(n)]
        meta = self.metadata(self._tensor(plan.positions, torch.int64),
                             self._block_table_tensor(plan.block_tables, plan.num_seqs),
                             self._inv_freq(plan.ntk_alphas, plan.num_seqs), plan.num_decode,
                             self._tensor(seq_index, torch.int32), self._tensor(plan.query_lens, torch.int32),
                             self._tensor(plan.context_lens, torch.int32),
                             max(plan.query_lens[plan.num_decode:], default=0), capture, all_logits)
        return self.engine.model(self._tensor(plan.input_ids, torch.int64), meta)

    def _prefill(self, ids: Tensor, positions: Tensor, seq_index: Tensor, block_tables: Tensor, inv_freq: Tensor,
                 query_lens: Tensor, context_lens: Tensor) -> Tensor:
        meta = self.metadata(positions, block_tables, inv_freq, 0, seq_index, query_lens, context_lens,
                             max_query_len=ids.shape[0])
        return self.engine.model(ids, meta)

    def _prefill_graph(self, tokens: int) -> PrefillGraph | None:
        """The graph of one prefill chunk of up to `tokens` tokens (buckets of PREFILL_GRAPH_STEP)."""
        if not self.cuda_graphs or tokens > PREFILL_GRAPH_TOKENS:
            return None
        tb = -(-tokens // PREFILL_GRAPH_STEP) * PREFILL_GRAPH_STEP
        if tb not in self._prefill_graphs:
            self._prefill_graphs[tb] = PrefillGraph(self._prefill, tb, self.max_blocks, self.config.rotary_dim // 2,
                                                    self.device, self._pool)
        return self._prefill_graphs[tb]

    def _mixed(self, plan: StepPlan) -> Tensor:
        """Logits of a step with prefill work. One prefill chunk of at most PREFILL_GRAPH_TOKENS: the decode rows'
        graph, then the chunk's graph (two replays instead of hundreds of eager launches); else eagerly."""
        D = plan.num_decode
        graph = self._prefill_graph(plan.query_lens[D]) if plan.num_seqs == D + 1 else None
        if graph is None:
            return self.forward_plan(plan)
        parts = []
        if D:
            decode = StepPlan(plan.input_ids[:D], plan.positions[:D], plan.query_lens[:D], plan.context_lens[:D],
                              plan.block_tables[:D], plan.ntk_alphas[:D], plan.counters[:D], D)
            # a copy: graphs share one memory pool, and the chunk's graph may reuse this output's memory
            parts.append(self.start(decode).run().clone())
        graph.load(plan.input_ids[D:], plan.positions[D:], plan.context_lens[D], plan.block_tables[D],
                   self._inv_freq(plan.ntk_alphas[D:], 2))
        parts.append(graph.replay()[:1])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _decode(self, ids: Tensor, positions: Tensor, block_tables: Tensor, inv_freq: Tensor) -> Tensor:
        return self.engine.model(ids, self.metadata(positions, block_tables, inv_freq, ids.shape[0]))

    def _decode_graph(self, batch: int) -> DecodeGraph | None:
        if not self.cuda_graphs:
            return None
        bb = next((b for b in GRAPH_BUCKETS if b >= batch), None)
        if bb is None:
            bb = -(-batch // 128) * 128
        bb = min(bb, max(self.max_batch_size, batch))
        if bb not in self._graphs:
            self._graphs[bb] = DecodeGraph(self._decode, bb, self.max_blocks, self.config.rotary_dim // 2,
                                           self.device, self._pool)
        return self._graphs[bb]

    def capture_graphs(self, max_batch: int | None = None) -> int:
        """Capture the decode graphs of every bucket up to max_batch now (else each is captured on first use,
        in the middle of serving); returns how many exist."""
        if self.cuda_graphs:
            top = min(max_batch or self.max_batch_size, self.max_batch_size)
            for b in [b for b in GRAPH_BUCKETS if b < top] + [top]:
                self._decode_graph(b)
            for t in range(PREFILL_GRAPH_STEP, PREFILL_GRAPH_TOKENS + 1, PREFILL_GRAPH_STEP):
                self._prefill_graph(t)
        return len(self._graphs) + len(self._prefill_graphs)

    # --- a whole plan: forward, sample, feed back ------------------------------------------------------------
    def start(self, plan: StepPlan) -> DecodeSteps | None:
        """The decode steps of a decode-only plan, inputs loaded (a CUDA graph's or eager); None otherwise."""
        S = plan.num_seqs
        if plan.num_decode != S:
            return None
        ids, pos = self._tensor(plan.input_ids, torch.int64), self._tensor(plan.positions, torch.int64)
        graph = self._decode_graph(S)
        rows = graph.batch if graph is not None else S
        steps = DecodeSteps(self._decode, graph, S)
        steps.load(ids, pos, self._block_table_tensor(plan.block_tables, rows), self._inv_freq(plan.ntk_alphas, rows))
        return steps

    @torch.inference_mode()
    def logits(self, plan: StepPlan) -> Tensor:
        """Logits [S, vocab] (float32) of the plan's first step, through the path generation uses."""
        steps = self.start(plan)
        return self._mixed(plan) if steps is None else steps.run()

    @torch.inference_mode()
    def execute(self, plan: StepPlan, params: Sequence[SamplingParams] | None = None,
                new_rows: Sequence[tuple[int, list[int]]] = (), slots: Sequence[int] = (),
                beam_groups: Sequence[BeamGroup] = ()) -> StepOutput:
        """Run the plan's steps; returns the sampled tokens [num_steps][S], with NON_FINITE (-1) for a sequence
        whose logits held NaN or inf at that step, and each beam group's candidates, on rank 0 (empty on other
        ranks).

        params [S] and slots [S] (each sequence's row in the repetition-penalty table) are rank 0's;
        new_rows: (slot, token ids) of sequences whose repetition-penalty row starts afresh this step;
        beam_groups: the rows of each beam-search request (one-step plans)."""
        self.kv.copy_blocks(plan.block_copies)
        rank0 = self.engine.rank == 0
        st = SamplingTensors.build(params, self.device) if rank0 else None
        slot_idx = self._tensor(list(slots), torch.int64) if rank0 and slots else None
        seen_rows = self._seen_rows(st, new_rows, slot_idx) if rank0 else None
        counters = self._tensor(plan.counters, torch.int64) if rank0 else None
        steps = self.start(plan)
        out = []
        for step in range(plan.num_steps):
            with nvtx_range(f"step {step}"):
                logits = self._mixed(plan) if steps is None else steps.run()
                if rank0:  # reported: NON_FINITE where a row's logits overflowed (its request then fails)
                    tokens, reported = sample_checked(logits, st, counters + step, seen_rows)
                    out.append(reported)
                else:
                    tokens = torch.empty(plan.num_seqs, dtype=torch.int64, device=self.device)
                if self.engine.world_size > 1:  # every rank continues with rank 0's tokens
                    dist.broadcast(tokens, src=0)
                if rank0 and beam_groups:
                    cands = beam_candidates(logits, beam_groups)
                if rank0 and seen_rows is not None:
                    seen_rows.scatter_(1, tokens[:, None], True)
                if step + 1 < plan.num_steps:
                    steps.advance(tokens)
        if rank0 and seen_rows is not None:
            self.seen[slot_idx] = seen_rows
        if not rank0:
            return StepOutput([])
        if not beam_groups:
            return StepOutput(torch.stack(out).tolist())
        values, indices = cands
        return StepOutput(torch.stack(out).tolist(), values.tolist(), indices.tolist())

    def _seen_rows(self, st: SamplingTensors, new_rows: Sequence[tuple[int, list[int]]],
                   slot_idx: Tensor | None) -> Tensor | None:
        """Each sequence's set of prompt and output tokens [S, vocab] bool, when any row has a penalty."""
        if not st.any_penalty and not new_rows:
            return None
        if self.seen is None:
            self.seen = torch.zeros(self.max_batch_size, self.config.vocab_size, dtype=torch.bool,
                                    device=self.device)
        for slot, ids in new_rows:
            self.seen[slot] = False
            self.seen[slot, self._tensor(ids, torch.int64)] = True
        if not st.any_penalty:
            return None
        return self.seen[slot_idx]

    def release(self) -> None:
        """Drop the CUDA graphs (they hold references through their captured steps)."""
        self._graphs.clear()
        self._prefill_graphs.clear()


class DecodeSteps:
    """Consecutive decode steps of the same rows: through a DecodeGraph when there is one, else eagerly."""

    def __init__(self, fn: Callable[..., Tensor], graph: DecodeGraph | None, rows: int):
        self.fn, self.graph, self.rows = fn, graph, rows

    def load(self, ids: Tensor, pos: Tensor, block_tables: Tensor, inv_freq: Tensor) -> None:
        if self.graph is not None:
            self.graph.load(ids, pos, block_tables, inv_freq)
        else:
            self.ids, self.pos, self.block_tables, self.inv_freq = ids, pos, block_tables, inv_freq

    def run(self) -> Tensor:
        if self.graph is not None:
            return self.graph.replay()[: self.rows]
        return self.fn(self.ids, self.pos, self.block_tables, self.inv_freq)

    def advance(self, tokens: Tensor) -> None:
        """The next step: the sampled tokens in, one position further."""
        if self.graph is not None:
            self.graph.advance(tokens)
        else:
            self.ids, self.pos = tokens, self.pos + 1


def _capture(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], device: torch.device, pool):
    """fn(*inputs) captured in a CUDA graph after two warm-up runs (Triton compilation, cuBLAS workspaces).

    Python's garbage collector runs before the capture and not during it (as vLLM freezes it there): a dead
    reference cycle holding an older runner's CUDA graphs, collected mid-capture, destroys those graphs while this
    stream captures, which CUDA refuses and which invalidates the capture (cudaErrorStreamCaptureInvalidated; seen
    on the H200 in the runtime tests: two graph resets refused during a decode-graph capture, which then failed)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = fn(*inputs)
    finally:
        if collecting:
            gc.enable()
    return graph, output


class PrefillGraph:
    """One prefill chunk of up to `tokens` tokens in a CUDA graph. Row 0 is the real sequence; tokens past the
    chunk belong to row 1, whose block table is all null and whose query length is 0: they write the null
    block, no query attends to them, and their rows' results are never read."""

    def __init__(self, fn: Callable[..., Tensor], tokens: int, max_blocks: int, half_rotary: int,
                 device: torch.device, pool):
        self.tokens = tokens
        z = lambda *shape, dt=torch.int64: torch.zeros(*shape, dtype=dt, device=device)
        self.ids, self.pos, self.seq_index = z(tokens), z(tokens), z(tokens, dt=torch.int32)
        self.block_tables = z(2, max_blocks, dt=torch.int32)
        self.inv_freq = z(2, half_rotary, dt=torch.float32)
        self.query_lens, self.context_lens = z(2, dt=torch.int32), z(2, dt=torch.int32)
        self.host = torch.zeros(3, tokens, dtype=torch.int64)  # ids, positions, seq_index: one copy in
        self.host_rows = torch.zeros(2, 2 + max_blocks, dtype=torch.int32)  # query len, context len, block table
        self.query_lens[0] = 1
        inputs = (self.ids, self.pos, self.seq_index, self.block_tables, self.inv_freq, self.query_lens,
                  self.context_lens)
        self.graph, self.output = _capture(fn, inputs, device, pool)

    def load(self, ids: Sequence[int], positions: Sequence[int], context_len: int, block_table: Sequence[int],
             inv_freq: Tensor) -> None:
        n = len(ids)
        h = self.host
        h.zero_()
        h[0, :n], h[1, :n] = torch.tensor(ids), torch.tensor(positions)
        h[2, n:] = 1
        r = self.host_rows
        r.zero_()
        r[0, 0], r[0, 1] = n, context_len
        r[0, 2: 2 + len(block_table)] = torch.tensor(block_table, dtype=torch.int32)
        d = r.to(self.ids.device, non_blocking=True)
        hd = h.to(self.ids.device, non_blocking=True)
        self.ids.copy_(hd[0])
        self.pos.copy_(hd[1])
        self.seq_index.copy_(hd[2])
        self.query_lens.copy_(d[:, 0])
        self.context_lens.copy_(d[:, 1])
        self.block_tables.copy_(d[:, 2:])
        self.inv_freq.copy_(inv_freq)

    def replay(self) -> Tensor:
        self.graph.replay()
        return self.output


class DecodeGraph:
    """A decode step for `batch` rows captured in a CUDA graph over static inputs. Rows past the real batch
    have position 0 and an all-null block table: they write and read the null block, and their logits are
    ignored."""

    def __init__(self, fn: Callable[..., Tensor], batch: int, max_blocks: int, half_rotary: int,
                 device: torch.device, pool):
        self.batch = batch
        self.ids = torch.zeros(batch, dtype=torch.int64, device=device)
        self.pos = torch.zeros(batch, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(batch, max_blocks, dtype=torch.int32, device=device)
        self.inv_freq = torch.zeros(batch, half_rotary, dtype=torch.float32, device=device)
        inputs = (self.ids, self.pos, self.block_tables, self.inv_freq)
        self.graph, self.output = _capture(fn, inputs, device, pool)
        self.rows = 0

    def load(self, ids: Tensor, pos: Tensor, block_tables: Tensor, inv_freq: Tensor) -> None:
        """Set the real rows (the rest: padding) before the first replay of a plan."""
        n = self.rows = ids.shape[0]
        self.ids.zero_()
        self.pos.zero_()
        self.ids[:n], self.pos[:n] = ids, pos
        self.block_tables.copy_(block_tables)
        self.inv_freq.copy_(inv_freq)

    def advance(self, tokens: Tensor) -> None:
        """The next step of the same rows: the sampled tokens in, one position further."""
        self.ids[: self.rows] = tokens
        self.pos[: self.rows] += 1

    def replay(self) -> Tensor:
        self.graph.replay()
        return self.output
