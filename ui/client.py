"""The page's HTTP client of the Producer: one method per route, each timed; ProducerDown when it does not
answer (refused, timed out), with a message a person can act on.

    client = ProducerClient("http://127.0.0.1:8000")
    reply = client.candidates(7, "similar", k=10, filters={"category": "Drama"})
    reply.status, reply.body["candidates"], reply.ms
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx


class ProducerDown(Exception):
    """Nothing answers at the Producer's address (or not in time)."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict
    ms: float  # the call as the page saw it (network + server)

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def message(self) -> str:
        """The error body's message (the Producer's JSON errors), else the status."""
        return str(self.body.get("message") or f"HTTP {self.status}")


class ProducerClient:
    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def _call(self, method: str, path: str, body: dict | None = None) -> Reply:
        t0 = time.perf_counter()
        try:
            r = self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise ProducerDown(
                f"The Producer at {self.url} is not answering ({type(exc).__name__}). Start it with "
                "`vlmrec serve --workdir <workspace>` (or `make demo UI=1`), then reload this page."
            ) from None
        ms = (time.perf_counter() - t0) * 1e3
        try:
            payload = r.json()
        except ValueError:
            payload = {"message": r.text[:200]}
        return Reply(r.status_code, payload if isinstance(payload, dict) else {"value": payload}, ms)

    def readyz(self) -> Reply:
        return self._call("GET", "/readyz")

    def clicks(self, user_id: int) -> Reply:
        return self._call("GET", f"/v1/users/{int(user_id)}/clicks")

    def candidates(self, user_id: int, producer: str, k: int, filters: dict | None = None) -> Reply:
        body = {"user_id": int(user_id), "producer": producer, "k": int(k), "filters": filters}
        return self._call("POST", "/v1/candidates", body)

    def mix(self, user_id: int, k: int, weights: dict[str, float], filters: dict | None = None) -> Reply:
        body = {"user_id": int(user_id), "k": int(k), "weights": weights, "filters": filters}
        return self._call("POST", "/v1/mix", body)

    def event(self, user_id: int, item_id: int) -> Reply:
        return self._call("POST", "/v1/events", {"user_id": int(user_id), "item_id": int(item_id)})

    def close(self) -> None:
        self._http.close()
