"""``genctr serve``'s settings."""

from dataclasses import dataclass


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
