"""Serving latency: p50 / p99 per request and requests/s, for 1 and 100 candidates at history
50 and 200, fp32 against int8 tables, with and without model integration (MI) and the g(s, c)
cache; then the HTTP service with and without micro-batching under 8 concurrent clients.

    python -m benchmarks.serving_latency [--items 1000000] [--requests 300]

The model is the paper's DNN at width 16 over a 1M-item table, random weights (latency does not
depend on them), compiled by the same ``build_serving_model`` as ``genctr export``. Traffic:
64 users with fixed histories and 5 interest categories each; a request is one random user,
a query category and candidates from that user's categories (search ads share a query's few
categories), so (history, category) pairs recur, as they do within a user's session.

Baselines in the same run: ``per-candidate g`` computes g(s, c) once per candidate (what the
per-category reuse saves); ``no MI`` is the backbone alone; ``max_batch=1`` turns the server's
micro-batching off; ``torch threads`` = all cores is the service before 0.5 (intra-op threads
left at torch's default); route ``FastAPI`` sends the same bodies as
``application/merge-patch+json``, which FastAPI parses as JSON and the fast path leaves to it:
the service as it answered every request before 0.6.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import write_results
from genctr_rec.data.catalogue import ItemCatalogue
from genctr_rec.embeddings import SharedEmbeddings
from genctr_rec.models.ctr import CTRModel
from genctr_rec.models.decoder import GenerativeDecoder
from genctr_rec.serving.artifact import Artifact, write_artifact
from genctr_rec.serving.torchscript import build_serving_model
from genctr_rec.serving.predictor import Predictor, Request
from genctr_rec.training.distributed import free_port

NUM_CATEGORIES = 1000
MAX_HISTORY = 200
USERS = 64
REPEATS = 3  # HTTP runs per setting: requests/s is their median


def _artifact(path: Path, items: int, mi: bool, quantize: str) -> Artifact:
    torch.manual_seed(0)
    embeddings = SharedEmbeddings(
        items, NUM_CATEGORIES, 16, dedup=False, device=torch.device("cpu")
    )
    decoder = GenerativeDecoder(16, MAX_HISTORY + 1) if mi else None
    served, sizes = build_serving_model(CTRModel(embeddings, "dnn", decoder).eval(), quantize)
    categories = _catalogue(items)
    metadata = {
        "genctr_rec": "benchmark",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_items": items,
        "num_categories": NUM_CATEGORIES,
        "max_history": MAX_HISTORY,
        "dim": 16,
        "backbone": "dnn",
        "model_integration": mi,
        "quantize": quantize,
        "parity": {"table_bytes": sizes},
    }
    write_artifact(path, served, ItemCatalogue(categories), metadata)
    return Artifact(path, served, categories, metadata)


def _catalogue(items: int) -> np.ndarray:
    """Each item's category in the benchmark's artifacts."""
    return np.random.default_rng(0).integers(0, NUM_CATEGORIES, items)


def _traffic(items: int, history: int, candidates: int, n: int, seed: int = 0) -> list[Request]:
    """Requests of USERS users, each with a fixed history and 5 interest categories; every
    request's query and candidates come from its user's categories (candidates are items of
    those categories in the catalogue, which the service checks)."""
    rng = np.random.default_rng(seed)
    catalogue = _catalogue(items)
    members = {c: np.flatnonzero(catalogue == c) for c in range(NUM_CATEGORIES)}
    interests = np.array([c for c, m in members.items() if m.size])
    users = [
        (
            rng.integers(0, items, history).tolist(),
            rng.integers(0, NUM_CATEGORIES, history).tolist(),
            rng.choice(interests, 5),
        )
        for _ in range(USERS)
    ]
    out = []
    for _ in range(n):
        hist_items, hist_cats, cats = users[int(rng.integers(USERS))]
        cand_cats = rng.choice(cats, candidates)
        cand_items = [int(rng.choice(members[int(c)])) for c in cand_cats]
        out.append(
            Request(hist_items, hist_cats, int(rng.choice(cats)), cand_items, cand_cats.tolist())
        )
    return out


class _PerCandidate:
    """Baseline: g(s, c) once per candidate, not per distinct category."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    @torch.inference_mode()
    def score(self, request: Request) -> np.ndarray:
        p = self.predictor
        t = p.tensors([p.prepare(request)])
        g = p.model.contexts(t.hist_items, t.hist_cats, t.hist_lengths, t.cand_rows, t.cand_cats)
        return p.model.score(*t.args(), g).numpy()


