"""The sampler: one batched step that honours each request's own settings, on the device, without a host sync.

Per row: repetition penalty (Hugging Face's rule), then greedy argmax, or temperature -> top-k -> top-p (the
smallest set of most likely tokens whose probability reaches top_p, as Hugging Face's TopPLogitsWarper keeps) ->
a draw by inverse CDF. The draw's uniform number is counter-based, a hash of (request seed, output index): a
request gets the same tokens whatever else shares its batch, across preemption, and on every rank.
Beam search takes each beam-search request's best continuations over all its beams instead (`beam_candidates`).
`sample_checked` also marks the rows whose logits hold NaN or inf (an fp16 overflow) in the tokens the host reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from qwen_trtllm.runtime.request import SamplingParams

if TYPE_CHECKING:
    from qwen_trtllm.runtime.model_runner import BeamGroup

_M64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >> 63 else x


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 tensors."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def uniform_from_counter(seed: Tensor, counter: Tensor) -> Tensor:
    """float64 numbers in [0, 1), one per (seed, counter) pair of int64 tensors: SplitMix64's finaliser
    (Steele, Lea, Flood, "Fast splittable pseudorandom number generators", 2014) over seed * golden + counter."""
    x = seed * _signed(0x9E3779B97F4A7C15) + counter * _signed(0xD1B54A32D192ED03)
    x = (x ^ _shr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _signed(0x94D049BB133111EB)
    x = x ^ _shr(x, 31)
    return _shr(x, 11).double() * (1.0 / (1 << 53))


@dataclass
class SamplingTensors:
    """The batch's settings as device tensors [S]; built once per scheduled step."""

    temperature: Tensor  # float32
    top_k: Tensor  # int64, 0 = off
    top_p: Tensor  # float32
    repetition_penalty: Tensor  # float32
    seed: Tensor  # int64
    greedy: Tensor  # bool
    all_greedy: bool
    any_penalty: bool
    any_top_k: bool
    any_top_p: bool

    @classmethod
    def build(cls, params: Sequence[SamplingParams], device: torch.device) -> SamplingTensors:
        f = lambda vals, dt: torch.tensor(vals, dtype=dt).to(device, non_blocking=True)
        greedy = [p.greedy for p in params]
        return cls(f([p.temperature for p in params], torch.float32), f([p.top_k for p in params], torch.int64),
                   f([p.top_p for p in params], torch.float32),
                   f([p.repetition_penalty for p in params], torch.float32), f([p.seed for p in params], torch.int64),
                   f(greedy, torch.bool), all(greedy), any(p.repetition_penalty != 1.0 for p in params),
                   any(p.top_k > 1 for p in params), any(p.top_p < 1.0 for p in params))


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """logits [S, V] float32; seen [S, V] bool (tokens of the prompt and the output so far); penalty [S]."""
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def sample(logits: Tensor, st: SamplingTensors, counter: Tensor, seen: Tensor | None = None) -> Tensor:
    """Next tokens [S] (int64) from logits [S, V] (float32). counter [S] int64: each row's output index (the
    random stream's position); seen [S, V] bool when any row has a repetition penalty."""
    if st.any_penalty and seen is not None:
        logits = apply_repetition_penalty(logits, seen, st.repetition_penalty)
    best = logits.argmax(dim=-1)
    if st.all_greedy:
        return best
    temperature = torch.where(st.greedy, 1.0, st.temperature)[:, None]
    sorted_logits, order = torch.sort(logits / temperature, dim=-1, descending=True)
    V = logits.shape[-1]
    if st.any_top_k:  # keep the k best (ties at the k-th value kept, as a threshold on values does)
        k = torch.where(st.top_k > 0, st.top_k.clamp(max=V), V)
        kth = sorted_logits.gather(1, (k - 1)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    if st.any_top_p:  # drop tokens once the mass before them reaches top_p
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= st.top_p[:, None], 0.0)
    cdf = probs.cumsum(dim=-1)
    u = (uniform_from_counter(st.seed, counter) * cdf[:, -1].double()).float()
    pick = torch.searchsorted(cdf, u[:, None], right=True).clamp_(max=V - 1)
    drawn = order.gather(1, pick)[:, 0]
    return torch.where(st.greedy, best, drawn)


def beam_candidates(logits: Tensor, groups: Sequence[BeamGroup]) -> tuple[Tensor, Tensor]:
    """Each beam group's k best continuations, as Hugging Face's beam search ranks them: log_softmax of each beam
    row's float32 logits plus the beam's cumulative log-probability, top k over beams x vocab. All groups in one
    batched pass (groups padded to the widest with -inf beams, which are never picked).

    logits [S, V]; returns (cumulative log-probabilities float32, indices int64 = beam * V + token), both
    [groups, max k], best first."""
    width, k = max(len(g.logprobs) for g in groups), max(g.k for g in groups)
    rows = [[g.first_row + min(i, len(g.logprobs) - 1) for i in range(width)] for g in groups]
    start = [g.logprobs + [float("-inf")] * (width - len(g.logprobs)) for g in groups]
    rows_t = torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True)
    start_t = torch.tensor(start, dtype=torch.float32).to(logits.device, non_blocking=True)
    scores = torch.log_softmax(logits[rows_t].float(), dim=-1) + start_t[..., None]  # [G, width, V]
    return scores.flatten(1).topk(k, dim=-1)
NON_FINITE = -1  # the token reported to the host for a row whose logits held NaN or inf


def sample_checked(logits: Tensor, st: SamplingTensors, counter: Tensor, seen: Tensor | None = None
                   ) -> tuple[Tensor, Tensor]:
    """sample() that never fails on NaN / inf logits: (tokens to feed the next step, tokens to report) [S].
    A row with a non-finite logit is sampled from zeros (a valid id for the next step and the other ranks) and
    reported as NON_FINITE, so its request can be stopped; all on the device, read with the tokens (no sync)."""
    bad = ~torch.isfinite(logits).all(dim=-1)
    tokens = sample(logits.masked_fill(bad[:, None], 0.0), st, counter, seen)
    return tokens, tokens.masked_fill(bad, NON_FINITE)
