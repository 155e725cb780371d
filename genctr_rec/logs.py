"""Logging set-up for the command line: one format, rank-aware, to stderr.

fbgemm logs every library it loads at INFO on the root logger; the root stays at WARNING and
only our own loggers speak at INFO.
"""

from __future__ import annotations

import logging
import os

OUR_LOGGERS = ("genctr", "genctr_rec")
# TorchRec's planner warns about dry-run estimates and prints large stats tables at INFO
QUIET_LOGGERS = ("torchrec.distributed.planner",)


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
