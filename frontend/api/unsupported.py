"""Request fields the API references document that this server does not implement yet.

Each is rejected with a 400 naming it, unless it carries its neutral value: clients (the
OpenAI and Fireworks SDKs, LangChain, ...) send defaults such as `functions: []` or
`service_tier: "auto"`, which ask for nothing we lack. Fields in none of these
tables and not in the request schema are unknown, and pydantic rejects them.
"""

import json
from collections.abc import Mapping
from typing import Any

from frontend.errors import invalid_request

# name -> the values that ask for nothing (None stands for JSON null).
COMMON_UNSUPPORTED: Mapping[str, tuple[Any, ...]] = {
    "prompt_cache_key": (None,),
    "reasoning_history": (None,),
    "thinking": (None,),
    "safe_tokenization": (None,),
    "service_tier": (None, "auto", "default"),
}

COMPLETION_UNSUPPORTED: Mapping[str, tuple[Any, ...]] = {
    **COMMON_UNSUPPORTED,
    "best_of": (None, 1),
    "suffix": (None, ""),
}

CHAT_UNSUPPORTED: Mapping[str, tuple[Any, ...]] = {
    **COMMON_UNSUPPORTED,
    # The deprecated forms of tools and tool_choice.
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "store": (None, False),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "web_search_options": (None,),
    "verbosity": (None,),
}

# Inside one chat message.
MESSAGE_UNSUPPORTED: Mapping[str, tuple[Any, ...]] = {
    "function_call": (None,),
}

# POST /v1/responses.
RESPONSES_UNSUPPORTED: Mapping[str, tuple[Any, ...]] = {
    "background": (None, False),
    "conversation": (None,),
    "context_management": (None, []),
    "include": (None, []),
    "max_tool_calls": (None,),
    "prompt": (None,),
    "prompt_cache_key": (None,),
    "prompt_cache_retention": (None,),
    "safety_identifier": (None,),
    "service_tier": (None, "auto", "default"),
    "top_logprobs": (None, 0),
    "truncation": (None, "disabled"),
}
RESPONSES_REASONING_UNSUPPORTED: Mapping[str, tuple[Any, ...]] = {
    "summary": (None,),
    "generate_summary": (None,),
}
RESPONSES_TEXT_UNSUPPORTED: Mapping[str, tuple[Any, ...]] = {
    "verbosity": (None,),
}
RESPONSES_STREAM_OPTIONS_UNSUPPORTED: Mapping[str, tuple[Any, ...]] = {
    # Random padding on deltas, against length side channels; these deltas have none.
    "include_obfuscation": (None, False),
    # The chat endpoints' usage on every chunk; Responses events carry it in the last one.
    "continuous_usage_stats": (None, False),
}


def is_neutral(value: Any, neutrals: tuple[Any, ...]) -> bool:
    # Type-aware: in Python `False == 0` and `1 == True`, but `logprobs: 0` is not `false`.
    for neutral in neutrals:
        if neutral is None or isinstance(neutral, bool) or isinstance(value, bool):
            if value is neutral:
                return True
        elif isinstance(neutral, int | float):
            if isinstance(value, int | float) and value == neutral:
                return True
        elif type(value) is type(neutral) and value == neutral:
            return True
    return False


def unsupported_message(name: str, neutrals: tuple[Any, ...]) -> str:
    accepted = [json.dumps(v) for v in neutrals if v is not None]
    hint = f" (only {' or '.join(accepted)} is accepted)" if accepted else ""
    return f"'{name}' is not supported yet{hint}."


def drop_neutral_fields(
    data: dict[str, Any], table: Mapping[str, tuple[Any, ...]], prefix: str = ""
) -> dict[str, Any]:
    """Returns `data` without the table's fields; raises 400 if one asks for something."""
    kept = {}
    for name, value in data.items():
        neutrals = table.get(name)
        if neutrals is None:
            kept[name] = value
        elif not is_neutral(value, neutrals):
            raise invalid_request(
                unsupported_message(name, neutrals),
                param=prefix + name,
                code="unsupported_parameter",
            )
    return kept
