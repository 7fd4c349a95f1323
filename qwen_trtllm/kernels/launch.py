"""Launch helpers for the decode-step kernels: programmatic dependent launch (PDL) and L2 prefetch on Hopper and
newer, and the arrival counters that let the last program of a group reduce its partials (no second kernel).

A kernel launched with PDL may start while the previous kernel of its stream still runs. Every kernel here that
is launched so calls `pdl_start` before it touches anything an earlier kernel wrote, and before its first write:
griddepcontrol.wait returns once the previous kernel has finished and its writes are visible. Before the wait a
kernel may only read what no kernel writes: the weights, which is what `l2_prefetch_rows` streams into L2 there.
Small kernels release their successor at once (early=True), so the next weight-streaming matmul is resident and
prefetching while they run; matmuls release theirs after the wait, so at most one matmul prefetches ahead.
Off sm_90, under the interpreter or with QWEN_TRTLLM_PDL=0, kernels launch as before and never prefetch.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def pdl_start(PDL: tl.constexpr, EARLY: tl.constexpr = False):
    """Wait for the previous kernel (PDL); let the next kernel launch before (EARLY) or after the wait."""
    if PDL:
        if EARLY:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
        if not EARLY:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def l2_prefetch_rows(row_ptrs, NBYTES: tl.constexpr):
    """Bring NBYTES from each pointer into L2 (sm_90 bulk prefetch: fire and forget). NBYTES % 16 == 0 and the
    pointers 16-byte aligned."""
    nbytes = tl.full(row_ptrs.shape, NBYTES, tl.int32)
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0;", "=r,l,r",
                              [row_ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@functools.cache
def _properties(device_index: int):
    return torch.cuda.get_device_properties(device_index)


def _cuda_properties(device: torch.device):
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def sm_count(device: torch.device, default: int) -> int:
    """Streaming multiprocessors of a CUDA device; `default` (the count a config plans for) elsewhere."""
    return _cuda_properties(device).multi_processor_count if device.type == "cuda" else default


TUNED_MODELS = ("H200", "H100")  # the GPU models with rows in the kernels' config tables


def gpu_model(device: torch.device) -> str:
    """The GPU model that kernel config tables are keyed by ("H200", "H100", ...: the first name among them in the
    CUDA device name); "" off CUDA or for a GPU no table names."""
    if device.type != "cuda":
        return ""
    name = _cuda_properties(device).name
    return next((m for m in TUNED_MODELS if m in name), "")


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # as when the kernel modules (imported after) are defined


def runs_ptx(device: torch.device) -> bool:
    """Whether kernels on `device` run compiled (CUDA, not Triton's interpreter), so inline PTX can run."""
    return device.type == "cuda" and not _INTERPRETED


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL and prefetch weights (compiled CUDA on sm_90+)."""
    if not runs_ptx(device):
        return False
    if os.environ.get("QWEN_TRTLLM_PDL", "1") == "0":
        return False
    return _cuda_properties(device).major >= 9


def l2_prefetch_bytes(device: torch.device, wanted: int, row_bytes: int, row_stride_bytes: int) -> int:
    """The NBYTES for l2_prefetch_rows: `wanted`, at most a row, in 16-byte units; 0 without PDL (nothing to
    overlap, or no sm_90 bulk prefetch) or when rows are not 16-byte aligned."""
    if not pdl_enabled(device) or row_stride_bytes % 16:
        return 0
    return min(wanted, row_bytes) // 16 * 16


_COUNTERS: dict[torch.device, torch.Tensor] = {}
MAX_COUNTERS = 1 << 16


def arrival_counters(device: torch.device, needed: int) -> torch.Tensor:
    """Zeroed int32 counters, one buffer per device, shared by every kernel: a kernel counts the programs that
    finished each output group (atomic add), the last one reduces the group's partials and resets its counter to
    zero. Kernels of one stream never use it at the same time: with PDL every program waits for the previous
    kernel before touching it."""
    if needed > MAX_COUNTERS:
        raise ValueError(f"{needed} reduction groups exceed the {MAX_COUNTERS} arrival counters")
    if device not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("run the kernel once outside CUDA-graph capture before capturing it")
        _COUNTERS[device] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[device]
