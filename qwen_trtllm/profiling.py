"""Profiling hooks: NVTX ranges (named ranges for nsys users) and a torch profiler trace for Perfetto."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from qwen_trtllm import QWenError


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range on CUDA (no-op on CPU and while a CUDA graph is being captured)."""
    if torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


@contextlib.contextmanager
def maybe_profile(trace_path: str | None) -> Iterator[None]:
    """With a path: record a torch profiler trace there (open it in Perfetto) and print a per-phase summary."""
    if not trace_path:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=False) as prof:
        yield
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15))
    from qwen_trtllm.cli import atomic_path

    with atomic_path(trace_path) as tmp:
        prof.export_chrome_trace(str(tmp))  # (logs an error but raises none when it cannot write)
        if tmp.stat().st_size == 0:
            raise QWenError(f"--profile: the torch profiler could not write its trace to {trace_path}")
    print(f"profiler trace written to {trace_path} (open it in https://ui.perfetto.dev)")
