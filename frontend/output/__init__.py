"""What the client gets: response bodies, SSE chunks, logprobs, parsed tool calls."""
