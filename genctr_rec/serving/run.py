"""``genctr serve``: one artifact or a directory of versions, served until SIGTERM, in this
process or in worker processes (``serving/workers.py``); the app itself is ``server.py``'s."""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch

from genctr_rec.serving.config import ServeConfig
from genctr_rec.serving.http import run_draining
from genctr_rec.serving.server import create_app
from genctr_rec.serving.swap import watch
from genctr_rec.serving.versions import ModelSource
from genctr_rec.serving.workers import WorkerOptions, quiet_uvicorn, serve_workers

logger = logging.getLogger(__name__)


def serve(artifact: str, config: ServeConfig | None = None, verbose: bool = False) -> None:
    """Serves ``artifact`` (one, or a directory of versions) until SIGTERM / SIGINT: in this
    process, or with ``config.workers`` > 1 in that many worker processes on the same port
    (:mod:`genctr_rec.serving.workers`), each with ``config.threads`` torch threads."""
    config = (config or ServeConfig()).check()
    config.token()  # an unreadable or empty token file fails here, once
    if config.artifact_sha256 and ModelSource(artifact).versioned:
        raise ValueError(
            "--artifact-sha256 pins one artifact; for a directory of versions pin a version "
            "with genctr models pin"
        )
    if config.threads:
        torch.set_num_threads(config.threads)
    # a bad artifact (or a directory with no loadable version) fails here, before any worker
    watcher = watch(artifact, config.predictor_options(), config.poll_s, config.warm_up_rounds)
    quiet_uvicorn(config.access_log)
    logger.info(
        "serving %s (version %s) on http://%s:%d%s",
        artifact,
        watcher.current.version,
        config.host,
        config.port,
        "" if config.token() else " without authentication (see docs/security.md)",
    )
    if config.workers <= 1:
        run_draining(create_app(watcher, config), config)
        return
    # one artifact: downloaded and verified once, here; versions: each worker watches
    local = artifact if watcher.source.versioned else str(watcher.current.predictor.artifact.path)
    del watcher
    serve_workers(WorkerOptions(local, asdict(config), verbose), config)
