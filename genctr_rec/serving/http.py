"""Running the ASGI app on uvicorn in this process: SIGTERM drains what was received."""

import logging
import signal
from typing import Any

logger = logging.getLogger(__name__)


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
