"""Optional API keys: without a valid bearer key the API answers 401; health and metrics stay
open."""

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from frontend.app import create_app
from frontend.config import parse_args
from tests.test_frontend_fake_stages import MODEL_ID, FakeStages, fake_config

KEYS = ("key-one", "key-two")
BODY = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 1}


@pytest.fixture(scope="module")
def client(fakes: FakeStages) -> Iterator[TestClient]:
    with TestClient(create_app(fake_config(fakes, api_keys=KEYS))) as test_client:
        yield test_client


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong", "Basic key-one", "key-one", "Bearer key-one-more"],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/inference/v1/chat/completions"])
def test_missing_or_wrong_key_is_401(
    client: TestClient, fakes: FakeStages, authorization: str | None, path: str
) -> None:
    fakes.prefill.requests.clear()
    headers = {} if authorization is None else {"Authorization": authorization}
    # Checked before the body: even an invalid one gets the 401.
    response = client.post(path, json={"bogus": 1}, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key"
    assert not fakes.prefill.requests


def test_valid_keys_are_served(client: TestClient) -> None:
    for key in KEYS:
        response = client.post(
            "/v1/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200, response.text
    lower = client.post("/v1/completions", json=BODY, headers={"authorization": "bearer key-two"})
    assert lower.status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer key-one"}).status_code == 200


def _isolation_key(client: TestClient, fakes: FakeStages, key: str, **body: str) -> str:
    headers = {"Authorization": f"Bearer {key}"}
    assert client.post("/v1/completions", json={**BODY, **body}, headers=headers).is_success
    return fakes.prefill.requests[-1].prompt_cache.isolation_key


def test_each_key_has_its_own_prompt_cache(client: TestClient, fakes: FakeStages) -> None:
    one, two = (_isolation_key(client, fakes, key) for key in KEYS)
    assert one and two and one != two
    assert one == _isolation_key(client, fakes, "key-one")
    assert all(key not in one + two for key in KEYS)  # the salt does not reveal the key
    # The request's own isolation key divides the key's cache further.
    salted = _isolation_key(client, fakes, "key-one", prompt_cache_isolation_key="user-7")
    assert salted not in (one, two) and salted.endswith("user-7")


def test_a_shared_prompt_cache_is_the_operators_choice(fakes: FakeStages) -> None:
    config = fake_config(fakes, api_keys=KEYS, shared_prompt_cache=True)
    with TestClient(create_app(config)) as shared:
        assert {_isolation_key(shared, fakes, key) for key in KEYS} == {""}


def test_health_and_metrics_stay_open(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_keys_from_flags_and_environment() -> None:
    config = parse_args(["--api-key", "a", "--api-key", "b"], environ={"API_KEYS": "c, d,,a"})
    assert config.api_keys == ("a", "b", "c", "d")
    assert parse_args([], environ={}).api_keys == ()
