"""Tools, tool calls and tool results in a chat prompt: by the model's own template where it has
a place for them, else by the default format of `services.tool_format`.

What a template handles is read once from its syntax tree: a template that reads the `tools`
variable lists the tools itself; one that reads a message's `tool_calls` renders the calls; one
that compares against the string "tool" renders tool results. Everything a template does not
handle is rewritten into plain messages before rendering:

- tools: a section appended to the system prompt (a system message is prepended if none);
- an assistant's calls: `<tool_call>...</tool_call>` blocks after its content, as the model
  writes them;
- tool results: a user turn holding each result in `<tool_response>...</tool_response>`
  (consecutive results share one turn).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta, nodes

from services import tool_format

# Tool results, as chat templates name the role.
_TOOL_ROLES = ("tool", "ipython")


@dataclass(slots=True, frozen=True)
class TemplateToolSupport:
    tools: bool  # the template lists the tools
    tool_calls: bool  # it renders an assistant's tool calls
    tool_results: bool  # it renders role "tool" messages as such


def template_tool_support(env: jinja2.Environment, source: str) -> TemplateToolSupport:
    tree = env.parse(source)
    reads_tool_calls = any(
        node.attr == "tool_calls" for node in tree.find_all(nodes.Getattr)
    ) or any(
        isinstance(node.arg, nodes.Const) and node.arg.value == "tool_calls"
        for node in tree.find_all(nodes.Getitem)
    )
    names_tool_role = any(node.value in _TOOL_ROLES for node in tree.find_all(nodes.Const))
    return TemplateToolSupport(
        tools="tools" in meta.find_undeclared_variables(tree),
        tool_calls=reads_tool_calls,
        tool_results=names_tool_role,
    )


def apply_tools(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, support: TemplateToolSupport
) -> list[dict[str, Any]]:
    """The messages as the template gets them: what it cannot render rewritten as text."""
    rendered: list[dict[str, Any]] = []
    results: dict[str, Any] | None = None  # the user turn collecting consecutive results
    for message in messages:
        if message.get("role") == "tool" and not support.tool_results:
            response = tool_format.format_response(message.get("content") or "")
            if results is None:
                results = {"role": "user", "content": response}
                rendered.append(results)
            else:
                results["content"] += "\n" + response
            continue
        results = None
        if message.get("tool_calls"):
            rendered.append(_with_tool_calls(message, support.tool_calls))
        else:
            rendered.append(message)
    if tools and not support.tools:
        rendered = _with_tools_section(rendered, tools)
    return rendered


def _with_tool_calls(message: dict[str, Any], template_renders_calls: bool) -> dict[str, Any]:
    calls = message["tool_calls"]
    if template_renders_calls:
        # Templates read arguments as a mapping (`arguments | tojson`), as transformers passes
        # them; the API sends them as JSON text.
        return {**message, "tool_calls": [_call_with_mapping(call) for call in calls]}
    blocks = "".join(
        tool_format.format_call(call["function"]["name"], call["function"]["arguments"])
        for call in calls
    )
    rest = {key: value for key, value in message.items() if key != "tool_calls"}
    return {**rest, "content": (message.get("content") or "") + blocks}


def _call_with_mapping(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    try:
        arguments = json.loads(function["arguments"])
    except (TypeError, ValueError):
        return call  # not JSON: left as the text the client sent
    return {**call, "function": {**function, "arguments": arguments}}


def _with_tools_section(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    section = tool_format.system_section(tools)
    if messages and messages[0].get("role") == "system":
        system = messages[0]
        content = system.get("content") or ""
        joined = f"{content}\n\n{section}" if content else section
        return [{**system, "content": joined}, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]
