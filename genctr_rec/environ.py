"""Environment variables set for a block and restored after it: how a process hands settings to
what reads them from the environment (Inductor's cache directory, the service's spawned
workers)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` for the block; each variable's earlier value (or its
    absence) restored after it, whatever ends the block."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
