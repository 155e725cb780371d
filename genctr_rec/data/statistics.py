"""What a run learns from its training data before it builds a model: the user vocabulary and
the dense features' standardisation, resolved into a :class:`FeatureSchema`.

They read the dataset (train/, items.parquet) through the readers' checks, so they sit above
the format's modules (schema, features, checks, catalogue), which never read a dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genctr_rec.data.catalogue import row_groups
from genctr_rec.data.features import USER_ID, FeatureSchema, FeatureSpec
from genctr_rec.data.kinds import feature_column, kind_of
from genctr_rec.data.schema import ITEMS_FILE, DatasetMeta, split_files
from genctr_rec.storage import location


def resolve_features(meta: DatasetMeta, directory: str | Path) -> FeatureSchema:
    """The user vocabulary (declared, or from train/), the declared features and the
    statistics of the dense ones."""
    return FeatureSchema(
        user_vocabulary(directory, meta.num_users),
        tuple(meta.features),
        dense_statistics(directory, meta.features),
    )


def user_vocabulary(data_dir: str | Path, declared: int | None) -> int:
    """Users with their own row: meta.json's ``num_users`` when given, else the largest
    ``user_id`` in train/ + 1 (read from one column; unseen users share the default row)."""
    if declared is not None:
        return declared
    largest = -1
    only_users = pa.schema([(USER_ID, pa.int64())])  # checked like every reader checks it
    for path in split_files(data_dir, "train"):
        for table, _ in row_groups(path, only_users):
            value = pc.max(table.column(USER_ID)).as_py()
            if value is not None:
                largest = max(largest, int(value))
    return largest + 1


def dense_statistics(data_dir: str | Path, features: list[FeatureSpec]) -> dict[str, tuple]:
    """Mean and standard deviation (1 where constant) of each dense feature: impression ones
    over train/, item ones over items.parquet. Reads those columns only."""
    stats = {}
    for spec in features:
        if kind_of(spec).sparse:
            continue
        files = (
            split_files(data_dir, "train")
            if spec.where == "impression"
            else [location(data_dir) / ITEMS_FILE]
        )
        # each value checked as the readers check it: a missing column or a NaN names its file
        parts = [
            feature_column(path, table, spec, row0)
            for path in files
            for table, row0 in row_groups(path, pa.schema([]), feature=spec)
        ]
        values = np.concatenate(parts).astype(np.float64)
        std = float(values.std()) if len(values) else 1.0
        stats[spec.name] = (float(values.mean()) if len(values) else 0.0, std if std > 0 else 1.0)
    return stats
