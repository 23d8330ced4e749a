"""Tools, tool calls and tool results in a chat prompt: by the model's own template where it has
a place for them, else by the default format of `services.tool_format`.

What a template handles is read once, at load: from its syntax tree, a template that reads the
`tools` variable lists the tools itself; one that reads a message's `tool_calls` renders the
calls; one that compares against the string "tool" renders tool results. A template that writes
any message's role into the prompt as given (ChatML's `'<|im_start|>' + message['role']`), found
by rendering a probe conversation, renders a result as a turn of role "tool", as it would in
transformers. Everything a template does not handle is rewritten into plain messages before
rendering:

- tools: a section appended to the system prompt (a system message is prepended if none);
- an assistant's calls: `<tool_call>...</tool_call>` blocks after its content, as the model
  writes them;
- tool results: a user turn holding each result as plain text after the name of the function
  that returned it (consecutive results share one turn). No tags: small models echo a tag that
  opens the turn they answer (`<tool_response>` came back at the start of SmolLM2's answers).
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
# The probe that checks whether a template writes roles as given: a result's text, and a role
# no template knows.
_PROBE_RESULT = "probe-result-3f9a"
_PROBE_ROLE = "probe-role-3f9a"


@dataclass(slots=True, frozen=True)
class TemplateToolSupport:
    tools: bool  # the template lists the tools
    tool_calls: bool  # it renders an assistant's tool calls
    tool_results: bool  # it renders role "tool" messages as such
    role_turns: bool  # it writes any role into the prompt as given, "tool" included


def template_tool_support(
    template: jinja2.Template, source: str, context: dict[str, Any]
) -> TemplateToolSupport:
    """`context`: the variables the template renders with besides the messages."""
    tree = template.environment.parse(source)
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
        role_turns=not names_tool_role and _writes_roles(template, context),
    )


def _writes_roles(template: jinja2.Template, context: dict[str, Any]) -> bool:
    """Whether a tool result renders as its own turn: the template accepts role "tool", and
    writes a role it cannot know into the prompt."""

    def render(role: str) -> str | None:
        probe = [
            {"role": "user", "content": "question"},
            {"role": "assistant", "content": "call"},
            {"role": role, "content": _PROBE_RESULT, "tool_call_id": "call_probe"},
        ]
        try:
            return template.render(messages=probe, add_generation_prompt=True, **context)
        except Exception:  # a template may reject roles it does not know, by any error
            return None

    as_tool, as_unknown = render("tool"), render(_PROBE_ROLE)
    return bool(as_tool and _PROBE_RESULT in as_tool and as_unknown and _PROBE_ROLE in as_unknown)


def apply_tools(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, support: TemplateToolSupport
) -> list[dict[str, Any]]:
    """The messages as the template gets them: what it cannot render rewritten as text."""
    rendered: list[dict[str, Any]] = []
    results: dict[str, Any] | None = None  # the user turn collecting consecutive results
    names: dict[str, str] = {}  # call id -> function name, from the assistants' calls
    for message in messages:
        for call in message.get("tool_calls") or []:
            names[call.get("id") or ""] = call["function"]["name"]
        if message.get("role") == "tool" and support.role_turns:
            rendered.append({**message, "content": message.get("content") or ""})
            continue
        if message.get("role") == "tool" and not support.tool_results:
            name = names.get(message.get("tool_call_id") or "")
            response = tool_format.format_response(message.get("content") or "", name)
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
