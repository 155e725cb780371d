"""What a side feature's kind means, everywhere it is read, in one class per kind: how a file's
column is checked and decoded, how a request's value is checked, and how the values of a
batch's rows are gathered. Adding a kind is a subclass here, its name in
``features.FEATURE_KINDS`` (the format's parse), its table in ``embeddings.feature_collection``
and its pooling in ``serving/model.py``; the readers, the catalogue, the validator and the
predictor ask the kind.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from genctr_rec.data.checks import (
    check_once,
    check_range,
    dense_column,
    is_integer_type,
    list_column,
    missing_feature,
    scalar_column,
)
from genctr_rec.data.features import FEATURE_KINDS, FeatureSchema, FeatureSpec
from genctr_rec.data.jagged import lengths_to_offsets
from genctr_rec.data.schema import DataFormatError
from genctr_rec.data.stream import Jagged


class FieldError(ValueError):
    """A value that cannot be used; ``field`` says where (``features.user_tags[3]``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def int_array(values: Any, field: str, expected: int | None = None) -> np.ndarray:
    """A request's flat list of integers as int64, or a :class:`FieldError` naming ``field``."""
    try:
        array = np.asarray(values if values is not None else [], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FieldError(field, f"must be a list of integers ({exc})") from exc
    if array.ndim != 1:
        raise FieldError(field, "must be a flat list of integers")
    if expected is not None and len(array) != expected:
        raise FieldError(field, f"has {len(array)} entries, expected {expected}")
    return array


class FeatureKind:
    """One kind of side feature. ``sparse``: looked up in a table of ``vocab_size`` rows (and
    one default row); ``is_list``: a list of ids a row, mean-pooled."""

    name: ClassVar[str]
    sparse: ClassVar[bool] = True
    is_list: ClassVar[bool] = False

    def column(
        self, path: Path, table: pa.Table, spec: FeatureSpec, row0: int
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The feature's column of a file, checked: ids in range, values finite."""
        raise NotImplementedError

    def request_value(self, value: Any, field: str, max_ids: int) -> float | np.ndarray:
        """A request's value, checked: a float, or the ids (range unchecked: the caller's
        policy for unknown ids decides)."""
        raise NotImplementedError

    def as_ids(self, value: Any) -> Any:
        """A request's value as a list of ids (to map raw ids)."""
        return value

    def from_ids(self, ids: np.ndarray | list[int]) -> Any:
        """The request value holding ``ids``."""
        return [int(i) for i in ids]

    def outside_at(self, field: str, index: int) -> str:
        """Where the ``index``-th id of a value is (for errors)."""
        return f"{field}[{index}]"

    def gather(self, given: list[Any], rows: np.ndarray) -> np.ndarray | Jagged:
        """The values of each row of a batch (``rows``: which request each row is) from the
        requests' checked values ``given``."""
        return np.concatenate(given)[rows]


class IdKind(FeatureKind):
    """One id a row (``user_gender``)."""

    name = "id"

    def column(self, path, table, spec, row0):
        actual = table.schema.field(spec.name).type
        if not is_integer_type(actual):
            raise DataFormatError(
                path, f"an id feature must be an integer, found {actual}", spec.name
            )
        values = scalar_column(path, table, spec.name, row0)
        check_range(path, spec.name, values, spec.vocab_size, row0)
        return values

    def request_value(self, value, field, max_ids):
        return int_array([value], field)

    def as_ids(self, value):
        return [value]

    def from_ids(self, ids):
        return int(ids[0])

    def outside_at(self, field, index):
        return field


class IdsKind(FeatureKind):
    """A list of ids a row, empty allowed (``user_interests``), mean-pooled."""

    name = "ids"
    is_list = True

    def column(self, path, table, spec, row0):
        actual = table.schema.field(spec.name).type
        if not (
            (pa.types.is_list(actual) or pa.types.is_large_list(actual))
            and is_integer_type(actual.value_type)
        ):
            raise DataFormatError(
                path, f"an ids feature must be a list of integers, found {actual}", spec.name
            )
        offsets, values = list_column(path, table, spec.name, row0)
        check_range(path, spec.name, values, spec.vocab_size, row0, offsets)
        return offsets, values

    def request_value(self, value, field, max_ids):
        if isinstance(value, list) and len(value) > max_ids:
            raise FieldError(field, f"{len(value)} ids; at most {max_ids} are accepted")
        return int_array(value, field)

    def gather(self, given, rows):
        sizes = np.array([len(v) for v in given], dtype=np.int64)
        flat = np.concatenate(given).astype(np.int64)
        return Jagged(flat, lengths_to_offsets(sizes)[:-1], sizes).rows(rows)


class DenseKind(FeatureKind):
    """One finite number a row (``user_age``), standardised with train/'s moments."""

    name = "dense"
    sparse = False

    def column(self, path, table, spec, row0):
        return dense_column(path, table, spec.name, row0)

    def request_value(self, value, field, max_ids):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FieldError(field, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise FieldError(field, f"must be finite, got {value!r}")
        return float(value)

    def from_ids(self, ids):
        return 0.0

    def gather(self, given, rows):
        return np.asarray(given, dtype=np.float32)[rows]


KINDS: dict[str, FeatureKind] = {k.name: k for k in (IdKind(), IdsKind(), DenseKind())}
assert tuple(KINDS) == FEATURE_KINDS, "every kind the format parses has its class here"


def kind_of(spec: FeatureSpec) -> FeatureKind:
    return KINDS[spec.kind]


def feature_column(
    path: Path, table: pa.Table, spec: FeatureSpec, row0: int
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A declared side feature's column, checked against its spec: ``id`` -> int64 ids in
    range, ``ids`` -> (offsets, values) in range, ``dense`` -> finite float32."""
    if spec.name not in table.column_names:
        raise missing_feature(path, spec, table.column_names)
    check_once(path, table.schema, spec.name)
    return kind_of(spec).column(path, table, spec, row0)


def side_arrays(
    schema: FeatureSchema, scalars: dict[str, np.ndarray], lists: dict[str, Jagged], n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A model's side inputs for ``n`` rows from per-row columns, for training batches and
    serving requests alike (serving hands them to the exported model as plain tensors, training
    wraps them in the KJT its sharded tables take): the side features' values and lengths,
    key-major in ``schema.sparse_keys`` order (``user_id`` and ``id`` features one value a row,
    ``ids`` features their lists, empty bags allowed), and the dense features [n, D] (None
    without dense features)."""
    values, lengths = [], []
    for key in schema.sparse_keys:
        if key in lists:
            jag = lists[key]
            values.append(jag.values[jag.flat_index()])
            lengths.append(jag.lengths.astype(np.int32))
        else:
            values.append(np.asarray(scalars[key], dtype=np.int64))
            lengths.append(np.ones(n, dtype=np.int32))
    names = schema.dense_names
    dense = np.stack([scalars[k] for k in names], axis=1).astype(np.float32) if names else None
    return np.concatenate(values).astype(np.int64, copy=False), np.concatenate(lengths), dense
