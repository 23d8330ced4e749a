"""A validated generation request as it runs: one object from the route, through the pipeline,
to the stage calls. Sampling, stopping, prompt cache and output options are the shared types
of `services.request_params`, read from the API fields of the same names."""

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from frontend.api.response_format import grammar_of
from frontend.api.schemas import MAX_N, ChatCompletionRequest, CompletionRequest
from frontend.errors import invalid_request
from frontend.stages.types import ChatTurn
from services.request_params import (
    MAX_GRAMMAR_BYTES,
    Grammar,
    OutputOptions,
    PromptCache,
    SamplingParams,
    Stopping,
)

UINT64_MODULUS = 2**64
# SamplingParams fields that are not read as they come: the API's logprobs has two forms, and
# the grammar comes from response_format or the tools.
_DERIVED_SAMPLING = frozenset({"logprobs", "top_logprobs", "grammar"})

Body = CompletionRequest | ChatCompletionRequest


@dataclass(slots=True)
class PromptSource:
    """Completion prompts (each text or token ids), or one chat; exactly one is set."""

    prompts: list[str | list[int]] | None = None
    messages: list[ChatTurn] | None = None
    # Chat: evict the earliest non-system turns until the prompt has at most this many tokens.
    truncate_len: int | None = None
    tools_json: str = ""  # chat: the tools the prompt lists (the OpenAI JSON list)

    @property
    def param(self) -> str:
        return "prompt" if self.messages is None else "messages"

    @property
    def num_prompts(self) -> int:
        return 1 if self.prompts is None else len(self.prompts)


@dataclass(slots=True)
class Prediction:
    """What the output is expected to repeat (speculative decoding), as the request gave it:
    `prediction` (text) or `speculation` (text or token ids)."""

    content: str | list[int]
    param: str  # the field it came from, for errors


@dataclass(slots=True)
class GenerationRequest:
    id: str
    source: PromptSource
    sampling: SamplingParams
    stop: list[str]
    include_stop_str: bool
    ignore_eos: bool
    max_tokens: int | None  # None: default_max_tokens, capped to the room left
    default_max_tokens: int
    # context_length_exceeded_behavior="error": refuse instead of lowering max_tokens.
    error_on_overflow: bool
    prompt_cache: PromptCache
    output: OutputOptions
    n: int = 1
    prediction: Prediction | None = None
    # Streaming: every chunk carries the usage so far (stream_options.continuous_usage_stats).
    continuous_usage_stats: bool = False

    def choice_sampling(self, choice: int) -> SamplingParams:
        """Choice j of a prompt draws with seed + j, so a seeded n > 1 request is reproducible
        and its choices still differ."""
        if self.sampling.seed is None or choice == 0:
            return self.sampling
        seed = (self.sampling.seed + choice) % UINT64_MODULUS
        return dataclasses.replace(self.sampling, seed=seed)

    def stopping(self, max_tokens: int) -> Stopping:
        """What ends a choice of a prompt whose max_tokens was fitted to the context window."""
        return Stopping(max_tokens, self.stop, self.ignore_eos, self.include_stop_str)

    def sampling_options(self, max_tokens: int) -> dict[str, Any]:
        """The fireworks-sampling-options header: what the stages were actually asked for."""
        sampling = dataclasses.asdict(self.sampling)
        sampling["logit_bias"] = {str(k): v for k, v in self.sampling.logit_bias.items()}
        grammar = sampling.pop("grammar")
        if grammar is not None and grammar["kind"] == "tool_calls":
            sampling["tool_choice"] = json.loads(grammar["source"])["mode"]
        elif grammar is not None:
            sampling["response_format"] = grammar["kind"]
        return {
            "max_tokens": max_tokens,
            **sampling,
            "n": self.n,
            "stop": self.stop,
            "include_stop_str_in_output": self.include_stop_str,
            "ignore_eos": self.ignore_eos,
        }


