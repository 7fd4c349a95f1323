"""Qwen (v1) tokenizer on tiktoken, and the chat prompt / response helpers of Qwen's qwen_generation_utils.

The BPE ranks come from the checkpoint's qwen.tiktoken; special tokens (<|endoftext|>, <|im_start|>, <|im_end|>,
<|extra_0..204|>) follow the 151643 regular ranks. Chat content (make_context's chatml turns) encodes literal
special-token text as plain text, so a user cannot inject chat-control tokens; a raw prompt (`encode_raw`:
run.py --chat_format raw, /v1/completions, LLM.generate on a string) spells them as the special ids, as Qwen's own
tokenizer does by default (people pre-format chatml themselves).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Literal

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from qwen_trtllm import QWenError

TIKTOKEN_FILE = "qwen.tiktoken"
# copied from a checkpoint into FT directories and engines: the tokenizer and the sampling defaults
TOKENIZER_FILES = (TIKTOKEN_FILE, "tokenizer_config.json", "generation_config.json")
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_START_ID = 151643  # number of regular BPE ranks in qwen.tiktoken
SPECIAL_TOKENS = {tok: SPECIAL_START_ID + i for i, tok in enumerate((ENDOFTEXT, IM_START, IM_END) + EXTRAS)}
NEWLINE_ID = 198  # "\n"
DEFAULT_SYSTEM = "You are a helpful assistant."


class QWenTokenizer:
    """tiktoken-backed Qwen tokenizer with the ids of Qwen's own tokenization_qwen.QWenTokenizer."""

    def __init__(self, mergeable_ranks: dict[bytes, int], name: str = "qwen"):
        if not mergeable_ranks or max(mergeable_ranks.values()) >= SPECIAL_START_ID:
            raise QWenError(f"{name} is not a Qwen (v1) qwen.tiktoken: expected BPE ranks below {SPECIAL_START_ID}")
        self.special_tokens: dict[str, int] = dict(SPECIAL_TOKENS)
        self.encoding = tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks,
                                          special_tokens=self.special_tokens)
        self.decoder: dict[int, bytes | str] = {v: k for k, v in mergeable_ranks.items()}
        self.decoder.update({v: k for k, v in self.special_tokens.items()})
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IM_START]
        self.im_end_id = self.special_tokens[IM_END]

    @classmethod
    def from_file(cls, path: str | Path) -> QWenTokenizer:
        """Load a qwen.tiktoken file (base64 token + rank per line)."""
        path = Path(path)
        if not path.is_file():
            raise QWenError(f"tokenizer file {path} is missing: the checkpoint dir must contain {TIKTOKEN_FILE}")
        data = path.read_bytes()
        try:
            # tiktoken caches files by path name; the content hash keeps a stale cached copy from being used
            ranks = load_tiktoken_bpe(str(path), expected_hash=hashlib.sha256(data).hexdigest())
        except ValueError as e:
            raise QWenError(f"{path} is not a valid {TIKTOKEN_FILE}: {str(e).splitlines()[0]}") from e
        return cls(ranks, name=str(path))

    @classmethod
    def from_dir(cls, path: str | Path) -> QWenTokenizer:
        """Load from a checkpoint/engine directory holding qwen.tiktoken (or from the file itself)."""
        path = Path(path)
        return cls.from_file(path if path.is_file() else path / TIKTOKEN_FILE)

    # --- properties -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eos_token_id(self) -> int:
        return self.eod_id

    @property
    def pad_token_id(self) -> int:
        return self.eod_id

    def __len__(self) -> int:
        return self.vocab_size

    # --- encode / decode --------------------------------------------------------------------------------
    def encode(self, text: str, allowed_special: Literal["all"] | Collection[str] = ()) -> list[int]:
        """Token ids of NFC(text); special-token text becomes special ids only if listed in allowed_special."""
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        return self.encoding.encode(unicodedata.normalize("NFC", text), allowed_special=allowed,
                                    disallowed_special=())

    def encode_raw(self, text: str) -> list[int]:
        """A raw prompt's ids as Qwen's tokenization_qwen encodes them (allowed_special="all" by default): special
        token text, e.g. a prompt pre-formatted as chatml, becomes the special ids. Never for chat content."""
        return self.encode(text, allowed_special="all")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Text of ids; bytes that do not form whole UTF-8 characters are handled per `errors`. Ids the tokenizer
        does not have (Qwen's embedding has 151936 rows, the tokenizer 151851 ids: a model can sample the padding
        rows) decode to nothing, as Hugging Face `tokenizers` does."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.eod_id]
        return self.encoding.decode([i for i in ids if i in self.decoder], errors=errors)

    def convert_tokens_to_ids(self, tokens: bytes | str | Sequence[bytes | str]) -> int | list[int]:
        """Ids of special-token strings or regular-token bytes (one token or a list)."""
        if isinstance(tokens, (bytes, str)):
            return self._token_id(tokens)
        return [self._token_id(t) for t in tokens]

    def _token_id(self, token: bytes | str) -> int:
        if isinstance(token, str) and token in self.special_tokens:
            return self.special_tokens[token]
        raw = token.encode("utf-8") if isinstance(token, str) else token
        try:
            return self.encoding.encode_single_token(raw)
        except KeyError as e:
            raise QWenError(f"{token!r} is not a token of the Qwen vocabulary") from e


