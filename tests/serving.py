"""``genctr serve`` as a real process on a loopback port, and request bodies for it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from genctr_rec.distributed import free_port
from genctr_rec.serving.predictor import Request
from tests.helpers import TOY_FEATURES

NUM_ITEMS, NUM_CATEGORIES = 2000, 20
LIMITS = (
    "--max-request-history", "300", "--max-candidates", "200", "--max-body-bytes", "65536",
    "--threads", "1",
)  # fmt: skip


def start_server(artifact: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """Start ``genctr serve`` and wait until ``/healthz`` answers; (process, base URL)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "genctr_rec.cli", "serve", "--artifact", str(artifact),
            "--port", str(port), *LIMITS, *extra,
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def score_body(rng: np.random.Generator, history: int, candidates: int) -> dict:
    """A valid /score body for the toy artifacts."""
    items = rng.integers(0, NUM_ITEMS, history).tolist()
    return {
        "history": {
            "item_ids": items,
            "category_ids": rng.integers(0, NUM_CATEGORIES, history).tolist(),
        },
        "query_category_id": int(rng.integers(0, NUM_CATEGORIES)),
        "user_id": int(rng.integers(0, 700)),  # past the toy's 600 users: the default row
        "features": TOY_FEATURES,
        # candidates' categories come from the artifact's catalogue
        "candidates": [{"item_id": int(i)} for i in rng.integers(0, NUM_ITEMS, candidates)],
    }


def as_request(body: dict) -> Request:
    """The in-process predictor's request for an HTTP body."""
    return Request(
        body["history"]["item_ids"],
        body["history"].get("category_ids"),
        body["query_category_id"],
        [c["item_id"] for c in body["candidates"]],
        [c.get("category_id") for c in body["candidates"]],
        user_id=body.get("user_id"),
        features=body.get("features"),
    )