def generation_request(
    body: Body,
    request_id: str,
    source: PromptSource,
    default_max_tokens: int,
    prompt_cache_tenant: str = "",
) -> GenerationRequest:
    """The body's fields with the API's defaults filled in. A `prompt_cache_tenant` (an API
    key's) salts the prompt cache ahead of the request's own isolation key."""
    max_tokens = _max_tokens(body)
    n = body.n or 1
    if source.num_prompts * n > MAX_N:
        raise invalid_request(
            f"prompts x n is {source.num_prompts} x {n}; a request may ask for at most "
            f"{MAX_N} completions.",
            "n",
        )
    return GenerationRequest(
        id=request_id,
        source=source,
        sampling=_sampling(body),
        stop=body.stop,
        include_stop_str=(
            body.stop_str_included_by_default
            if body.include_stop_str_in_output is None
            else body.include_stop_str_in_output
        ),
        ignore_eos=bool(body.ignore_eos),
        max_tokens=max_tokens,
        default_max_tokens=default_max_tokens,
        error_on_overflow=body.context_length_exceeded_behavior == "error",
        prompt_cache=PromptCache(
            isolation_key="/".join(
                filter(None, (prompt_cache_tenant, body.prompt_cache_isolation_key))
            ),
            max_len=body.prompt_cache_max_len,
        ),
        output=_output_options(body),
        n=n,
        prediction=_prediction(body),
        continuous_usage_stats=bool(
            body.stream_options and body.stream_options.continuous_usage_stats
        ),
    )


def _max_tokens(body: Body) -> int | None:
    """max_tokens or its alias. 0 scores the prompt without generating (the legacy scoring
    call: echo with logprobs), so it needs the echo."""
    param, max_tokens = "max_tokens", body.max_tokens
    if body.max_completion_tokens is not None:
        if max_tokens is not None:
            raise invalid_request(
                "max_completion_tokens is an alias of max_tokens; set only one of them.",
                "max_completion_tokens",
            )
        param, max_tokens = "max_completion_tokens", body.max_completion_tokens
    if max_tokens == 0 and not (body.echo or body.echo_last):
        raise invalid_request(
            f"Invalid '{param}': it must be at least 1; 0 (nothing generated) is only "
            "accepted with echo or echo_last, to score the prompt.",
            param,
            "invalid_value",
        )
    return max_tokens


def _prediction(body: Body) -> Prediction | None:
    """`prediction` is OpenAI's name for what the Fireworks API calls `speculation`."""
    if body.prediction is not None and body.speculation is not None:
        raise invalid_request(
            "prediction is transformed to speculation; set only one of them.", "prediction"
        )
    if body.prediction:
        return Prediction(body.prediction, "prediction")
    if body.speculation:
        return Prediction(body.speculation, "speculation")
    return None


def _sampling(body: Body) -> SamplingParams:
    """Each SamplingParams field from the API field of the same name, when it is set."""
    values = {
        field.name: getattr(body, field.name)
        for field in dataclasses.fields(SamplingParams)
        if field.name not in _DERIVED_SAMPLING and getattr(body, field.name) is not None
    }
    return SamplingParams(**values, **_logprobs(body), grammar=_grammar(body))


def _grammar(body: Body) -> Grammar | None:
    """response_format's grammar, or the tools' (never both), within MAX_GRAMMAR_BYTES."""
    grammar = _requested_grammar(body)
    if grammar is not None and len(grammar.source.encode()) > MAX_GRAMMAR_BYTES:
        param = "tools" if grammar.kind == "tool_calls" else "response_format"
        raise invalid_request(
            f"{param}: the schema or grammar is larger than {MAX_GRAMMAR_BYTES // 1024} KiB.",
            param,
        )
    return grammar


def _requested_grammar(body: Body) -> Grammar | None:
    requested = grammar_of(body.response_format)
    if not isinstance(body, ChatCompletionRequest) or body.tool_use.grammar is None:
        return requested
    if requested is not None:
        raise invalid_request(
            "response_format cannot be combined with tools: a reply is either a tool call or "
            'text in the response format. Drop one of them, or set tool_choice to "none".',
            "response_format",
        )
    return body.tool_use.grammar


def _logprobs(body: Body) -> dict[str, Any]:
    """`logprobs: true` takes its number of alternatives from top_logprobs; the legacy
    integer form is that number itself, unless top_logprobs overrides it."""
    if not body.wants_logprobs():
        if body.top_logprobs:
            raise invalid_request("top_logprobs requires logprobs to be set.", "top_logprobs")
        return {"logprobs": False, "top_logprobs": 0}
    count = body.logprobs if type(body.logprobs) is int else 0
    if body.top_logprobs is not None:
        count = body.top_logprobs
    return {"logprobs": True, "top_logprobs": count}


def _output_options(body: Body) -> OutputOptions:
    stream_options = body.stream_options
    return OutputOptions(
        stream=bool(body.stream),
        include_usage=bool(stream_options and stream_options.include_usage),
        perf_metrics_in_response=bool(body.perf_metrics_in_response),
        echo=bool(body.echo),
        echo_last=body.echo_last or 0,
        raw_output=bool(body.raw_output),
        return_token_ids=bool(body.return_token_ids),
        tool_calls=isinstance(body, ChatCompletionRequest) and body.tool_use.grammar is not None,
    )
