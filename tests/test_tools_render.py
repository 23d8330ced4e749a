"""Tools, tool calls and tool results in chat prompts: through a template that has a place for
them, else in the default format; and the tokenizer service's reading of them."""

import json

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models

from services.engine.loader import load_tokenizer
from services.engine.tokenizer import Tokenizer
from services.errors import InvalidArgumentError
from services.rpc import tokenizer_pb2
from services.tokenizer.server import _message_dict
from services.tool_format import format_call, format_response, system_section

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
CHAT = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "22 C", "tool_call_id": "call_1"},
    {"role": "tool", "content": "25 C", "tool_call_id": "call_2"},
]
# A template with fixed turns for the roles it knows, and none for tool results.
FIXED_ROLES_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'user' %}U: {% elif m.role == 'assistant' %}A: {% else %}S: {% endif %}"
    "{{ m.content }}\n{% endfor %}"
)
# One that refuses roles it does not know.
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m.role) }}{% endif %}"
    "<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
)
# A template with a place for everything, in the style of Hermes-format models.
TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}:{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.city }}]"
    "{% endfor %}{% if m.role == 'tool' %}({{ m.tool_call_id }}){% endif %}{{ '\\n' }}"
    "{% endfor %}"
)


def tiny(template: str | None) -> Tokenizer:
    backend = BackendTokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=[], chat_template=template)


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    return load_tokenizer("default")


def test_default_format_where_the_template_has_no_tool_support(smollm: Tokenizer) -> None:
    prompt = smollm.render_chat(CHAT, tools=[WEATHER])
    section = system_section([WEATHER])
    assert prompt.startswith(f"<|im_start|>system\n{section}<|im_end|>\n<|im_start|>user\n")
    call = format_call("get_weather", '{"city": "Paris"}')
    assert f"<|im_start|>assistant\n{call}<|im_end|>\n" in prompt
    # SmolLM2's ChatML writes any role as given: results are its own "tool" turns, as
    # transformers renders them with this template.
    results = "<|im_start|>tool\n22 C<|im_end|>\n<|im_start|>tool\n25 C<|im_end|>\n"
    assert prompt.endswith(f"{call}<|im_end|>\n{results}<|im_start|>assistant\n")
    assert "Result of" not in prompt


@pytest.mark.parametrize("template", [FIXED_ROLES_TEMPLATE, STRICT_TEMPLATE])
def test_results_without_a_turn_of_their_own_join_a_user_turn(template: str) -> None:
    prompt = tiny(template).render_chat(CHAT, add_generation_prompt=False, tools=[WEATHER])
    # Plain text named by the call's function (call_2 is unknown), no tags to echo.
    results = format_response("22 C", "get_weather") + "\n" + format_response("25 C")
    assert results == "Result of get_weather:\n22 C\nResult of the function call:\n25 C"
    assert prompt.endswith(("U: " if "U:" in template else "<|user|>") + results + "\n")
    assert "<" not in results


def test_tool_result_with_null_content_renders_empty(smollm: Tokenizer) -> None:
    chat = [*CHAT[:2], {"role": "tool", "content": None, "tool_call_id": "call_1"}]
    assert smollm.render_chat(chat).endswith(
        "<|im_start|>tool\n<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tools_section_joins_the_system_prompt(smollm: Tokenizer) -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = smollm.render_chat(chat, tools=[WEATHER])
    assert prompt.startswith(f"<|im_start|>system\nBe brief.\n\n{system_section([WEATHER])}")
    assert prompt.count("<|im_start|>system") == 1


def test_no_tools_renders_as_before(smollm: Tokenizer) -> None:
    chat = [{"role": "user", "content": "Hi"}]
    assert smollm.render_chat(chat, tools=None) == smollm.render_chat(chat, tools=[])
    assert "<tools>" not in smollm.render_chat(chat)


def test_template_with_tool_support_renders_them_itself() -> None:
    prompt = tiny(TOOL_TEMPLATE).render_chat(CHAT, add_generation_prompt=False, tools=[WEATHER])
    assert prompt == (
        "TOOLS:get_weather\n"
        "user:Weather in Paris and Rome?\n"
        "assistant:[get_weather Paris]\n"  # arguments reach the template as a mapping
        "tool:22 C(call_1)\n"
        "tool:25 C(call_2)\n"
    )


def test_default_template_also_falls_back() -> None:
    prompt = tiny(None).render_chat(CHAT[:2], add_generation_prompt=False, tools=[WEATHER])
    assert "<tools>" in prompt and format_call("get_weather", '{"city": "Paris"}') in prompt


def message(**fields: str) -> tokenizer_pb2.ChatMessage:
    return tokenizer_pb2.ChatMessage(**fields)


def test_service_reads_tool_calls_json() -> None:
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]
    entry = _message_dict(0, message(role="assistant", tool_calls_json=json.dumps(calls)))
    assert entry["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    entry = _message_dict(0, message(role="tool", content="1", tool_call_id="c"))
    assert entry == {"role": "tool", "content": "1", "tool_call_id": "c"}


@pytest.mark.parametrize("calls_json", ["{bad", '{"a": 1}', '[{"function": {}}]', "[1]"])
def test_service_rejects_malformed_tool_calls(calls_json: str) -> None:
    with pytest.raises(InvalidArgumentError, match=r"messages\[2\]\.tool_calls_json"):
        _message_dict(2, message(role="assistant", tool_calls_json=calls_json))
