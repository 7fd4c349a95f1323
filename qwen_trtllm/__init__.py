"""qwen_trtllm: a Qwen-7B-Chat inference port in the style of TensorRT-LLM's Qwen example.

Pipeline: checkpoint (Hugging Face -> FT dir) -> models (the QWen network) -> builder (engine dir)
-> runtime (generation, CUDA graphs) -> kernels (Triton) -> evaluation (ROUGE, layer comparison).
"""

__version__ = "0.1.0"


class QWenError(Exception):
    """A user-facing error: the CLI scripts print its one-line message and exit non-zero."""