def _latencies(score, requests: list[Request], warmup: int = 20) -> dict[str, float]:
    for r in requests[:warmup]:
        score(r)
    times = []
    start = time.perf_counter()
    for r in requests[warmup:]:
        t = time.perf_counter()
        score(r)
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    ms = np.array(times) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "requests_per_s": len(times) / total,
    }


def in_process(root: Path, items: int, n: int) -> list[dict]:
    rows = []
    for quantize in ("none", "int8"):
        artifacts = {mi: _artifact(root / f"{quantize}-{mi}", items, mi, quantize) for mi in (1, 0)}
        modes = {
            "MI + cache": (artifacts[1], 100_000, False),
            "MI, no cache": (artifacts[1], 0, False),
            "MI, per-candidate g (baseline)": (artifacts[1], 0, True),
            "no MI (backbone alone)": (artifacts[0], 0, False),
        }
        for history in (50, 200):
            for candidates in (1, 100):
                requests = _traffic(items, history, candidates, n + 20)
                for mode, (artifact, cache, per_candidate) in modes.items():
                    predictor = Predictor(artifact, cache_size=cache)
                    scorer = _PerCandidate(predictor).score if per_candidate else predictor.score
                    row = {
                        "tables": "int8" if quantize == "int8" else "fp32",
                        "mode": mode,
                        "history": history,
                        "candidates": candidates,
                        **_latencies(scorer, requests),
                    }
                    if predictor.cache is not None:
                        stats = predictor.cache.stats()
                        row["cache_hit_rate"] = stats["hits"] / max(
                            1, stats["hits"] + stats["misses"]
                        )
                    rows.append(row)
                    print(row, flush=True)
    return rows


def _timed_posts(
    port: int, bodies: list[bytes], content_type: str = "application/json"
) -> tuple[list[float], float]:
    """Seconds per POST /score of each body, one after another on one keep-alive connection
    (the standard library's HTTP client: little Python per request, so that what is timed
    is the service and not the client), and the CPU seconds this client spent."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"content-type": content_type}
    out = []
    cpu = time.process_time()
    try:
        for body in bodies:
            t = time.perf_counter()
            connection.request("POST", "/score", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            out.append(time.perf_counter() - t)
            if response.status != 200:
                raise RuntimeError(f"POST /score answered {response.status}")
    finally:
        connection.close()
    return out, time.process_time() - cpu


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children (the service's workers)."""
    import psutil

    parent = psutil.Process(pid)
    total = 0.0
    for proc in [parent, *parent.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def over_http(artifact: Path, items: int, clients: int, per_client: int) -> tuple[list[dict], dict]:
    """The HTTP rows, and :func:`where_the_time_goes` on the same traffic."""
    import httpx

    rows = []
    requests = _traffic(items, 200, 100, clients * per_client, seed=1)
    bodies = [
        json.dumps(
            {
                "history": {"item_ids": r.history_items, "category_ids": r.history_categories},
                "query_category_id": r.query_category,
                "candidates": [
                    {"item_id": i, "category_id": c}
                    for i, c in zip(r.candidate_items, r.candidate_categories, strict=True)
                ],
            }
        ).encode()
        for r in requests
    ]
    breakdown = where_the_time_goes(artifact, bodies[:300], requests[:300])
    print(breakdown, flush=True)
    cores = os.cpu_count() or 1
    for max_batch, wait_ms, n_clients, threads, route, workers, score_on in (
        (64, 0, 1, 1, "fast path", 1, "thread"),
        (64, 0, 1, 1, "fast path", 1, "loop"),
        (64, 0, 1, 1, "FastAPI", 1, "thread"),
        (64, 0, 1, cores, "fast path", 1, "thread"),
        (64, 0, 1, 1, "fast path", cores, "thread"),
        (64, 0, clients, 1, "fast path", 1, "thread"),
        (64, 0, clients, 1, "fast path", 1, "loop"),
        (64, 0, clients, 1, "FastAPI", 1, "thread"),
        (64, 0, clients, cores, "fast path", 1, "thread"),
        (64, 0, clients, 1, "fast path", cores, "thread"),
        (64, 0, clients, 1, "fast path", cores, "loop"),
        (64, 0, clients, 1, "fast path", 2 * cores, "thread"),
        (64, 2, clients, 1, "fast path", 1, "thread"),
        (1, 0, clients, 1, "fast path", 1, "thread"),
    ):
        content_type = "application/json" if route == "fast path" else THROUGH_FASTAPI.decode()
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "genctr_rec.cli", "serve", "--artifact", str(artifact),
             "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(wait_ms),
             "--threads", str(threads), "--workers", str(workers), "--score-on", score_on],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ),
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)

            _timed_posts(port, bodies[:20], content_type)  # warm: first requests allocate
            # each client its own process (threads of one process would share its GIL)
            chunks = [bodies[k * per_client : (k + 1) * per_client] for k in range(n_clients)]
            times, rates, client_cpu, server_cpu = [], [], 0.0, 0.0
            with ProcessPoolExecutor(n_clients) as pool:
                ports, types = [port] * n_clients, [content_type] * n_clients
                list(pool.map(_timed_posts, ports, [c[:2] for c in chunks], types))
                for _ in range(REPEATS):
                    server_before = _cpu_seconds(proc.pid)
                    start = time.perf_counter()
                    for took, cpu in pool.map(_timed_posts, ports, chunks, types):
                        times.append(took)
                        client_cpu += cpu
                    rates.append(n_clients * per_client / (time.perf_counter() - start))
                    server_cpu += _cpu_seconds(proc.pid) - server_before
            times = np.concatenate(times) * 1e3
            batching = httpx.get(f"{url}/metadata").json()["batching"]  # one worker's
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        timed = REPEATS * n_clients * per_client
        row = {
            "max_batch": max_batch,
            "max_wait_ms": wait_ms,
            "clients": n_clients,
            "threads": threads,
            "workers": workers,
            "route": route,
            "score_on": score_on,
            "server_cpu_ms_per_request": 1e3 * server_cpu / timed,
            "client_cpu_ms_per_request": 1e3 * client_cpu / timed,
            "p50_ms": float(np.percentile(times, 50)),
            "p99_ms": float(np.percentile(times, 99)),
            "requests_per_s": float(np.median(rates)),
            "requests_per_s_runs": rates,
            "mean_requests_per_batch": batching["requests"] / max(1, batching["batches"]),
        }
        rows.append(row)
        print(row, flush=True)
    return rows, breakdown


