"""``genctr serve``: the HTTP scoring service (FastAPI on uvicorn).

Endpoints: ``POST /score``; ``GET /livez`` (the process answers), ``GET /readyz`` and
``/healthz`` (503 until a warm-up of the model has run, then 200), ``GET /metadata``,
``GET /metrics`` (Prometheus), and FastAPI's ``/openapi.json`` and ``/docs``. A ``POST /score``
with a valid JSON body is answered below FastAPI (:class:`ScoreFastPath`, same validation,
same answer, 10-20 % less time a request); any other request, bad ones included, goes
through FastAPI.

Concurrent requests are micro-batched: each batch takes every request that queued while the
model was busy with the previous one (up to ``max_batch``), and optionally waits
``max_wait_ms`` for more; it is scored in one model call on a scoring thread beside the event
loop (``score_on="thread"``, the default), or on the loop's own thread (``"loop"``: no hand-off,
for traffic that comes one request at a time). With the default ``max_wait_ms=0`` a lone
request waits for nothing, and batches grow by themselves under load. Every bad request gets a 4xx
``{"detail", "field"}``; an unexpected failure gets a 500 for the requests of that batch only.
SIGTERM stops accepting and drains what was received.
"""

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from genctr_rec.serving.predictor import Predictor, PreparedRequest, RequestError
from genctr_rec.serving.predictor import Request as ScoringRequest
from genctr_rec.serving.swap import ModelWatcher, watch
from genctr_rec.serving.telemetry import MeasuredApp, ServiceMetrics
from genctr_rec.serving.versions import ServedModel

logger = logging.getLogger(__name__)
VERSION_HEADER = "x-genctr-model-version"
VERSION_HEADER_BYTES = VERSION_HEADER.encode()


class History(BaseModel):
    """The user's behaviour, oldest first."""

    model_config = ConfigDict(extra="forbid")
    item_ids: list[StrictInt]
    category_ids: list[StrictInt] | None = Field(
        default=None, description="one per item; omitted: taken from the item catalogue"
    )
    timestamps: list[StrictInt] | None = Field(default=None, description="optional, oldest first")


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: StrictInt
    category_id: StrictInt | None = Field(
        default=None, description="omitted: taken from the item catalogue"
    )


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: History
    query_category_id: StrictInt
    candidates: list[Candidate] = Field(min_length=1)
    user_id: StrictInt | None = Field(
        default=None, description="omitted or unseen in training: the shared default user row"
    )
    features: dict[str, StrictInt | StrictFloat | list[StrictInt]] | None = Field(
        default=None,
        description="the model's declared impression features by name (GET /metadata lists "
        "them): id -> integer, ids -> list of integers, dense -> number",
    )


class ScoreResponse(BaseModel):
    scores: list[float] = Field(description="click probability per candidate, in request order")


class ErrorResponse(BaseModel):
    detail: str
    field: str | None = None


@dataclass
class ServeConfig:
    """Service limits, batching and worker processes (each worker batches its own requests)."""

    max_batch: int = 64
    max_wait_ms: float = 0.0
    max_body_bytes: int = 1 << 20
    shutdown_timeout_s: float = 30.0
    warm_up_rounds: int = 3
    workers: int = 1
    poll_s: float = 30.0  # how often a directory of versions is checked for a new one
    score_on: str = "thread"  # SCORE_ON: where a batch runs (MicroBatcher)


# ``thread``: one scoring thread, so that the loop reads and parses further requests while the
# model runs; ``loop``: the event loop's thread runs each batch (no hand-off to a thread and
# back: benchmarks/results/serving_latency.md)
SCORE_ON = ("thread", "loop")


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

    Why: in one process without sockets a request through FastAPI cost 1.07-1.56 ms against a
    model call of 0.50-0.62 ms and 0.1 ms for parsing plus the request model: the rest was
    routing, dependency solving, validating and serialising the response model, and exception
    middlewares. This path takes 0.95-1.23 ms, and 8 HTTP clients get 14-40 % more requests/s
    (``benchmarks/results/serving_latency.md``, ``benchmarks/README.md``). Here the body is
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
        except (ValidationError, RequestError):
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


