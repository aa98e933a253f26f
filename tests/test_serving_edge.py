"""The Producer's HTTP edge on a real deployment with a write token: the token guards writes only, and a
short schemathesis run over its OpenAPI finds no 5xx and no answer outside the contract
(benchmarks/fuzz.py runs the long one: `make fuzz`).

The token reaches the replica as it does in Kubernetes, through the environment of the replica's process
(here Serve's runtime_env; in k8s a Secret mapped to VLMREC_WRITE_TOKEN).
"""

from __future__ import annotations

import httpx
import pytest

from benchmarks.fuzz import fuzz
from serving.guard import WRITE_TOKEN_ENV
from tests.producer_world import FIRST_ID, World, free_port, write_world

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

TOKEN = "test-write-token"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return write_world(tmp_path_factory.mktemp("edge"))


@pytest.fixture(scope="module")
def url(world, ray_local):
    from ray import serve

    from serving.producer import Producer

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = Producer.options(
        user_config=world.config.to_dict(),
        ray_actor_options={"runtime_env": {"env_vars": {WRITE_TOKEN_ENV: TOKEN}}},
    ).bind()
    serve.run(app, name="edge", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_write_token_guards_writes_only(url):
    event = {"user_id": 9_000_001, "item_id": FIRST_ID}
    with httpx.Client(base_url=url, timeout=30) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = http.post("/v1/events", json=event, headers=headers)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert TOKEN not in r.text
        r = http.post("/v1/events", json=event, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
        assert http.get(f"/v1/users/{event['user_id']}/clicks").json()["item_ids"] == [FIRST_ID]
        assert http.post("/v1/candidates", json={"user_id": 1, "k": 3}).status_code == 200, "reads stay open"


def test_short_fuzz_run_finds_no_5xx_and_no_contract_violation(url):
    result = fuzz(url, max_requests=300, seconds=120, headers={"Authorization": f"Bearer {TOKEN}"})
    assert result["requests"] >= 300 or result["wall_s"] >= 120
    assert result["server_errors_5xx"] == 0, result["server_error_examples"]
    assert result["schema_violations"] == 0, result["violation_examples"]
    assert {"200", "422"} <= set(result["status"]), "valid and invalid cases were both sent"
    assert any(op.startswith("POST /v1/events") for op in result["per_operation"])
