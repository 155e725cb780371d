"""Vectorised helpers for jagged (offsets + values) arrays in numpy and Arrow.

Everything that builds or slices history lists goes through these, so that no recipe or
reader loops over rows in Python.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def gather_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat indices of the ranges ``[starts[i], starts[i] + lengths[i])``, concatenated."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # index = start of own range + position within it
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - offsets[:-1], lengths)
    return shift + np.arange(total, dtype=np.int64)


def lengths_to_offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def suffix_ranges(
    starts: np.ndarray, ends: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the last ``max_len`` elements of each ``[start, end)`` range (newest last)."""
    new_starts = np.maximum(starts, ends - max_len)
    return new_starts, ends - new_starts


def list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def list_parts(array: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets starting at 0, flat values) of an Arrow list column, copying nothing it need not."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    offsets = array.offsets.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    values = array.flatten().to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values
