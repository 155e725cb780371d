"""``genctr serve``: the HTTP scoring service (FastAPI on uvicorn).

Endpoints: ``POST /score``; ``GET /livez`` (the process answers), ``GET /readyz`` and
``/healthz`` (503 until a warm-up of the model has run, then 200), ``GET /metadata``,
``GET /metrics`` (Prometheus), and FastAPI's ``/openapi.json`` and ``/docs``. A ``POST /score``
with a valid JSON body is answered below FastAPI (``asgi.ScoreFastPath``, same validation,
same answer, less time a request); any other request, bad ones included, goes through
FastAPI.

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
import logging
import secrets
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from genctr_rec.serving.api import ErrorResponse, ScoreBody, ScoreResponse
from genctr_rec.serving.asgi import (
    VERSION_HEADER,
    BearerAuth,
    BodyLimit,
    HostCheck,
    ScoreFastPath,
    VersionHeader,
)
from genctr_rec.serving.batcher import MicroBatcher, Overloaded
from genctr_rec.serving.config import ServeConfig
from genctr_rec.serving.predictor import Predictor, RequestError
from genctr_rec.serving.predictor import Request as ScoringRequest
from genctr_rec.serving.swap import ModelWatcher
from genctr_rec.serving.telemetry import MeasuredApp, ServiceMetrics
from genctr_rec.serving.versions import ServedModel

logger = logging.getLogger(__name__)
# which worker answered, for clients and tests; random, so it tells an outsider nothing
WORKER_ID = secrets.token_hex(4)


def create_app(model: Predictor | ModelWatcher, config: ServeConfig | None = None) -> Any:
    """The ASGI application (FastAPI wrapped in the body-size limit). ``model``: one
    predictor, or a :class:`ModelWatcher` that swaps in new versions as they arrive."""
    config = config or ServeConfig()
    token = config.token()
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
        config.max_queue,
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

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return JSONResponse(
            {"detail": f"overloaded: {exc}; retry", "field": None},
            status_code=503,
            headers={"retry-after": "1"},
        )

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
            "artifact_sha256": predictor.artifact_sha256,
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
                "max_feature_ids": predictor.max_feature_ids,
                "max_request_ids": predictor.max_request_ids,
                "max_body_bytes": config.max_body_bytes,
                "max_queue": config.max_queue,
                "max_connections": config.max_connections,
                "read_timeout_s": config.read_timeout_s,
            },
            "process": {"workers": config.workers, "worker": WORKER_ID},
            "authentication": "bearer token" if token else "none",
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

    app.state.watcher = watcher  # for tests and embedding applications
    # outermost first: metrics, version header, Host check, token, body limit, fast path
    inner: Any = BodyLimit(ScoreFastPath(app, submit), config.max_body_bytes)
    if token:
        inner = BearerAuth(inner, token)
    if config.hosts():
        inner = HostCheck(inner, config.hosts())
    return MeasuredApp(VersionHeader(inner, lambda: watcher.current), telemetry)
