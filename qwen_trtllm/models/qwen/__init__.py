"""The QWen (v1) network: qwen_trtllm.models.qwen (the seed's tensorrt_llm/models/qwen)."""

from qwen_trtllm.models.qwen.model import AttentionMetadata, QWen, ntk_alpha, rotary_inv_freq

__all__ = ["QWen", "AttentionMetadata", "ntk_alpha", "rotary_inv_freq"]
