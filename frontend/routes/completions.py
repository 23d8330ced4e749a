"""POST /v1/completions."""

import time

from fastapi import APIRouter, Request, Response

from frontend.context import get_state
from frontend.parsing import parse_completion_request, read_json_object
from frontend.pipeline import COMPLETION_DEFAULT_MAX_TOKENS, PromptSource
from frontend.responses import CompletionShape
from frontend.routes.generation import job_from, new_request_id, respond

router = APIRouter()


@router.post("/completions")
async def create_completion(request: Request) -> Response:
    arrival_ns = time.monotonic_ns()
    state = get_state(request)
    body = parse_completion_request(await read_json_object(request))
    request_id = new_request_id("cmpl")
    source = PromptSource(prompt=body.prompt)
    job = job_from(body, request_id, source, COMPLETION_DEFAULT_MAX_TOKENS)
    await state.check_model(body.model)
    shape = CompletionShape(id=request_id, created=int(time.time()), model=body.model)
    return await respond(request, state, job, shape, arrival_ns)
