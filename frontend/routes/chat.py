"""POST /v1/chat/completions."""

import time

from fastapi import APIRouter, Request, Response

from frontend.context import get_state
from frontend.parsing import parse_chat_request, read_json_object
from frontend.pipeline import CHAT_DEFAULT_MAX_TOKENS, PromptSource
from frontend.responses import ChatShape
from frontend.routes.generation import job_from, new_request_id, respond
from frontend.stage_types import ChatTurn

router = APIRouter()


@router.post("/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    arrival_ns = time.monotonic_ns()
    state = get_state(request)
    body = parse_chat_request(await read_json_object(request))
    request_id = new_request_id("chatcmpl")
    turns = [ChatTurn(m.role, m.content or "", m.name or "") for m in body.messages]
    job = job_from(body, request_id, PromptSource(messages=turns), CHAT_DEFAULT_MAX_TOKENS)
    await state.check_model(body.model)
    shape = ChatShape(id=request_id, created=int(time.time()), model=body.model)
    return await respond(request, state, job, shape, arrival_ns)
