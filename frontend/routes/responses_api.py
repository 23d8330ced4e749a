"""POST /v1/responses (OpenAI's Responses API), run as a chat request; GET /v1/responses/{id}
for stored responses (`--store-responses N`)."""

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from frontend.api.parsing import read_json_object
from frontend.api.request import PromptSource, generation_request
from frontend.api.responses_input import InputItem, input_items
from frontend.api.responses_request import ResponsesRequest, parse_responses_request
from frontend.auth import api_key_id, prompt_cache_tenant
from frontend.context import AppState, get_state
from frontend.errors import ApiError, invalid_request
from frontend.output.response_object import ResponseWriter
from frontend.request_id import request_ids
from frontend.responses_store import StoredResponse
from frontend.routes.chat import CHAT_DEFAULT_MAX_TOKENS, chat_turn
from frontend.routes.respond import answer, counted

router = APIRouter()

# The chat path's errors name chat fields; a Responses client knows them by these names.
_RESPONSES_PARAMS = {
    "messages": "input",
    "prompt": "input",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
}
_HOW_TO_STORE = (
    "start the frontend with --store-responses N (e.g. scripts/serve --frontend-args "
    '"--store-responses 1000") to keep the last N responses'
)


@router.post("/responses")
@counted
async def create_response(request: Request) -> Response:
    arrival_ns = time.monotonic_ns()
    state = get_state(request)
    body = parse_responses_request(await read_json_object(request))
    owner = api_key_id(request)
    store = _stores(state, body)
    conversation = [*_previous_conversation(state, body, owner), *body.input_items]
    stage_id = request_ids("resp", request).stage
    # Stored responses are found by id: unique even when a client reuses its X-Request-Id.
    response_id = f"resp_{uuid.uuid4().hex}"
    with _responses_params():
        chat = body.chat_request(conversation)
        turns = [chat_turn(message) for message in chat.messages]
        source = PromptSource(messages=turns, tools_json=chat.tool_use.tools_json)
        tenant = prompt_cache_tenant(request)
        generation = generation_request(chat, stage_id, source, CHAT_DEFAULT_MAX_TOKENS, tenant)
        await state.check_model(body.model)
        writer = ResponseWriter(
            response_id,
            int(time.time()),
            body.model,
            body.echoed(generation.sampling, store),
            generation.output.tool_calls,
            _keeper(state, owner, conversation) if store else lambda response: None,
        )
        return await answer(
            request, state, generation, arrival_ns, writer.events, writer.error_events, writer.body
        )


@router.get("/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> JSONResponse:
    store = get_state(request).response_store
    stored = store.get(response_id, api_key_id(request)) if store is not None else None
    if stored is None:
        hint = "" if store is not None else f" (responses are not stored: {_HOW_TO_STORE})"
        raise ApiError(
            404, f"No response with id '{response_id}' found{hint}.", code="response_not_found"
        )
    return JSONResponse(stored.body)


def _stores(state: AppState, body: ResponsesRequest) -> bool:
    """Whether the response is to be stored: by default when the server stores responses."""
    if state.response_store is not None:
        return body.store is not False
    if body.store:
        raise invalid_request(
            f"'store' cannot be true: this server does not store responses; {_HOW_TO_STORE}, "
            "or leave store out.",
            "store",
            "unsupported_parameter",
        )
    return False


def _previous_conversation(state: AppState, body: ResponsesRequest, owner: str) -> list[InputItem]:
    response_id = body.previous_response_id
    if response_id is None:
        return []
    if state.response_store is None:
        raise invalid_request(
            f"'previous_response_id' needs stored responses, and this server does not store "
            f"them; {_HOW_TO_STORE}, or send the whole conversation as input.",
            "previous_response_id",
            "unsupported_parameter",
        )
    previous = state.response_store.get(response_id, owner)
    if previous is None:
        raise ApiError(
            404,
            f"Previous response with id '{response_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return previous.conversation


def _keeper(
    state: AppState, owner: str, conversation: list[InputItem]
) -> Callable[[dict[str, Any]], None]:
    """Stores a finished response with what a response continuing it starts from."""
    assert state.response_store is not None
    store = state.response_store

    def keep(response: dict[str, Any]) -> None:
        output = input_items(response["output"])
        store.put(StoredResponse(owner, response, [*conversation, *output]))

    return keep


@contextlib.contextmanager
def _responses_params() -> Iterator[None]:
    try:
        yield
    except ApiError as exc:
        name = _RESPONSES_PARAMS.get(exc.param or "")
        if name is not None:
            assert exc.param is not None
            if exc.message.startswith(exc.param):
                exc.message = name + exc.message[len(exc.param) :]
            exc.param = name
        raise
