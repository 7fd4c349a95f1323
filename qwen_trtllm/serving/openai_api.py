"""OpenAI's API shapes (pydantic) and their translation into the runtime's terms.

Requests: `ChatCompletionRequest` (/v1/chat/completions) and `CompletionRequest` (/v1/completions), with the
extensions `top_k`, `repetition_penalty`, `ignore_eos` and beam search (`use_beam_search` with `n` / `best_of`,
`length_penalty`, `early_stopping`; not streamed), and on completions `return_token_ids` (vLLM's names).
Responses, stream chunks, model cards and the error body are in the shapes the official `openai` client parses.
The translation helpers need no web framework (examples/qwen/chat.py uses them too): `chat_prompt` (messages ->
Qwen's chatml prompt via make_context, history trimmed to the window), `resolve_sampling` (request fields +
generation_config.json defaults -> SamplingParams, as run.py resolves its flags); streamed text comes from the
runtime's `IncrementalText` (qwen_trtllm/runtime/detokenizer.py).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from qwen_trtllm import QWenError
from qwen_trtllm.runtime.request import NON_FINITE_LOGITS, RequestOutput, SamplingParams
from qwen_trtllm.runtime.runner import sampling_from_args
from qwen_trtllm.tokenizer import DEFAULT_SYSTEM, make_context

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
DEFAULT_MAX_WINDOW_SIZE = 6144  # Qwen-7B-Chat's generation_config.json max_window_size


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def generation_error(out: RequestOutput) -> APIError:
    """The 500 of a request the engine ended with an error: its own one-line message where it names the fix
    (non-finite logits: rebuild with --dtype bfloat16), else a generic one (the detail belongs in the log)."""
    if out.error_code == NON_FINITE_LOGITS:
        return APIError(500, out.error or "non-finite logits", "server_error", None, out.error_code)
    return APIError(500, "internal error while generating", "server_error", None, "internal_error")


# --- errors ----------------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# --- requests --------------------------------------------------------------------------------------------------
class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields of newer API versions that change nothing here


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class _GenerationRequest(_Request):
    model: str | None = None  # None: the served model
    max_tokens: int | None = None
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM's and TensorRT-LLM's names)
    top_k: int | None = None  # 0 = off, 1 = greedy
    repetition_penalty: float | None = None  # 1 = off
    ignore_eos: bool | None = None  # True: stop tokens end nothing; exactly max_tokens tokens (stop strings still end)
    # beam search (vLLM's names): the n best of best_of (default n) beams, one choice each; not streamed
    use_beam_search: bool | None = None
    length_penalty: float | None = None  # 1.0: scores = log-probability sums / output length
    early_stopping: bool | Literal["never"] | None = None  # False: Hugging Face's heuristic


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    response_format: Any | None = None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    # each choice also carries the generated token ids (`token_ids`; in a stream: those new in the chunk, and a chunk
    # goes out for every step that gave tokens). None: on when the server has no tokenizer (there is no text then)
    return_token_ids: bool | None = None


# --- responses -------------------------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nones(self, handler):  # OpenAI's deltas: {"role": ..., "content": ""}, {"content": ...}, {}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


def _without_none(data: dict, key: str) -> dict:
    """A serialised model without `key` when it is None (OpenAI leaves such fields out)."""
    if key in data and data[key] is None:
        del data[key]
    return data


class _Chunk(BaseModel):
    @model_serializer(mode="wrap")
    def _usage_only_in_the_usage_chunk(self, handler):
        return _without_none(handler(self), "usage")


class ChatCompletionChunk(_Chunk):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None  # return_token_ids only

    @model_serializer(mode="wrap")
    def _token_ids_when_asked(self, handler):
        return _without_none(handler(self), "token_ids")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(_Chunk):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen_trtllm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# --- requests -> the runtime -------------------------------------------------------------------------------------
def message_text(message: ChatMessage, index: int) -> str:
    """A message's text: a string, or the text parts of a content list (other parts: 400)."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise invalid(f"messages[{index}]: content part of type {part.type!r} is not supported (text only)",
                          f"messages.{index}.content")
        texts.append(part.text)
    return "".join(texts)


