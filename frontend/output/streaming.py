"""Server-sent events: the chunk sequence of one generation."""

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator
from typing import Any

from frontend.errors import ApiError
from frontend.output.responses import ResponseShape
from frontend.run.choice import Generation
from frontend.run.pipeline import Run
from frontend.stages.types import TokenDelta

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse_events(
    run: Run,
    shape: ResponseShape,
    *,
    include_usage: bool,
    continuous_usage_stats: bool,
    perf_metrics_in_response: bool,
) -> AsyncGenerator[str, None]:
    """Chunks from decode's first messages to [DONE]; a failure is raised (the caller turns it
    into an error event).

    Each choice opens with its own chunks and ends with its own finish_reason chunk; the last
    of those carries perf_metrics when asked, and the usage over all choices unless
    include_usage puts it on an extra chunk of its own, as OpenAI does (only there: clients
    that add up usage across chunks would count it twice). continuous_usage_stats adds the
    counts so far to every other chunk, as vLLM does."""
    annotate = _Annotator(shape, run, continuous_usage_stats)
    try:
        for generation in run.generations:
            for opening in shape.opening_chunks(generation.output):
                yield sse(annotate(generation, opening))
        remaining = len(run.generations)
        async with contextlib.aclosing(_merged(run)) as deltas:
            async for generation, delta in deltas:
                for chunk in shape.delta_chunks(generation.output, delta):
                    yield sse(annotate(generation, chunk))
                if delta.finish_reason is None:
                    continue
                remaining -= 1
                extra: dict[str, Any] = {}
                if remaining == 0:
                    if not include_usage:
                        extra["usage"] = run.usage()
                    if perf_metrics_in_response:
                        extra["perf_metrics"] = run.metrics.as_dict()
                for closing in shape.closing_chunks(generation.output):
                    yield sse(annotate(generation, closing))
                yield sse(annotate(generation, shape.finish_chunk(generation.output, **extra)))
                if remaining == 0 and include_usage:
                    yield sse(shape.usage_chunk(run.usage()))
    finally:
        run.close()
    yield DONE


def error_events(error: ApiError) -> str:
    """How a stream of chunks ends when it fails after its status line has gone out."""
    return sse(error.body()) + DONE


class _Annotator:
    """What a request adds to its choices' chunks: with return_token_ids, a choice's first
    chunk carries its prompt's token ids; with continuous_usage_stats, every chunk the token
    counts so far (the finish chunk keeps the full usage it may carry)."""

    def __init__(self, shape: ResponseShape, run: Run, continuous_usage_stats: bool) -> None:
        self._run = run
        self._announce = shape.options.return_token_ids
        self._continuous_usage = continuous_usage_stats
        self._announced: set[int] = set()

    def __call__(self, generation: Generation, chunk: dict[str, Any]) -> dict[str, Any]:
        index = generation.output.index
        if self._announce and index not in self._announced:
            self._announced.add(index)
            chunk["choices"][0]["prompt_token_ids"] = generation.output.prompt.token_ids
        if self._continuous_usage:
            chunk.setdefault("usage", self._run.token_counts())
        return chunk


async def _merged(run: Run) -> AsyncGenerator[tuple[Generation, TokenDelta], None]:
    """Every choice's decode messages as they come, the first ones (already read) first."""
    for generation, first in zip(run.generations, run.firsts, strict=True):
        yield generation, first
    running = [g for g in run.generations if not g.finished]
    if len(running) == 1:  # the common case, without a task per message
        while (delta := await running[0].next()) is not None:
            yield running[0], delta
        return
    reads: dict[asyncio.Future[TokenDelta | None], Generation] = {}
    try:
        for generation in running:
            reads[asyncio.ensure_future(generation.next())] = generation
        while reads:
            done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
            for read in sorted(done, key=lambda r: reads[r].output.index):
                generation = reads.pop(read)
                delta = read.result()
                assert delta is not None  # only unfinished choices are read
                yield generation, delta
                if not generation.finished:
                    reads[asyncio.ensure_future(generation.next())] = generation
    finally:
        for read in reads:
            read.cancel()
