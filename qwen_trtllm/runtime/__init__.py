"""The generation runtime: load an engine, prefill + decode with a static KV cache, sample, stream."""

from qwen_trtllm.runtime.engine import Engine
from qwen_trtllm.runtime.generation import GenerationSession
from qwen_trtllm.runtime.sampling import SamplingConfig

__all__ = ["Engine", "GenerationSession", "SamplingConfig"]
