"""The item catalogue: every item's category and declared item features, from items.parquet.

Training looks the target item's features up here (``where: item`` features are columns of
items.parquet, not of the impressions), validation checks them, and export ships them so that
serving finds each candidate's features without the caller sending them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from genctr_rec.data.checks import (
    check_range,
    check_schema,
    missing_feature,
    scalar_column,
)
from genctr_rec.data.features import FeatureSpec
from genctr_rec.data.jagged import lengths_to_offsets
from genctr_rec.data.kinds import feature_column, kind_of
from genctr_rec.data.schema import ITEMS_FILE, ITEMS_SCHEMA, DataFormatError, DatasetMeta
from genctr_rec.data.stream import Jagged
from genctr_rec.storage import location, open_parquet


def row_groups(
    path: Path,
    expected: pa.Schema,
    extra: list[str] | tuple[str, ...] = (),
    feature: FeatureSpec | None = None,
) -> Iterator[tuple[pa.Table, int]]:
    """Yields (table, first row) per row group after checking the file opens and has the schema;
    ``extra`` columns are read too where the file has them, and ``feature``'s column, which the
    file must have."""
    try:
        handle = open_parquet(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataFormatError(path, f"not a readable Parquet file ({exc})") from exc
    check_schema(path, handle.schema_arrow, expected)
    if feature is not None and feature.name not in handle.schema_arrow.names:
        raise missing_feature(path, feature, handle.schema_arrow.names)
    extra = [*extra, feature.name] if feature is not None else extra
    columns = expected.names + [c for c in extra if c in handle.schema_arrow.names]
    row0 = 0
    for rg in range(handle.metadata.num_row_groups):
        try:
            table = handle.read_row_group(rg, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise DataFormatError(path, f"cannot read row group {rg} ({exc})", row=row0) from exc
        yield table, row0
        row0 += table.num_rows


@dataclass
class ItemCatalogue:
    """Per-item columns indexed by item id.

    Args:
        categories: int64 [num_items], the category of every item.
        scalars: ``id`` features (int64 [num_items]) and ``dense`` ones (float32 [num_items]).
        lists: ``ids`` features, one row per item.
    """

    categories: np.ndarray
    scalars: dict[str, np.ndarray] = field(default_factory=dict)
    lists: dict[str, Jagged] = field(default_factory=dict)

    def gather(self, items: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Jagged]]:
        """The item features of ``items`` (views where possible)."""
        return (
            {k: v[items] for k, v in self.scalars.items()},
            {k: v.rows(items) for k, v in self.lists.items()},
        )


def read_item_catalogue(
    data_dir: str | Path, meta: DatasetMeta, features: list[FeatureSpec] | None = None
) -> ItemCatalogue:
    """items.parquet checked (dense ids, categories in range, one row per item) with the item
    features of ``features`` (default: every ``where: item`` feature meta.json declares)."""
    path = location(data_dir) / ITEMS_FILE
    if not path.is_file():
        raise DataFormatError(path, "items.parquet is missing")
    specs = [f for f in (meta.features if features is None else features) if f.where == "item"]
    categories = np.full(meta.num_items, -1, dtype=np.int64)
    parts: dict[str, list] = {f.name: [] for f in specs}
    order: list[np.ndarray] = []
    seen = 0
    for table, row0 in row_groups(path, ITEMS_SCHEMA, [f.name for f in specs]):
        items = scalar_column(path, table, "item_id", row0)
        cats = scalar_column(path, table, "category_id", row0)
        check_range(path, "item_id", items, meta.num_items, row0)
        check_range(path, "category_id", cats, meta.num_categories, row0)
        dup = categories[items] >= 0
        if dup.any() or len(np.unique(items)) != len(items):
            first = int(np.flatnonzero(dup)[0]) if dup.any() else 0
            raise DataFormatError(path, "item_id appears more than once", "item_id", row0 + first)
        categories[items] = cats
        for spec in specs:
            parts[spec.name].append(feature_column(path, table, spec, row0))
        order.append(items)
        seen += len(items)
    if seen != meta.num_items:
        raise DataFormatError(
            path, f"holds {seen} items but meta.json says num_items={meta.num_items}", "item_id"
        )
    position = np.empty(meta.num_items, dtype=np.int64)  # file row of each item id
    position[np.concatenate(order)] = np.arange(seen)
    catalogue = ItemCatalogue(categories)
    for spec in specs:
        if kind_of(spec).is_list:
            lengths = np.concatenate([np.diff(off) for off, _ in parts[spec.name]])
            values = np.concatenate([vals for _, vals in parts[spec.name]])
            starts = lengths_to_offsets(lengths)[:-1]
            catalogue.lists[spec.name] = Jagged(values, starts[position], lengths[position])
        else:
            catalogue.scalars[spec.name] = np.concatenate(parts[spec.name])[position]
    return catalogue
