"""``genctr serve`` as a real process on a loopback port, talked to over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from genctr_rec.serving.predictor import Predictor
from tests.helpers import TOY_FEATURES
from tests.serving import (
    NUM_CATEGORIES,
    NUM_ITEMS,
    as_request,
    score_body,
    start_server,
    stop_server,
)


@pytest.fixture(scope="module")
def server(artifacts: dict) -> Iterator[tuple[str, Path]]:
    path = artifacts["genctr-int8"]["path"]
    proc, url = start_server(path, "--unknown-ids", "reject")  # the 422s below test refusal
    yield url, path
    stop_server(proc)


def test_unknown_ids_are_scored_and_counted_by_default(artifacts: dict) -> None:
    """A page with a new ad gets every candidate scored (was a 422 for the whole page)."""
    path = artifacts["genctr-int8"]["path"]
    proc, url = start_server(path)
    try:
        assert httpx.get(f"{url}/metadata").json()["oov_policy"] == "default"
        body = {
            "history": {"item_ids": [1, NUM_ITEMS + 3]},
            "query_category_id": 0,
            "candidates": [{"item_id": 3}, {"item_id": NUM_ITEMS + 1, "category_id": 2}],
            "features": TOY_FEATURES,
        }
        response = httpx.post(f"{url}/score", json=body, timeout=30)
        assert response.status_code == 200, response.text
        expected = Predictor(path).score(as_request(body))
        np.testing.assert_allclose(response.json()["scores"], expected, atol=1e-6)
        text = httpx.get(f"{url}/metrics").text
        assert _metric(text, "genctr_unknown_ids_total", field="candidates.item_id") == 1
        assert _metric(text, "genctr_unknown_ids_total", field="history.item_ids") == 1
    finally:
        stop_server(proc)


def test_the_service_holds_neither_torchrec_nor_fbgemm(artifacts: dict) -> None:
    """`genctr serve` on the default artifact (AOTInductor-compiled) answers as the predictor
    without TorchRec or fbgemm_gpu in the process: serving needs torch and the exported model
    alone, and each worker would otherwise import and map the training stack."""
    path = artifacts["genctr-none"]["path"]
    proc, url = start_server(path)
    try:
        body = score_body(np.random.default_rng(3), 20, 5)
        response = httpx.post(f"{url}/score", json=body, timeout=30)
        assert response.status_code == 200, response.text
        expected = Predictor(path).score(as_request(body))
        np.testing.assert_allclose(response.json()["scores"], expected, atol=1e-6)
        libraries = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch_cpu" in libraries  # the maps are the server's
        assert "fbgemm_gpu" not in libraries
    finally:
        stop_server(proc)


def test_scores_equal_the_predictor(server) -> None:
    url, path = server
    predictor = Predictor(path)
    rng = np.random.default_rng(0)
    for history, candidates in [(0, 1), (7, 3), (50, 100), (120, 20)]:
        body = score_body(rng, history, candidates)
        response = httpx.post(f"{url}/score", json=body, timeout=30)
        assert response.status_code == 200, response.text
        scores = response.json()["scores"]
        assert len(scores) == candidates
        np.testing.assert_allclose(scores, predictor.score(as_request(body)), atol=1e-6)


def test_metadata_health_and_openapi(server) -> None:
    url, _ = server
    for path in ("/healthz", "/readyz", "/livez"):
        assert httpx.get(f"{url}{path}").json() == {"status": "ok"}
    meta = httpx.get(f"{url}/metadata").json()
    assert meta["quantize"] == "int8" and meta["model_integration"] is True
    assert meta["num_items"] == NUM_ITEMS and meta["oov_policy"] == "reject"
    assert meta["limits"]["max_candidates"] == 200
    assert meta["ready"] is True and meta["warm_up_s"] > 0  # warmed up before ready
    assert meta["categories"] == "catalogue"
    spec = httpx.get(f"{url}/openapi.json").json()
    assert {"/score", "/healthz", "/readyz", "/livez", "/metadata", "/metrics"} <= set(
        spec["paths"]
    )
    assert "ScoreBody" in spec["components"]["schemas"]
    declared = spec["paths"]["/score"]["post"]["responses"]
    assert {"413", "422"} <= set(declared)
    assert declared["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )


def _metric(text: str, name: str, **labels: str) -> float:
    """A sample's value from Prometheus exposition text."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == (f"{name}{{{want}}}" if labels else name):
            return float(value)
    return 0.0


