"""The ASGI layers around FastAPI: each a small class with one job (a Host check, a bearer token,
a body limit, the score fast path, the model-version header), stacked by
``server.create_app``."""

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from genctr_rec.serving.api import ScoreBody
from genctr_rec.serving.batcher import Overloaded
from genctr_rec.serving.predictor import RequestError
from genctr_rec.serving.versions import ServedModel

VERSION_HEADER = "x-genctr-model-version"
VERSION_HEADER_BYTES = VERSION_HEADER.encode()


def replaying(body: bytes, receive: Callable) -> Callable:
    """An ASGI ``receive`` that gives ``body`` (already read) as one message, then defers to
    ``receive`` (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> dict:
        return pending.pop() if pending else await receive()

    return replay


class BodyTooLarge(Exception):
    """A request body grew past the limit while it was read."""


async def read_body(receive: Callable, limit: int | None = None) -> bytes | None:
    """The whole request body, or None when the client went away first; raises
    :class:`BodyTooLarge` as soon as it grows past ``limit`` bytes."""
    body, more = bytearray(), True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if limit is not None and len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


class ScoreFastPath:
    """ASGI: ``POST /score`` with a valid JSON body, scored without FastAPI's per-request
    machinery; everything else goes to FastAPI, which answers it exactly as before.

    Why: FastAPI's routing, dependency solving, validating and serialising the response model,
    and exception middlewares cost about as much as the model call for a typical request
    (measured in ``benchmarks/README.md``). Here the body is
    validated by the same :class:`ScoreBody` (pydantic's JSON parser, straight from bytes),
    scored through the same batcher, and the answer written as FastAPI writes it. Any body
    this path does not accept as it is (another content type, invalid JSON, a validation
    error, a :class:`RequestError` of the predictor) is handed to FastAPI unchanged, so error
    answers (400, 413, 422 and their ``{detail, field}``) stay those of the one documented
    route.
    """

    def __init__(
        self, app: Callable, score: Callable[[ScoreBody], tuple[str, Awaitable[np.ndarray]]]
    ):
        self.app = app
        self.score = score

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == "/score"
            and _declares_json(scope)
        ):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:  # the client went away
            return
        try:
            request = ScoreBody.model_validate_json(body)
            version, scoring = self.score(request)
        except (ValidationError, RequestError, Overloaded):
            await self.app(scope, replaying(body, receive), send)  # FastAPI's own answer
            return
        content = _json_bytes({"scores": (await scoring).tolist()})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", str(len(content)).encode()),
                    (b"content-type", b"application/json"),
                    (VERSION_HEADER_BYTES, version.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})


def _declares_json(scope: dict) -> bool:
    """The request says its body is ``application/json`` (a charset parameter allowed)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return False


def _json_bytes(content: Any) -> bytes:
    """JSON as Starlette's ``JSONResponse`` renders it (compact, UTF-8, no NaN)."""
    return json.dumps(
        content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413 before anything parses them,
    by Content-Length or, for a chunked body, by counting it in (it is read fully first)."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        try:
            body = await read_body(receive, self.limit)
        except BodyTooLarge:
            await self._refuse(scope, receive, send)
            return
        if body is None:  # the client went away
            return
        await self.app(scope, replaying(body, receive), send)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable) -> None:
        response = JSONResponse(
            {"detail": f"request body over {self.limit} bytes", "field": None}, status_code=413
        )
        await response(scope, receive, send)


class VersionHeader:
    """ASGI: every HTTP response names a model version (``x-genctr-model-version``); ``/score``
    answers carry the version that scored them, others the version current now."""

    def __init__(self, app: Callable, current: Callable[[], ServedModel]) -> None:
        self.app = app
        self.current = current

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_version(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name == VERSION_HEADER_BYTES for name, _ in headers):
                    headers.append((VERSION_HEADER_BYTES, self.current().version.encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_version)


def json_answer(status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None):
    """An ASGI app answering ``{"detail", "field": null}`` with ``status``: the one error
    shape, for refusals made below FastAPI."""
    content = _json_bytes({"detail": detail, "field": None})

    async def answer(scope: dict, receive: Callable, send: Callable) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-length", str(len(content)).encode()),
                    (b"content-type", b"application/json"),
                    *(headers or []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})

    return answer


class BearerAuth:
    """ASGI: every route but the probes needs ``Authorization: Bearer TOKEN`` (compared in
    constant time); 401 otherwise, before the body is read."""

    OPEN = frozenset({"/livez", "/readyz", "/healthz"})

    def __init__(self, app: Callable, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.refuse = json_answer(
            401, "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")]
        )

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            given = dict(scope.get("headers", [])).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await self.refuse(scope, receive, send)
                return
        await self.app(scope, receive, send)


class HostCheck:
    """ASGI: only requests whose ``Host`` header (without its port) is one of ``hosts``; 400
    otherwise (DNS rebinding, traffic meant for another service)."""

    def __init__(self, app: Callable, hosts: list[str]) -> None:
        self.app = app
        self.hosts = frozenset(hosts)
        self.refuse = json_answer(400, "this service does not answer for that Host")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.strip("[]").lower() not in self.hosts:
                await self.refuse(scope, receive, send)
                return
        await self.app(scope, receive, send)