class MicroBatcher:
    """Collects concurrent prepared requests into batches for ``score_batch``.

    Where a batch runs (``score_on``): ``thread`` hands it to one scoring thread, so that
    while the model runs the event loop reads and parses the next requests (larger batches,
    two cores at work under concurrent load); ``loop`` scores on the event loop's thread,
    which spares the hand-off (a thread woken and the loop woken back: 0.14 ms of CPU even for
    an empty call on the benchmark machine) and so serves requests that come one at a time
    with less CPU and latency (one client: p50 1.2 against 1.6 ms, p99 2.4 against 3.5), while
    under load the loop waits for the model (benchmarks/results/serving_latency.md). Either
    way batches run one at a time and never beside the warm-up (``start(after=...)``), which
    runs on the scoring thread so that ``/livez`` answers meanwhile.
    """

    def __init__(
        self,
        score_batch: Callable[[list[PreparedRequest]], list[np.ndarray]],
        max_batch: int,
        max_wait_ms: float,
        observe_batch: Callable[[int], None] | None = None,
        score_on: str = "thread",
    ) -> None:
        if score_on not in SCORE_ON:
            raise ValueError(f"score_on must be one of {SCORE_ON}, got {score_on!r}")
        self.score_batch = score_batch
        self.observe_batch = observe_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_loop = score_on == "loop"
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genctr-score")
        self.batches = 0
        self.requests = 0
        self._task: asyncio.Task | None = None

    def start(self, after: Awaitable | None = None) -> None:
        """Start batching; the first batch waits for ``after`` (the warm-up) to finish."""
        self._task = asyncio.get_running_loop().create_task(self._run(after))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    def submit(
        self, prepared: PreparedRequest, score_batch: Callable | None = None
    ) -> Awaitable[np.ndarray]:
        """Queue ``prepared``; ``score_batch``: the model that took it (the service's models
        change while requests wait: each is scored by the one that prepared it)."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((prepared, future, score_batch or self.score_batch))
        return future

    async def _score(self, score_batch: Callable, prepared: list) -> list[np.ndarray]:
        if self.on_loop:
            return score_batch(prepared)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, score_batch, prepared)

    async def _run(self, after: Awaitable | None) -> None:
        if after is not None:
            await asyncio.gather(after, return_exceptions=True)  # its failure is logged there
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())  # what queued while the model was busy
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except TimeoutError:
                    break
            by_model: dict[Callable, list] = {}  # one model call per model (a swap's edge)
            for p, f, scorer in batch:
                if not f.done():  # a client may have gone
                    by_model.setdefault(scorer, []).append((p, f))
            for scorer, live in by_model.items():
                await self._score_group(scorer, live)

    async def _score_group(self, scorer: Callable, live: list) -> None:
        try:
            results = await self._score(scorer, [p for p, _ in live])
        except Exception as exc:  # the batch fails, the service stays up
            logger.exception("scoring a batch of %d requests failed", len(live))
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        self.batches += 1
        self.requests += len(live)
        if self.observe_batch is not None:
            self.observe_batch(len(live))
        for (_, future), result in zip(live, results, strict=True):
            if not future.done():
                future.set_result(result)


def create_app(model: Predictor | ModelWatcher, config: ServeConfig | None = None) -> Any:
    """The ASGI application (FastAPI wrapped in the body-size limit). ``model``: one
    predictor, or a :class:`ModelWatcher` that swaps in new versions as they arrive."""
    config = config or ServeConfig()
    watcher = model if isinstance(model, ModelWatcher) else ModelWatcher.fixed(model)
    first = watcher.current.predictor
    telemetry = ServiceMetrics(
        (lambda: watcher.current.predictor.cache.stats()) if first.cache is not None else None
    )
    first.on_unknown = telemetry.count_unknown
    telemetry.serving(watcher.current.version)
    for version, reason in watcher.refused.items():
        telemetry.refused(version, reason)
    previous_swap, previous_refusal = watcher.on_swap, watcher.on_refusal

    def on_swap(old: ServedModel, new: ServedModel) -> None:
        new.predictor.on_unknown = telemetry.count_unknown
        telemetry.swapped(old.version, new.version)
        if previous_swap is not None:
            previous_swap(old, new)

    def on_refusal(version: str, reason: str) -> None:
        telemetry.refused(version, reason)
        if previous_refusal is not None:
            previous_refusal(version, reason)

    watcher.on_swap, watcher.on_refusal = on_swap, on_refusal
    batcher = MicroBatcher(
        first.score_prepared,
        config.max_batch,
        config.max_wait_ms,
        telemetry.batch_size.observe,
        config.score_on,
    )
    started = time.time()
    state: dict[str, Any] = {"ready": False, "warm_up_s": None}

    async def warm_up() -> None:
        """On the scoring thread, so that it never runs beside a batch; ready when done."""
        if config.warm_up_rounds > 0:
            try:
                seconds = await asyncio.get_running_loop().run_in_executor(
                    batcher.executor, first.warm_up, config.warm_up_rounds
                )
            except Exception:  # never ready; batches still run (the batcher waited for this)
                logger.exception("warm-up failed: the service stays not ready")
                raise
            state["warm_up_s"] = round(seconds, 3)
            telemetry.warm_up_seconds.set(seconds)
            logger.info("warmed up in %.2f s: ready", seconds)
        state["ready"] = True
        telemetry.ready.set(1)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        loop = asyncio.get_running_loop()
        warming = loop.create_task(warm_up())
        batcher.start(after=warming)
        watching = loop.create_task(watcher.run()) if watcher.watching else None
        yield
        warming.cancel()
        if watching is not None:
            watching.cancel()
        await batcher.stop()

    app = FastAPI(
        title="genctr-rec scoring service",
        version=str(first.artifact.metadata.get("genctr_rec")),
        description="Click probabilities from a GenCTR serving artifact.",
        lifespan=lifespan,
    )

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.message, "field": exc.field}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        """404, 405, and 400 for a body that cannot be parsed at all (invalid UTF-8, nesting
        deeper than the parser's limit): the same shape as every other 4xx."""
        return JSONResponse(
            {"detail": str(exc.detail), "field": None},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        """The same {detail, field} shape as every other 4xx; the offending value is never
        echoed (NaN or Infinity cannot be written as JSON: echoing them was a 500)."""
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = str(first.get("msg", "invalid request"))
        return JSONResponse({"detail": message, "field": ".".join(where) or None}, status_code=422)

    @app.get("/livez")
    async def livez() -> dict[str, str]:
        """Liveness: the process answers (while warming up too)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "still warming up"}})
    @app.get("/healthz", responses={503: {"description": "still warming up"}})
    async def readyz() -> JSONResponse:
        """Readiness: the model is loaded and warmed up, the batcher running; 503 before."""
        if state["ready"]:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "warming up"}, status_code=503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus exposition: requests, latency, batch sizes, cache, readiness."""
        body, content_type = telemetry.render()
        return Response(body, media_type=content_type)

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        """The served version's metadata, the service's limits and counters."""
        predictor = watcher.current.predictor
        meta = predictor.artifact.metadata
        return {
            "version": watcher.current.version,
            "models": watcher.describe(),
            "artifact": str(predictor.artifact.path),
            **{k: meta[k] for k in ("num_items", "num_categories", "max_history", "dim")},
            **{k: meta[k] for k in ("backbone", "model_integration", "quantize", "created")},
            "features": meta.get("features"),
            "format_version": meta["format_version"],
            "genctr_rec": meta["genctr_rec"],
            "parity": meta["parity"],
            "oov_policy": predictor.oov,
            "limits": {
                "max_candidates": predictor.max_candidates,
                "max_request_history": predictor.max_request_history,
                "max_body_bytes": config.max_body_bytes,
            },
            "process": {"pid": os.getpid(), "workers": config.workers},
            "batching": {  # this worker's
                "max_batch": config.max_batch,
                "max_wait_ms": config.max_wait_ms,
                "score_on": config.score_on,
                "batches": batcher.batches,
                "requests": batcher.requests,
            },
            "cache": predictor.cache.stats() if predictor.cache is not None else None,
            "categories": "trusted" if predictor.trust_request_categories else "catalogue",
            "ready": state["ready"],
            "warm_up_s": state["warm_up_s"],
            "uptime_s": round(time.time() - started, 1),
        }

    @app.post(
        "/score",
        response_model=ScoreResponse,
        responses={413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    )
    async def score(body: ScoreBody, response: Response) -> ScoreResponse:
        """Click probability of every candidate, in candidate order (the header
        ``x-genctr-model-version`` names the version that scored them)."""
        version, scoring = submit(body)
        response.headers[VERSION_HEADER] = version
        return ScoreResponse(scores=(await scoring).tolist())

    def submit(body: ScoreBody) -> tuple[str, Awaitable[np.ndarray]]:
        """Check the request (raises :class:`RequestError`) and queue it for the batcher on
        the model current now. Returns that model's version and the scores to come."""
        served = watcher.current
        predictor = served.predictor
        prepared = predictor.prepare(
            ScoringRequest(
                history_items=body.history.item_ids,
                history_categories=body.history.category_ids,
                history_timestamps=body.history.timestamps,
                query_category=body.query_category_id,
                candidate_items=[c.item_id for c in body.candidates],
                candidate_categories=[c.category_id for c in body.candidates],
                user_id=body.user_id,
                features=body.features,
            )
        )
        return served.version, batcher.submit(prepared, predictor.score_prepared)

    fast = ScoreFastPath(app, submit)
    app.state.watcher = watcher  # for tests and embedding applications
    versioned = VersionHeader(BodyLimit(fast, config.max_body_bytes), lambda: watcher.current)
    return MeasuredApp(versioned, telemetry)


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


def run_draining(app: Any, host: str, port: int, shutdown_timeout_s: float) -> None:
    """uvicorn's server, saying on SIGTERM / SIGINT what it drains: it stops accepting, answers
    every request already received (up to ``shutdown_timeout_s``), then exits 0."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                logger.warning(
                    "%s: draining %d in-flight connection(s) (at most %.0f s), "
                    "accepting no new ones",
                    signal.Signals(sig).name,
                    len(self.server_state.tasks),
                    shutdown_timeout_s,
                )
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # our logging set-up and format; levels set by serve()
        timeout_graceful_shutdown=shutdown_timeout_s,
    )
    # uvicorn re-raises the signal once it has shut down; drained is a clean exit
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    Server(config).run()


def _exit_cleanly(sig: int, frame: Any) -> None:
    raise SystemExit(0)


def serve(
    artifact: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    config: ServeConfig | None = None,
    cache_size: int = 100_000,
    oov: str = "default",
    max_candidates: int = 1000,
    max_request_history: int = 10_000,
    trust_request_categories: bool = False,
    access_log: bool = False,
    threads: int = 1,
    verbose: bool = False,
) -> None:
    """Serves ``artifact`` until SIGTERM / SIGINT: in this process, or with
    ``config.workers`` > 1 in that many worker processes on the same port
    (:mod:`genctr_rec.serving.workers`), each with ``threads`` torch threads."""
    from genctr_rec.serving.workers import WorkerOptions, quiet_uvicorn, serve_workers

    config = config or ServeConfig()
    if threads:
        torch.set_num_threads(threads)
    options = {
        "cache_size": cache_size,
        "oov": oov,
        "max_candidates": max_candidates,
        "max_request_history": max_request_history,
        "trust_request_categories": trust_request_categories,
    }
    # a bad artifact (or a directory with no loadable version) fails here, before any worker
    watcher = watch(artifact, options, config.poll_s, config.warm_up_rounds)
    quiet_uvicorn(access_log)
    logger.info(
        "serving %s (version %s) on http://%s:%d", artifact, watcher.current.version, host, port
    )
    if config.workers <= 1:
        run_draining(create_app(watcher, config), host, port, config.shutdown_timeout_s)
        return
    # one artifact: downloaded and verified once, here; versions: each worker watches
    local = artifact if watcher.source.versioned else str(watcher.current.predictor.artifact.path)
    del watcher
    serve_workers(
        WorkerOptions(local, asdict(config), options, threads, verbose, access_log),
        host,
        port,
        config.workers,
    )
