"""Parquet output of the dataset recipes: bounded files written row group by row group.

A recipe writes into the staging directory of ``storage.publish``, so that one that fails
half-way (bad source file, full disk, Ctrl-C) leaves nothing behind and an existing dataset is
replaced only once the new one is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Low-cardinality columns only: dictionary pages for million-item id columns cost decode time.
DICTIONARY_COLUMNS = [
    "category_id",
    "query_category_id",
    "label",
    "hist_category_ids",
    "category_ids",
]


@dataclass
class DatasetCut:
    """One dataset a recipe writes from a longer log: events in ``[train_from, test_from)`` train
    it, ``[test_from, test_until)`` test it (and events before ``test_from`` make its
    sequences); ids below ``num_items`` / ``num_users`` are its catalogue; ``extra`` goes to
    its card. A static recipe writes one cut, a ``--days`` recipe one per day."""

    directory: Path
    train_from: int
    test_from: int
    test_until: int
    num_items: int
    num_users: int
    extra: dict = field(default_factory=dict)


class PartitionWriter:
    """Streams tables into ``DIR/part-NNNNN.parquet`` files of bounded size, row group by row group.

    Memory stays flat: each :meth:`write` appends row groups to the open file and starts a new
    file every ``rows_per_file`` rows.
    """

    def __init__(
        self,
        directory: Path,
        schema: pa.Schema,
        row_group_size: int = 65_536,
        rows_per_file: int = 4_000_000,
        compression: str = "lz4",
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.row_group_size = row_group_size
        self.rows_per_file = rows_per_file
        self.compression = compression
        self.rows_written = 0
        self._file_index = 0
        self._rows_in_file = 0
        self._writer: pq.ParquetWriter | None = None

    def _open(self) -> pq.ParquetWriter:
        path = self.directory / f"part-{self._file_index:05d}.parquet"
        self._file_index += 1
        self._rows_in_file = 0
        dictionary = [c for c in DICTIONARY_COLUMNS if c in self.schema.names]
        return pq.ParquetWriter(
            path, self.schema, compression=self.compression, use_dictionary=dictionary
        )

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        start = 0
        while start < table.num_rows:
            if self._writer is None or self._rows_in_file >= self.rows_per_file:
                self.close()
                self._writer = self._open()
            take = min(table.num_rows - start, self.rows_per_file - self._rows_in_file)
            self._writer.write_table(table.slice(start, take), row_group_size=self.row_group_size)
            self._rows_in_file += take
            self.rows_written += take
            start += take

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> PartitionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
