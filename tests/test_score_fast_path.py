"""The ASGI layer that answers ``POST /score`` below FastAPI: which requests it takes, and that
it hands every other one to FastAPI with its body intact."""

from __future__ import annotations

import asyncio
import json

import numpy as np

from genctr_rec.serving.asgi import ScoreFastPath
from genctr_rec.serving.predictor import RequestError

VALID = {"history": {"item_ids": [1, 2]}, "query_category_id": 0, "candidates": [{"item_id": 3}]}


def _post(app, body: bytes, content_type: bytes = b"application/json", path: str = "/score"):
    """Run one HTTP request through ``app`` in chunks; returns (status, body, headers)."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body))],
    }
    chunks = [body[: len(body) // 2], body[len(body) // 2 :]]
    messages = [
        {"type": "http.request", "body": chunk, "more_body": i == 0}
        for i, chunk in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), sent[0]


class _Inner:
    """Stands for FastAPI: records what it was given and answers 299."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"inner"})


def _scorer(calls: list, refuse: bool = False):
    def score(request):
        calls.append(request)
        if refuse:
            raise RequestError("candidates[0].item_id", "outside the vocabulary")
        future = asyncio.get_running_loop().create_future()
        future.set_result(np.array([0.25, 1 / 3]))
        return "v7", future  # the version that prepared it, and its scores

    return score


def test_a_valid_json_request_is_answered_without_fastapi() -> None:
    inner, calls = _Inner(), []
    status, body, start = _post(ScoreFastPath(inner, _scorer(calls)), json.dumps(VALID).encode())
    assert (status, inner.bodies, len(calls)) == (200, [], 1)
    assert calls[0].history.item_ids == [1, 2] and calls[0].candidates[0].item_id == 3
    assert body == b'{"scores":[0.25,0.3333333333333333]}'  # as Starlette's JSONResponse
    assert dict(start["headers"])[b"content-length"] == str(len(body)).encode()
    assert dict(start["headers"])[b"x-genctr-model-version"] == b"v7"


def test_everything_else_reaches_fastapi_with_its_body_intact() -> None:
    valid = json.dumps(VALID).encode()
    cases = [
        (b'{"history": [', b"application/json", "/score", False),  # not JSON
        (b'{"history": {}}', b"application/json", "/score", False),  # not a ScoreBody
        (valid, b"text/plain", "/score", False),  # another content type
        (valid, b"application/json", "/other", False),  # another route
        (valid, b"application/json", "/score", True),  # the predictor refuses it
    ]
    for raw, content_type, path, refuse in cases:
        inner, calls = _Inner(), []
        app = ScoreFastPath(inner, _scorer(calls, refuse))
        status, body, _ = _post(app, raw, content_type, path)
        assert (status, body, inner.bodies) == (299, b"inner", [raw]), (raw, content_type, path)