def test_prometheus_metrics_count_requests_latency_batches_and_cache(server) -> None:
    url, path = server
    catalogue = Predictor(path).item_categories
    before = httpx.get(f"{url}/metrics").text
    body = score_body(np.random.default_rng(31), 6, 3)
    for _ in range(5):
        assert httpx.post(f"{url}/score", json=body).status_code == 200
    assert httpx.post(f"{url}/score", json={"history": {}}).status_code == 422
    response = httpx.get(f"{url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text

    def grew(name: str, **labels: str) -> float:
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert grew("genctr_requests_total", route="/score", status="200") == 5
    assert grew("genctr_requests_total", route="/score", status="422") == 1
    assert grew("genctr_request_seconds_count", route="/score") == 6
    assert grew("genctr_batch_requests_count") == 5  # the 422 never reached the model
    # g(s, c) once per distinct candidate category, then from the cache
    categories = len({int(catalogue[c["item_id"]]) for c in body["candidates"]})
    assert grew("genctr_context_cache_misses") == categories
    assert grew("genctr_context_cache_hits") == 4 * categories
    assert _metric(after, "genctr_ready") == 1


def test_a_candidate_category_against_the_catalogue_gets_422(server) -> None:
    url, path = server
    catalogue = Predictor(path).item_categories
    body = score_body(np.random.default_rng(32), 3, 2)
    item = body["candidates"][1]["item_id"]
    body["candidates"][1]["category_id"] = int(catalogue[item] + 1) % NUM_CATEGORIES
    response = httpx.post(f"{url}/score", json=body)
    assert response.status_code == 422
    assert response.json()["field"] == "candidates[1].category_id"
    assert "--trust-request-categories" in response.json()["detail"]


BAD_REQUESTS = {
    "unknown item": (
        {"history": {"item_ids": [1]}, "query_category_id": 0, "candidates": [{"item_id": 10**6}]},
        422,
        "candidates[0].item_id",
    ),
    "unknown history category": (
        {
            "history": {"item_ids": [1, 2], "category_ids": [0, 999]},
            "query_category_id": 0,
            "candidates": [{"item_id": 3}],
        },
        422,
        "history.category_ids[1]",
    ),
    "string id": (
        {"history": {"item_ids": ["1"]}, "query_category_id": 0, "candidates": [{"item_id": 3}]},
        422,
        "item_ids",
    ),
    "float id": (
        {"history": {"item_ids": [1]}, "query_category_id": 0.5, "candidates": [{"item_id": 3}]},
        422,
        "query_category_id",
    ),
    "empty candidates": (
        {"history": {"item_ids": [1]}, "query_category_id": 0, "candidates": []},
        422,
        "candidates",
    ),
    "missing field": ({"history": {"item_ids": [1]}, "candidates": [{"item_id": 3}]}, 422, "query"),
    "unknown field": (
        {
            "history": {"item_ids": []},
            "query_category_id": 0,
            "candidates": [{"item_id": 3}],
            "x": 1,
        },
        422,
        "x",
    ),
    "history too long": (
        {
            "history": {"item_ids": [1] * 301},
            "query_category_id": 0,
            "candidates": [{"item_id": 3}],
        },
        422,
        "at most 300",
    ),
    "too many candidates": (
        {
            "history": {"item_ids": [1]},
            "query_category_id": 0,
            "candidates": [{"item_id": 3}] * 201,
        },
        422,
        "at most 200",
    ),
    "feature out of range": (
        {
            "history": {"item_ids": [1]},
            "query_category_id": 0,
            "candidates": [{"item_id": 3}],
            "features": {**TOY_FEATURES, "user_segment": 99},
        },
        422,
        "features.user_segment",
    ),
    "feature missing": (
        {
            "history": {"item_ids": [1]},
            "query_category_id": 0,
            "candidates": [{"item_id": 3}],
            "features": {"user_segment": 1, "user_activity": 2.0},
        },
        422,
        "features.user_interests",
    ),
    "unknown feature": (
        {
            "history": {"item_ids": [1]},
            "query_category_id": 0,
            "candidates": [{"item_id": 3}],
            "features": {**TOY_FEATURES, "colour": 1},
        },
        422,
        "features.colour",
    ),
    "negative user": (
        {
            "history": {"item_ids": [1]},
            "query_category_id": 0,
            "candidates": [{"item_id": 3}],
            "features": TOY_FEATURES,
            "user_id": -4,
        },
        422,
        "user_id",
    ),
    "mismatched lengths": (
        {
            "history": {"item_ids": [1, 2], "category_ids": [0]},
            "query_category_id": 0,
            "candidates": [{"item_id": 3}],
        },
        422,
        "expected 2",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_REQUESTS))
def test_bad_requests_get_4xx_with_a_message(server, kind: str) -> None:
    url, _ = server
    body, status, needle = BAD_REQUESTS[kind]
    response = httpx.post(f"{url}/score", json=body, timeout=10)
    assert response.status_code == status, response.text
    assert needle in response.text
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_nan_and_infinity_get_422_and_the_connection_stays_usable(server) -> None:
    """Values JSON cannot carry back are refused like any bad value: one error shape, no 500,
    and the keep-alive connection serves the next valid request."""
    url, _ = server
    headers = {"content-type": "application/json"}
    valid = score_body(np.random.default_rng(3), 4, 2)
    with httpx.Client(base_url=url, timeout=10) as http:
        for raw in (
            b'{"history": {"item_ids": [NaN]}, "query_category_id": 0, "candidates": []}',
            b'{"history": {"item_ids": [1]}, "query_category_id": Infinity, '
            b'"candidates": [{"item_id": 3}]}',
            b'{"history": {"item_ids": [1]}, "query_category_id": 0, '
            b'"candidates": [{"item_id": 3}], "features": {"user_activity": NaN}}',
        ):
            response = http.post("/score", content=raw, headers=headers)
            assert response.status_code == 422, response.text
            assert set(response.json()) == {"detail", "field"}
            assert http.post("/score", json=valid).status_code == 200


def test_malformed_and_huge_bodies(server) -> None:
    url, _ = server
    headers = {"content-type": "application/json"}
    broken = httpx.post(f"{url}/score", content=b'{"history": [', headers=headers)
    assert broken.status_code == 422 and "json" in broken.text.lower()
    huge = httpx.post(f"{url}/score", content=b" " * 100_000, headers=headers)
    assert huge.status_code == 413 and "65536" in huge.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it arrives
        for _ in range(100):
            yield b" " * 1000

    chunked = httpx.post(f"{url}/score", content=chunks(), headers=headers)
    assert chunked.status_code == 413
    assert httpx.get(f"{url}/score").status_code == 405
    assert httpx.get(f"{url}/healthz").status_code == 200


@pytest.mark.slow
def test_concurrent_load_has_no_errors_and_is_batched(server) -> None:
    """8 clients x 200 requests at once: every answer right, none failed, and concurrent
    requests shared model calls (fewer batches than requests)."""
    url, path = server
    predictor = Predictor(path)
    rng = np.random.default_rng(5)
    sizes = zip(rng.integers(0, 60, 40), rng.integers(1, 30, 40), strict=True)
    pool = [score_body(rng, int(h), int(c)) for h, c in sizes]
    expected = [predictor.score(as_request(b)) for b in pool]
    before = httpx.get(f"{url}/metadata").json()["batching"]

    def client(seed: int) -> int:
        errors = 0
        order = np.random.default_rng(seed).integers(0, len(pool), 200)
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in order:
                response = http.post("/score", json=pool[i])
                ok = response.status_code == 200 and np.allclose(
                    response.json()["scores"], expected[i], atol=1e-6
                )
                errors += not ok
        return errors

    with ThreadPoolExecutor(8) as workers:
        errors = sum(workers.map(client, range(8)))
    assert errors == 0
    after = httpx.get(f"{url}/metadata").json()["batching"]
    served = after["requests"] - before["requests"]
    assert served == 1600
    assert after["batches"] - before["batches"] < served


def test_the_fast_path_answers_as_fastapi_does(server) -> None:
    """``application/json`` bodies take the path below FastAPI; a ``+json`` content type (which
    FastAPI parses as JSON too) goes through FastAPI's route: the same bytes come back, for
    valid requests and for requests the predictor refuses."""
    import json

    url, _ = server
    rng = np.random.default_rng(11)
    bad_category = score_body(rng, 5, 2)
    bad_category["query_category_id"] = NUM_CATEGORIES + 3
    with httpx.Client(base_url=url, timeout=30) as http:
        for body in [score_body(rng, 30, 7), score_body(rng, 0, 1), bad_category]:
            raw = json.dumps(body).encode()
            fast = http.post("/score", content=raw, headers={"content-type": "application/json"})
            routed = http.post(
                "/score", content=raw, headers={"content-type": "application/merge-patch+json"}
            )
            assert fast.status_code == routed.status_code
            assert fast.content == routed.content
            assert fast.headers["content-type"] == routed.headers["content-type"]


def test_scoring_on_the_event_loop_answers_the_same(server, artifacts: dict) -> None:
    """``--score-on loop`` (batches on the event loop's thread) answers as the default, a
    scoring thread; /metadata says which runs."""
    url, path = server
    proc, loop_url = start_server(path, "--score-on", "loop")
    try:
        rng = np.random.default_rng(3)
        for history, candidates in [(0, 1), (40, 25)]:
            body = score_body(rng, history, candidates)
            on_thread = httpx.post(f"{url}/score", json=body, timeout=30).json()["scores"]
            on_loop = httpx.post(f"{loop_url}/score", json=body, timeout=30).json()["scores"]
            np.testing.assert_allclose(on_loop, on_thread, atol=1e-6)
        assert httpx.get(f"{url}/metadata").json()["batching"]["score_on"] == "thread"
        assert httpx.get(f"{loop_url}/metadata").json()["batching"]["score_on"] == "loop"
    finally:
        stop_server(proc)
