"""OpenAI-compatible serving on the in-flight batching runtime.

openai_api (request/response models in OpenAI's shapes; messages -> chatml prompt; sampling defaults; streamed
text with stop strings), server (the FastAPI app, engine glue, Prometheus metrics; `create_app`, `serve`),
static/index.html (the chat page served at /). CLI: examples/qwen/serve.py; terminal chat: examples/qwen/chat.py.
"""

__all__ = ["create_app", "serve"]


def __getattr__(name: str):
    if name in __all__:  # the web stack is imported only when the server is used
        from qwen_trtllm.serving import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
