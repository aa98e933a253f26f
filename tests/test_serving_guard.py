"""serving/guard.py on a small FastAPI app of its own (no Ray): the same edge the Producer installs.

The Producer's routes are exercised through Serve in test_serving.py; here each piece is checked alone,
fast: what the 422 handler may echo, the body limit (declared and chunked), FastAPI's own errors, the token.
"""

from __future__ import annotations

import math

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving import guard
from serving.api import CandidatesRequest

JSON = {"content-type": "application/json"}


def make_app(limit: int = 1000) -> FastAPI:
    app = FastAPI()
    guard.install(app, limits={"/big": 10 * limit}, default_limit=limit, env="TEST_GUARD_TOKEN")

    @app.post("/v1/events")
    async def events(body: CandidatesRequest):
        return {"ok": body.user_id}

    @app.post("/echo")
    async def echo(body: CandidatesRequest):
        return {"ok": body.user_id}

    @app.post("/big")
    async def big(body: CandidatesRequest):
        return {"n": len(body.recent_item_ids or [])}

    return app


def test_json_safe_bounds_what_an_error_echoes():
    assert guard.json_safe(math.nan) == "nan" and guard.json_safe(-math.inf) == "-inf"
    assert guard.json_safe(10**400) == "<integer of 401 digits>"
    assert guard.json_safe(7) == 7 and guard.json_safe(True) is True and guard.json_safe(None) is None
    assert guard.json_safe("x" * 500).endswith("(500 chars)")
    assert guard.json_safe(list(range(100)))[-1] == "... 80 more"
    assert guard.json_safe({"a": [math.inf]}) == {"a": ["inf"]}


def test_non_finite_numbers_are_422_not_500():
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        for raw, field in ((b'{"user_id": 7, "k": NaN}', "k"), (b'{"user_id": 1e400}', "user_id")):
            r = client.post("/echo", content=raw, headers=JSON)
            assert r.status_code == 422 and r.json()["message"].startswith(f"{field}:"), r.text


def test_body_limit_declared_chunked_and_per_route():
    with TestClient(make_app(limit=1000), raise_server_exceptions=False) as client:
        body = b'{"user_id": 1, "recent_item_ids": [' + b"1," * 600 + b"1]}"
        r = client.post("/echo", content=body, headers=JSON)
        assert r.status_code == 413 and r.json() == {
            "error": "payload_too_large",
            "message": "the request body is larger than 1000 bytes, this route's limit",
        }
        r = client.post("/echo", content=iter([body[:800], body[800:]]), headers=JSON)  # chunked
        assert r.status_code == 413
        assert client.post("/big", content=body, headers=JSON).json() == {"n": 601}, "its own limit"
        assert client.post("/echo", content=b'{"user_id": 1}', headers=JSON).json() == {"ok": 1}


def test_fastapi_own_errors_get_the_error_shape():
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        r = client.post("/echo", content=b'{"user_id": "\xff"}', headers=JSON)
        assert r.status_code == 400 and set(r.json()) == {"error", "message"}
        assert client.get("/nope").json()["error"] == "not_found"


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_write_token_from_the_environment(monkeypatch, token):
    if token:
        monkeypatch.setenv("TEST_GUARD_TOKEN", token)
    else:
        monkeypatch.delenv("TEST_GUARD_TOKEN", raising=False)
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        r = client.post("/v1/events", json={"user_id": 1})
        assert r.status_code == (401 if token else 200), r.text
        if token:
            assert r.json()["error"] == "unauthorized" and token not in r.text
            ok = client.post("/v1/events", json={"user_id": 1}, headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200
        assert client.post("/echo", json={"user_id": 1}).status_code == 200, "only write paths"
