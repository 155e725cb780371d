"""The service under hostile input and at shutdown: a seeded fuzz of malformed requests (never a
5xx, always the one error shape, the keep-alive connection kept), slow and truncated bodies, a
bounded soak of 8 clients mixing valid and malformed requests, and SIGTERM draining in-flight
requests before exit."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import psutil
import pytest

from genctr_rec.serving.predictor import Predictor
from tests.serving import as_request, score_body, start_server, stop_server

JSON = {"content-type": "application/json"}
DEEP = "__nested_lists_of_depth_"


@pytest.fixture(scope="module")
def server(artifacts: dict) -> Iterator[tuple[str, Path, int]]:
    path = artifacts["genctr-int8"]["path"]
    proc, url = start_server(path, "--read-timeout-s", "3", "--max-feature-ids", "100")
    yield url, path, proc.pid
    stop_server(proc)


def _random_value(rng: np.random.Generator) -> object:
    """A JSON value of a kind the schema does not expect somewhere (or does, by chance)."""
    kind = int(rng.integers(0, 13))
    if kind == 12:  # past --max-feature-ids where it lands in an ids feature
        return [int(v) for v in rng.integers(0, 16, int(rng.integers(101, 3000)))]
    if kind == 0:
        return int(rng.choice([10**30, -(10**30), 2**63, 2**64 + 1, -1]))
    if kind == 1:
        return float(rng.choice([1e308, -0.0, 0.5, float("nan"), float("inf"), float("-inf")]))
    if kind == 2:
        return "".join(chr(int(c)) for c in rng.integers(1, 0x2FFF, int(rng.integers(0, 12))))
    if kind == 3:
        return None
    if kind == 4:
        return bool(rng.integers(0, 2))
    if kind == 5:  # deep nesting, spliced in as text by _encode (json.dumps would recurse)
        return f"{DEEP}{int(rng.choice([30, 500, 20_000]))}"
    if kind == 6:
        return {"item_id": "x", "nested": {"a": [1, {"b": None}]}}
    if kind == 7:
        return [int(v) for v in rng.integers(-5, 3000, int(rng.integers(0, 8)))]
    if kind == 8:
        return []
    if kind == 9:
        return {}
    if kind == 10:
        return int(rng.integers(-3, 3000))
    return "\ud800"  # a lone surrogate, escaped by json.dumps


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node[:3]):
            out += _paths(value, (*prefix, i))
    return out


def _mutate(body: dict, rng: np.random.Generator) -> object:
    """Replace, delete or add at 1-3 random places of a valid body."""
    body = json.loads(json.dumps(body))
    for _ in range(int(rng.integers(1, 4))):
        paths = _paths(body)
        path = paths[int(rng.integers(0, len(paths)))]
        if not path:
            return _random_value(rng)
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        action = int(rng.integers(0, 3))
        if action == 0 or isinstance(parent, list):
            parent[path[-1]] = _random_value(rng)
        elif action == 1:
            del parent[path[-1]]
        else:
            parent[f"extra_{int(rng.integers(0, 9))}"] = _random_value(rng)
    return body


def _encode(value: object, rng: np.random.Generator) -> tuple[bytes, dict[str, str]]:
    """The value as a request body, sometimes in a wrong encoding or with a wrong type."""
    text = json.dumps(value, allow_nan=True)  # NaN / Infinity as the bare tokens
    text = re.sub(f'"{DEEP}(\\d+)"', lambda m: "[" * int(m[1]) + "1" + "]" * int(m[1]), text)
    kind = int(rng.integers(0, 8))
    if kind == 0:
        return text.encode("utf-16"), JSON
    if kind == 1:
        return text.encode("utf-8") + b"\xff\xfe\xc3", JSON  # invalid UTF-8
    if kind == 2:
        return text.encode("utf-8")[: int(rng.integers(0, max(1, len(text))))], JSON
    if kind == 3:
        return text.encode("utf-8"), {"content-type": "text/plain"}
    if kind == 4:
        return text.encode("utf-8"), {}
    return text.encode("utf-8", "surrogatepass"), JSON


def _post(conn: http.client.HTTPConnection, body: bytes, headers: dict) -> tuple[int, dict]:
    conn.request("POST", "/score", body=body, headers=headers)
    response = conn.getresponse()
    raw = response.read()
    assert not response.will_close, f"the server closed the connection after {raw[:200]!r}"
    return response.status, json.loads(raw)


def _connection(url: str) -> http.client.HTTPConnection:
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    conn.connect()
    return conn


def _check_error_shape(status: int, payload: dict, sent: bytes) -> None:
    assert status < 500, (status, payload, sent[:300])
    if status >= 400:
        assert set(payload) == {"detail", "field"}, (status, payload, sent[:300])
        assert isinstance(payload["detail"], str) and payload["detail"]


def test_fuzzed_requests_never_get_a_5xx_and_keep_the_connection(server) -> None:
    """400 seeded mutations of valid bodies (random JSON values, NaN and Infinity, huge
    numbers, deep nesting, wrong encodings and content types, truncated JSON), all on one
    keep-alive connection: every answer a 2xx or a 4xx with {detail, field}, the socket never
    replaced, and a valid request after every malformed one scored."""
    url, path, _ = server
    rng = np.random.default_rng(11)
    valid = score_body(rng, 5, 3)
    expected = Predictor(path).score(as_request(valid))
    conn = _connection(url)
    sock = conn.sock
    statuses: dict[int, int] = {}
    for case in range(400):
        sent, headers = _encode(_mutate(score_body(rng, 4, 2), rng), rng)
        status, payload = _post(conn, sent, headers)
        statuses[status] = statuses.get(status, 0) + 1
        _check_error_shape(status, payload, sent)
        if case % 20 == 0:
            status, payload = _post(conn, json.dumps(valid).encode(), JSON)
            assert status == 200 and np.allclose(payload["scores"], expected, atol=1e-6)
    assert conn.sock is sock, "one connection served every request"
    conn.close()
    assert statuses.get(422, 0) > 200 and sum(statuses.values()) == 400, statuses
    for method, route in (("GET", "/score"), ("POST", "/nowhere"), ("DELETE", "/healthz")):
        response = httpx.request(method, f"{url}{route}")
        assert response.status_code in (404, 405)
        assert set(response.json()) == {"detail", "field"}
    huge = httpx.post(f"{url}/score", content=b" " * 100_000, headers=JSON)
    assert huge.status_code == 413 and set(huge.json()) == {"detail", "field"}


def _raw_request(url: str, body: bytes) -> socket.socket:
    parsed = urlparse(url)
    sock = socket.create_connection((parsed.hostname, parsed.port), timeout=30)
    head = (
        f"POST /score HTTP/1.1\r\nHost: {parsed.hostname}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode())
    return sock


def test_slow_and_truncated_bodies(server) -> None:
    """A body trickling in over a second is scored; one cut off by a client that goes away
    leaves the service answering everyone else."""
    url, path, _ = server
    body = json.dumps(score_body(np.random.default_rng(4), 6, 2)).encode()
    slow = _raw_request(url, body)
    for start in range(0, len(body), len(body) // 5 + 1):
        slow.sendall(body[start : start + len(body) // 5 + 1])
        time.sleep(0.2)
    reply = slow.recv(65536).decode()
    slow.close()
    assert reply.startswith("HTTP/1.1 200"), reply[:300]
    for _ in range(5):
        cut = _raw_request(url, body)
        cut.sendall(body[: len(body) // 2])
        cut.shutdown(socket.SHUT_WR)
        cut.close()
    assert httpx.post(f"{url}/score", json=json.loads(body)).status_code == 200
    assert httpx.get(f"{url}/healthz").status_code == 200


@pytest.mark.slow
def test_soak_of_valid_and_malformed_requests(server) -> None:
    """8 clients x 250 requests, one in four malformed, beside 4 slow-loris clients that keep
    opening connections that never finish a request: no valid request fails or changes its
    score, the server closes the slow connections at its read deadline, the same 20 requests
    score identically before and after, and the server's memory stays flat (measured after a
    warm-up of the same traffic)."""
    url, path, pid = server
    rng = np.random.default_rng(21)
    sizes = zip(rng.integers(0, 80, 40), rng.integers(1, 40, 40), strict=True)
    pool = [score_body(rng, int(h), int(c)) for h, c in sizes]
    predictor = Predictor(path)
    expected = [predictor.score(as_request(b)) for b in pool]
    probes = [json.dumps(b).encode() for b in pool[:20]]

    def probe_scores() -> list[list[float]]:
        conn = _connection(url)
        try:
            return [_post(conn, body, JSON)[1]["scores"] for body in probes]
        finally:
            conn.close()

    def client(seed: int) -> tuple[int, int]:
        local = np.random.default_rng(seed)
        failures = malformed = 0
        conn = _connection(url)
        for _ in range(250):
            i = int(local.integers(0, len(pool)))
            if local.random() < 0.25:
                sent, headers = _encode(_mutate(pool[i], local), local)
                status, payload = _post(conn, sent, headers)
                _check_error_shape(status, payload, sent)
                malformed += 1
                continue
            status, payload = _post(conn, json.dumps(pool[i]).encode(), JSON)
            ok = status == 200 and np.allclose(payload["scores"], expected[i], atol=1e-6)
            failures += not ok
        conn.close()
        return failures, malformed

    def slow_loris(stop: threading.Event) -> int:
        """Keeps opening connections that send a header line now and then and never finish a
        request; returns how many the server closed (read deadline, 3 s here)."""
        closed = 0
        while not stop.is_set():
            sock = socket.create_connection((urlparse(url).hostname, urlparse(url).port))
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")
            sock.settimeout(0.5)
            while not stop.is_set():
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                    if sock.recv(1) == b"":
                        closed += 1
                        break
                except TimeoutError:
                    continue
                except OSError:
                    closed += 1
                    break
            sock.close()
        return closed

    before = probe_scores()
    with ThreadPoolExecutor(8) as workers:  # warm-up: caches and allocator arenas fill
        list(workers.map(client, range(100, 108)))
    rss_before = psutil.Process(pid).memory_info().rss
    soak_started = time.monotonic()
    stop = threading.Event()
    with ThreadPoolExecutor(12) as workers:
        lorises = [workers.submit(slow_loris, stop) for _ in range(4)]
        results = list(workers.map(client, range(8)))
        time.sleep(max(0.0, 3.5 - (time.monotonic() - soak_started)))
        stop.set()
        closed = sum(f.result() for f in lorises)
    rss_after = psutil.Process(pid).memory_info().rss
    assert closed >= 4, "the server closed no slow-loris connection in time"
    assert sum(f for f, _ in results) == 0
    assert sum(m for _, m in results) > 300
    assert probe_scores() == before
    growth_mb = (rss_after - rss_before) / 2**20
    assert growth_mb < 25, f"server memory grew {growth_mb:.1f} MiB over 2,000 requests"


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests(artifacts: dict) -> None:
    """Requests held in a batch (max-wait 1.5 s) when SIGTERM arrives are all answered, then
    the process exits 0 and stops accepting connections; the access log lists them."""
    path = artifacts["genctr-int8"]["path"]
    proc, url = start_server(
        path, "--max-wait-ms", "1500", "--shutdown-timeout", "20", "--access-log"
    )
    try:
        rng = np.random.default_rng(8)
        bodies = [score_body(rng, 10, 4) for _ in range(6)]
        predictor = Predictor(path)
        expected = [predictor.score(as_request(b)) for b in bodies]

        def send(i: int) -> tuple[int, list[float]]:
            response = httpx.post(f"{url}/score", json=bodies[i], timeout=30)
            return response.status_code, response.json().get("scores", [])

        with ThreadPoolExecutor(6) as workers:
            pending = [workers.submit(send, i) for i in range(6)]
            time.sleep(0.5)  # every request is now waiting in the batcher
            sent_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in pending]
        assert [status for status, _ in answers] == [200] * 6
        for (_, scores), want in zip(answers, expected, strict=True):
            assert np.allclose(scores, want, atol=1e-6)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - sent_at < 20
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)
        log = proc.stdout.read()
        assert "draining" in log and "Traceback" not in log, log[-2000:]
        assert log.count('"POST /score HTTP/1.1" 200') == 6, "the access log has every request"
    finally:
        if proc.poll() is None:
            stop_server(proc)
