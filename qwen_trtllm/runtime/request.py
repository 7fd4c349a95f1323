"""Requests: what a client asks for (prompt ids + SamplingParams) and the runtime's state of it.

Names follow TensorRT-LLM's executor and LLM API (and vLLM's): a `Request` moves from the waiting queue to the
running batch (prefill in chunks, then one decode token per step) to finished; `RequestOutput` is what the
caller sees, as often as new tokens arrive.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from qwen_trtllm import QWenError

QWEN_EOD_ID = 151643  # <|endoftext|>
NON_FINITE_LOGITS = "non_finite_logits"  # error_code of a request stopped by NaN / inf logits


@dataclass
class SamplingParams:
    """Per-request generation settings (TensorRT-LLM's SamplingConfig / LLM-API SamplingParams names).

    max_tokens: new tokens at most (>= 1). temperature >= 0 (0 = greedy); top_k >= 0 (1 = greedy, 0 = off);
    0 < top_p <= 1 (1 = off); repetition_penalty > 0 (1 = off; Hugging Face semantics: positive logits of tokens
    already in the prompt or output are divided by it, negative ones multiplied); seed: the request's own random
    stream (counter-based: the same tokens whatever else runs in the batch). stop_token_ids end the request and are
    kept in the output; end_id (None: none) ends it too unless ignore_eos, and pads TensorRT-LLM's output arrays;
    stop: strings that end the request (checked on the detokenised text, not returned).

    Beam search (TensorRT-LLM's LLM-API fields): use_beam_search with beam width best_of (default n) returns the n
    best of the beam-width hypotheses. It is deterministic: temperature, top-k, top-p, repetition penalty and seed
    do not apply. Scores are Hugging Face's: sum of log-probabilities / generated_length ** length_penalty;
    early_stopping True (stop when beam-width hypotheses are done), False (Hugging Face's heuristic: stop when the
    best running beam cannot beat the worst done one at its current length) or "never".
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop_token_ids: Sequence[int] = ()
    end_id: int | None = QWEN_EOD_ID
    ignore_eos: bool = False
    stop: Sequence[str] = ()
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0.0

    @property
    def beam_width(self) -> int:
        """Hypotheses kept per step: best_of (default n) with beam search, else 1."""
        return (self.best_of or self.n) if self.use_beam_search else 1

    def stop_ids(self) -> frozenset[int]:
        ids = set(self.stop_token_ids)
        if self.end_id is not None and not self.ignore_eos:
            ids.add(self.end_id)
        return frozenset(ids)

    def validate(self) -> None:
        """Raise QWenError naming the bad value and the valid range."""
        checks = (("temperature", self.temperature >= 0 and math.isfinite(self.temperature), ">= 0 (0 = greedy)"),
                  ("top_k", self.top_k >= 0, ">= 0 (1 = greedy, 0 = off)"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
                  ("repetition_penalty", self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
                   "> 0 (1 = off)"))
        for name, ok, need in checks:
            if not ok:  # the message starts with the field's name (the server's 400 names it as the param)
                raise QWenError(f"{name} {getattr(self, name)} is invalid: it must be {need}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise QWenError(f"max_tokens {self.max_tokens} must be a positive integer")
        if not isinstance(self.n, int) or self.n < 1 or (self.best_of is not None and self.best_of < self.n):
            raise QWenError(f"n={self.n}, best_of={self.best_of}: need 1 <= n <= best_of")
        if self.beam_width == 1 and max(self.n, self.best_of or 1) > 1:
            raise QWenError(f"n={self.n} / best_of={self.best_of} need use_beam_search (several sampled outputs per "
                            "prompt are not supported): set use_beam_search=True or n=1")
        if self.use_beam_search:
            if self.early_stopping not in (True, False, "never") or not math.isfinite(self.length_penalty):
                raise QWenError(f"early_stopping={self.early_stopping!r}, length_penalty={self.length_penalty}: "
                                "need early_stopping True, False or 'never' and a finite length_penalty")
            if self.stop:
                raise QWenError("stop strings do not apply to beam search: use stop_token_ids")


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """A snapshot of one request: every token id generated so far, the newest since the last snapshot, and why
    it finished (None while it runs; "stop", "length", "cancelled" or "error"). An error's error_code
    NON_FINITE_LOGITS marks a message meant for users (it names the fix); other errors are internal."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""  # the detokenised output, when the engine has a tokenizer
    new_text: str = ""
    error_code: str | None = None
    # beam search: the n best hypotheses' output ids, best first (beams[0] == token_ids), and their scores
    beams: list[list[int]] = field(default_factory=list)
    beam_scores: list[float] = field(default_factory=list)


@dataclass
class Beam:
    """One running hypothesis of a beam-search request: its output ids, its own block table (sharing the blocks
    of the prompt and of common ancestors by reference count) and its cumulative log-probability (a float32
    value, as Hugging Face accumulates it)."""

    token_ids: list[int]
    block_ids: list[int]
    logprob: float


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One request's state in the runtime (created by Executor.add_request)."""

    prompt_token_ids: list[int]
    params: SamplingParams
    on_output: Callable[[RequestOutput], None] | None = None  # called on the engine loop after each step's tokens
    request_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None
    error_code: str | None = None
    block_ids: list[int] = field(default_factory=list)  # the block table
    num_computed_tokens: int = 0  # tokens whose K and V are in the cache
    ntk_alpha: float = 1.0  # from the prompt length, fixed for the request's life (preemption included)
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # host time each output token was seen
    cancel_requested: bool = False
    beams: list[Beam] = field(default_factory=list)  # beam search: the running hypotheses (after the prompt)
    beam_hyps: list[tuple[float, list[int]]] = field(default_factory=list)  # done hypotheses (score, ids), best first
    beam_can_improve: bool = True  # Hugging Face's early-stop heuristic: a running beam may still beat a done one
    _sent: int = 0  # output tokens already reported through on_output

    def __post_init__(self) -> None:
        self.stop_ids = self.params.stop_ids()  # checked for every generated token

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def in_prefill(self) -> bool:
        """Tokens other than the newest still lack their K and V (a new request, or one preempted)."""
        return self.num_computed_tokens < self.num_tokens - 1 or not self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def is_beam_search(self) -> bool:
        return self.params.beam_width > 1

    @property
    def num_beam_candidates(self) -> int:
        """Continuations a beam step ranks over all beams: Hugging Face's max(2, 1 + number of stop ids) x width,
        so that width of them survive even when the best ones all end."""
        return max(2, 1 + len(self.stop_ids)) * self.params.beam_width

    def block_tables(self) -> list[list[int]]:
        """Every block table the request holds: its own (the prompt's) and its beams'."""
        return [self.block_ids] + [b.block_ids for b in self.beams]

    def restart(self) -> None:
        """Back to the prompt alone (a preempted beam search starts again: being deterministic, it finds the
        same beams; its outputs were never shown)."""
        self.output_token_ids.clear()
        self.token_times.clear()
        self.beams, self.beam_hyps, self.beam_can_improve = [], [], True

    def cancel(self) -> None:
        """Ask the engine to stop this request; its blocks return to the pool at the next step."""
        self.cancel_requested = True

    def snapshot(self) -> RequestOutput:
        new = self.output_token_ids[self._sent:]
        self._sent = len(self.output_token_ids)
        hyps = self.beam_hyps[: self.params.n] if self.finished else []
        return RequestOutput(self.request_id, self.prompt_token_ids, list(self.output_token_ids), new,
                             self.finished, self.finish_reason, self.error, error_code=self.error_code,
                             beams=[list(h) for _, h in hyps], beam_scores=[s for s, _ in hyps])
