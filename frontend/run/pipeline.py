"""tokenize -> fit max_tokens -> prefill -> decode for every prompt and choice of a request
(or tokenize -> decode, when decode computes the prompt itself)."""

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from frontend.api.request import GenerationRequest, Prediction
from frontend.errors import invalid_request
from frontend.metrics.request import PathTimings, RequestMetrics
from frontend.metrics.server import ServerMetrics
from frontend.metrics.spans import add_perf_metrics
from frontend.run.choice import ChoiceOutput, Generation
from frontend.run.prompts import PreparedPrompt, PromptTokenizer, describe, fit_max_tokens
from frontend.stages.clients import StageClients
from frontend.stages.types import Choice, ModelLimits, SpeculationStats, TokenDelta

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

    def token_counts(self) -> dict[str, int]:
        """Tokens so far. Prompt tokens count once per prompt, however many choices share it."""
        num_prompt = sum(len(p.token_ids) for p in self.prompts)
        num_completion = sum(g.output.num_generated for g in self.generations)
        return {
            "prompt_tokens": num_prompt,
            "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion,
        }

    def usage(self) -> dict[str, Any]:
        return {
            **self.token_counts(),
            "prompt_tokens_details": {"cached_tokens": self.metrics.cached_prompt_tokens},
            **self._prediction_usage(),
        }

    def _prediction_usage(self) -> dict[str, Any]:
        """OpenAI's counts for a request with a prediction: drafts from it that the output
        kept, and those verified and rejected."""
        speculation = self.metrics.speculation
        if speculation is None or not speculation.prediction_tokens:
            return {}
        accepted = speculation.accepted_tokens
        return {
            "completion_tokens_details": {
                "accepted_prediction_tokens": accepted,
                "rejected_prediction_tokens": speculation.draft_tokens - accepted,
            }
        }

    def close(self) -> None:
        """Ends every decode call (or releases unclaimed KV); idempotent."""
        if self._closed:
            return
        self._closed = True
        for generation in self.generations:
            generation.close()
        self.server_metrics.observe_end(self.metrics, self.finished)
        add_perf_metrics(self.metrics)


@dataclass(slots=True)
class _Starting:
    """A request while its prompts start."""

    request: GenerationRequest
    metrics: RequestMetrics
    prediction_ids: list[int]
    # The first prompt's max_tokens once fitted, for a caller that answers before the run
    # has started (the sampling-options header of a stream).
    fitted_max_tokens: asyncio.Future[int] | None
    # (choice index, generation) as created, so that a failure can close them all.
    created: list[tuple[int, Generation]] = field(default_factory=list)
    # Decode's first message of the choices whose prompt decode computed, by choice index.
    firsts: dict[int, TokenDelta] = field(default_factory=dict)


