"""``genctr serve --workers N``: N processes answering on one port, each with its own model.

One service process answers HTTP on one Python thread: on the serving benchmark's traffic
(100 candidates, history 200) the framework around the model costs about as much as the model,
so one process keeps one core busy however many the replica has. Several workers are what
uvicorn and gunicorn users run; this is uvicorn's own supervisor (``uvicorn.supervisors.
Multiprocess``: one listening socket bound here and shared, workers spawned, a dead worker
replaced, SIGTERM passed on so that each worker drains its connections), with three additions:

* the parent loads the artifact once before any worker starts, so a missing or damaged
  artifact is the same one-line error as with one process (and an ``s3://`` artifact is
  downloaded once); a worker that still fails to start stops the service instead of being
  restarted forever;
* ``GET /metrics`` describes the whole service, whichever worker answers: Prometheus'
  multiprocess mode (counters and histograms summed over workers, dead ones included;
  ``genctr_ready`` the minimum over live workers), in a directory that lives as long as the
  service;
* the workers' options travel in one environment variable (spawned processes share nothing
  else), read by :func:`app_from_environment`, the factory uvicorn calls in each worker.

Each worker holds its own copy of the tables and its own g(s, c) cache and micro-batcher.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from genctr_rec.environ import environment

logger = logging.getLogger(__name__)

WORKER_OPTIONS = "GENCTR_SERVE_WORKER"
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's switch to multiprocess mode
FACTORY = "genctr_rec.serving.workers:app_from_environment"


@dataclass
class WorkerOptions:
    """What each worker needs to build the same service (JSON in :data:`WORKER_OPTIONS`)."""

    artifact: str  # one artifact the parent downloaded and verified, or a directory of versions
    serve: dict[str, Any] = field(default_factory=dict)  # ServeConfig's fields
    verbose: bool = False


def app_from_environment() -> Any:
    """The ASGI app of one worker (uvicorn's factory). A failure to build it exits with
    uvicorn's start-up failure code, which stops the supervisor instead of a restart loop."""
    from uvicorn.config import STARTUP_FAILURE

    options = WorkerOptions(**json.loads(os.environ[WORKER_OPTIONS]))
    from genctr_rec.logs import setup_logging
    from genctr_rec.serving.config import ServeConfig

    config = ServeConfig(**options.serve)
    setup_logging(options.verbose)
    quiet_uvicorn(config.access_log)
    try:
        import torch

        from genctr_rec.serving.http import BoundedHttpToolsProtocol
        from genctr_rec.serving.server import create_app
        from genctr_rec.serving.swap import watch

        if config.threads:
            torch.set_num_threads(config.threads)
        # this process's connections (uvicorn's config reached it by reference to the class)
        BoundedHttpToolsProtocol.read_timeout_s = config.read_timeout_s
        watcher = watch(
            options.artifact, config.predictor_options(), config.poll_s, config.warm_up_rounds
        )
        return create_app(watcher, config)
    except Exception as exc:  # noqa: BLE001 - reported once, then the service stops
        logger.error("worker %d could not start: %s", os.getpid(), exc)
        sys.exit(STARTUP_FAILURE)


def quiet_uvicorn(access_log: bool) -> None:
    logging.getLogger("uvicorn.access").setLevel(logging.INFO if access_log else logging.WARNING)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


class WorkerFailedToStart(RuntimeError):
    pass


def _tcp(listening: socket.socket) -> socket.socket:
    """The listening socket with its protocol stated. uvicorn binds it as ``socket(family)``
    (protocol 0), the connections accepted from it inherit that, and asyncio sets
    ``TCP_NODELAY`` only on sockets that say TCP: without it a response written in two parts
    waits for the client's delayed ACK (tens of milliseconds a request)."""
    return socket.socket(
        listening.family, listening.type, socket.IPPROTO_TCP, fileno=listening.detach()
    )


def serve_workers(options: WorkerOptions, config: Any) -> None:
    """Runs ``config.workers`` worker processes on ``config.host:config.port`` until SIGTERM /
    SIGINT, then lets each drain (``config.shutdown_timeout_s``). Raises
    :class:`WorkerFailedToStart` when a worker could not build its app."""
    from prometheus_client import multiprocess
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        """uvicorn's supervisor; a replaced worker's live gauges are dropped."""

        def keep_subprocess_alive(self) -> None:
            before = {p.pid for p in self.processes}
            super().keep_subprocess_alive()
            for pid in before - {p.pid for p in self.processes}:
                multiprocess.mark_process_dead(pid)
                logger.warning("worker %s died; a new one was started", pid)

        def handle_term(self) -> None:
            logger.warning(
                "SIGTERM: each of %d workers drains its in-flight requests (at most %.0f s)",
                len(self.processes),
                config.shutdown_timeout_s,
            )
            super().handle_term()

    with tempfile.TemporaryDirectory(prefix="genctr-metrics-") as metrics_dir:
        # read by each spawned worker: its prometheus_client, and the options it serves with
        with environment({METRICS_DIR: metrics_dir, WORKER_OPTIONS: json.dumps(asdict(options))}):
            from genctr_rec.serving.http import uvicorn_config

            server_config = uvicorn_config(FACTORY, config, factory=True, workers=config.workers)
            supervisor = Supervisor(server_config, sockets=[_tcp(server_config.bind_socket())])
            logger.info(
                "serving on http://%s:%d with %d workers", config.host, config.port, config.workers
            )
            supervisor.run()
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        raise WorkerFailedToStart("a worker could not start (its error is logged above)")
