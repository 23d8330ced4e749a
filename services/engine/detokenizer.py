"""Streaming token ids -> text, one step at a time, with the same result as a full decode.

Byte-level vocabularies (GPT-2 style, including every GGUF "gpt2" model) decode by concatenating
each piece's bytes, so we map new pieces to bytes and feed an incremental UTF-8 decoder: O(new
tokens) per step, and a character split across tokens is held back until its last byte arrives.
Other vocabularies (sentencepiece-style decoders strip or add spaces depending on neighbours)
re-decode a short window of recent ids and emit the difference. That window starts with the
prompt's last ids, as vLLM's does: a Metaspace decoder drops the leading space of the first
piece it decodes, so without the prompt before it "▁is" would come out as "is", not " is".
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from services.engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt ids that open the re-decode window: enough for a decoder's view of what precedes the
# first generated piece (one whole piece; a few byte-fallback pieces of one character).
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """One per generated sequence. Invariant: the concatenation of every push() and the final
    flush() is what the generated ids add to the prompt's text: decode(context + generated)
    minus decode(context), where the context is the prompt's last PROMPT_CONTEXT_TOKENS ids
    (for byte-level vocabularies, decode(generated) itself)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        prompt_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._byte_level = tokenizer.is_byte_level
        if self._byte_level:
            self._pieces = tokenizer.piece_bytes()
            # errors="replace" matches the backend's lossy UTF-8 for truly invalid bytes, and the
            # incremental decoder holds an incomplete trailing sequence instead of replacing it.
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Fallback state: ids so far, the prompt's last ones first; [prefix_offset, read_offset)
        # is the context window already emitted (or the prompt's), ids from read_offset on are
        # not yet emitted.
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_ids: Sequence[int]) -> str:
        """Text that became final with these ids (possibly empty)."""
        if self._byte_level:
            return self._utf8.decode(self._bytes_of(token_ids))
        self._ids.extend(token_ids)
        prefix, full = self._window_texts()
        # A trailing U+FFFD is usually a multi-byte character still missing bytes: wait.
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever was held back, at the end of the stream; invalid bytes become U+FFFD."""
        if self._byte_level:
            return self._utf8.decode(b"", final=True)
        prefix, full = self._window_texts()
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""

    def _bytes_of(self, token_ids: Sequence[int]) -> bytes:
        pieces, num_pieces = self._pieces, len(self._pieces)
        is_special = self._tokenizer.is_special
        skip = self._skip_special_tokens
        # Ids past the tokenizer's vocabulary (a model's padded embedding rows) decode to nothing,
        # as in the backend.
        return b"".join(
            pieces[i] for i in token_ids if 0 <= i < num_pieces and not (skip and is_special(i))
        )

    def _window_texts(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        skip = self._skip_special_tokens
        window = self._ids[self._prefix_offset :]
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], skip)
        return prefix, decode(window, skip)
