"""POST /v1/completions."""

import time

from fastapi import APIRouter, Request, Response

from frontend.api.parsing import parse_completion_request, read_json_object
from frontend.api.request import PromptSource, generation_request
from frontend.auth import prompt_cache_tenant
from frontend.context import get_state
from frontend.output.responses import CompletionShape
from frontend.request_id import request_ids
from frontend.routes.respond import counted, respond, shape_for

router = APIRouter()

# OpenAI's default for /v1/completions.
COMPLETION_DEFAULT_MAX_TOKENS = 16


@router.post("/completions")
@counted
async def create_completion(request: Request) -> Response:
    arrival_ns = time.monotonic_ns()
    state = get_state(request)
    body = parse_completion_request(await read_json_object(request))
    ids = request_ids("cmpl", request)
    source = PromptSource(prompts=body.prompt)
    tenant = prompt_cache_tenant(request)
    generation = generation_request(body, ids.stage, source, COMPLETION_DEFAULT_MAX_TOKENS, tenant)
    await state.check_model(body.model)
    shape = shape_for(CompletionShape, generation, body.model, ids.response)
    return await respond(request, state, generation, shape, arrival_ns)
