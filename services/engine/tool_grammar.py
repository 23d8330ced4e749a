"""The "tool_calls" grammar: outputs in the default tool format (`services.tool_format`), as an
xgrammar structural tag.

Its source is JSON: `{"tools": [{"name", "parameters"}], "mode": "auto" | "required",
"parallel": bool}`. Each tool is one tag, `<tool_call>{"name": "<name>", "arguments": ` + JSON
matching its parameters schema + `}</tool_call>`.

- required: one call (any of the tools), or with `parallel` one or more back to back, and
  nothing else; a named tool_choice is `required` over that one tool.
- auto: free text, which may go on into calls: the trigger `<tool_call>` in the text starts a
  call, after which only more calls (with `parallel`) or the end may follow.
"""

from __future__ import annotations

import json
import re
from typing import Any

import xgrammar as xgr
from xgrammar.structural_tag import (
    Format,
    JSONSchemaFormat,
    OrFormat,
    PlusFormat,
    SequenceFormat,
    StarFormat,
    TagFormat,
    TriggeredTagsFormat,
)

from services import tool_format

AUTO = "auto"
REQUIRED = "required"
MODES = (AUTO, REQUIRED)
_NAME = re.compile(tool_format.NAME_PATTERN)


def canonical_source(source: str) -> str:
    """The source checked and re-serialized compactly (tools and schemas in the given order);
    ValueError says what is wrong."""
    try:
        spec = json.loads(source)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the tool_calls source is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict) or set(spec) - {"tools", "mode", "parallel"}:
        raise ValueError('the tool_calls source must be {"tools", "mode", "parallel"}')
    tools = spec.get("tools")
    if not isinstance(tools, list) or not tools:
        raise ValueError("tool_calls needs at least one tool")
    names = [_check_tool(i, tool) for i, tool in enumerate(tools)]
    if len(set(names)) != len(names):
        raise ValueError("tool names must be unique")
    mode = spec.get("mode", AUTO)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    parallel = spec.get("parallel", True)
    if not isinstance(parallel, bool):
        raise ValueError("parallel must be a boolean")
    normalized = {"tools": tools, "mode": mode, "parallel": parallel}
    return json.dumps(normalized, separators=(",", ":"), allow_nan=False)


def _check_tool(index: int, tool: Any) -> str:
    if not isinstance(tool, dict) or set(tool) != {"name", "parameters"}:
        raise ValueError(f'tools[{index}] must be {{"name", "parameters"}}')
    name, parameters = tool["name"], tool["parameters"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"tools[{index}].name must match {tool_format.NAME_PATTERN}")
    if not isinstance(parameters, dict):
        raise ValueError(f"tools[{index}].parameters must be a JSON schema object")
    return name


def structural_tag(source: str, max_whitespace: int) -> xgr.StructuralTag:
    """The structural tag of a canonical source (see `canonical_source`)."""
    spec = json.loads(source)
    tags = [_call_tag(t["name"], t["parameters"], max_whitespace) for t in spec["tools"]]
    parallel = spec["parallel"]
    if spec["mode"] == REQUIRED:
        one: Format = tags[0] if len(tags) == 1 else OrFormat(elements=list(tags))
        return xgr.StructuralTag(format=PlusFormat(content=one) if parallel else one)
    first = TriggeredTagsFormat(triggers=[tool_format.CALL_OPEN], tags=tags, stop_after_first=True)
    if not parallel:
        return xgr.StructuralTag(format=first)
    more = StarFormat(content=OrFormat(elements=list(tags)))
    return xgr.StructuralTag(format=SequenceFormat(elements=[first, more]))


def _call_tag(name: str, parameters: dict[str, Any], max_whitespace: int) -> TagFormat:
    return TagFormat(
        begin=tool_format.call_prefix(name),
        content=JSONSchemaFormat(json_schema=parameters, max_whitespace_cnt=max_whitespace),
        end=tool_format.CALL_END,
    )