# FastAPI parses a "+json" body as JSON; the service's fast path takes application/json only:
# the same request through FastAPI's route, as every request went before 0.6
THROUGH_FASTAPI = b"application/merge-patch+json"


async def _asgi_post(app, body: bytes, content_type: bytes = b"application/json") -> None:
    """One POST /score through the ASGI application, without sockets or an HTTP parser."""
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/score", "raw_path": b"/score", "query_string": b"",
        "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }  # fmt: skip
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if sent[0]["status"] != 200:
        raise RuntimeError(f"POST /score answered {sent[0]['status']}")


def where_the_time_goes(artifact: Path, bodies: list[bytes], requests: list) -> dict:
    """Milliseconds per request of each layer, one request at a time on one torch thread (as
    the service runs): the whole ASGI application without sockets (our middlewares, the fast
    path, the hand-off to the scoring thread), the same through FastAPI's route (its request
    and response models, routing, exception middlewares: the baseline), then the parts."""
    import asyncio

    from genctr_rec.serving.api import ScoreBody
    from genctr_rec.serving.config import ServeConfig
    from genctr_rec.serving.server import create_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    predictor = Predictor(str(artifact))

    def per_request(fn, items) -> float:
        for item in items[:20]:
            fn(item)
        start = time.perf_counter()
        for item in items:
            fn(item)
        return (time.perf_counter() - start) / len(items) * 1e3

    async def started_app(score_on: str) -> tuple[Any, asyncio.Task]:
        app = create_app(predictor, ServeConfig(warm_up_rounds=0, score_on=score_on))
        started: asyncio.Queue = asyncio.Queue()
        lifespan = [{"type": "lifespan.startup"}]

        async def receive() -> dict:
            return lifespan.pop() if lifespan else await asyncio.Event().wait()

        runner = asyncio.get_running_loop().create_task(
            app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, started.put)
        )
        await started.get()
        return app, runner

    async def through_app() -> dict[str, float]:
        """The routes in alternating rounds (this machine's speed drifts): medians."""
        on_loop, loop_runner = await started_app("loop")
        on_thread, thread_runner = await started_app("thread")
        routes = {
            "asgi_app_thread_ms": (on_thread, b"application/json"),
            "asgi_app_loop_ms": (on_loop, b"application/json"),
            "asgi_through_fastapi_ms": (on_thread, THROUGH_FASTAPI),
        }
        rounds: dict[str, list[float]] = {key: [] for key in routes}
        for body in bodies[:20]:
            for app, content_type in routes.values():
                await _asgi_post(app, body, content_type)
        for _ in range(5):
            for key, (app, content_type) in routes.items():
                start = time.perf_counter()
                for body in bodies:
                    await _asgi_post(app, body, content_type)
                rounds[key].append((time.perf_counter() - start) / len(bodies) * 1e3)
        loop_runner.cancel()
        thread_runner.cancel()
        return {key: float(np.median(values)) for key, values in rounds.items()}

    try:
        return {
            **asyncio.run(through_app()),
            "predictor_score_ms": per_request(predictor.score, requests),
            "predictor_prepare_ms": per_request(predictor.prepare, requests),
            "json_parse_ms": per_request(json.loads, bodies),
            "request_model_ms": per_request(ScoreBody.model_validate_json, bodies),
        }
    finally:
        torch.set_num_threads(threads)


