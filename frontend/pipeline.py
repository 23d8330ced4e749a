"""tokenize -> fit max_tokens -> prefill -> decode for every prompt and choice of a request."""

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from frontend.errors import invalid_request
from frontend.generation import ChoiceOutput, Generation
from frontend.metrics import PathTimings, RequestMetrics
from frontend.prompts import PreparedPrompt, PromptSource, PromptTokenizer, describe, fit_max_tokens
from frontend.server_metrics import ServerMetrics
from frontend.settings import GenerationSettings, OutputOptions
from frontend.stage_types import ModelLimits, Stopping, TokenDelta
from frontend.stages import StageClients

T = TypeVar("T")


@dataclass(slots=True)
class Run:
    """A started request: its prompts and every choice's generation (index i * n + j is
    prompt i's choice j), each already past decode's first message."""

    prompts: list[PreparedPrompt]
    generations: list[Generation]
    firsts: list[TokenDelta]
    metrics: RequestMetrics
    server_metrics: ServerMetrics
    _closed: bool = field(default=False)

    @property
    def choices(self) -> list[ChoiceOutput]:
        return [g.output for g in self.generations]

    @property
    def finished(self) -> bool:
        return all(g.finished for g in self.generations)

    def usage(self) -> dict[str, Any]:
        """Prompt tokens count once per prompt, however many choices share it."""
        num_prompt = sum(len(p.token_ids) for p in self.prompts)
        num_completion = sum(g.output.num_generated for g in self.generations)
        return {
            "prompt_tokens": num_prompt,
            "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion,
            "prompt_tokens_details": {"cached_tokens": self.metrics.cached_prompt_tokens},
        }

    def close(self) -> None:
        """Ends every decode call (or releases unclaimed KV); idempotent."""
        if self._closed:
            return
        self._closed = True
        for generation in self.generations:
            generation.close()
        self.server_metrics.observe_end(self.metrics, self.finished)


@dataclass(slots=True)
class _Request:
    """What every prompt of one request shares while it starts."""

    request_id: str
    source: PromptSource
    settings: GenerationSettings
    options: OutputOptions
    metrics: RequestMetrics
    # (choice index, generation) as created, so that a failure can close them all.
    created: list[tuple[int, Generation]] = field(default_factory=list)


class Pipeline:
    def __init__(self, stages: StageClients, server_metrics: ServerMetrics) -> None:
        self._stages = stages
        self.server_metrics = server_metrics

    async def start(
        self,
        request_id: str,
        source: PromptSource,
        settings: GenerationSettings,
        options: OutputOptions,
        metrics: RequestMetrics,
    ) -> Run:
        """Runs every choice up to decode's first message, so that stage failures still get
        an HTTP status. The caller owns `close()` of the returned run."""
        limits = await self._stages.limits()
        check_token_ids(settings, limits)
        request = _Request(request_id, source, settings, options, metrics)
        try:
            prompts = await run_all(
                [self._start_prompt(request, i) for i in range(source.num_prompts)]
            )
            generations = [g for _, g in sorted(request.created, key=lambda item: item[0])]
            run = Run(prompts, generations, [], metrics, self.server_metrics)
            firsts = await run_all([g.next() for g in generations])
            run.firsts = [delta for delta in firsts if delta is not None]
            self.server_metrics.observe_first_token(metrics)
            want_logprobs = settings.sampling.logprobs
            await run_all([describe(self._stages, p, options, want_logprobs) for p in prompts])
        except BaseException:
            for _, generation in request.created:
                generation.close()
            raise
        return run

    async def _start_prompt(self, request: _Request, index: int) -> PreparedPrompt:
        """Tokenizes and prefills prompt `index`, registering its choices' generations."""
        settings, source = request.settings, request.source
        timings = PathTimings()
        tokenized = await PromptTokenizer(self._stages, timings).tokenize(source, index)
        token_ids = tokenized.token_ids
        if not token_ids:
            raise invalid_request("The prompt is empty after tokenization.", source.param)
        limits = await self._stages.limits()
        max_tokens = fit_max_tokens(len(token_ids), settings, limits.max_model_len, source.param)
        prompt = PreparedPrompt(index, token_ids, tokenized.text, max_tokens)
        request.metrics.prompt_tokens += len(token_ids)
        await self._prefill(request, prompt, 0, timings)
        request.metrics.cached_prompt_tokens += prompt.num_cached_tokens
        # The other choices are prefilled only now, together: prefill's prefix cache then
        # serves them the whole prompt, so its KV is computed once, and decode finds the
        # blocks it pulled for the first choice in its own prefix cache rather than moving
        # them again.
        await run_all([self._prefill(request, prompt, j) for j in range(1, settings.n)])
        return prompt

    async def _prefill(
        self,
        request: _Request,
        prompt: PreparedPrompt,
        choice: int,
        timings: PathTimings | None = None,
    ) -> None:
        """Prefills one choice and registers its generation. The first choice (`timings`
        given) is on its prompt's way to the first token and asks for prompt logprobs when
        the echo shows them."""
        settings, metrics = request.settings, request.metrics
        index = prompt.index * settings.n + choice
        choice_id = request.request_id if index == 0 else f"{request.request_id}-{index}"
        sampling = settings.choice_sampling(choice)
        echoes = request.options.echo_count(len(prompt.token_ids)) > 0
        started = time.monotonic_ns()
        prefilled = await self._stages.prefill(
            choice_id,
            prompt.token_ids,
            sampling,
            settings.cache,
            prompt_logprobs=timings is not None and sampling.logprobs and echoes,
        )
        now = time.monotonic_ns()
        if timings is not None:
            timings.add_prefill_call(now - started, prefilled.queue_ns, prefilled.compute_ns)
            metrics.first_token(timings, now)
            prompt.prefilled = prefilled
        stopping = Stopping(prompt.max_tokens, settings.stop, settings.ignore_eos)
        generation = Generation(
            self._stages,
            choice_id,
            ChoiceOutput(index, prompt),
            prefilled,
            sampling,
            stopping,
            metrics,
            self.server_metrics,
        )
        request.created.append((index, generation))

    async def collect(self, run: Run) -> None:
        """Reads every choice to its end."""
        await run_all([_drain(g) for g in run.generations if not g.finished])


async def _drain(generation: Generation) -> None:
    while await generation.next() is not None:
        pass


def check_token_ids(settings: GenerationSettings, limits: ModelLimits) -> None:
    if not limits.vocab_size:
        return
    bad = [t for t in settings.sampling.logit_bias if t >= limits.vocab_size]
    if bad:
        raise invalid_request(
            f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size}).",
            "logit_bias",
        )


async def run_all(calls: Sequence[Awaitable[T]]) -> list[T]:
    """Awaits every call; on the first failure (or if cancelled) cancels the rest and raises."""
    if len(calls) <= 1:
        return [await call for call in calls]
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()  # a no-op for the finished ones
    # Every failure is retrieved (so none is logged as unhandled); the first one is raised.
    failures = [t.exception() for t in tasks if t.done() and not t.cancelled()]
    for failure in failures:
        if failure is not None:
            raise failure
    return [task.result() for task in tasks]
