"""``genctr serve``'s settings in one dataclass: the command line's flags are built from its
fields and their docstrings, as training's are from ``ModelConfig`` and ``TrainConfig``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ``thread``: one scoring thread, so that the loop reads and parses further requests while the
# model runs; ``loop``: the event loop's thread runs each batch (no hand-off to a thread and
# back: benchmarks/results/serving_latency.md)
SCORE_ON = ("thread", "loop")
UNKNOWN_IDS = ("default", "reject", "skip_history")
TOKEN_VARIABLE = "GENCTR_SERVE_TOKEN"  # the bearer token, when no --auth-token-file is given


@dataclass
class ServeConfig:
    """How the service listens, batches, bounds and guards its work.

    Args:
        host: address to listen on (0.0.0.0: every interface; there is no authentication unless
            a token is set, so expose it only behind one or on a trusted network).
        port: TCP port.
        workers: processes answering on the port, each with its own copy of the model, cache
            and micro-batcher; /metrics sums them. Up to one per core the replica has.
        threads: torch intra-op threads of each worker (0: torch's default, all cores). One
            keeps the tail short for requests of a few hundred candidates; scale with workers.
        poll_s: with a directory of versions: seconds between checks for a new or pinned one
            (0: never).
        max_batch: requests scored together in one model call.
        max_wait_ms: wait this long for more requests before a batch (0: take what is queued).
        score_on: where each batch runs: on a scoring thread beside the event loop (thread: the
            loop parses further requests meanwhile, larger batches under load) or on the
            loop's own thread (loop: no hand-off, less CPU and latency for requests that come
            one at a time).
        max_queue: requests waiting for the model beyond which a new one gets 503 with
            Retry-After (overload sheds requests instead of growing memory).
        max_connections: connections served at once; more get 503 (uvicorn's
            limit_concurrency).
        read_timeout_s: a connection must deliver each whole request (headers and body) within
            this many seconds of opening or of its previous answer, else it is closed: a client
            that sends a byte a second cannot hold a socket for ever.
        keep_alive_s: an idle keep-alive connection is closed after this many seconds.
        max_body_bytes: larger request bodies get 413.
        max_candidates: candidates per request.
        max_request_history: history entries a request may send; the model keeps its newest
            max_history.
        max_feature_ids: ids one ids feature of a request may hold.
        max_request_ids: a request's ids features copied once per candidate may hold at most
            this many ids in all (one request cannot ask for gigabytes).
        cache_size: g(s, c) cache entries.
        unknown_ids: an id past the model's vocabulary (a new ad, category, user or feature
            value): scored with its table's default row (default; counted in /metrics), refused
            with 422 (reject), or, in a history only, dropped (skip_history).
        trust_request_categories: score a candidate with the category_id the request gives even
            where the catalogue says otherwise (off: such a request gets 422).
        warm_up_rounds: synthetic requests scored before the service reports ready.
        shutdown_timeout_s: on SIGTERM, seconds to finish the requests already received.
        auth_token_file: a file holding a bearer token; /score, /metadata and /metrics then
            need ``Authorization: Bearer TOKEN`` (401 otherwise); /livez and /readyz stay open
            for probes. The environment variable GENCTR_SERVE_TOKEN sets one too.
        allowed_hosts: comma-separated Host header values the service answers (400 otherwise;
            empty: any), against DNS rebinding and misrouted traffic.
        artifact_sha256: serve only the artifact whose manifest has this SHA-256 (what genctr
            export prints): a replaced or altered artifact is refused.
        access_log: log every request (method, path, status).
    """

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    threads: int = 1
    poll_s: float = 30.0
    max_batch: int = 64
    max_wait_ms: float = 0.0
    score_on: str = "thread"
    max_queue: int = 4096
    max_connections: int = 1024
    read_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_body_bytes: int = 1 << 20
    max_candidates: int = 1000
    max_request_history: int = 10_000
    max_feature_ids: int = 1000
    max_request_ids: int = 1_000_000
    cache_size: int = 100_000
    unknown_ids: str = "default"
    trust_request_categories: bool = False
    warm_up_rounds: int = 3
    shutdown_timeout_s: float = 30.0
    auth_token_file: str | None = None
    allowed_hosts: str = ""
    artifact_sha256: str | None = None
    access_log: bool = False

    CHOICES = {"score_on": SCORE_ON, "unknown_ids": UNKNOWN_IDS}
    # older spellings of flags, still accepted
    ALIASES = {"unknown_ids": ["--oov"], "shutdown_timeout_s": ["--shutdown-timeout"]}

    def check(self) -> ServeConfig:
        """Refuse settings that cannot work (raises ValueError naming the flag)."""
        for name in ("workers", "max_batch", "max_queue", "max_connections", "max_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("read_timeout_s", "keep_alive_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {allowed}")
        return self

    def predictor_options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~genctr_rec.serving.predictor.Predictor`."""
        return {
            "cache_size": self.cache_size,
            "oov": self.unknown_ids,
            "max_candidates": self.max_candidates,
            "max_request_history": self.max_request_history,
            "trust_request_categories": self.trust_request_categories,
            "max_feature_ids": self.max_feature_ids,
            "max_request_ids": self.max_request_ids,
            "artifact_sha256": self.artifact_sha256,
        }

    def token(self) -> str | None:
        """The bearer token requests must carry (None: no authentication)."""
        import os

        if self.auth_token_file:
            text = Path(self.auth_token_file).read_text().strip()
            if not text:
                raise ValueError(f"--auth-token-file {self.auth_token_file} is empty")
            return text
        return os.environ.get(TOKEN_VARIABLE) or None

    def hosts(self) -> list[str]:
        return [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]
