"""Prompt encoding that remembers the text between added tokens.

A tokenizer cuts its input at every added token ("<|im_start|>", "<|im_end|>", ...) before it
normalizes, pre-tokenizes and merges anything, and encodes each piece between them on its
own. A rendered chat is such pieces, one or more per message, so the next turn of a
conversation, or the same long prompt again, repeats all of them but the new ones: those
are all this encodes (in parallel when they are long), the rest comes from a cache bounded
in tokens (least recently used first out). The ids are exactly those of encoding the whole
text.

That holds where a piece's encoding cannot depend on where it sits: byte-level tokenizers
without a normalizer whose added tokens strip no whitespace (GPT-2, Llama 3, Qwen, SmolLM
and the like). For any other tokenizer, or if a check at start-up disagrees, every text is
encoded whole. The ids that add_special_tokens adds around a text (a BOS) are found once.
"""

import logging
import re
import threading
from collections import OrderedDict

from services.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# New pieces are encoded in parallel (a batch) when two of them have this many characters:
# waking the library's threads costs about as much as encoding that one after the other.
_PARALLEL_CHARS = 2048
# Checked at start-up against encoding it whole (with the added tokens spliced in).
_PROBE = "{0}user\nHello there,  friend!\n\n{1}\n{0}assistant\n 12 apples{1}{0}"


class EncodeCache:
    def __init__(self, tokenizer: Tokenizer, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._pieces: OrderedDict[str, list[int]] = OrderedDict()
        self._num_tokens = 0
        self._lock = threading.Lock()
        self._added = _added_token_ids(tokenizer)
        self._around = _special_tokens_around(tokenizer)
        self._split = None
        if max_tokens > 0 and self._added:
            names = sorted(self._added, key=len, reverse=True)  # the longest match first
            self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")")
            if not self._agrees_with_whole_encoding():
                log.warning("encoding pieces between added tokens differs here: no cache")
                self._split = None
            # Starts the library's threads now, not on the first long prompt (about 2 ms).
            tokenizer.backend.encode_batch(["a", "b"], add_special_tokens=False)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """As `Tokenizer.encode`."""
        if self._bypassed(add_special_tokens):
            return self.tokenizer.encode(text, add_special_tokens)
        parts = self._split.split(text)  # text, added token, text, ..., text
        known = self._lookup(parts)
        missing = list(dict.fromkeys(p for p in parts[::2] if p and p not in known))
        if missing:
            new = dict(zip(missing, self._encode_pieces(missing), strict=True))
            self._remember(new)
            known.update(new)
        return self._join(parts, known, add_special_tokens)

    def cached(self, text: str, add_special_tokens: bool = False) -> list[int] | None:
        """`encode(text, add_special_tokens)` when the cache holds every piece of the text (no
        tokenizer work at all); else None."""
        if self._bypassed(add_special_tokens):
            return None
        parts = self._split.split(text)
        known = self._lookup(parts)
        if any(p and p not in known for p in parts[::2]):
            return None
        return self._join(parts, known, add_special_tokens)

    def _bypassed(self, add_special_tokens: bool) -> bool:
        return self._split is None or (add_special_tokens and self._around is None)

    def _encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        backend = self.tokenizer.backend
        if len(pieces) > 1 and sorted(map(len, pieces))[-2] >= _PARALLEL_CHARS:
            encodings = backend.encode_batch(pieces, add_special_tokens=False)
        else:
            encodings = [backend.encode(p, add_special_tokens=False) for p in pieces]
        return [e.ids for e in encodings]

    def _lookup(self, parts: list[str]) -> dict[str, list[int]]:
        with self._lock:
            known = {p: self._pieces[p] for p in parts[::2] if p in self._pieces}
            for piece in known:
                self._pieces.move_to_end(piece)
        return known

    def _join(
        self, parts: list[str], known: dict[str, list[int]], add_special_tokens: bool
    ) -> list[int]:
        before, after = self._around if add_special_tokens and self._around else ((), ())
        ids = list(before)
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self._added[part])
            elif part:
                ids += known[part]
        return ids + list(after)

    def _remember(self, new: dict[str, list[int]]) -> None:
        with self._lock:
            for piece, ids in new.items():
                if len(ids) > self.max_tokens or piece in self._pieces:
                    continue
                self._pieces[piece] = ids
                self._num_tokens += len(ids)
            while self._num_tokens > self.max_tokens:
                _, ids = self._pieces.popitem(last=False)
                self._num_tokens -= len(ids)

    def _agrees_with_whole_encoding(self) -> bool:
        names = list(self._added)
        start, end = names[0], names[-1]
        text = _PROBE.format(start, end)
        return all(
            self.encode(text, special) == self.tokenizer.encode(text, special)
            for special in (False, True)
        )


def _special_tokens_around(tokenizer: Tokenizer) -> tuple[tuple[int, ...], ...] | None:
    """The ids that add_special_tokens puts before and after a text (a BOS, an EOS), the same
    for every text probed; None if they are not."""
    found = set()
    for text in ("Hello", " 12 x\n"):
        bare, full = tokenizer.encode(text), tokenizer.encode(text, add_special_tokens=True)
        starts = [i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare]
        if len(starts) != 1:
            return None
        found.add((tuple(full[: starts[0]]), tuple(full[starts[0] + len(bare) :])))
    return found.pop() if len(found) == 1 else None


def _added_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The added tokens by content, when the text between them encodes independently of
    what surrounds it; else none."""
    backend = tokenizer.backend
    if not tokenizer.is_byte_level or backend.normalizer is not None:
        return {}
    added = backend.get_added_tokens_decoder()
    if any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
        return {}
    return {t.content: i for i, t in sorted(added.items())}
