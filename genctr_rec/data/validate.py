"""``genctr data validate``: check a dataset directory against the contract and summarise it.

Streams every row group once (memory stays flat), runs the same column checks the readers run,
and adds the checks that need the whole dataset: dense item table, histories no longer than
``max_history`` and strictly earlier than their impression (when ``hist_timestamps`` is
present), impression categories matching the item table, test strictly after train, and no
pre-training sequence reaching into the test period.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from genctr_rec.data.catalogue import read_item_catalogue, row_groups
from genctr_rec.data.checks import (
    check_oldest_first,
    check_range,
    check_same_lengths,
    label_column,
    list_column,
    scalar_column,
)
from genctr_rec.data.kinds import feature_column
from genctr_rec.data.schema import (
    HIST_TIMESTAMPS,
    IMPRESSION_SCHEMA,
    SEQUENCE_SCHEMA,
    VALID_SPLIT,
    DataFormatError,
    DatasetMeta,
    split_files,
)
from genctr_rec.progress import Progress
from genctr_rec.storage import location


@dataclass
class SplitSummary:
    rows: int = 0
    clicks: int = 0
    users: set[int] = field(default_factory=set)
    items: set[int] = field(default_factory=set)
    hist_lengths: list[np.ndarray] = field(default_factory=list)
    min_ts: int | None = None
    max_ts: int | None = None
    causality_checked: bool = False

    def report(self) -> dict[str, Any]:
        lengths = np.concatenate(self.hist_lengths) if self.hist_lengths else np.zeros(1)
        pct = np.percentile(lengths, [50, 90, 99]).tolist()
        return {
            "rows": self.rows,
            "users": len(self.users),
            "items": len(self.items),
            "click_rate": round(self.clicks / max(self.rows, 1), 5),
            "history_length": {
                "p50": pct[0],
                "p90": pct[1],
                "p99": pct[2],
                "max": int(lengths.max()),
            },
            "timestamps": [self.min_ts, self.max_ts],
            "history_causality": "checked"
            if self.causality_checked
            else "not checked (no hist_timestamps column)",
        }


def _track_time(summary: SplitSummary, ts: np.ndarray) -> None:
    if ts.size:
        lo, hi = int(ts.min()), int(ts.max())
        summary.min_ts = lo if summary.min_ts is None else min(summary.min_ts, lo)
        summary.max_ts = hi if summary.max_ts is None else max(summary.max_ts, hi)


def _validate_impressions(
    path: Path, meta: DatasetMeta, item_category: np.ndarray, summary: SplitSummary
) -> None:
    declared = [f for f in meta.features if f.where == "impression"]
    extra = [HIST_TIMESTAMPS] + [f.name for f in declared]
    for table, row0 in row_groups(path, IMPRESSION_SCHEMA, extra):
        for spec in declared:
            feature_column(path, table, spec, row0)
        items = scalar_column(path, table, "item_id", row0)
        check_range(path, "item_id", items, meta.num_items, row0)
        cats = scalar_column(path, table, "category_id", row0)
        check_range(path, "category_id", cats, meta.num_categories, row0)
        mismatch = item_category[items] != cats
        if mismatch.any():
            r = int(np.flatnonzero(mismatch)[0])
            raise DataFormatError(
                path,
                f"item {items[r]} has category {item_category[items[r]]} in items.parquet, "
                f"not {cats[r]}",
                "category_id",
                row0 + r,
            )
        query = scalar_column(path, table, "query_category_id", row0)
        check_range(path, "query_category_id", query, meta.num_categories, row0)
        labels = label_column(path, table, row0)
        users = scalar_column(path, table, "user_id", row0)
        check_range(path, "user_id", users, meta.num_users or np.iinfo(np.int64).max, row0)
        ts = scalar_column(path, table, "timestamp", row0)
        h_off, h_items = list_column(path, table, "hist_item_ids", row0)
        c_off, h_cats = list_column(path, table, "hist_category_ids", row0)
        check_same_lengths(path, "hist_item_ids", h_off, "hist_category_ids", c_off, row0)
        check_range(path, "hist_item_ids", h_items, meta.num_items, row0, h_off)
        check_range(path, "hist_category_ids", h_cats, meta.num_categories, row0, c_off)
        lengths = np.diff(h_off)
        too_long = lengths > meta.max_history
        if too_long.any():
            r = int(np.flatnonzero(too_long)[0])
            raise DataFormatError(
                path,
                f"history of {lengths[r]} exceeds max_history={meta.max_history} from meta.json",
                "hist_item_ids",
                row0 + r,
            )
        if HIST_TIMESTAMPS in table.column_names:
            t_off, h_ts = list_column(path, table, HIST_TIMESTAMPS, row0)
            check_same_lengths(path, "hist_item_ids", h_off, HIST_TIMESTAMPS, t_off, row0)
            late = h_ts >= np.repeat(ts, lengths)
            if late.any():
                r = int(np.searchsorted(h_off, np.flatnonzero(late)[0], side="right") - 1)
                raise DataFormatError(
                    path,
                    "history holds behaviour at or after the impression's timestamp",
                    HIST_TIMESTAMPS,
                    row0 + r,
                )
            summary.causality_checked = True
        summary.rows += len(items)
        summary.clicks += int(labels.sum())
        summary.users.update(np.unique(users).tolist())
        summary.items.update(np.unique(items).tolist())
        summary.hist_lengths.append(lengths.astype(np.int32))
        _track_time(summary, ts)


def _validate_sequences(path: Path, meta: DatasetMeta, summary: SplitSummary) -> None:
    for table, row0 in row_groups(path, SEQUENCE_SCHEMA):
        users = scalar_column(path, table, "user_id", row0)
        i_off, items = list_column(path, table, "item_ids", row0)
        c_off, cats = list_column(path, table, "category_ids", row0)
        t_off, ts = list_column(path, table, "timestamps", row0)
        check_same_lengths(path, "item_ids", i_off, "category_ids", c_off, row0)
        check_same_lengths(path, "item_ids", i_off, "timestamps", t_off, row0)
        check_range(path, "item_ids", items, meta.num_items, row0, i_off)
        check_range(path, "category_ids", cats, meta.num_categories, row0, c_off)
        check_oldest_first(path, "timestamps", t_off, ts, row0)
        dup = summary.users.intersection(users.tolist()) if summary.rows else set()
        if dup or len(np.unique(users)) != len(users):
            raise DataFormatError(path, "user_id appears in more than one sequence row", "user_id")
        summary.rows += len(users)
        summary.users.update(users.tolist())
        summary.items.update(np.unique(items).tolist())
        summary.hist_lengths.append(np.diff(i_off).astype(np.int32))
        _track_time(summary, ts)


def validate_dataset(data_dir: str | Path) -> dict[str, Any]:
    """Check ``data_dir`` against the public format. Returns a summary; raises DataFormatError."""
    data_dir = location(data_dir)
    if not data_dir.is_dir():
        raise DataFormatError(data_dir, "dataset directory does not exist")
    meta = DatasetMeta.read(data_dir)
    if meta.raw_ids:
        return _validate_raw(data_dir, meta)
    return _validate_dense(data_dir, meta)


def _validate_raw(data_dir: Path, meta: DatasetMeta) -> dict[str, Any]:
    """A dataset of raw ids: mapped as a run would map it (``data/id_maps.py``), then its
    dense view checked; an error names the source file (the view's have the same names)."""
    import tempfile

    from genctr_rec.data.id_maps import build_maps, write_dense_view

    maps = build_maps(data_dir, meta)
    with tempfile.TemporaryDirectory(prefix="genctr-validate-") as tmp:
        view = Path(tmp) / "dense"
        write_dense_view(data_dir, meta, maps, view)
        try:
            report = _validate_dense(view, DatasetMeta.read(view))
        except DataFormatError as exc:
            inside = Path(exc.path)
            path = data_dir / inside.relative_to(view) if inside.is_relative_to(view) else inside
            raise DataFormatError(path, exc.message, exc.column, exc.row) from None
    report["meta"] = meta.to_json()
    report["raw_ids"] = maps.sizes()
    return report


def _validate_dense(data_dir: Path, meta: DatasetMeta) -> dict[str, Any]:
    item_category = read_item_catalogue(data_dir, meta).categories
    report: dict[str, Any] = {
        "meta": meta.to_json(),
        "categories_used": int(len(np.unique(item_category))),
    }
    summaries: dict[str, SplitSummary] = {}
    splits = ["train", "test"] + ([VALID_SPLIT] if (data_dir / VALID_SPLIT).is_dir() else [])
    files = {split: split_files(data_dir, split) for split in [*splits, "sequences"]}
    progress = Progress(f"validate {data_dir}", sum(map(len, files.values())), "file")
    for split in splits:
        summary = SplitSummary()
        for path in files[split]:
            _validate_impressions(path, meta, item_category, summary)
            progress.update(1, rows=f"{summary.rows:,}")
        if summary.rows == 0:
            raise DataFormatError(data_dir / split, f"the '{split}' split holds no rows")
        summaries[split] = summary
    seq = SplitSummary()
    for path in files["sequences"]:
        _validate_sequences(path, meta, seq)
        progress.update(1)
    progress.close()
    if seq.rows == 0:
        raise DataFormatError(data_dir / "sequences", "the pre-training corpus holds no rows")
    train, test = summaries["train"], summaries["test"]
    if train.max_ts >= test.min_ts:
        raise DataFormatError(
            data_dir / "test",
            f"test must be strictly later than train: earliest test timestamp "
            f"{test.min_ts} <= latest train timestamp {train.max_ts}",
            "timestamp",
        )
    if seq.max_ts is not None and seq.max_ts >= test.min_ts:
        raise DataFormatError(
            data_dir / "sequences",
            f"pre-training sequences reach into the test period "
            f"(timestamp {seq.max_ts} >= first test timestamp {test.min_ts})",
            "timestamps",
        )
    if VALID_SPLIT in summaries and summaries[VALID_SPLIT].max_ts >= test.min_ts:
        raise DataFormatError(
            data_dir / VALID_SPLIT,
            f"validation must be earlier than test: latest valid timestamp "
            f"{summaries[VALID_SPLIT].max_ts} >= earliest test timestamp {test.min_ts}",
            "timestamp",
        )
    report.update({split: summary.report() for split, summary in summaries.items()})
    report["sequences"] = seq.report()
    report["sequences"].pop("click_rate")
    report["sequences"].pop("history_causality")
    return report
