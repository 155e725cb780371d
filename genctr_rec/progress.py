"""Progress that works everywhere: a tqdm bar on a terminal, a log line every N seconds
elsewhere (torchrun, torchx, Slurm and Kubernetes logs, a file), on rank 0 only.

A one-hour epoch under a scheduler otherwise prints nothing for an hour. The interval is
``GENCTR_PROGRESS_EVERY_S`` (default 30 s; 0 logs every update).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from tqdm import tqdm

logger = logging.getLogger("genctr_rec.progress")
INTERVAL_VARIABLE = "GENCTR_PROGRESS_EVERY_S"
DEFAULT_INTERVAL_S = 30.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_VARIABLE, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Counts work done (``update(n, examples=..., loss=...)``) and shows it.

    ``total`` is in the same unit as ``update``'s n (steps, batches, users); without it the
    line has no percentage or ETA. ``enabled=False`` (ranks other than 0) shows nothing."""

    def __init__(
        self, desc: str, total: int | None = None, unit: str = "step", enabled: bool = True
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.done = 0
        self.examples = 0
        self.fields: dict[str, Any] = {}
        self.started = self.last = time.monotonic()
        self.every = _interval()
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=1.0)

    def update(self, n: int = 1, examples: int = 0, **fields: Any) -> None:
        self.done += n
        self.examples += examples
        self.fields.update(fields)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if fields:
                self.bar.set_postfix({k: _show(v) for k, v in fields.items()}, refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            logger.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """``desc: 120/400 steps (30%), loss 0.5123, 4,512 examples/s, 0m41s, ETA 1m36s``."""
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        parts = [f"{self.done:,}/{self.total:,}" if self.total else f"{self.done:,}"]
        parts[0] += " " + self.unit + ("es" if self.unit.endswith(("ch", "s")) else "s")
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts += [f"{k} {_show(v)}" for k, v in self.fields.items()]
        if self.examples:
            parts.append(f"{self.examples / elapsed:,.0f} examples/s")
        parts.append(_duration(elapsed))
        if self.total and self.done:
            parts.append(f"ETA {_duration(elapsed * (self.total - self.done) / self.done)}")
        return f"{self.desc}: " + ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _show(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
