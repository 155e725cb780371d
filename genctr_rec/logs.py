"""Logging set-up for the command line: one format, rank-aware, to stderr.

fbgemm logs every library it loads at INFO on the root logger; the root stays at WARNING and
only our own loggers speak at INFO.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

OUR_LOGGERS = ("genctr", "genctr_rec")
# TorchRec's planner warns about dry-run estimates and prints large stats tables at INFO
QUIET_LOGGERS = ("torchrec.distributed.planner",)
# The stack's own notices about its internals, one per library call we cannot change: hidden
# unless -v. Anything not listed here still shows, through logging; in particular every
# deprecation of a format this project writes or reads (TorchScript, torch.ao.quantization:
# the legacy artifact, genctr export --format torchscript) is shown.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"HeuristicalStorageReservation is known to cause issues"),
    (FutureWarning, r"`broadcast_buffers` is deprecated"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    (UserWarning, r"torch\.distributed is disabled, unavailable or uninitialized"),
    (UserWarning, r"\s*Failed to import: fbgemm_gpu"),
    (DeprecationWarning, r"\s*The Python module fbgemm_gpu\.split_table_batched_embeddings_ops"),
)
# loggers of the stack that warn through logging rather than warnings
KNOWN_WARNING_LOGGERS = ("torch.fx._symbolic_trace",)


def setup_logging(verbose: bool = False) -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)  # what still warns comes out in the same format
    if not verbose:
        hide_known_warnings()


def hide_known_warnings() -> None:
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in KNOWN_WARNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def rounded(value: Any, digits: int = 4) -> Any:
    """Floats rounded for people (metrics files keep full precision)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


def as_json(value: Any, digits: int = 4) -> str:
    """A result for a log line: compact JSON, floats rounded."""
    return json.dumps(rounded(value, digits), sort_keys=True)
