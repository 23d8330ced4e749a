"""The default tool-calling format: how tools, calls and results read in a prompt, and how a call
reads in the model's output.

One place for every party: the tokenizer renders prompts with it when the model's chat template
has no tool support of its own, the grammar engine constrains outputs to it, and the frontend
parses outputs by it. Pure Python, so the frontend may import it without the engine.

A call is `<tool_call>{"name": "<name>", "arguments": <JSON object>}</tool_call>`, byte for
byte (the grammar fixes the layout, so the parser can rely on it); a reply holds plain text, or
one or more calls, optionally after some text.
"""

import json
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
# What a call block holds before its arguments: CALL_OPEN + NAME_OPEN + name + ARGUMENTS_OPEN.
NAME_OPEN = '{"name": "'
ARGUMENTS_OPEN = '", "arguments": '
# After the arguments: closes the call's JSON object, then the block.
CALL_END = "}" + CALL_CLOSE

# OpenAI's limits on a function name; names go into the grammar's literals unescaped, so the
# pattern must never admit a quote or a backslash.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"

SYSTEM_SECTION = """# Tools

You may call one or more functions to assist with the user query. The functions, as JSON \
signatures within <tools></tools> tags:
<tools>
{tools}
</tools>

Answer either in plain text, or with one or more function calls, each a JSON object with the \
function's name and its arguments within <tool_call></tool_call> tags:
<tool_call>{{"name": <function-name>, "arguments": <arguments-json-object>}}</tool_call>"""


def call_prefix(name: str) -> str:
    """A call block up to its arguments."""
    return CALL_OPEN + NAME_OPEN + name + ARGUMENTS_OPEN


def format_call(name: str, arguments: str) -> str:
    """One call block; `arguments` is JSON text, inserted as given."""
    return call_prefix(name) + arguments + CALL_END


def system_section(tools: list[dict[str, Any]]) -> str:
    """The text that tells the model which tools it has and how to call them."""
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return SYSTEM_SECTION.format(tools=listed)


def format_response(content: str, name: str | None = None) -> str:
    """One tool result as the model reads it in a user turn, when its chat template has no turn
    for results: plain text, since a model tends to echo markup that opens the turn it answers;
    `name` is the function's, where the result's call is known."""
    return f"Result of {name or 'the function call'}:\n{content}"
