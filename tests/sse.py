"""Reading the SSE bodies of streamed responses as a client does."""

import json
from typing import Any


def sse_events(text: str) -> list[dict[str, Any]]:
    """The JSON events of an SSE body that ends with `data: [DONE]`. Comment frames (the
    `: keep-alive` a stream sends while it waits for its first token) are skipped, as
    clients skip them."""
    frames = [f for f in text.split("\n\n") if f and not f.startswith(":")]
    assert all(f.startswith("data: ") for f in frames), frames
    assert frames[-1] == "data: [DONE]"
    return [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
