"""A validated request's fields as what the stages get (sampling, stopping, cache) and what the
response shows (echo, logprobs, raw output, ...), with the defaults filled in."""

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from frontend.errors import invalid_request
from frontend.response_format import grammar_of
from frontend.schemas import ChatCompletionRequest, CompletionRequest
from frontend.stage_types import Grammar, PromptCache, Sampling

UINT64_MODULUS = 2**64


@dataclass(slots=True)
class GenerationSettings:
    max_tokens: int | None  # None: default_max_tokens, capped to the room left
    default_max_tokens: int
    sampling: Sampling
    stop: list[str]
    ignore_eos: bool = False
    # context_length_exceeded_behavior="error": refuse instead of lowering max_tokens.
    error_on_overflow: bool = False
    cache: PromptCache = field(default_factory=PromptCache)
    n: int = 1

    def choice_sampling(self, choice: int) -> Sampling:
        """Choice j of a prompt draws with seed + j, so a seeded n > 1 request is reproducible
        and its choices still differ."""
        if self.sampling.seed is None or choice == 0:
            return self.sampling
        seed = (self.sampling.seed + choice) % UINT64_MODULUS
        return dataclasses.replace(self.sampling, seed=seed)


@dataclass(slots=True)
class OutputOptions:
    stream: bool = False
    include_usage: bool = False
    perf_metrics_in_response: bool = False
    echo: bool = False
    echo_last: int = 0  # > 0: echo only the prompt's last echo_last tokens
    raw_output: bool = False
    return_token_ids: bool = False
    # Chat with a tools grammar: `<tool_call>` blocks in the output become message.tool_calls.
    tool_calls: bool = False

    def echo_count(self, num_prompt_tokens: int) -> int:
        """How many of the prompt's last tokens the response echoes."""
        if self.echo_last > 0:
            return min(self.echo_last, num_prompt_tokens)
        return num_prompt_tokens if self.echo else 0


def settings_from(
    request: CompletionRequest | ChatCompletionRequest, default_max_tokens: int
) -> GenerationSettings:
    """The fields both endpoints share, with the API's defaults filled in."""
    max_tokens = request.max_tokens
    if request.max_completion_tokens is not None:
        if max_tokens is not None:
            raise invalid_request(
                "max_completion_tokens is an alias of max_tokens; set only one of them.",
                "max_completion_tokens",
            )
        max_tokens = request.max_completion_tokens
    return GenerationSettings(
        max_tokens=max_tokens,
        default_max_tokens=default_max_tokens,
        sampling=sampling_from(request),
        stop=request.stop,
        ignore_eos=bool(request.ignore_eos),
        error_on_overflow=request.context_length_exceeded_behavior == "error",
        cache=PromptCache(
            isolation_key=request.prompt_cache_isolation_key or "",
            max_tokens=request.prompt_cache_max_len,
        ),
        n=request.n or 1,
    )


def sampling_from(request: CompletionRequest | ChatCompletionRequest) -> Sampling:
    defaults = Sampling()
    values: dict[str, Any] = {}
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "min_p",
        "typical_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "mirostat_target",
        "mirostat_lr",
        "logit_bias",
    ):
        value = getattr(request, name)
        values[name] = getattr(defaults, name) if value is None else value
    return Sampling(**values, **_logprobs(request), grammar=_grammar(request))


def _grammar(request: CompletionRequest | ChatCompletionRequest) -> Grammar | None:
    """response_format's grammar, or the tools' (never both)."""
    requested = grammar_of(request.response_format)
    if not isinstance(request, ChatCompletionRequest) or request.tool_use.grammar is None:
        return requested
    if requested is not None:
        raise invalid_request(
            "response_format cannot be combined with tools: a reply is either a tool call or "
            'text in the response format. Drop one of them, or set tool_choice to "none".',
            "response_format",
        )
    return request.tool_use.grammar


def _logprobs(request: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    """`logprobs: true` takes its number of alternatives from top_logprobs; the legacy
    integer form is that number itself, unless top_logprobs overrides it."""
    if not request.wants_logprobs():
        if request.top_logprobs:
            raise invalid_request("top_logprobs requires logprobs to be set.", "top_logprobs")
        return {"logprobs": False, "top_logprobs": 0}
    count = request.logprobs if type(request.logprobs) is int else 0
    if request.top_logprobs is not None:
        count = request.top_logprobs
    return {"logprobs": True, "top_logprobs": count}


def output_options(request: CompletionRequest | ChatCompletionRequest) -> OutputOptions:
    stream_options = request.stream_options
    return OutputOptions(
        stream=bool(request.stream),
        include_usage=bool(stream_options and stream_options.include_usage),
        perf_metrics_in_response=bool(request.perf_metrics_in_response),
        echo=bool(request.echo),
        echo_last=request.echo_last or 0,
        raw_output=bool(request.raw_output),
        return_token_ids=bool(request.return_token_ids),
        tool_calls=(
            isinstance(request, ChatCompletionRequest) and request.tool_use.grammar is not None
        ),
    )


def sampling_options(settings: GenerationSettings, max_tokens: int) -> dict[str, Any]:
    """The fireworks-sampling-options header: what the stages were actually asked for."""
    sampling = dataclasses.asdict(settings.sampling)
    sampling["logit_bias"] = {str(k): v for k, v in settings.sampling.logit_bias.items()}
    grammar = sampling.pop("grammar")
    if grammar is not None and grammar["kind"] == "tool_calls":
        sampling["tool_choice"] = json.loads(grammar["source"])["mode"]
    elif grammar is not None:
        sampling["response_format"] = grammar["kind"]
    return {
        "max_tokens": max_tokens,
        **sampling,
        "n": settings.n,
        "stop": settings.stop,
        "ignore_eos": settings.ignore_eos,
    }