def split_messages(messages: Sequence[ChatMessage]) -> tuple[str, list[tuple[str, str | None]], str]:
    """(system, history, query) of an OpenAI message list, the shape Qwen's chat(query, history, system) takes.

    Leading system messages form the system prompt (default: Qwen's "You are a helpful assistant."); then user
    and assistant messages, the last one from the user. A user message not followed by an assistant one is an
    unanswered turn of the history (make_context keeps it without an answer)."""
    if not messages:
        raise invalid("messages must hold at least one message", "messages")
    for i, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant"):
            raise invalid(f"messages[{i}] has the unknown role {m.role!r}: use system, user or assistant",
                          f"messages.{i}.role")
    texts = [message_text(m, i) for i, m in enumerate(messages)]
    i, systems = 0, []
    while i < len(messages) and messages[i].role == "system":
        systems.append(texts[i])
        i += 1
    system = "\n".join(systems) if systems else DEFAULT_SYSTEM
    history: list[tuple[str, str | None]] = []
    pending: str | None = None
    for j in range(i, len(messages)):
        role = messages[j].role
        if role == "system":
            raise invalid(f"messages[{j}]: system messages must come before the conversation",
                          f"messages.{j}.role")
        if role == "user":
            if pending is not None:
                history.append((pending, None))
            pending = texts[j]
        else:  # assistant
            if pending is None:
                raise invalid(f"messages[{j}]: an assistant message must follow a user message",
                              f"messages.{j}.role")
            history.append((pending, texts[j]))
            pending = None
    if pending is None:
        raise invalid("the last message must come from the user", "messages")
    return system, history, pending


def chat_prompt(tokenizer, messages: Sequence[ChatMessage], max_window_size: int) -> tuple[str, list[int]]:
    """(raw_text, token ids) of Qwen's chatml prompt for an OpenAI message list: make_context with the history,
    the oldest turns dropped to fit max_window_size exactly as Qwen's chat() does."""
    system, history, query = split_messages(messages)
    return make_context(tokenizer, query, history, system=system, max_window_size=max_window_size)


def window_size(defaults: dict, max_input_len: int, requested: int | None = None) -> int:
    """The history window: --max_window_size, else generation_config.json's max_window_size (Qwen's 6144), never
    more than the engine's max_input_len (longer prompts could not run)."""
    size = requested or defaults.get("max_window_size") or DEFAULT_MAX_WINDOW_SIZE
    return min(int(size), max_input_len)


def check_unsupported(req: _GenerationRequest) -> None:
    """400 for settings this engine cannot honour (rather than silently ignoring them)."""
    if req.n is not None and req.n != 1 and not req.use_beam_search:
        raise invalid(f"n={req.n} is not supported by this server without use_beam_search: use n=1, or "
                      "use_beam_search: true for the n best beams (several sampled outputs are not supported)", "n")
    if req.use_beam_search and req.stream:
        raise invalid("use_beam_search does not stream (a beam is final only when the search ends): set stream "
                      "false", "stream")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise invalid(f"{name} is not supported: use repetition_penalty (Qwen's generation_config uses 1.1)",
                          name)
    if req.logit_bias:
        raise invalid("logit_bias is not supported", "logit_bias")
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs or req.top_logprobs:
            raise invalid("logprobs are not supported", "logprobs")
        if req.tools:
            raise invalid("tools / function calling are not supported", "tools")
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None:
            raise invalid("logprobs are not supported", "logprobs")
        if req.best_of not in (None, 1) and not req.use_beam_search:
            raise invalid(f"best_of={req.best_of} needs use_beam_search: true (the best n of best_of beams); "
                          "sampling several outputs is not supported", "best_of")
        if req.suffix:
            raise invalid("suffix is not supported", "suffix")


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(s == "" for s in stops):
        raise invalid("stop strings must not be empty", "stop")
    return stops


def resolve_sampling(req: _GenerationRequest, defaults: dict, max_tokens: int, stop_ids: Sequence[int],
                     end_id: int) -> SamplingParams:
    """SamplingParams of a request: its own values win, the rest come from generation_config.json as run.py
    resolves its flags (runner.sampling_from_args; Qwen-7B-Chat: top_p 0.8, top_k 0, repetition_penalty 1.1).
    temperature 0 is greedy. No seed: a random one (OpenAI's nondeterminism). ignore_eos: the stop ids (the
    end-of-text and chatml stop tokens) end nothing, as vLLM's ignore_eos drops the model's EOS ids. Bad values: 400."""
    seed = req.seed if req.seed is not None else random.getrandbits(63)
    args = SimpleNamespace(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                           repetition_penalty=req.repetition_penalty, seed=seed)
    try:
        params = sampling_from_args(args, defaults, max_tokens)
    except QWenError as e:  # SamplingParams.validate names the field first
        field = str(e).split(" ", 1)[0]
        raise invalid(str(e), field if field in ("temperature", "top_k", "top_p", "repetition_penalty") else None) \
            from None
    params.ignore_eos = bool(req.ignore_eos)
    params.stop_token_ids = [] if params.ignore_eos else sorted(set(stop_ids))
    params.end_id, params.stop = end_id, stop_strings(req.stop)
    if req.use_beam_search:  # deterministic: the sampling fields above do not apply (SamplingParams' rule)
        params = replace(params, use_beam_search=True, n=req.n or 1, best_of=getattr(req, "best_of", None),
                         length_penalty=1.0 if req.length_penalty is None else req.length_penalty,
                         early_stopping=False if req.early_stopping is None else req.early_stopping)
        try:
            params.validate()
        except QWenError as e:
            raise invalid(str(e)) from None
    return params
