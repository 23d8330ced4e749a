"""Responses kept in memory (`--store-responses N`) for `previous_response_id` and
`GET /v1/responses/{id}`: at most N, the least recently used forgotten first.

Each belongs to the API key that created it; another key finds nothing under its id.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from frontend.api.responses_input import InputItem


@dataclass(slots=True, frozen=True)
class StoredResponse:
    owner: str  # the API key's id ("" without API keys)
    body: dict[str, Any]  # the response object as it was answered
    # Its input (previous turns included, instructions not) and then its output: what a
    # response that continues it starts from.
    conversation: list[InputItem]


class ResponseStore:
    def __init__(self, capacity: int) -> None:
        assert capacity > 0
        self._capacity = capacity
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response: StoredResponse) -> None:
        response_id = response.body["id"]
        self._responses[response_id] = response
        self._responses.move_to_end(response_id)
        while len(self._responses) > self._capacity:
            self._responses.popitem(last=False)

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        response = self._responses.get(response_id)
        if response is None or response.owner != owner:
            return None
        self._responses.move_to_end(response_id)
        return response
