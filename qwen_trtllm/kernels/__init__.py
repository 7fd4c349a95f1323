"""Triton kernels for the decode step, each next to its plain PyTorch reference (`<name>_reference`).

rms_norm (fused residual add + RMSNorm), rotary_kv_write (rotary + logn + paged KV-cache write),
paged_decode_attention (flash decoding over the paged KV cache; rotary_paged_decode_attention: with rotary_kv_write
inside it, for decode-only steps), paged_prefill_attention (causal flash attention of
packed prefill chunks over the paged KV cache), silu_mul (SwiGLU) and copy_kv_blocks (beam search's copy-on-write
of KV cache blocks). The KV-cache kernels also take int8 / fp8 caches with per-(token, head) scales (kv_quant.py:
quantize_kv_reference / dequantize_kv_reference define the format). The wrappers launch with grids computed from
static shapes (and, for prefill, the host int max_query_len) and never synchronise, so they can be captured in
CUDA graphs. triton_available(device) says whether they can run there.

Off CUDA the kernels run only in Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before this
package is first imported: triton.jit picks the interpreter when a kernel is defined, not when it runs.
"""

from __future__ import annotations

import torch

try:
    from qwen_trtllm.kernels.activation import silu_mul, silu_mul_reference
    from qwen_trtllm.kernels.kv_cache_copy import copy_kv_blocks, copy_kv_blocks_reference
    from qwen_trtllm.kernels.kv_quant import dequantize_kv_reference, quantize_kv_reference
    from qwen_trtllm.kernels.paged_attention import (
        default_num_splits,
        paged_decode_attention,
        paged_decode_attention_reference,
        paged_prefill_attention,
        paged_prefill_attention_reference,
        rotary_paged_decode_attention,
        rotary_paged_decode_attention_reference,
    )
    from qwen_trtllm.kernels.rmsnorm import rms_norm, rms_norm_reference
    from qwen_trtllm.kernels.rotary import (
        apply_rotary_reference,
        logn_scale_reference,
        rotary_kv_write,
        rotary_kv_write_reference,
    )
except ImportError as exc:  # Triton missing or broken: triton_available() is False everywhere
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

__all__ = ["apply_rotary_reference", "copy_kv_blocks", "copy_kv_blocks_reference", "default_num_splits",
           "dequantize_kv_reference", "interpreted", "logn_scale_reference", "paged_decode_attention",
           "paged_decode_attention_reference", "paged_prefill_attention", "paged_prefill_attention_reference",
           "quantize_kv_reference", "rms_norm", "rms_norm_reference", "rotary_kv_write", "rotary_kv_write_reference",
           "rotary_paged_decode_attention", "rotary_paged_decode_attention_reference",
           "silu_mul", "silu_mul_reference", "triton_available"]


def interpreted() -> bool:
    """True when the kernels were defined under Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    if _IMPORT_ERROR is not None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    from qwen_trtllm.kernels.rmsnorm import _rms_norm_kernel

    return isinstance(_rms_norm_kernel, InterpretedFunction)


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton wrappers can run on tensors of `device`: CUDA with Triton importable, or CPU when the
    kernels were defined under the interpreter. Otherwise use the `*_reference` functions."""
    if _IMPORT_ERROR is not None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreted()
