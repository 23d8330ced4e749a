"""Finishing a constrained document within its token budget.

A JSON string with no length limit runs on until max_tokens and the reply is cut mid-document.
Near the end of its budget, a constrained sequence checks at each token that what is left
still fits a short completion of the document (the open string closed, required properties
filled with the shortest values, the open arrays and objects closed); a token that would leave
too little is replaced by the completion's first token, and the rest of the completion follows.
The reply then parses whenever the budget allows it at all, and ends with finish_reason
"length", since the budget forced the close.
"""

from collections.abc import Callable

from services.engine.grammar import GrammarState

# Characters a completion is built from, in order of preference: closers first, then the
# shortest values, then separators (which open more), whitespace last.
PREFERRED_CHARS = ('"', "}", "]", "0", ":", ",", "a", "1", "[", "{", "t", "f", "n", "-", " ", "\n")
# A document that needs more than this to finish is left alone.
MAX_COMPLETION_CHARS = 1024
# The budget is checked at every token once it is within this many tokens of the last
# completion's length, and otherwise every REFRESH_TOKENS tokens: a single token can lengthen
# the completion (opening an object with required properties) but rarely by this much.
WINDOW_TOKENS = 64
REFRESH_TOKENS = 16
# UTF-8: a character's bytes after the first.
MAX_CHARACTER_BYTES = 3


def short_completion(grammar: GrammarState) -> str | None:
    """Text that completes the document from the grammar's state, built greedily from the
    grammar's forced text and PREFERRED_CHARS; "" when it is complete, None when none is found
    (a character outside the preferred set is needed, or it would be too long)."""
    probe = grammar.matcher.fork()
    parts: list[str] = []
    size = 0
    while not probe.is_completed():
        forced = probe.find_jump_forward_string()
        step = forced or next((c for c in PREFERRED_CHARS if probe.accept_string(c)), None)
        if step is None:
            return None
        if forced:
            probe.accept_string(forced)
        parts.append(step)
        size += len(step)
        if size > MAX_COMPLETION_CHARS:
            return None
    return "".join(parts)


class BudgetCloser:
    """Accepts one constrained sequence's tokens into its grammar, keeping the document
    finishable within the tokens left. Owned by the decode loop."""

    def __init__(self, grammar: GrammarState, encode: Callable[[str], list[int]]) -> None:
        self.grammar = grammar
        self._encode = encode
        # The tokens of a completion from the grammar's state when last computed (None: none
        # found), whether that state is still the grammar's, and how many tokens came since a
        # completion was last found and how long it was (None: never found).
        self._completion: list[int] | None = None
        self._fresh = False
        self._unchecked = REFRESH_TOKENS  # computed at the first token
        self._known_len: int | None = None
        # The completion being emitted, once the budget forced it.
        self.closing: list[int] | None = None

    def accept(self, token_id: int, tokens_left: int) -> int:
        """Accepts the sampled `token_id`, or in its place the next token of the document's
        completion when `tokens_left` (this token included) leave no room for more. Returns
        the token accepted."""
        if self.closing:
            return self._force()
        if not self._due(tokens_left):
            self._accept(token_id)
            return token_id
        completion = self._current_completion()
        if not completion or len(completion) > tokens_left:  # nothing to do, or too late
            self._accept(token_id)
            return token_id
        if len(completion) < tokens_left:
            self._accept(token_id)
            if self._fits(self._current_completion(), len(completion), tokens_left - 1):
                return token_id
            # Too little would be left: undo the token and close from before it.
            self.grammar.matcher.rollback(1)
            self._completion, self._fresh = completion, True
        self.closing = list(completion)
        return self._force()

    def free_tokens(self, tokens_left: int) -> int:
        """How many tokens may come before the budget needs checking (drafts stay within)."""
        if self._known_len is None:
            return max(0, REFRESH_TOKENS - self._unchecked)
        return max(
            0,
            min(tokens_left - self._known_len - WINDOW_TOKENS, REFRESH_TOKENS - self._unchecked),
        )

    @staticmethod
    def _fits(completion: list[int] | None, before: int, tokens_left: int) -> bool:
        """Whether a completion of `tokens_left` tokens at most is sure to exist. None: the
        token stopped inside a character (a multi-byte one), which needs a few more bytes,
        each a token at worst, before the completion from before it applies again."""
        if completion is None:
            return before + MAX_CHARACTER_BYTES <= tokens_left
        return len(completion) <= tokens_left

    def _due(self, tokens_left: int) -> bool:
        if self._unchecked >= REFRESH_TOKENS:
            return True
        return self._known_len is not None and tokens_left <= self._known_len + WINDOW_TOKENS

    def _current_completion(self) -> list[int] | None:
        if not self._fresh:
            text = short_completion(self.grammar)
            self._completion = None if text is None else self._encode(text)
            self._fresh = True
            if self._completion is not None:
                self._known_len, self._unchecked = len(self._completion), 0
        return self._completion

    def _accept(self, token_id: int) -> None:
        self.grammar.accept(token_id)
        self._fresh = False
        self._unchecked += 1

    def _force(self) -> int:
        assert self.closing
        token_id = self.closing.pop(0)
        if not self.grammar.accept(token_id):
            raise RuntimeError("the grammar refused its own completion")
        return token_id
