"""POST /v1/chat/completions."""

import json
import time

from fastapi import APIRouter, Request, Response

from frontend.api.parsing import parse_chat_request, read_json_object
from frontend.api.request import PromptSource, generation_request
from frontend.api.schemas import DEFAULT_PROMPT_TRUNCATE_LEN, ChatMessage
from frontend.auth import prompt_cache_tenant
from frontend.context import get_state
from frontend.output.responses import ChatShape
from frontend.request_id import request_ids
from frontend.routes.respond import counted, respond, shape_for
from frontend.stages.types import ChatTurn

router = APIRouter()

# The rest of the context window, capped at this (the Fireworks chat guide's default) so that
# a forgotten max_tokens cannot hold a slot for 100k tokens.
CHAT_DEFAULT_MAX_TOKENS = 2048


@router.post("/chat/completions")
@counted
async def create_chat_completion(request: Request) -> Response:
    arrival_ns = time.monotonic_ns()
    state = get_state(request)
    body = parse_chat_request(await read_json_object(request))
    ids = request_ids("chatcmpl", request)
    turns = [chat_turn(message) for message in body.messages]
    truncate_len = body.prompt_truncate_len or DEFAULT_PROMPT_TRUNCATE_LEN
    source = PromptSource(
        messages=turns, truncate_len=truncate_len, tools_json=body.tool_use.tools_json
    )
    tenant = prompt_cache_tenant(request)
    generation = generation_request(body, ids.stage, source, CHAT_DEFAULT_MAX_TOKENS, tenant)
    await state.check_model(body.model)
    shape = shape_for(ChatShape, generation, body.model, ids.response)
    return await respond(request, state, generation, shape, arrival_ns)


def chat_turn(message: ChatMessage) -> ChatTurn:
    calls = json.dumps(message.tool_calls, ensure_ascii=False) if message.tool_calls else ""
    return ChatTurn(
        message.role,
        message.content or "",
        message.name or "",
        message.tool_call_id or "",
        tool_calls_json=calls,
    )
