"""Hand-built datasets in the public format for tests: small, exact and easy to break."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genctr_rec.data.schema import IMPRESSION_SCHEMA, ITEMS_SCHEMA, SEQUENCE_SCHEMA

# impression features of the simulator's toy preset (what a request to its models must carry)
TOY_FEATURES = {"user_segment": 2, "user_activity": 15.0, "user_interests": [1, 4]}
NUM_ITEMS = 50
NUM_CATEGORIES = 5
MAX_HISTORY = 8


def impression_table(n: int, first_row: int = 0, ts0: int = 0, seed: int = 0) -> pa.Table:
    """``n`` impressions whose user_id is the global row number, so every row is identifiable."""
    rng = np.random.default_rng(seed + first_row)
    item = rng.integers(0, NUM_ITEMS, n)
    lengths = rng.integers(0, MAX_HISTORY + 1, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    hist = rng.integers(0, NUM_ITEMS, int(lengths.sum()))
    return pa.table(
        {
            "user_id": np.arange(first_row, first_row + n, dtype=np.int64),
            "timestamp": ts0 + np.arange(n, dtype=np.int64),
            "item_id": item,
            "category_id": item % NUM_CATEGORIES,
            "query_category_id": rng.integers(0, NUM_CATEGORIES, n),
            "label": (rng.random(n) < 0.3).astype(np.int8),
            "hist_item_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(hist)),
            "hist_category_ids": pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(hist % NUM_CATEGORIES)
            ),
        },
        schema=IMPRESSION_SCHEMA,
    )


def write_dataset(
    root: Path,
    train_files: tuple[int, ...] = (300, 250, 177),
    test_rows: int = 120,
    row_group_size: int = 64,
    num_sequences: int = 90,
) -> Path:
    """A valid dataset with several train files of several row groups each."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(
        json.dumps(
            {
                "num_items": NUM_ITEMS,
                "num_categories": NUM_CATEGORIES,
                "max_history": MAX_HISTORY,
                "source": "test",
            }
        )
    )
    pq.write_table(
        pa.table(
            {"item_id": np.arange(NUM_ITEMS), "category_id": np.arange(NUM_ITEMS) % NUM_CATEGORIES},
            schema=ITEMS_SCHEMA,
        ),
        root / "items.parquet",
    )
    (root / "train").mkdir()
    first = 0
    for i, n in enumerate(train_files):
        pq.write_table(
            impression_table(n, first),
            root / "train" / f"part-{i:05d}.parquet",
            row_group_size=row_group_size,
        )
        first += n
    (root / "test").mkdir()
    pq.write_table(
        impression_table(test_rows, first, ts0=10_000),
        root / "test" / "part-0.parquet",
        row_group_size=row_group_size,
    )
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 15, num_sequences)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    items = rng.integers(0, NUM_ITEMS, int(lengths.sum()))
    (root / "sequences").mkdir()
    pq.write_table(
        pa.table(
            {
                "user_id": np.arange(num_sequences, dtype=np.int64),
                "item_ids": pa.ListArray.from_arrays(offsets, pa.array(items)),
                "category_ids": pa.ListArray.from_arrays(offsets, pa.array(items % NUM_CATEGORIES)),
                "timestamps": pa.ListArray.from_arrays(
                    offsets, pa.array(np.arange(int(lengths.sum())))
                ),
            },
            schema=SEQUENCE_SCHEMA,
        ),
        root / "sequences" / "part-0.parquet",
        row_group_size=32,
    )
    return root


def rewrite_column(path: Path, name: str, values: pa.Array | list) -> None:
    """Replace (or drop, with values=None) one column of a Parquet file in place."""
    table = pq.read_table(path)
    index = table.schema.get_field_index(name)
    if values is None:
        table = table.remove_column(index)
    else:
        array = values if isinstance(values, pa.Array) else pa.array(values)
        table = table.set_column(index, name, array)
    pq.write_table(table, path, row_group_size=64)


def jagged_embeddings(lengths: list[int], dim: int, seed: int):
    """Random item and category embeddings [N, dim] (leaves that take gradients) of a jagged
    batch with these row lengths, and the lengths as a tensor."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    items = torch.randn(n, dim, generator=g, requires_grad=True)
    cats = torch.randn(n, dim, generator=g, requires_grad=True)
    return items, cats, torch.tensor(lengths)


def grow_catalogue(source: Path, target: Path, new_items: int, new_categories: int = 0) -> Path:
    """A copy of dataset ``source`` whose catalogue gained ``new_items`` items (ids appended,
    each in category ``id % num_categories``) and ``new_categories`` categories: tomorrow's
    dataset of a warm start, whose old rows are today's."""
    import shutil

    shutil.copytree(source, target)
    meta = json.loads((target / "meta.json").read_text())
    old_items = meta["num_items"]
    meta["num_items"] = old_items + new_items
    meta["num_categories"] += new_categories
    items = pq.read_table(target / "items.parquet")
    added = {
        "item_id": np.arange(old_items, meta["num_items"], dtype=np.int64),
        "category_id": np.arange(old_items, meta["num_items"]) % meta["num_categories"],
    }
    for name in items.column_names[2:]:  # item features: the first value of the column
        added[name] = [items.column(name)[0].as_py()] * new_items
    grown = pa.concat_tables([items, pa.table(added, schema=items.schema)])
    pq.write_table(grown, target / "items.parquet")
    (target / "meta.json").write_text(json.dumps(meta))
    return target


def warning_record(w: warnings.WarningMessage) -> dict[str, Any]:
    """A raised warning as plain data (what ``built_once`` can hand to another worker)."""
    return {
        "category": w.category.__name__,
        "deprecation": issubclass(w.category, DeprecationWarning | FutureWarning),
        "message": str(w.message),
        "filename": w.filename,
        "lineno": w.lineno,
    }
