"""Serving latency of the artifact formats: torch.export programs compiled by AOTInductor (the
default since 0.11) against the TorchScript artifact of 0.10, in the same run, fp32 and int8
tables, in process and over HTTP with 1 and 8 clients.

    python -m benchmarks.serving_latency [--items 1000000] [--requests 300]

The model is the paper's DNN at width 16 over a 1M-item table, random weights (latency does not
depend on them), built by the same builders as ``genctr export`` (``serving/model.py`` and
``serving/exported.py`` for the new format, ``serving/torchscript.py`` for the old one). Traffic:
64 users with fixed histories and 5 interest categories each; a request is one random user,
a query category and candidates from that user's categories (search ads share a query's few
categories), so (history, category) pairs recur, as they do within a user's session.

Modes: ``MI + cache`` (g(s, c) once per (history, category), kept between requests: the
service's default), ``MI, no cache``, ``no MI`` (the backbone alone). ``exported`` rows run the
exported programs uncompiled (what a machine of another CPU serves until it recompiles).
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

import numpy as np
import torch

from benchmarks.common import write_results
from genctr_rec.data.catalogue import ItemCatalogue
from genctr_rec.distributed import free_port
from genctr_rec.embeddings import SharedEmbeddings
from genctr_rec.models.ctr import CTRModel
from genctr_rec.models.decoder import GenerativeDecoder
from genctr_rec.serving import torchscript
from genctr_rec.serving.artifact import LEGACY_MODEL_FILE, Artifact, load_artifact, write_artifact
from genctr_rec.serving.exported import PACKAGE_FILE, export_programs, write_package
from genctr_rec.serving.model import build_serving_model
from genctr_rec.serving.predictor import Predictor, Request

NUM_CATEGORIES = 1000
MAX_HISTORY = 200
USERS = 64
REPEATS = 3  # HTTP runs per setting: requests/s is their median


def _artifact(path: Path, items: int, mi: bool, quantize: str, fmt: str) -> Artifact:
    """An artifact of the benchmark's model in ``fmt``: ``aoti``, ``exported`` (uncompiled)
    or ``torchscript``."""
    torch.manual_seed(0)
    embeddings = SharedEmbeddings(
        items, NUM_CATEGORIES, 16, dedup=False, device=torch.device("cpu")
    )
    decoder = GenerativeDecoder(16, MAX_HISTORY + 1) if mi else None
    model = CTRModel(embeddings, "dnn", decoder).eval()
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
    }
    with tempfile.TemporaryDirectory() as staging:
        if fmt == "torchscript":
            served, sizes = torchscript.build_serving_model(model, quantize)
            model_file = torchscript.save(served, Path(staging) / LEGACY_MODEL_FILE)
            metadata["model"] = {"format": "torchscript", "file": LEGACY_MODEL_FILE}
        else:
            serving, sizes = build_serving_model(model, quantize)
            programs = export_programs(serving, _example(items), MAX_HISTORY)
            model_file = Path(staging) / PACKAGE_FILE
            info = write_package(model_file, programs, compile_aoti=fmt == "aoti")
            metadata["model"] = {"format": "torch.export", **info}
        metadata["parity"] = {"table_bytes": sizes}
        write_artifact(path, model_file, ItemCatalogue(categories), metadata)
    return load_artifact(path)


def _example(items: int) -> tuple[torch.Tensor, ...]:
    """An example batch to export on: 4 requests with histories of up to 8, 8 candidates, no
    side features (the benchmark's model reads none)."""
    g = torch.Generator().manual_seed(0)
    hist_items = torch.randint(0, items, (4, 8), generator=g)
    hist_cats = torch.randint(0, NUM_CATEGORIES, (4, 8), generator=g)
    lengths = torch.tensor([8, 3, 5, 1])
    query = torch.randint(0, NUM_CATEGORIES, (4,), generator=g)
    cand_items = torch.randint(0, items, (8,), generator=g)
    cand_cats = torch.randint(0, NUM_CATEGORIES, (8,), generator=g)
    rows = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    empty = torch.zeros(0, dtype=torch.long)
    return (hist_items, hist_cats, lengths, query, cand_items, cand_cats, rows, empty,
            empty.int(), torch.zeros(8, 0))  # fmt: skip


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


FORMATS = ("aoti", "torchscript")


def in_process(root: Path, items: int, n: int) -> list[dict]:
    rows = []
    for quantize in ("none", "int8"):
        for fmt in (*FORMATS, "exported"):
            mis = (1, 0) if fmt != "exported" else (1,)
            artifacts = {mi: _artifact(root / f"{fmt}-{quantize}-{mi}", items, mi, quantize, fmt)
                         for mi in mis}  # fmt: skip
            modes = {"MI + cache": (1, 100_000)}
            if fmt != "exported":
                modes.update({"MI, no cache": (1, 0), "no MI (backbone alone)": (0, 0)})
            for candidates in (1, 100):
                requests = _traffic(items, MAX_HISTORY, candidates, n + 20)
                for mode, (mi, cache) in modes.items():
                    predictor = Predictor(artifacts[mi], cache_size=cache)
                    row = {
                        "format": fmt,
                        "tables": "int8" if quantize == "int8" else "fp32",
                        "mode": mode,
                        "history": MAX_HISTORY,
                        "candidates": candidates,
                        **_latencies(predictor.score, requests),
                    }
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


def over_http(root: Path, items: int, clients: int, per_client: int) -> list[dict]:
    """The service (``genctr serve``, default settings, MI + cache) on each format and table
    type, with one client and with ``clients`` clients; and the compiled fp32 artifact with
    one worker per core at ``clients`` clients."""
    import httpx

    rows = []
    requests = _traffic(items, MAX_HISTORY, 100, clients * per_client, seed=1)
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
    cores = os.cpu_count() or 1
    settings = [
        (fmt, tables, n_clients, 1)
        for fmt in FORMATS
        for tables in ("none", "int8")
        for n_clients in (1, clients)
    ] + [("aoti", "none", clients, cores)]
    for fmt, tables, n_clients, workers in settings:
        artifact = root / f"{fmt}-{tables}-1"
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "genctr_rec.cli", "serve", "--artifact", str(artifact),
             "--port", str(port), "--workers", str(workers)],
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
            _timed_posts(port, bodies[:20])  # warm: first requests allocate
            # each client its own process (threads of one process would share its GIL)
            chunks = [bodies[k * per_client : (k + 1) * per_client] for k in range(n_clients)]
            times, rates, server_cpu = [], [], 0.0
            with ProcessPoolExecutor(n_clients) as pool:
                ports = [port] * n_clients
                list(pool.map(_timed_posts, ports, [c[:2] for c in chunks]))
                for _ in range(REPEATS):
                    server_before = _cpu_seconds(proc.pid)
                    start = time.perf_counter()
                    for took, _ in pool.map(_timed_posts, ports, chunks):
                        times.append(took)
                    rates.append(n_clients * per_client / (time.perf_counter() - start))
                    server_cpu += _cpu_seconds(proc.pid) - server_before
            times = np.concatenate(times) * 1e3
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        row = {
            "format": fmt,
            "tables": "int8" if tables == "int8" else "fp32",
            "clients": n_clients,
            "workers": workers,
            "server_cpu_ms_per_request": 1e3 * server_cpu / (REPEATS * n_clients * per_client),
            "p50_ms": float(np.percentile(times, 50)),
            "p99_ms": float(np.percentile(times, 99)),
            "requests_per_s": float(np.median(rates)),
            "requests_per_s_runs": rates,
        }
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=300, help="timed requests per cell")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = in_process(Path(tmp), args.items, args.requests)
        http_rows = over_http(Path(tmp), args.items, args.clients, args.per_client)
    lines = [
        "In process (`Predictor.score`, one request at a time, history 200, torch threads "
        f"{torch.get_num_threads()}; aoti: torch.export + AOTInductor, the default; torchscript: "
        "0.10's artifact; exported: the programs uncompiled):",
        "",
        "| format | tables | mode | candidates | p50 ms | p99 ms | requests/s | x torchscript |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(
            (b for b in rows if b["format"] == "torchscript" and all(
                b[k] == r[k] for k in ("tables", "mode", "candidates"))), None,
        )  # fmt: skip
        ratio = f"{r['requests_per_s'] / base['requests_per_s']:.2f}x" if base else "-"
        lines.append(
            f"| {r['format']} | {r['tables']} | {r['mode']} | {r['candidates']} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['requests_per_s']:.0f} | {ratio} |"
        )
    lines += [
        "",
        f"Over HTTP (`genctr serve` with its defaults, MI + cache, history 200, 100 candidates; "
        f"each client {args.per_client} requests over one keep-alive connection with the "
        "standard library's `http.client`, each client its own process on the same cores as "
        "the service; requests/s the median of 3 runs):",
        "",
        "| format | tables | clients | workers | p50 ms | p99 ms | requests/s | x torchscript "
        "| service CPU ms a request |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in http_rows:
        base = next(
            (b for b in http_rows if b["format"] == "torchscript" and all(
                b[k] == r[k] for k in ("tables", "clients", "workers"))), None,
        )  # fmt: skip
        ratio = f"{r['requests_per_s'] / base['requests_per_s']:.2f}x" if base else "-"
        lines.append(
            f"| {r['format']} | {r['tables']} | {r['clients']} | {r['workers']} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['requests_per_s']:.0f} | {ratio} | "
            f"{r['server_cpu_ms_per_request']:.2f} |"
        )
    md = write_results(
        "serving_latency",
        {"items": args.items, "in_process": rows, "http": http_rows},
        "\n".join(lines),
    )
    print(md.read_text())


if __name__ == "__main__":
    main()
