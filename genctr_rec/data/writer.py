"""Atomic dataset output: everything is written under a temporary name, then renamed.

A dataset recipe that fails half-way (bad source file, full disk, Ctrl-C) leaves nothing
behind, and an existing dataset is replaced only once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from genctr_rec.storage import shared_permissions

# Low-cardinality columns only: dictionary pages for million-item id columns cost decode time.
DICTIONARY_COLUMNS = [
    "category_id",
    "query_category_id",
    "label",
    "hist_category_ids",
    "category_ids",
]


def check_replaceable(target: str | Path, overwrite: bool, marker: str | None = None) -> None:
    """Refuse an existing ``target`` unless ``overwrite``; and even then, unless it holds
    ``marker`` (the file our own tool writes there): --overwrite replaces what we wrote, never
    a directory of the user's."""
    from genctr_rec.storage import location

    target = location(target)
    if not target.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    if marker is not None and not (target / marker).is_file():
        raise FileExistsError(
            f"{target} exists and has no {marker}: it was not written by genctr, so --overwrite "
            "will not delete it; choose another path"
        )


@contextmanager
def atomic_directory(
    target: str | Path, overwrite: bool = False, marker: str | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``target`` only if the block succeeds
    (``marker``: see :func:`check_replaceable`)."""
    target = Path(target)
    check_replaceable(target, overwrite, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        shared_permissions(tmp)  # mkdtemp's 0700 would hide it from other users
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file under a temporary name in the same directory, then rename it (on
    object storage: one PUT, which is all or nothing by itself)."""
    from genctr_rec.storage import location, make_dirs, write_bytes

    target = location(path)
    make_dirs(target.parent)
    write_bytes(target, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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


@contextmanager
def dataset_destination(out: str | Path, overwrite: bool, marker: str) -> Iterator[Path]:
    """Where a dataset recipe writes: ``out`` itself on local disk (the recipe renames into
    place); for a URL, a local staging directory uploaded when the recipe succeeds, ``marker``
    (meta.json) last, so a reader never takes a partial upload for a dataset."""
    from genctr_rec.storage import is_url, location, remove_tree, upload_tree

    if not is_url(out):
        yield Path(out)
        return
    target = location(out)
    check_replaceable(target, overwrite, marker)
    with tempfile.TemporaryDirectory(prefix="genctr-dataset-") as staging:
        local = Path(staging) / "dataset"
        yield local
        (target / marker).unlink(missing_ok=True)
        remove_tree(target)
        upload_tree(local, target, last=marker)
