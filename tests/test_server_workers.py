"""``genctr serve --workers 2``: several processes on one port, one service to its clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from genctr_rec.serving.predictor import Predictor
from tests.serving import as_request, score_body, start_server
from tests.test_server import _metric


def _worker_ids(url: str, want: int, seconds: float = 60) -> set[str]:
    """Workers (``/metadata``'s opaque id) answering over fresh connections, until ``want``
    are seen."""
    seen: set[str] = set()
    deadline = time.monotonic() + seconds
    while len(seen) < want and time.monotonic() < deadline:
        with httpx.Client() as client:  # a new connection: the kernel picks a worker
            seen.add(client.get(f"{url}/metadata", timeout=10).json()["process"]["worker"])
    return seen


def _worker_pids(proc: subprocess.Popen) -> set[int]:
    """The live worker processes under the service's supervisor (a killed worker the
    supervisor has not reaped yet is a zombie: not live, and psutil cannot read its command
    line, so it is skipped rather than raised)."""
    live = set()
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn" in " ".join(child.cmdline()):
                live.add(child.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return live


@pytest.mark.slow
def test_two_workers_serve_count_survive_a_crash_and_drain(artifacts: dict) -> None:
    path = artifacts["genctr-int8"]["path"]
    proc, url = start_server(path, "--workers", "2")
    try:
        meta = httpx.get(f"{url}/metadata").json()
        assert meta["process"]["workers"] == 2
        ids = _worker_ids(url, 2)
        pids = _worker_pids(proc)
        assert len(ids) == 2 and len(pids) == 2, "two worker processes answer"

        # every worker scores as the in-process predictor does
        predictor, rng = Predictor(path), np.random.default_rng(1)
        bodies = [score_body(rng, 30, 20) for _ in range(12)]
        for body in bodies:
            with httpx.Client() as client:
                response = client.post(f"{url}/score", json=body, timeout=30)
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(
                response.json()["scores"], predictor.score(as_request(body)), atol=1e-6
            )

        # /metrics is the service's, whichever worker answers the scrape
        for _ in range(4):
            with httpx.Client() as client:
                text = client.get(f"{url}/metrics").text
            assert _metric(text, "genctr_requests_total", route="/score", status="200") == 12
            assert _metric(text, "genctr_ready") == 1.0
            assert _metric(text, "genctr_context_cache_misses") > 0

        # a worker killed outright is replaced; the service answers throughout
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        for _ in range(20):
            assert httpx.get(f"{url}/livez", timeout=10).status_code == 200
        deadline = time.monotonic() + 90
        replaced: set[int] = set()
        while not (replaced - pids and len(replaced) == 2) and time.monotonic() < deadline:
            replaced = _worker_pids(proc)
            time.sleep(0.2)
        assert victim not in replaced and replaced - pids, "a new worker took the dead one's place"
        assert _worker_ids(url, 2, seconds=30) - ids, "and answers"
        text = httpx.get(f"{url}/metrics").text
        assert _metric(text, "genctr_requests_total", route="/score", status="200") == 12, (
            "the dead worker's requests still count"
        )
        workers = replaced | pids - {victim}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stdout.read()[-3000:]
    log = proc.stdout.read()
    assert "drains its in-flight requests" in log and f"worker {victim} died" in log
    for pid in workers:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        ), f"worker {pid} outlived the service"


def test_a_bad_artifact_is_one_line_before_any_worker_starts(tmp_path: Path) -> None:
    (tmp_path / "art").mkdir()
    result = subprocess.run(
        [
            sys.executable, "-m", "genctr_rec.cli", "serve", "--artifact",
            str(tmp_path / "art"), "--workers", "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "genctr: error:" in result.stderr and "not a genctr serving artifact" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_that_cannot_build_its_app_stops_the_service(tmp_path: Path, monkeypatch) -> None:
    """Exit code 3 is uvicorn's start-up failure: its supervisor stops instead of restarting."""
    from uvicorn.config import STARTUP_FAILURE

    from genctr_rec.serving.workers import WORKER_OPTIONS, app_from_environment

    monkeypatch.setenv(WORKER_OPTIONS, json.dumps({"artifact": str(tmp_path / "gone")}))
    with pytest.raises(SystemExit) as info:
        app_from_environment()
    assert info.value.code == STARTUP_FAILURE


def test_workers_connections_are_tcp_nodelay() -> None:
    """The shared listening socket must say it is TCP: asyncio sets TCP_NODELAY only then, and
    without it every response written in two parts waits 40 ms for the client's delayed ACK."""
    import asyncio
    import socket

    import uvicorn

    from genctr_rec.serving.workers import _tcp

    async def nodelay_of_an_accepted_connection(listening: socket.socket) -> int:
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=listening)
        _, writer = await asyncio.open_connection(*listening.getsockname()[:2])
        value = await asyncio.wait_for(accepted, 10)
        writer.close()
        server.close()
        return value

    def bound() -> socket.socket:
        return uvicorn.Config("x:y", host="127.0.0.1", port=0, log_config=None).bind_socket()

    # uvicorn 0.54's own socket (protocol 0) gives 0 here
    assert asyncio.run(nodelay_of_an_accepted_connection(_tcp(bound()))) != 0
