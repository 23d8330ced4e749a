"""Per-request text: incremental detokenization and stop strings."""

from collections.abc import Sequence

from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.tokenizer import Tokenizer


class TextStream:
    """Turns tokens into text deltas that end at the first stop string, cut or (with
    `include_stop_str`) kept, and never contain what follows it.

    Text that could still become a stop string is held back until it cannot, so a client
    never sees a partial stop sequence that is later cut.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: list[str],
        include_stop_str: bool,
        prompt_ids: Sequence[int] = (),
    ) -> None:
        # The prompt's ids let a sentencepiece-style decoder keep the first token's space.
        self._detokenizer = IncrementalDetokenizer(tokenizer, True, prompt_ids)
        self._stop = [s for s in stop if s]
        self._include_stop_str = include_stop_str
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._text = ""
        self._emitted = 0

    def push(self, token_id: int, is_last: bool) -> tuple[str, bool]:
        """Returns (new text to emit, whether a stop string ended the text)."""
        searched_upto = len(self._text)
        self._text += self._detokenizer.push([token_id])
        if is_last:
            self._text += self._detokenizer.flush()
        if self._stop:
            start = max(0, searched_upto - self._hold)
            hits = [(self._text.find(s, start), s) for s in self._stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                # The earliest match; at one position, the first listed.
                index, stop = min(hits, key=lambda hit: hit[0])
                return self._emit(index + len(stop) if self._include_stop_str else index), True
        end = len(self._text) if is_last else max(self._emitted, len(self._text) - self._hold)
        return self._emit(end), False

    def finish(self) -> str:
        """Whatever is still held back when generation ends for another reason."""
        self._text += self._detokenizer.flush()
        return self._emit(len(self._text))

    def _emit(self, end: int) -> str:
        delta = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta
