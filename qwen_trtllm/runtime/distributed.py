"""Tensor-parallel process group: torch.distributed (NCCL on GPUs, gloo on CPU), launched by torchrun or mpirun.

Each rank loads only its own rank{r}.safetensors. Errors are agreed on before the first collective of the model,
so a rank that fails to load makes every rank exit (rank 0 prints the reason) instead of leaving the others
waiting in an all-reduce; the process group also has a timeout. Every rank leaves together (a barrier, then
destroy_process_group): a gloo rank that exits while its peer still holds the connection can abort the process
("terminate called without an active exception") and fail a run whose results were all correct.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist

from qwen_trtllm import QWenError
from qwen_trtllm.runtime.engine import Engine, world_from_env


def init_distributed(timeout_s: float = 120.0) -> tuple[int, int]:
    """(rank, world size); sets up the process group when launched with more than one rank."""
    rank, world = world_from_env()
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available() and torch.cuda.device_count() < world:
            raise QWenError(f"{world} ranks but only {torch.cuda.device_count()} GPU(s): launch at most "
                            f"{torch.cuda.device_count()} ranks, or rebuild the engine for fewer ranks")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        use_nccl = torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if use_nccl else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest `value` over the ranks of the default process group (a collective; tensors on `device`,
    the process group's device); `value` itself without a process group."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_ranks_agree(error: str | None) -> None:
    """Raise the first rank's error on every rank if any rank had one (a no-op without a process group)."""
    if not dist.is_initialized():
        if error:
            raise QWenError(error)
        return
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise QWenError(first)


def load_engine_on_all_ranks(engine_dir: str | Path, rank: int, world: int) -> Engine:
    """Engine.load on every rank, failing together when any rank fails."""
    engine, error = None, None
    try:
        engine = Engine.load(engine_dir, rank=rank, world_size=world)
    except QWenError as e:
        error = f"rank {rank}: {e}" if world > 1 else str(e)
    all_ranks_agree(error)
    return engine


def leave_distributed(wait: bool = True) -> None:
    """Tear the process group down (a no-op without one); called by run_cli at exit.

    wait: first wait for every rank (main returned, whatever its exit code). After an error, do not: the other
    ranks may be elsewhere (a rank-local error) and a barrier would hold the failing rank until the timeout.
    """
    if not dist.is_initialized():
        return
    if wait:
        try:
            dist.barrier()
        except RuntimeError:  # a peer is already gone: nothing left to wait for
            pass
    dist.destroy_process_group()
