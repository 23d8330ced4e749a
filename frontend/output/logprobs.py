"""Token logprobs in the three response shapes: legacy completions, chat, and raw_output."""

from typing import Any

from frontend.stages.types import TokenLogprob, TopLogprob

JsonObject = dict[str, Any]


def _bytes(token: str, token_bytes: bytes) -> list[int]:
    return list(token_bytes or token.encode())


def num_chars(entries: list[TokenLogprob]) -> int:
    return sum(len(entry.token) for entry in entries)


def legacy(entries: list[TokenLogprob], offset: int) -> JsonObject:
    """/v1/completions: parallel lists; `text_offset` counts characters into the choice's text
    from `offset` (clamped at 0: an echo is aligned to end where the completion starts, and
    special tokens such as BOS have text of their own that the echoed prompt lacks). Each
    top_logprobs dict holds the alternatives and the sampled token (so up to N + 1 entries);
    null for a prompt's first token, which has no logprob."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    token_ids: list[int] = []
    for entry in entries:
        tokens.append(entry.token)
        token_logprobs.append(entry.logprob)
        text_offset.append(max(offset, 0))
        token_ids.append(entry.token_id)
        offset += len(entry.token)
        if entry.logprob is None:
            top_logprobs.append(None)
            continue
        alternatives = {top.token: top.logprob for top in entry.top}
        alternatives.setdefault(entry.token, entry.logprob)
        top_logprobs.append(alternatives)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
        "token_ids": token_ids,
    }


def chat(entries: list[TokenLogprob]) -> JsonObject:
    """/v1/chat/completions: one object per token, its alternatives as a list."""
    return {"content": [_chat_entry(entry) for entry in entries]}


def _chat_entry(entry: TokenLogprob) -> JsonObject:
    return {
        "token": entry.token,
        "logprob": entry.logprob,
        "bytes": _bytes(entry.token, entry.token_bytes),
        "top_logprobs": [_chat_top(top) for top in entry.top],
    }


def _chat_top(top: TopLogprob) -> JsonObject:
    return {"token": top.token, "logprob": top.logprob, "bytes": _bytes(top.token, top.token_bytes)}


def raw(entries: list[TokenLogprob], offset: int) -> JsonObject:
    """raw_output.completion_logprobs: the chat form with token ids and text offsets."""
    content = []
    for entry in entries:
        content.append(
            {
                "token": entry.token,
                "logprob": entry.logprob,
                "bytes": _bytes(entry.token, entry.token_bytes),
                "token_id": entry.token_id,
                "text_offset": offset,
                "top_logprobs": [{**_chat_top(top), "token_id": top.token_id} for top in entry.top],
            }
        )
        offset += len(entry.token)
    return {"content": content}
