"""The public dataset format (docs/data-format.md): Arrow schemas, ``meta.json`` and the error type.

A dataset is a directory ``DATA/`` with ``meta.json``, ``items.parquet``, ``sequences/``,
``train/`` and ``test/``. Other tools write this format, so every reader checks it and every
error names the file, the column and the first offending row.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from genctr_rec.data.features import FeatureSpec, FeatureSpecError, parse_features
from genctr_rec.storage import location

ITEMS_FILE = "items.parquet"
META_FILE = "meta.json"
SPLITS = ("train", "test")
VALID_SPLIT = "valid"  # optional: a validation split; else the newest slice of train/
SEQUENCES_DIR = "sequences"

ITEMS_SCHEMA = pa.schema([("item_id", pa.int64()), ("category_id", pa.int64())])
SEQUENCE_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_ids", pa.list_(pa.int64())),
        ("category_ids", pa.list_(pa.int64())),
        ("timestamps", pa.list_(pa.int64())),
    ]
)
IMPRESSION_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("timestamp", pa.int64()),
        ("item_id", pa.int64()),
        ("category_id", pa.int64()),
        ("query_category_id", pa.int64()),
        ("label", pa.int8()),
        ("hist_item_ids", pa.list_(pa.int64())),
        ("hist_category_ids", pa.list_(pa.int64())),
    ]
)
# Optional extra column our own recipes write so that `validate` can prove causality.
HIST_TIMESTAMPS = "hist_timestamps"

# Which id columns index which vocabulary, per file kind.
ITEM_ID_COLUMNS = {"item_id", "hist_item_ids", "item_ids"}
CATEGORY_ID_COLUMNS = {"category_id", "query_category_id", "hist_category_ids", "category_ids"}


class DataFormatError(ValueError):
    """A dataset breaks the public format. Names the file, the column and the first bad row."""

    def __init__(
        self, path: str | Path, message: str, column: str | None = None, row: int | None = None
    ) -> None:
        self.path = str(path)
        self.message = message
        self.column = column
        self.row = row
        where = self.path
        if column is not None:
            where += f", column '{column}'"
        if row is not None:
            where += f", row {row}"
        super().__init__(f"{where}: {message}")


@dataclass
class DatasetMeta:
    """Contents of ``meta.json``: the vocabulary sizes every reader and model is built from,
    and the declared side features (``docs/data-format.md``)."""

    num_items: int
    num_categories: int
    max_history: int
    source: str
    extra: dict[str, Any] = field(default_factory=dict)
    num_users: int | None = None
    features: list[FeatureSpec] = field(default_factory=list)
    # id spaces whose columns hold a log's raw int64 ids (data/id_maps.py): "item_id",
    # "user_id", names of id / ids features
    raw_ids: tuple[str, ...] = ()

    REQUIRED = ("num_items", "num_categories", "max_history", "source")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        extra = out.pop("extra")
        out.pop("features")
        out.pop("raw_ids")
        if self.num_users is None:
            out.pop("num_users")
        if self.features:
            out["features"] = [f.to_json() for f in self.features]
        if self.raw_ids:
            out["raw_ids"] = list(self.raw_ids)
        out.update(extra)
        return out

    def write(self, directory: Path) -> None:
        (Path(directory) / META_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def read(cls, directory: str | Path) -> DatasetMeta:
        path = location(directory) / META_FILE
        if not path.is_file():
            raise DataFormatError(path, "meta.json is missing; every dataset directory needs one")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, f"not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise DataFormatError(path, "must hold a JSON object")
        raw_ids = _raw_ids(path, raw.get("raw_ids", []), raw.get("features"))
        if "item_id" in raw_ids:  # the id map counts the items
            raw = {"num_items": 1, **raw}
        for key in cls.REQUIRED:
            if key not in raw:
                raise DataFormatError(path, "required key is missing", column=key)
        for key in ("num_items", "num_categories", "max_history"):
            value = raw[key]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise DataFormatError(path, f"must be a positive integer, got {value!r}", key)
        num_users = raw.get("num_users")
        if num_users is not None and (
            not isinstance(num_users, int) or isinstance(num_users, bool) or num_users <= 0
        ):
            raise DataFormatError(
                path, f"must be a positive integer, got {num_users!r}", "num_users"
            )
        try:
            features = parse_features(raw.get("features"), raw_ids=set(raw_ids))
        except FeatureSpecError as exc:
            raise DataFormatError(
                path, f"{exc} (see docs/data-format.md)", column=exc.field
            ) from None
        known = (*cls.REQUIRED, "num_users", "features", "raw_ids")
        extra = {k: v for k, v in raw.items() if k not in known}
        return cls(
            num_items=raw["num_items"],
            num_categories=raw["num_categories"],
            max_history=raw["max_history"],
            source=str(raw["source"]),
            extra=extra,
            num_users=num_users,
            features=features,
            raw_ids=raw_ids,
        )


def _raw_ids(path: Path, raw: Any, features: Any) -> tuple[str, ...]:
    """meta.json's ``raw_ids``: ``item_id``, ``user_id`` or the name of a declared ``id`` /
    ``ids`` feature, each once."""
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise DataFormatError(path, f"must be a list of id names, got {raw!r}", "raw_ids")
    declared = {
        f.get("name"): f.get("kind")
        for f in (features if isinstance(features, list) else [])
        if isinstance(f, dict)
    }
    for space in raw:
        if space not in ("item_id", "user_id") and declared.get(space) not in ("id", "ids"):
            raise DataFormatError(
                path,
                f"{space!r} is neither item_id, user_id nor a declared id / ids feature",
                "raw_ids",
            )
    if len(set(raw)) != len(raw):
        raise DataFormatError(path, "an id space is named twice", "raw_ids")
    return tuple(raw)


def split_files(directory: str | Path, split: str) -> list[Path]:
    """The Parquet files of one split (``train``, ``test`` or ``sequences``), sorted by name."""
    split_dir = location(directory) / split
    if not split_dir.is_dir():
        raise DataFormatError(split_dir, f"the '{split}' directory is missing")
    files = sorted(split_dir.glob("*.parquet"))
    if not files:
        raise DataFormatError(split_dir, f"the '{split}' directory holds no .parquet file")
    return files
