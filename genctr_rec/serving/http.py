"""uvicorn for the service: the connection bounds it lacks (a read deadline against slow-loris
clients, a cap on header bytes), its limits from :class:`ServeConfig`, and a run in this process
in which SIGTERM drains what was received."""

import asyncio
import logging
import signal
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from genctr_rec.serving.config import ServeConfig

logger = logging.getLogger(__name__)


MAX_HEADER_BYTES = 64 * 1024  # one request's header lines, in all


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with two bounds uvicorn lacks: a read deadline (from a
    connection's opening, or from its previous answer, a client has ``read_timeout_s`` to send
    a whole request, headers and body, else the connection is closed: a slow-loris client that
    sends a byte a second cannot hold a socket for ever) and a cap on one request's header
    bytes (400, the connection closed). A request being answered is never cut: the deadline
    stops at its last byte. ``read_timeout_s`` is set per process (:func:`uvicorn_config`, and
    in each worker by ``workers.app_from_environment``)."""

    read_timeout_s = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._read_deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        self._header_bytes = 0
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            # the parser stops; uvicorn answers 400 and closes the connection
            raise ValueError(f"request headers over {MAX_HEADER_BYTES} bytes")
        super().on_header(name, value)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        if not self.transport.is_closing():
            logger.info("closing a connection that sent no whole request in %.0f s",
                        self.read_timeout_s)  # fmt: skip
            self.transport.close()


def uvicorn_config(app: Any, config: ServeConfig, **extra: Any) -> Any:
    """uvicorn's configuration for the service: the bounded protocol, at most
    ``max_connections`` connections (503 past it), idle keep-alive closed after
    ``keep_alive_s``, SIGTERM's grace ``shutdown_timeout_s``."""
    import uvicorn

    BoundedHttpToolsProtocol.read_timeout_s = config.read_timeout_s
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        http=BoundedHttpToolsProtocol,
        limit_concurrency=config.max_connections,
        timeout_keep_alive=config.keep_alive_s,
        log_config=None,  # our logging set-up and format; levels set by serve()
        timeout_graceful_shutdown=config.shutdown_timeout_s,
        **extra,
    )


def run_draining(app: Any, config: ServeConfig) -> None:
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
                    config.shutdown_timeout_s,
                )
            super().handle_exit(sig, frame)

    # uvicorn re-raises the signal once it has shut down; drained is a clean exit
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    Server(uvicorn_config(app, config)).run()


def _exit_cleanly(sig: int, frame: Any) -> None:
    raise SystemExit(0)
