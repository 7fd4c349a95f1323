"""OpenAI's response shapes of one request (a chat or a completion: the first chunk, content deltas, the last
chunk, usage, the whole response) and the SSE response that streams them.

The content delta is the hot path of a streaming server (one per request and engine step): its JSON is made once
per request by pydantic with marker values and filled in by string joins (`_Template`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi.responses import StreamingResponse

from qwen_trtllm.serving.openai_api import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    DeltaMessage,
    UsageInfo,
)


class SSEResponse(StreamingResponse):
    """text/event-stream whose body stops as soon as the client disconnects (whatever the ASGI server's spec
    version), so that the generator is closed and its request cancelled; on_close runs exactly once."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away while we wrote
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self._on_close()


def sse(data: str) -> str:
    return f"data: {data}\n\n"



_TEXT_MARK, _IDS_MARK = "@@qwen-trtllm-text@@", -987654321


class _Template:
    """A chunk's JSON as pydantic writes it, with the text and token-id markers cut out: fill() puts a chunk's
    own values in by string joins (a few microseconds instead of a model build and dump per token)."""

    def __init__(self, marked: str):
        head, rest = marked.split(json.dumps(_TEXT_MARK), 1)
        self.parts = (head, *rest.split(json.dumps([_IDS_MARK]), 1))

    def fill(self, text: str, token_ids: list[int]) -> str:
        text_json = json.dumps(text, ensure_ascii=False)
        if len(self.parts) == 2:
            return self.parts[0] + text_json + self.parts[1]
        return self.parts[0] + text_json + self.parts[1] + json.dumps(list(token_ids), separators=(",", ":")) + \
            self.parts[2]


class ChatShape:
    """OpenAI's chat shapes of one request."""

    token_ids = False  # whether each chunk / choice carries its token ids (completions' return_token_ids)

    def __init__(self, rid: str, created: int, model: str):
        self.rid, self.created, self.model = rid, created, model
        self._delta = _Template(self.delta_model(_TEXT_MARK, [_IDS_MARK]))

    def _chunk(self, delta: DeltaMessage, finish_reason: str | None = None) -> str:
        return ChatCompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[
            ChatCompletionChunkChoice(delta=delta, finish_reason=finish_reason)]).model_dump_json()

    def first(self) -> str | None:
        return self._chunk(DeltaMessage(role="assistant", content=""))

    def delta_model(self, text: str, token_ids: list[int]) -> str:
        return self._chunk(DeltaMessage(content=text))

    def delta(self, text: str, token_ids: list[int]) -> str:
        """The chunk of new text (hot path: the pydantic chunk's JSON, made once with markers, filled in)."""
        return self._delta.fill(text, token_ids)

    def last(self, finish_reason: str) -> str:
        return self._chunk(DeltaMessage(), finish_reason)

    def usage(self, usage: UsageInfo) -> str:
        return ChatCompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[],
                                   usage=usage).model_dump_json()

    def response(self, choices: list[tuple[str, str, list[int]]], usage: UsageInfo) -> dict:
        """The whole response: one choice per (text, finish_reason, token ids) (beam search: one per beam)."""
        return ChatCompletionResponse(id=self.rid, created=self.created, model=self.model, usage=usage, choices=[
            ChatCompletionChoice(index=i, message=AssistantMessage(content=text), finish_reason=reason)
            for i, (text, reason, _) in enumerate(choices)]).model_dump()


class CompletionShape(ChatShape):
    """OpenAI's (legacy) completion shapes of one request; echo puts the prompt's text first; token_ids: each
    choice carries its token ids (return_token_ids)."""

    def __init__(self, rid: str, created: int, model: str, echo: str = "", token_ids: bool = False):
        self.echo, self.token_ids = echo, token_ids
        super().__init__(rid, created, model)

    def _chunk(self, text: str, finish_reason: str | None = None, token_ids: list[int] | None = None) -> str:
        return CompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[
            CompletionChoice(text=text, finish_reason=finish_reason, token_ids=token_ids)]).model_dump_json()

    def first(self) -> str | None:
        return self._chunk(self.echo, token_ids=[] if self.token_ids else None) if self.echo else None

    def delta_model(self, text: str, token_ids: list[int]) -> str:
        return self._chunk(text, token_ids=list(token_ids) if self.token_ids else None)

    def last(self, finish_reason: str) -> str:
        return self._chunk("", finish_reason, [] if self.token_ids else None)

    def usage(self, usage: UsageInfo) -> str:
        return CompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[],
                               usage=usage).model_dump_json()

    def response(self, choices: list[tuple[str, str, list[int]]], usage: UsageInfo) -> dict:
        return CompletionResponse(id=self.rid, created=self.created, model=self.model, usage=usage, choices=[
            CompletionChoice(index=i, text=self.echo + text, finish_reason=reason,
                             token_ids=list(ids) if self.token_ids else None)
            for i, (text, reason, ids) in enumerate(choices)]).model_dump()
