"""Draft tokens for speculative decoding (pure Python, no torch).

A drafter proposes the tokens a sequence will probably generate next; one decode step runs
the sequence's last token and the drafts together and keeps the drafts its own sampling
agrees with (`services.decode.engine`). Two sources:

- a prediction (the API's `prediction` / `speculation`): text the output is expected to
  repeat, such as the file an edit request changes. The drafter follows the prediction
  while the output matches it; after a mismatch (the edited line) it re-aligns on the last
  few output tokens, preferring the nearest place ahead, so the rest still helps;
- prompt lookup (n-gram): the continuation of the latest earlier occurrence of the output's
  last few tokens in the prompt and the output so far.

How many tokens a step drafts adapts to the sequence's recent acceptance: it doubles after a
step that accepts every draft and falls to what was accepted (at least one) otherwise, and a
step whose first draft fails makes the next few steps draft nothing, so a wrong prediction
costs little.
"""

from collections import defaultdict

MIN_NGRAM = 2  # output tokens that must match before a source is followed
MAX_NGRAM = 4
_START_DRAFT = 4
_MAX_BACKOFF_STEPS = 8


def num_accepted(sampled: list[int], draft: list[int]) -> int:
    """How many drafts a step keeps: `sampled[j]` was sampled at the draft's position j (from
    the logits after the first j drafts), and draft j stands only if it is what was sampled
    there. Sampling every position as if there were no draft and keeping drafts while they
    match is speculative sampling for a deterministic draft: draft j is accepted with its
    probability, and on a mismatch the token sampled there is drawn from the rest of the
    distribution, renormalised. The step's new tokens are sampled[: num_accepted + 1]."""
    for j, token in enumerate(draft):
        if sampled[j] != token:
            return j
    return len(draft)


class NgramIndex:
    """Positions of every n-gram (MIN_NGRAM..MAX_NGRAM tokens) of a growing token list."""

    def __init__(self, tokens: list[int] | None = None) -> None:
        self.tokens: list[int] = []
        self._starts: dict[tuple[int, ...], list[int]] = defaultdict(list)
        self.extend(tokens or [])

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if end >= n:
                    self._starts[tuple(self.tokens[end - n : end])].append(end - n)

    def continuations(self, suffix: list[int], limit: int) -> tuple[list[int], int]:
        """Where the tokens following an occurrence of the longest matching tail of `suffix`
        start (ascending), for occurrences ending before `limit`, and that tail's length;
        ([], 0) if none matches."""
        for n in range(min(MAX_NGRAM, len(suffix)), MIN_NGRAM - 1, -1):
            starts = self._starts.get(tuple(suffix[-n:]))
            ends = [s + n for s in starts or () if s + n < limit]
            if ends:
                return ends, n
        return [], 0


class Drafter:
    """Proposes drafts for one sequence and learns from what each step accepted."""

    def __init__(self, max_draft: int) -> None:
        self.max_draft = max_draft
        self.draft_len = min(_START_DRAFT, max_draft)
        self._backoff = 0  # steps to skip after a miss
        self._misses = 0  # consecutive steps whose first draft failed
        self.drafted = 0
        self.accepted = 0
        # Per draft position (0: the first draft of a step): how often drafted, accepted.
        self.drafted_at: list[int] = []
        self.accepted_at: list[int] = []

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        """At most `limit` drafts to follow `token_ids` (prompt + output so far)."""
        if self._backoff:
            self._backoff -= 1
            return []
        return self._candidates(token_ids)[: min(limit, self.draft_len)]

    def record(self, num_drafted: int, num_accepted: int) -> None:
        """A step verified `num_drafted` drafts and accepted the first `num_accepted`."""
        if num_drafted == 0:
            return
        self.drafted += num_drafted
        self.accepted += num_accepted
        grow = max(num_drafted - len(self.drafted_at), 0)
        self.drafted_at += [0] * grow
        self.accepted_at += [0] * grow
        for i in range(num_drafted):
            self.drafted_at[i] += 1
            self.accepted_at[i] += i < num_accepted
        if num_accepted == num_drafted:
            self.draft_len = min(self.draft_len * 2, self.max_draft)
            self._misses = 0
        else:
            self.draft_len = max(num_accepted, 1)
        if num_accepted == 0:
            self._misses += 1
            self._backoff = min(2 ** (self._misses - 1), _MAX_BACKOFF_STEPS)
        else:
            self._misses = 0

    def _candidates(self, token_ids: list[int]) -> list[int]:
        raise NotImplementedError


class PredictionDrafter(Drafter):
    """Drafts from a prediction of the output, aligned to the output so far."""

    def __init__(self, prediction: list[int], num_prompt_tokens: int, max_draft: int) -> None:
        super().__init__(max_draft)
        self.prediction = NgramIndex(prediction)
        self.num_prompt_tokens = num_prompt_tokens
        self._next = 0  # prediction index expected next, if aligned
        self._aligned_at = -1  # output length when _next was last checked

    def _candidates(self, token_ids: list[int]) -> list[int]:
        tokens = self.prediction.tokens
        output = token_ids[self.num_prompt_tokens :]
        if not self._follows(output):
            ends, n = self.prediction.continuations(output[-MAX_NGRAM:], len(tokens))
            if not ends:
                return []
            # The nearest occurrence that starts where the output left the prediction or
            # later (an edit replaced or inserted text), else the last one (text removed).
            ahead = [end for end in ends if end - n >= self._next]
            self._next = ahead[0] if ahead else ends[-1]
        self._aligned_at = len(output)
        return tokens[self._next : self._next + self.max_draft]

    def _follows(self, output: list[int]) -> bool:
        """Whether the output since the last alignment matches the prediction from _next on;
        if so _next moves past it."""
        if self._aligned_at < 0:
            # Nothing generated yet but prefill's first token: the prediction starts the output.
            self._aligned_at = 0
        new = output[self._aligned_at :]
        tokens = self.prediction.tokens
        if tokens[self._next : self._next + len(new)] != new:
            return False
        self._next += len(new)
        return self._next < len(tokens)


class PromptLookupDrafter(Drafter):
    """Drafts the continuation of the latest earlier occurrence of the output's last tokens
    in the prompt and the output so far (n-gram prompt lookup)."""

    def __init__(self, max_draft: int) -> None:
        super().__init__(max_draft)
        self.index = NgramIndex()

    def _candidates(self, token_ids: list[int]) -> list[int]:
        self.index.extend(token_ids[len(self.index.tokens) :])
        ends, _ = self.index.continuations(token_ids[-MAX_NGRAM:], len(token_ids))
        if not ends:
            return []
        return token_ids[ends[-1] : ends[-1] + self.max_draft]
