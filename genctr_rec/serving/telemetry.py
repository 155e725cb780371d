"""The service's Prometheus metrics (``GET /metrics``): requests by route and status, latency,
micro-batch sizes, the g(s, c) cache, readiness, and the model versions served, swapped in
and refused.

Each app has its own ``CollectorRegistry``, so several services (or tests) in one process do not
share counters. With several worker processes (``genctr serve --workers``, which sets
``PROMETHEUS_MULTIPROC_DIR``) the exposition is the whole service's, whichever worker answers:
prometheus_client's multiprocess mode sums counters and histograms over the workers, and
the gauges say how to combine theirs (``genctr_ready`` is the minimum over live workers: 1 once
every worker is warmed up). Names follow Prometheus' conventions (``_total``, ``_seconds``).
"""

from __future__ import annotations

import os
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
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROUTES = ("/score", "/metadata", "/healthz", "/readyz", "/livez", "/metrics")


class ServiceMetrics:
    """Counters the service updates; ``render()`` is the exposition text."""

    def __init__(self, cache_stats: Callable[[], dict[str, int]] | None = None) -> None:
        self.shared = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))  # one of several workers
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
            "genctr_ready",
            "1 once the model is warmed up and serving (every worker's)",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.warm_up_seconds = Gauge(
            "genctr_warm_up_seconds",
            "time the start-up warm-up took (the slowest worker's)",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.unknown_ids = Counter(
            "genctr_unknown_ids",
            "ids past the model's vocabulary, scored with a default row, by request field",
            ["field"],
            registry=self.registry,
        )
        self.model_version = Gauge(
            "genctr_model_version",
            "1 for the model version served (by a worker), 0 for one served before",
            ["version"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.swaps = Counter(
            "genctr_model_swaps",
            "new model versions swapped in while serving",
            registry=self.registry,
        )
        self.refusals = Counter(
            "genctr_model_refusals",
            "model versions refused (damaged, unreadable or failing the probe), by version",
            ["version"],
            registry=self.registry,
        )
        self._cache_stats = cache_stats
        self._cache_gauges: dict[str, Gauge] = {}
        if cache_stats is not None:
            for name in ("hits", "misses"):
                gauge = Gauge(
                    f"genctr_context_cache_{name}",
                    f"g(s, c) cache {name} since start (over workers)",
                    registry=self.registry,
                    multiprocess_mode="livesum",
                )
                if self.shared:  # read from files: set after each request (observe)
                    self._cache_gauges[name] = gauge
                else:
                    gauge.set_function(lambda name=name: cache_stats().get(name, 0))

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"  # bounded label values
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if self._cache_gauges and route == "/score":
            stats = self._cache_stats()
            for name, gauge in self._cache_gauges.items():
                gauge.set(stats.get(name, 0))

    def count_unknown(self, field: str, count: int) -> None:
        """``count`` ids of ``field`` scored with a default row (field names are the
        request's, bounded by the model's declared features)."""
        self.unknown_ids.labels(field).inc(count)

    def serving(self, version: str) -> None:
        self.model_version.labels(version).set(1)

    def swapped(self, old: str, new: str) -> None:
        self.model_version.labels(old).set(0)
        self.model_version.labels(new).set(1)
        self.swaps.inc()

    def refused(self, version: str, reason: str) -> None:
        self.refusals.labels(version).inc()

    def render(self) -> tuple[bytes, str]:
        if not self.shared:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker)
        return generate_latest(every_worker), CONTENT_TYPE_LATEST


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
