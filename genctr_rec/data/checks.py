"""Column checks shared by ``genctr data validate`` and the training readers.

Each check works on one Arrow table read from one file (a row group or a whole file) with the
row number of its first row in that file, and raises :class:`DataFormatError` naming the file,
the column and the first offending row. The checks are vectorised: the readers run them on
every row group they read, so training never sees broken ids, NaN labels or ragged histories.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from genctr_rec.data.jagged import list_parts
from genctr_rec.data.schema import DataFormatError


def is_integer_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def check_once(path: Path, schema: pa.Schema, name: str) -> None:
    """Column ``name`` appears once: Arrow allows two of one name, and which one is meant
    cannot be told."""
    copies = len(schema.get_all_field_indices(name))
    if copies > 1:
        raise DataFormatError(path, f"the column appears {copies} times", name)


def check_schema(path: Path, schema: pa.Schema, expected: pa.Schema) -> None:
    """Every expected column is present once with a compatible type (any integer width for
    ids)."""
    for field in expected:
        if field.name not in schema.names:
            raise DataFormatError(
                path,
                f"required column is missing (file has: {', '.join(schema.names)})",
                field.name,
            )
        check_once(path, schema, field.name)
        actual = schema.field(field.name).type
        if pa.types.is_list(field.type):
            ok = (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and is_integer_type(
                actual.value_type
            )
        elif field.name == "label":
            ok = (
                is_integer_type(actual)
                or pa.types.is_floating(actual)
                or pa.types.is_boolean(actual)
            )
        else:
            ok = is_integer_type(actual)
        if not ok:
            raise DataFormatError(path, f"expected {field.type}, found {actual}", field.name)


def _first_null_row(column: pa.ChunkedArray | pa.Array) -> int | None:
    if column.null_count == 0:
        return None
    mask = column.is_null()
    if isinstance(mask, pa.ChunkedArray):
        mask = mask.combine_chunks()
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])


def scalar_column(path: Path, table: pa.Table, name: str, row0: int) -> np.ndarray:
    """An integer column as int64 numpy, rejecting nulls."""
    column = table.column(name)
    bad = _first_null_row(column)
    if bad is not None:
        raise DataFormatError(path, "null value", name, row0 + bad)
    return column.to_numpy().astype(np.int64, copy=False)


def list_column(path: Path, table: pa.Table, name: str, row0: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list column, rejecting null lists and null elements."""
    column = table.column(name).combine_chunks()
    bad = _first_null_row(column)
    if bad is not None:
        raise DataFormatError(path, "null list", name, row0 + bad)
    offsets, values = list_parts(column)
    if column.flatten().null_count:
        flat_bad = _first_null_row(column.flatten())
        row = int(np.searchsorted(offsets, flat_bad, side="right") - 1)
        raise DataFormatError(path, "null element in list", name, row0 + row)
    return offsets, values.astype(np.int64, copy=False)


def check_range(
    path: Path,
    name: str,
    values: np.ndarray,
    upper: int,
    row0: int,
    offsets: np.ndarray | None = None,
) -> None:
    """0 <= values < upper; for list columns ``offsets`` maps a bad element to its row."""
    if values.size == 0:
        return
    if values.min() >= 0 and values.max() < upper:
        return
    flat = int(np.flatnonzero((values < 0) | (values >= upper))[0])
    row = flat if offsets is None else int(np.searchsorted(offsets, flat, side="right") - 1)
    raise DataFormatError(
        path, f"id {int(values[flat])} outside the dense range [0, {upper})", name, row0 + row
    )


def label_column(path: Path, table: pa.Table, row0: int) -> np.ndarray:
    """Labels as float32 0/1; rejects nulls, NaN and anything else."""
    column = table.column("label")
    bad = _first_null_row(column)
    if bad is not None:
        raise DataFormatError(path, "null label", "label", row0 + bad)
    labels = column.to_numpy(zero_copy_only=False)
    if labels.dtype.kind == "f":
        nan = np.isnan(labels)
        if nan.any():
            raise DataFormatError(path, "label is NaN", "label", row0 + int(np.flatnonzero(nan)[0]))
    wrong = (labels != 0) & (labels != 1)
    if wrong.any():
        flat = int(np.flatnonzero(wrong)[0])
        raise DataFormatError(
            path, f"label must be 0 or 1, found {labels[flat]}", "label", row0 + flat
        )
    return labels.astype(np.float32)


def check_same_lengths(
    path: Path,
    first: str,
    first_offsets: np.ndarray,
    second: str,
    second_offsets: np.ndarray,
    row0: int,
) -> None:
    """Paired list columns (items and their categories) must have equal lengths row by row."""
    if first_offsets.shape == second_offsets.shape and np.array_equal(
        first_offsets, second_offsets
    ):
        return
    a, b = np.diff(first_offsets), np.diff(second_offsets)
    row = int(np.flatnonzero(a != b)[0])
    raise DataFormatError(
        path, f"has {b[row]} elements but '{first}' has {a[row]}", second, row0 + row
    )


def check_oldest_first(
    path: Path, column: str, offsets: np.ndarray, timestamps: np.ndarray, row0: int
) -> None:
    """A list column of timestamps must not decrease within a row (oldest first)."""
    step_back = np.diff(timestamps) < 0
    inside = np.ones(len(step_back), dtype=bool)
    inside[offsets[1:-1] - 1] = False  # differences that cross a row boundary don't count
    bad = step_back & inside
    if bad.any():
        row = int(np.searchsorted(offsets, np.flatnonzero(bad)[0] + 1, side="right") - 1)
        raise DataFormatError(path, "timestamps must be oldest first", column, row0 + row)


def dense_column(path: Path, table: pa.Table, name: str, row0: int) -> np.ndarray:
    """A numeric column as float32, rejecting nulls, NaN and infinities."""
    column = table.column(name)
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        raise DataFormatError(path, f"expected a number (float32), found {column.type}", name)
    bad = _first_null_row(column)
    if bad is not None:
        raise DataFormatError(path, "null value", name, row0 + bad)
    values = column.to_numpy().astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        r = int(np.flatnonzero(~finite)[0])
        raise DataFormatError(path, f"value {values[r]} is not finite", name, row0 + r)
    return values


def missing_feature(path: Path, spec, file_columns: list[str]) -> DataFormatError:
    """The error for a declared feature whose column a file lacks (its columns listed, for
    typos)."""
    return DataFormatError(
        path,
        f"declared in meta.json's features ({spec.kind}, where={spec.where}) but missing "
        f"(file has: {', '.join(file_columns)})",
        spec.name,
    )
