"""The service bounds what a client can make it hold and who may ask: ids per request, a read
deadline against slow-loris clients, header bytes, a bounded queue that sheds load with 503
and Retry-After, an optional bearer token, a Host check, and metadata that shows no paths.
Every server here is a real process on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from genctr_rec.serving.batcher import MicroBatcher, Overloaded
from genctr_rec.serving.predictor import Predictor, RequestError
from tests.serving import as_request, score_body, start_server, stop_server


def test_ids_a_request_may_ask_for_are_bounded(artifacts) -> None:
    """An ids feature copied once per candidate: 500 ids x 1,000 candidates would be 500k
    rows of ids from a few kilobytes of JSON; both the list and the product are capped."""
    predictor = Predictor(artifacts["genctr-none"]["path"], max_feature_ids=100,
                          max_request_ids=5_000)  # fmt: skip
    body = score_body(np.random.default_rng(0), 5, 10)
    body["features"] = {**body["features"], "user_interests": list(range(16)) * 10}
    with pytest.raises(RequestError, match="160 ids; at most 100") as err:
        predictor.prepare(as_request(body))
    assert err.value.field == "features.user_interests"
    body["features"]["user_interests"] = list(range(16)) * 6  # 96 ids
    body["candidates"] = body["candidates"] * 6  # 60 candidates: 5,760 ids to score
    with pytest.raises(RequestError, match="at most 5000 a request") as err:
        predictor.prepare(as_request(body))
    assert err.value.field == "features"
    body["candidates"] = body["candidates"][:50]
    assert len(predictor.score(as_request(body))) == 50


def test_an_overloaded_queue_sheds_new_requests() -> None:
    """Past ``max_queue`` requests waiting for the model, a new one is refused at once (the
    service answers 503 with Retry-After) instead of growing the queue; the waiting ones are
    still scored."""

    async def scenario() -> tuple[int, int]:
        batcher = MicroBatcher(lambda batch: [np.zeros(1)] * len(batch), 64, 0.0, max_queue=3)
        blocker = asyncio.get_running_loop().create_future()
        batcher.start(after=blocker)  # nothing is scored until the warm-up ends
        queued = [batcher.submit(object()) for _ in range(3)]
        refused = 0
        for _ in range(5):
            try:
                batcher.submit(object())
            except Overloaded:
                refused += 1
        blocker.set_result(None)
        done = await asyncio.gather(*queued)
        await batcher.stop()
        return refused, len(done)

    assert asyncio.run(scenario()) == (5, 3)


@pytest.fixture(scope="module")
def guarded(artifacts, tmp_path_factory):
    token = tmp_path_factory.mktemp("secret") / "token"
    token.write_text("s3cret-token\n")
    proc, url = start_server(
        artifacts["genctr-int8"]["path"], "--auth-token-file", str(token),
        "--allowed-hosts", "127.0.0.1,ctr.internal", "--read-timeout-s", "1.5",
        "--max-queue", "2", "--max-wait-ms", "300",
    )  # fmt: skip
    yield url
    stop_server(proc)


AUTH = {"authorization": "Bearer s3cret-token"}


def test_a_token_guards_everything_but_the_probes(guarded) -> None:
    body = score_body(np.random.default_rng(1), 4, 3)
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret-token"}):
        reply = httpx.post(f"{guarded}/score", json=body, headers=headers)
        assert reply.status_code == 401 and set(reply.json()) == {"detail", "field"}
        assert reply.headers["www-authenticate"] == "Bearer"
    for route in ("/metadata", "/metrics", "/openapi.json"):
        assert httpx.get(f"{guarded}{route}").status_code == 401
    for route in ("/livez", "/readyz"):
        assert httpx.get(f"{guarded}{route}").status_code == 200
    assert httpx.post(f"{guarded}/score", json=body, headers=AUTH).status_code == 200
    meta = httpx.get(f"{guarded}/metadata", headers=AUTH).json()
    text = json.dumps(meta)
    assert "pid" not in meta.get("process", {}) and "artifact" not in meta
    assert "/tmp" not in text and str(Path.home()) not in text


def test_another_host_is_refused(guarded) -> None:
    reply = httpx.get(f"{guarded}/livez", headers={"host": "evil.example:80"})
    assert reply.status_code == 400 and set(reply.json()) == {"detail", "field"}
    assert httpx.get(f"{guarded}/livez", headers={"host": "ctr.internal:8080"}).status_code == 200


def _connect(url: str) -> socket.socket:
    parsed = urlparse(url)
    return socket.create_connection((parsed.hostname, parsed.port), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (reads until EOF)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def test_slow_loris_connections_are_closed_and_others_answered(guarded) -> None:
    """Twenty connections that send a header line a second never finish a request: each is
    closed within the read deadline (1.5 s here) while the service keeps answering; a request
    whose headers grow past 64 KiB is refused and its connection closed."""
    slow = []
    for _ in range(20):
        sock = _connect(guarded)
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow.append(sock)
    body = score_body(np.random.default_rng(2), 4, 2)
    for _ in range(3):
        time.sleep(0.4)
        for sock in slow:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass
        assert httpx.post(f"{guarded}/score", json=body, headers=AUTH).status_code == 200
    started = time.monotonic()
    assert all(_closed_within(sock, 5.0) for sock in slow)
    assert time.monotonic() - started < 5.0
    flood = _connect(guarded)
    flood.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        for _ in range(100):
            flood.sendall(b"X-Flood: " + b"a" * 1000 + b"\r\n")
    except OSError:
        pass
    reply = flood.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert _closed_within(flood, 5.0)


def test_overload_is_a_503_with_retry_after(guarded) -> None:
    """Batches wait 300 ms for more requests and at most 2 may queue: a burst of 12 gets some
    200s and the rest 503 with Retry-After, every answer in the one error shape."""
    body = score_body(np.random.default_rng(3), 4, 2)

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{guarded}/score", json=body, headers=AUTH, timeout=30)

    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(post, range(12)))
    statuses = sorted(r.status_code for r in replies)
    assert set(statuses) == {200, 503}, statuses
    for reply in replies:
        if reply.status_code == 503:
            assert reply.headers["retry-after"] == "1"
            assert set(reply.json()) == {"detail", "field"}
