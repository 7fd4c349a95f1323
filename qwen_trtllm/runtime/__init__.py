"""The runtime: in-flight batching on a paged KV cache.

engine (load an engine dir) -> kv_cache (block pool, block tables) -> scheduler (waiting/running queues, token
budget, chunked prefill, preemption) -> model_runner (attention metadata, CUDA graphs) -> sampler (per-request
settings) -> executor (the step loop) -> llm (the Python API: LLM, SamplingParams, generate / generate_async).
"""

from qwen_trtllm.runtime.engine import Engine
from qwen_trtllm.runtime.executor import Executor, ExecutorConfig
from qwen_trtllm.runtime.kv_cache import KvCacheConfig
from qwen_trtllm.runtime.llm import LLM
from qwen_trtllm.runtime.request import Request, RequestOutput, SamplingParams

__all__ = ["LLM", "Engine", "Executor", "ExecutorConfig", "KvCacheConfig", "Request", "RequestOutput",
           "SamplingParams"]
