"""The HTTP edge of the Producer: bounded bodies, optional write token, and every error in one JSON shape.

    guard.install(api, limits={"/v1/candidates:batch": 8 << 20}, default_limit=1 << 20)  # before ingress

- `BodyLimit`, a raw ASGI middleware: a body larger than its route's limit is answered 413 before anything
  parses it (a declared content-length is refused unread; a chunked body is counted as it arrives).
- `WriteToken`, a raw ASGI middleware: when the replica's environment sets VLMREC_WRITE_TOKEN, the write
  routes (`WRITE_PATHS`) need `Authorization: Bearer <token>` (401 otherwise); unset, writes are open.
  The variable is read once per process, when Starlette builds the middleware stack inside the replica
  (the token never travels in the pickled app or in Serve's user_config).
- Handlers that give every error `{"error", "message"}` (422s add `detail`): validation errors never
  echo a value JSON cannot carry (NaN, infinities, huge numbers or strings are summarised), and FastAPI's
  own 400s (a body that is not UTF-8, or nested deeper than the parser goes) and routing errors (404,
  405) are reshaped instead of `{"detail": ...}`.
"""

from __future__ import annotations

import hmac
import math
import os
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

WRITE_TOKEN_ENV = "VLMREC_WRITE_TOKEN"  # read once, where the replica starts (serving/producer.py)
WRITE_PATHS = frozenset({"/v1/events"})  # routes that change state: the token guards these
ECHO_CHARS = 120  # a rejected value is echoed only up to this size (its repr is cut beyond)
ECHO_ITEMS = 20  # list / dict members echoed
HTTP_ERRORS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def json_safe(value: Any, depth: int = 0) -> Any:
    """A rejected value as JSON can carry it, bounded: non-finite floats and numbers beyond float range
    become strings, long strings / lists / dicts are cut (with a count of what was left out)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**64 else f"<integer of {len(str(abs(value)))} digits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return value if len(value) <= ECHO_CHARS else f"{value[:ECHO_CHARS]}... ({len(value)} chars)"
    if depth >= 3:
        return f"<{type(value).__name__}>"
    if isinstance(value, dict):
        items = list(value.items())
        out = {str(k)[:ECHO_CHARS]: json_safe(v, depth + 1) for k, v in items[:ECHO_ITEMS]}
        if len(items) > ECHO_ITEMS:
            out["..."] = f"{len(items) - ECHO_ITEMS} more keys"
        return out
    if isinstance(value, (list, tuple)):
        out = [json_safe(v, depth + 1) for v in value[:ECHO_ITEMS]]
        if len(value) > ECHO_ITEMS:
            out.append(f"... {len(value) - ECHO_ITEMS} more")
        return out
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}..."


def field_name(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc if p not in ("body", "path", "query")) or "body"


def invalid(field: str, message: str, value: Any = None) -> RequestValidationError:
    """A 422 in FastAPI's shape, for checks that depend on the deployment's config (e.g. max_k)."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", *field.split(".")), "msg": message, "input": value}]
    )


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    message = "; ".join(f"{field_name(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:10])
    if len(errors) > 10:
        message += f"; and {len(errors) - 10} more errors"
    detail = [
        {
            "type": str(e.get("type", "")),
            "loc": [p if isinstance(p, int) else str(p)[:ECHO_CHARS] for p in e.get("loc", ())],
            "msg": str(e.get("msg", ""))[:500],
            **({"input": json_safe(e["input"])} if "input" in e else {}),
        }
        for e in errors[:20]
    ]
    # every value went through json_safe: Starlette's encoder (allow_nan=False) can always write it
    return JSONResponse({"error": "invalid_request", "message": message, "detail": detail}, status_code=422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's and Starlette's own errors in the documented shape. FastAPI answers 400 "There was an error
    parsing the body" for a body it cannot decode: not UTF-8, or nested deeper than its JSON parser goes."""
    if exc.status_code == 400:
        message = "the body could not be parsed: it must be UTF-8 JSON, and not nested too deeply"
    else:
        message = str(exc.detail)
    code = HTTP_ERRORS.get(exc.status_code, f"http_{exc.status_code}")
    return error(exc.status_code, code, message, headers=getattr(exc, "headers", None))


class BodyLimit:
    """Raw ASGI middleware: refuse a request body above `limit(path)` bytes with a 413, before parsing.

    A content-length above the limit is refused without reading; otherwise the body is read here, counted
    as it arrives (chunked bodies have no length), and replayed to the app once complete."""

    def __init__(self, app, limits: dict[str, int], default: int) -> None:
        self.app, self.limits, self.default = app, limits, default

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope.get("path", ""), self.default)
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await error(400, "bad_request", "content-length is not a number")(scope, receive, send)
                return
            if size > limit:
                await self._too_large(scope, receive, send, limit)
                return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                await self._too_large(scope, receive, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(scope, receive, send, limit: int) -> None:
        response = error(
            413, "payload_too_large", f"the request body is larger than {limit} bytes, this route's limit"
        )
        await response(scope, receive, send)


class WriteToken:
    """Raw ASGI middleware: with a token in the environment variable `env`, `paths` need
    `Authorization: Bearer <token>` (else 401). Read here, once per process (the edge)."""

    def __init__(self, app, env: str = WRITE_TOKEN_ENV, paths: frozenset[str] = WRITE_PATHS) -> None:
        token = os.environ.get(env, "").strip()
        self.app, self.paths = app, paths
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send) -> None:
        if self.expected is not None and scope["type"] == "http" and scope.get("path") in self.paths:
            got = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                response = error(
                    401,
                    "unauthorized",
                    "this route needs `Authorization: Bearer <token>` (the deployment's write token)",
                    headers={"WWW-Authenticate": 'Bearer realm="vlmrec"'},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install(app: FastAPI, limits: dict[str, int], default_limit: int, env: str = WRITE_TOKEN_ENV) -> None:
    """The edge of `app`: error handlers, then the token check and the body limit (outermost)."""
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_middleware(WriteToken, env=env)
    app.add_middleware(BodyLimit, limits=limits, default=default_limit)
