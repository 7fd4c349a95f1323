"""Detokenising a growing output for streaming: text deltas that are safe to show.

Used by the Python API (`RequestOutput.text` / `new_text`), the OpenAI server and the terminal chat.
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalText:
    """The text of a growing list of output token ids, handed out in deltas that are safe to show.

    Held back until more tokens decide: a trailing partial UTF-8 character (U+FFFD from the decoder) and any
    tail that could be the start of a stop string. A stop string ends the text before it (never returned). At
    the end (finished) everything left is flushed. Without a tokenizer (a server on token ids alone) the text
    stays empty."""

    def __init__(self, tokenizer, skip_ids: Sequence[int] = (), stop: Sequence[str] = ()):
        self.tokenizer, self.skip, self.stop = tokenizer, frozenset(skip_ids), list(stop)
        self.text = ""  # the text so far, cut before a stop string once one appeared
        self.sent = 0  # characters of self.text handed out
        self.stopped = False  # a stop string was found

    def update(self, token_ids: Sequence[int], finished: bool = False) -> str:
        """The new text to show after the output grew to token_ids (all of them, not only the new ones)."""
        if self.stopped or self.tokenizer is None:
            return ""
        text = self.tokenizer.decode([t for t in token_ids if t not in self.skip])
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            text, self.stopped, finished = text[: max(min(hits), self.sent)], True, True
        self.text = text
        end = len(text)
        if not finished:
            while end > self.sent and text[end - 1] == "\ufffd":  # a character whose bytes are still coming
                end -= 1
            hold = 0
            for s in self.stop:  # the longest tail that a stop string starts with
                for n in range(min(len(s) - 1, end - self.sent), hold, -1):
                    if text.endswith(s[:n], 0, end):
                        hold = n
                        break
            end -= hold
        delta = text[self.sent: end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def finish_reason(self, runtime_reason: str | None) -> str:
        """OpenAI's finish_reason: "stop" (stop token or string), "length" (max_tokens)."""
        return "stop" if self.stopped or runtime_reason == "stop" else "length"
