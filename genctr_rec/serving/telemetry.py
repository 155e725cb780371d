"""The service's Prometheus metrics (``GET /metrics``): requests by route and status, latency,
micro-batch sizes, the g(s, c) cache and readiness.

Each app has its own ``CollectorRegistry``, so several services (or tests) in one process do not
share counters. Names follow Prometheus' conventions (``_total``, ``_seconds``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROUTES = ("/score", "/metadata", "/healthz", "/readyz", "/livez", "/metrics")


class ServiceMetrics:
    """Counters the service updates; ``render()`` is the exposition text."""

    def __init__(self, cache_stats: Callable[[], dict[str, int]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "genctr_requests",
            "HTTP requests by route and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "genctr_request_seconds",
            "time from a request's arrival to its response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "genctr_batch_requests",
            "requests scored together in one model call",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.ready = Gauge(
            "genctr_ready", "1 once the model is warmed up and serving", registry=self.registry
        )
        self.warm_up_seconds = Gauge(
            "genctr_warm_up_seconds", "time the start-up warm-up took", registry=self.registry
        )
        if cache_stats is not None:
            for name in ("hits", "misses"):
                gauge = Gauge(
                    f"genctr_context_cache_{name}",
                    f"g(s, c) cache {name} since start",
                    registry=self.registry,
                )
                gauge.set_function(lambda name=name: cache_stats().get(name, 0))

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"  # bounded label values
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MeasuredApp:
    """ASGI middleware: every HTTP request's route, status and latency into ``metrics``
    (outermost, so that refusals by the body limit count too)."""

    def __init__(self, app: Callable, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what an exception escaping the app becomes

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.observe(scope["path"], status, time.perf_counter() - started)
