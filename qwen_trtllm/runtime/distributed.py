"""Tensor-parallel process group: torch.distributed (NCCL on GPUs, gloo on CPU), launched by torchrun or mpirun."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from qwen_trtllm.runtime.engine import world_from_env


def init_distributed(timeout_s: float = 120.0) -> tuple[int, int]:
    """(rank, world size); sets up the process group when launched with more than one rank."""
    rank, world = world_from_env()
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= world
        if use_nccl:
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group("nccl" if use_nccl else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world