def _place(row: dict) -> str:
    """Where the row's batches ran (``--score-on``; before 0.9 always the scoring thread)."""
    return {"loop": "event loop", "thread": "scoring thread"}[row.get("score_on", "thread")]


def _same_traffic(row: dict) -> bool:
    """The in-process row with the HTTP rows' traffic and model."""
    return (row["tables"], row["mode"], row["history"], row["candidates"]) == (
        "fp32",
        "MI + cache",
        200,
        100,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=300, help="timed requests per cell")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = in_process(Path(tmp), args.items, args.requests)
        http_rows, breakdown = over_http(
            Path(tmp) / "none-1", args.items, args.clients, args.per_client
        )
    lines = [
        "In process (`Predictor.score`, one request at a time, torch threads "
        f"{torch.get_num_threads()}):",
        "",
        "| tables | mode | history | candidates | p50 ms | p99 ms | requests/s | cache hits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hits = f"{r['cache_hit_rate']:.0%}" if "cache_hit_rate" in r else "-"
        lines.append(
            f"| {r['tables']} | {r['mode']} | {r['history']} | {r['candidates']} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['requests_per_s']:.0f} | {hits} |"
        )
    lines += [
        "",
        f"Over HTTP (`genctr serve`, fp32, MI + cache, history 200, 100 candidates, each client "
        f"{args.per_client} requests over one keep-alive connection with the standard library's "
        "`http.client`; each client its own process, on the same cores as the server; "
        "in process, the same traffic "
        f"{next(r['requests_per_s'] for r in rows if _same_traffic(r)):.0f} requests/s):",
        "",
        "| clients | route | batches run on | workers | max_batch | max_wait_ms | torch threads | "
        "p50 ms | p99 ms | requests/s (median of 3) | of in-process | requests per call (one "
        "worker's) | CPU ms a request: service / clients |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    in_process_rate = next(r["requests_per_s"] for r in rows if _same_traffic(r))
    for r in http_rows:
        lines.append(
            f"| {r['clients']} | {r['route']} | {_place(r)} | {r['workers']} | {r['max_batch']} | "
            f"{r['max_wait_ms']} | {r['threads']} | "
            f"{r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | "
            f"{r['requests_per_s']:.0f} | {r['requests_per_s'] / in_process_rate:.0%} | "
            f"{r['mean_requests_per_batch']:.1f} | "
            f"{r['server_cpu_ms_per_request']:.2f} / {r['client_cpu_ms_per_request']:.2f} |"
        )
    b = breakdown
    lines += [
        "",
        "Where a request's time goes (the same traffic, one request at a time, one torch "
        "thread, milliseconds per request; the three paths in 5 alternating rounds, medians):",
        "",
        "| path | the whole ASGI app, no sockets | of which `Predictor.score` | of which "
        "`prepare` | JSON parse | request model from bytes (pydantic) | the rest: framework, "
        "middlewares, hand-off |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, key in (
        ("fast path, batches on a scoring thread (the default)", "asgi_app_thread_ms"),
        ("fast path, batches on the event loop (`--score-on loop`)", "asgi_app_loop_ms"),
        ("FastAPI route (scoring thread)", "asgi_through_fastapi_ms"),
    ):
        lines.append(
            f"| {name} | {b[key]:.2f} | {b['predictor_score_ms']:.2f} | "
            f"{b['predictor_prepare_ms']:.2f} | {b['json_parse_ms']:.2f} | "
            f"{b['request_model_ms']:.2f} | "
            f"{b[key] - b['predictor_score_ms'] - b['request_model_ms']:.2f} |"
        )
    md = write_results(
        "serving_latency",
        {"items": args.items, "in_process": rows, "http": http_rows, "breakdown": breakdown},
        "\n".join(lines),
    )
    print(md.read_text())


if __name__ == "__main__":
    main()
