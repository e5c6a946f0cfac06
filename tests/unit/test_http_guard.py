"""The server's outermost checks (server/guard.py `Guard`) on a small app of their own: API key, body limit, and a
bug answered 500 in the API's error shape with the server going on."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from radixflow.server.errors import MAX_BODY_BYTES
from radixflow.server.guard import Guard


def guarded(api_key: str | None = None, draining: bool = False) -> TestClient:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(body: dict):
        return body

    @app.get("/bug")
    async def bug():
        raise KeyError("a bug")

    app.add_middleware(Guard, api_key=api_key, is_draining=lambda: draining)
    return TestClient(app, raise_server_exceptions=False)


def test_a_bug_is_a_500_in_the_api_shape_and_the_next_request_is_served():
    client = guarded()
    response = client.get("/bug")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "KeyError" in error["message"]
    assert client.post("/echo", json={"a": 1}).json() == {"a": 1}


@pytest.mark.parametrize("headers,status", [({}, 401), ({"Authorization": "Bearer k"}, 200)])
def test_api_key(headers, status):
    client = guarded(api_key="k")
    assert client.post("/echo", json={}, headers=headers).status_code == status
    assert client.get("/health").status_code == 200  # no key needed


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_is_read_whatever_its_content_type(content_type):
    headers = {"content-type": content_type} if content_type else {}
    assert guarded().post("/echo", content=b'{"a": 1}', headers=headers).json() == {"a": 1}  # as `curl -d` sends it


def test_body_over_the_limit_with_and_without_a_declared_length():
    client = guarded()
    declared = client.post("/echo", content=b" " * (MAX_BODY_BYTES + 1), headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "limit" in declared.json()["error"]["message"]

    def chunks():
        for _ in range(MAX_BODY_BYTES // 2**20 + 1):
            yield b" " * 2**20
    streamed = client.post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_a_draining_server_answers_503_with_retry_after_on_every_path():
    client = guarded(draining=True)
    for response in (client.get("/health"), client.post("/echo", json={}), client.post("/v1/messages", json={})):
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "shutting down" in client.get("/health").json()["error"]["message"]
    assert client.post("/v1/messages", json={}).json()["error"]["type"] == "overloaded_error"  # Anthropic's shape
