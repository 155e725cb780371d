"""Where validation data comes from: a ``valid/`` directory when the dataset has one, else the
newest slice of ``train/`` by timestamp (the rows a model trained on the rest would meet next,
as test rows are later than train ones).

Example::

    split = ValidationSplit.for_dataset("data/ml100k", fraction=0.1)
    train = ImpressionReader("data/ml100k", split.train_split, 1024, time_range=split.train_range)
    valid = ImpressionReader("data/ml100k", split.valid_split, 1024, time_range=split.valid_range)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genctr_rec.data.schema import VALID_SPLIT, DataFormatError, split_files
from genctr_rec.storage import location, read_table

TimeRange = tuple[int | None, int | None]  # [lo, hi): None = unbounded


def time_masks(files: list[Path], time_range: TimeRange) -> list[np.ndarray]:
    """Per file, which rows have ``lo <= timestamp < hi`` (reads the timestamp column only)."""
    lo, hi = time_range
    masks = []
    for path in files:
        ts = read_table(path, columns=["timestamp"]).column("timestamp").to_numpy()
        mask = np.ones(len(ts), dtype=bool)
        if lo is not None:
            mask &= ts >= lo
        if hi is not None:
            mask &= ts < hi
        masks.append(mask)
    return masks


@dataclass(frozen=True)
class ValidationSplit:
    """The train and validation rows of one fine-tuning run.

    Args:
        train_split, valid_split: directories (``train``, ``valid``) the rows come from.
        train_range, valid_range: timestamp ranges within them (None: every row).
        boundary: the first validation timestamp when carved out of train/ (else None).
    """

    train_split: str
    valid_split: str | None
    train_range: TimeRange | None = None
    valid_range: TimeRange | None = None
    boundary: int | None = None

    @classmethod
    def for_dataset(cls, data_dir: str | Path, fraction: float) -> ValidationSplit:
        """``valid/`` if present; else the newest ``fraction`` of train/ rows (by timestamp,
        cut on a timestamp boundary); ``fraction`` 0 turns validation off."""
        data_dir = location(data_dir)
        if fraction <= 0:
            return cls("train", None)
        if (data_dir / VALID_SPLIT).is_dir():
            return cls("train", VALID_SPLIT)
        if not fraction < 1:
            raise ValueError(f"the validation fraction must be in [0, 1), got {fraction}")
        files = split_files(data_dir, "train")
        ts = np.concatenate(
            [read_table(p, columns=["timestamp"]).column("timestamp").to_numpy() for p in files]
        )
        ordered = np.sort(ts)
        boundary = int(ordered[min(len(ordered) - 1, int(len(ordered) * (1 - fraction)))])
        if boundary <= ordered[0]:
            raise DataFormatError(
                data_dir / "train",
                f"cannot hold out the newest {fraction:.0%} of rows by time: too few distinct "
                "timestamps; add a valid/ split or pass --valid-fraction 0",
                "timestamp",
            )
        return cls("train", "train", (None, boundary), (boundary, None), boundary)

    def describe(self) -> str:
        if self.valid_split is None:
            return "none"
        if self.boundary is None:
            return f"{self.valid_split}/"
        return f"train/ rows with timestamp >= {self.boundary}"