# --- chat prompts (Qwen's qwen_generation_utils.make_context) ---------------------------------------------
def make_context(tokenizer: QWenTokenizer, query: str, history: Sequence[tuple[str, str | None]] | None = None,
                 system: str = DEFAULT_SYSTEM, max_window_size: int = 6144,
                 chat_format: str = "chatml") -> tuple[str, list[int]]:
    """(raw_text, context_tokens) of a chat prompt; the oldest history turns are dropped to fit max_window_size."""
    if chat_format == "raw":
        return query, tokenizer.encode_raw(query)
    if chat_format != "chatml":
        raise QWenError(f"unknown chat format {chat_format!r}: use 'chatml' or 'raw'")
    start, end, nl = [tokenizer.im_start_id], [tokenizer.im_end_id], [NEWLINE_ID]

    def turn(role: str, content: str) -> tuple[str, list[int]]:
        ids = start + tokenizer.encode(role) + nl + tokenizer.encode(content) + end
        return f"{IM_START}{role}\n{content}{IM_END}", ids

    system_text, system_tokens = turn("system", system)
    raw_text, context_tokens = "", []
    for q, r in reversed(list(history or [])):
        q_text, q_tokens = turn("user", q)
        r_text, r_tokens = turn("assistant", r) if r is not None else ("", [])  # None: an unanswered turn
        next_tokens = nl + q_tokens + nl + r_tokens
        if len(system_tokens) + len(next_tokens) + len(context_tokens) >= max_window_size:
            break
        raw_text = f"\n{q_text}\n{r_text}" + raw_text
        context_tokens = next_tokens + context_tokens
    q_text, q_tokens = turn("user", query)
    raw_text = f"{system_text}{raw_text}\n{q_text}\n{IM_START}assistant\n"
    context_tokens = system_tokens + context_tokens + nl + q_tokens + nl + start + tokenizer.encode("assistant") + nl
    return raw_text, context_tokens


# --- stopping and decoding the response -------------------------------------------------------------------
def get_stop_words_ids(chat_format: str, tokenizer: QWenTokenizer) -> list[list[int]]:
    """Stop sequences as Qwen's generation utils list them."""
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    if chat_format == "raw":
        return [[tokenizer.eod_id]]
    raise QWenError(f"unknown chat format {chat_format!r}: use 'chatml' or 'raw'")


def stop_token_ids(tokenizer: QWenTokenizer, chat_format: str = "chatml") -> set[int]:
    """Every single-token id that ends generation: the stop words plus <|endoftext|>."""
    return {ids[0] for ids in get_stop_words_ids(chat_format, tokenizer)} | {tokenizer.eod_id}


def decode_tokens(tokens: Sequence[int], tokenizer: QWenTokenizer, raw_text_len: int | None = None,
                  context_length: int = 0, chat_format: str = "chatml", errors: str = "replace") -> str:
    """Response text of prompt+output `tokens`: cut at the first stop id after context_length, the prompt's
    raw_text_len characters dropped, surrounding whitespace stripped (as Qwen's decode_tokens does)."""
    stops = stop_token_ids(tokenizer, chat_format)
    tokens = [int(t) for t in tokens]
    end = next((i for i in range(context_length, len(tokens)) if tokens[i] in stops), len(tokens))
    text = tokenizer.decode(tokens[:end], errors=errors)
    return text[raw_text_len or 0:].strip()


def decode_response(generated_ids: Sequence[int], tokenizer: QWenTokenizer, chat_format: str = "chatml") -> str:
    """Text of generated ids only (no prompt), cut at the first stop token and stripped."""
    return decode_tokens(generated_ids, tokenizer, chat_format=chat_format)