class Pipeline:
    def __init__(
        self, stages: StageClients, server_metrics: ServerMetrics, request_timeout_s: float
    ) -> None:
        self._stages = stages
        self.server_metrics = server_metrics
        self._request_timeout_s = request_timeout_s

    async def start(
        self,
        request: GenerationRequest,
        metrics: RequestMetrics,
        fitted_max_tokens: asyncio.Future[int] | None = None,
    ) -> Run:
        """Runs every choice up to decode's first message, so that stage failures still get
        an HTTP status; sets `fitted_max_tokens` to the first prompt's on the way. The caller owns
        `close()` of the returned run (`abandon` when the start may still be under way)."""
        limits = await self._stages.directory.limits()
        check_token_ids(request, limits)
        prediction_ids: list[int] = []
        if request.prediction is not None:
            prediction_ids = await self._prediction_ids(request.prediction, limits)
            metrics.speculation = SpeculationStats(prediction_tokens=len(prediction_ids))
        starting = _Starting(request, metrics, prediction_ids, fitted_max_tokens)
        try:
            prompts = await run_all(
                [self._start_prompt(starting, i) for i in range(request.source.num_prompts)]
            )
            created = sorted(starting.created, key=lambda item: item[0])
            generations = [g for _, g in created]
            run = Run(prompts, generations, [], metrics, self.server_metrics)
            firsts = await run_all([_first(starting, i, g) for i, g in created])
            run.firsts = [delta for delta in firsts if delta is not None]
            self.server_metrics.observe_first_token(metrics)
            want_logprobs = request.sampling.logprobs
            output = request.output
            await run_all([describe(self._stages, p, output, want_logprobs) for p in prompts])
        except BaseException:
            for _, generation in starting.created:
                generation.close()
            raise
        return run

    async def _prediction_ids(self, prediction: Prediction, limits: ModelLimits) -> list[int]:
        """The prediction as token ids (text without special tokens), each in the vocabulary,
        no more than the context window holds."""
        content, param = prediction.content, prediction.param
        if isinstance(content, str):
            tokenized = await self._stages.tokenize(content, add_special_tokens=False, param=param)
            ids = tokenized.token_ids
        else:
            ids = content
            bad = [t for t in ids if limits.vocab_size and t >= limits.vocab_size]
            if bad:
                raise invalid_request(
                    f"{param}: token id {bad[0]} is outside the vocabulary "
                    f"[0, {limits.vocab_size}).",
                    param,
                )
        if len(ids) > limits.max_model_len:
            raise invalid_request(
                f"{param} is {len(ids)} tokens long; the context window holds "
                f"{limits.max_model_len}.",
                param,
            )
        return ids

    async def _start_prompt(self, starting: _Starting, index: int) -> PreparedPrompt:
        """Tokenizes and prefills prompt `index`, registering its choices' generations."""
        request, source = starting.request, starting.request.source
        timings = PathTimings()
        tokenized = await PromptTokenizer(self._stages, timings).tokenize(source, index)
        token_ids = tokenized.token_ids
        if not token_ids:
            raise invalid_request("The prompt is empty after tokenization.", source.param)
        limits = await self._stages.directory.limits()
        max_tokens = fit_max_tokens(len(token_ids), request, limits.max_model_len)
        prompt = PreparedPrompt(index, token_ids, tokenized.text, max_tokens)
        fitted = starting.fitted_max_tokens
        if index == 0 and fitted is not None and not fitted.done():
            fitted.set_result(max_tokens)
        starting.metrics.prompt_tokens += len(token_ids)
        await self._prefill(starting, prompt, 0, timings)
        starting.metrics.cached_prompt_tokens += prompt.num_cached_tokens
        # The other choices are prefilled only now, together: prefill's prefix cache then
        # serves them the whole prompt, so its KV is computed once, and decode finds the
        # blocks it pulled (or computed) for the first choice in its own prefix cache rather
        # than moving them again.
        await run_all([self._prefill(starting, prompt, j) for j in range(1, request.n)])
        return prompt

    async def _prefill(
        self,
        starting: _Starting,
        prompt: PreparedPrompt,
        number: int,
        timings: PathTimings | None = None,
    ) -> None:
        """Prefills choice `number` of a prompt and registers its generation. The first choice
        (`timings` given) is on its prompt's way to the first token and asks for prompt
        logprobs when the echo shows them. Decode computes the prompt itself when it holds
        most of it (`StageClients.decode_computing`); prompt logprobs and scoring alone
        (max_tokens 0) take prefill."""
        request, metrics = starting.request, starting.metrics
        index = prompt.index * request.n + number
        choice = Choice(
            id=request.id if index == 0 else f"{request.id}-{index}",
            prompt_ids=prompt.token_ids,
            sampling=request.choice_sampling(number),
            stopping=request.stopping(prompt.max_tokens),
            prompt_cache=request.prompt_cache,
            deadline=metrics.arrival_ns / 1e9 + self._request_timeout_s,
            prediction_ids=starting.prediction_ids,
        )
        echoes = request.output.echo_count(len(prompt.token_ids)) > 0
        prompt_logprobs = timings is not None and choice.sampling.logprobs and echoes
        output = ChoiceOutput(index, prompt)
        started = time.monotonic_ns()
        if not prompt_logprobs and choice.stopping.max_tokens:
            decode = await self._stages.decode_computing(choice)
            if decode is not None:
                generation = Generation(
                    self._stages, choice, output, None, metrics, self.server_metrics, decode
                )
                starting.created.append((index, generation))
                first = starting.firsts[index] = await generation.next()
                assert first is not None  # a first message always comes
                computed = (first.prefill_queue_ns, first.prefill_compute_ns)
                self._computed(
                    starting, prompt, timings, started, computed, first.num_cached_tokens
                )
                return
        prefilled = await self._stages.prefill(choice, prompt_logprobs=prompt_logprobs)
        if timings is not None:
            prompt.prefilled = prefilled
        computed = (prefilled.queue_ns, prefilled.compute_ns)
        self._computed(starting, prompt, timings, started, computed, prefilled.num_cached_tokens)
        generation = Generation(
            self._stages, choice, output, prefilled, metrics, self.server_metrics
        )
        starting.created.append((index, generation))

    def _computed(
        self,
        starting: _Starting,
        prompt: PreparedPrompt,
        timings: PathTimings | None,
        started_ns: int,
        queue_and_compute_ns: tuple[int, int],
        num_cached_tokens: int,
    ) -> None:
        """A choice's prompt is computed and its first token sampled, by the stage call that
        began at `started_ns` (prefill's, or decode's when it computed the prompt)."""
        now = time.monotonic_ns()
        self.server_metrics.observe_prefill(len(prompt.token_ids), num_cached_tokens)
        if timings is not None:  # the prompt's first choice
            timings.add_prefill_call(now - started_ns, *queue_and_compute_ns)
            starting.metrics.first_token(timings, now)
            prompt.num_cached_tokens = num_cached_tokens

    async def collect(self, run: Run) -> None:
        """Reads every choice to its end."""
        await run_all([_drain(g) for g in run.generations if not g.finished])


def abandon(starting: asyncio.Future[Run]) -> None:
    """Cancels a `Pipeline.start` still under way (it closes what it created), or closes the
    run it has produced; retrieves its failure, if any, so that none is logged as unhandled."""
    if not starting.done():
        starting.cancel()
    elif not starting.cancelled() and starting.exception() is None:
        starting.result().close()


async def _first(starting: _Starting, index: int, generation: Generation) -> TokenDelta | None:
    """Choice `index`'s first decode message, which `_prefill` may already have read."""
    first = starting.firsts.get(index)
    return first if first is not None else await generation.next()


async def _drain(generation: Generation) -> None:
    while await generation.next() is not None:
        pass


def check_token_ids(request: GenerationRequest, limits: ModelLimits) -> None:
    if not limits.vocab_size:
        return
    bad = [t for t in request.sampling.logit_bias if t >= limits.vocab_size]
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
