"""Raw int64 ids: a stable map from a log's ids to table rows, kept with the run.

A dataset may declare in meta.json ``"raw_ids": ["item_id", "user_id", "<id feature>", ...]``:
those ids are then any int64 values (a log's 64-bit ids), not rows, and ``num_items``,
``num_users`` and the features' ``vocab_size`` are not needed. A training run over it

1. maps each declared id space to rows (:class:`IdMap`): the rows of the run it continues
   (``--warm-start``, ``--init-from``) first, so an id keeps its row from day to day, then the
   ids that run never saw, in ascending order (the grown catalogue a warm start expects);
2. keeps the maps beside its checkpoints (``RUN/id_maps/<space>.parquet``: one column ``raw``,
   in row order) and
3. trains on ``RUN/dense-data``, the same dataset in the dense public format with every declared
   id replaced by its row, so that every reader, check, sampler and tool reads it unchanged.

Export copies the maps into the artifact and the predictor maps a request's raw ids through
them: an id no map holds is an unknown id (the default row; 422 with ``--unknown-ids reject``).

What each map holds: ``item_id``, every item of items.parquet (the catalogue defines the items:
an item id elsewhere that it lacks stops the run with the file, column and row), and the items
of the previous run that today's catalogue dropped (rows, categories and features kept);
``user_id``, the users of the impressions (train/, valid/, test/: a dense dataset's
``num_users`` counts its test users too), a pre-training sequence's other users reading the
shared default row; a feature, its values in the impressions (items.parquet for an item
feature). Categories stay dense (a small taxonomy).

Why not TorchRec's managed-collision modules (``MCHManagedCollisionModule``) here: see
``docs/data-format.md`` (what works on CPU fbgemm, measured, and why an exact map fits a
catalogue that only grows).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genctr_rec.data.checks import list_column, scalar_column
from genctr_rec.data.jagged import list_array
from genctr_rec.data.schema import (
    ITEMS_FILE,
    META_FILE,
    SEQUENCES_DIR,
    SPLITS,
    VALID_SPLIT,
    DataFormatError,
    DatasetMeta,
)
from genctr_rec.storage import location, open_parquet

ITEM = "item_id"
USER = "user_id"
ID_MAPS_DIR = "id_maps"
DENSE_DIR = "dense-data"
# the columns that hold each built-in space's ids, by file kind
ITEM_COLUMNS = {"items": ("item_id",), "impressions": ("item_id", "hist_item_ids"),
                "sequences": ("item_ids",)}  # fmt: skip
USER_COLUMNS = {"items": (), "impressions": ("user_id",), "sequences": ("user_id",)}


@dataclass(frozen=True)
class IdMap:
    """Raw ids in row order: ``raw[row]`` is the raw id of table row ``row``."""

    raw: np.ndarray

    def __len__(self) -> int:
        return len(self.raw)

    @cached_property
    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.raw, kind="stable")
        return self.raw[order], order

    def rows(self, values: np.ndarray) -> np.ndarray:
        """The row of each raw id in ``values``; -1 where the map does not hold it."""
        values = np.asarray(values, dtype=np.int64)
        keys, order = self._sorted
        if len(keys) == 0:
            return np.full(values.shape, -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
        return np.where(keys[at] == values, order[at], -1)

    def grown(self, seen: np.ndarray) -> IdMap:
        """This map and, after it, the ids of ``seen`` it lacks (ascending)."""
        new = np.setdiff1d(np.unique(np.asarray(seen, dtype=np.int64)), self.raw)
        return IdMap(np.concatenate([self.raw, new]))

    def write(self, path: Path) -> None:
        from genctr_rec.storage import write_bytes

        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"raw": pa.array(self.raw, pa.int64())}), sink)
        write_bytes(path, sink.getvalue().to_pybytes())

    @classmethod
    def read(cls, path: Path) -> IdMap:
        return cls(open_parquet(path).read(columns=["raw"]).column("raw").to_numpy())


@dataclass
class IdMaps:
    """Every raw id space of a dataset: ``item_id``, ``user_id`` and raw id features."""

    maps: dict[str, IdMap] = field(default_factory=dict)

    def __contains__(self, space: str) -> bool:
        return space in self.maps

    def __getitem__(self, space: str) -> IdMap:
        return self.maps[space]

    def sizes(self) -> dict[str, int]:
        return {space: len(m) for space, m in self.maps.items()}

    def write(self, directory: str | Path) -> None:
        """One Parquet file a space, each written whole (temporary name, then rename)."""
        from genctr_rec.storage import make_dirs

        directory = location(directory)
        make_dirs(directory)
        for space, m in self.maps.items():
            m.write(directory / f"{space}.parquet")

    @classmethod
    def read(cls, directory: str | Path) -> IdMaps:
        directory = location(directory)
        if not directory.is_dir():
            return cls()
        return cls({p.stem: IdMap.read(p) for p in sorted(directory.glob("*.parquet"))})


def _column_ids(path: Path, table: pa.Table, column: str, row0: int) -> np.ndarray:
    """A scalar or list id column's ids, nulls refused with the file, column and row."""
    if pa.types.is_list(table.schema.field(column).type) or pa.types.is_large_list(
        table.schema.field(column).type
    ):
        return list_column(path, table, column, row0)[1]
    return scalar_column(path, table, column, row0)


def _split_files(data: Path, split: str) -> list[Path]:
    directory = data / split
    return sorted(directory.glob("*.parquet")) if directory.is_dir() else []


def _read_ids(files: Iterable[Path], column: str) -> np.ndarray:
    """Every id of ``column`` in ``files`` (unique), read row group by row group."""
    seen: list[np.ndarray] = []
    for path in files:
        handle = _open(path)
        if column not in handle.schema_arrow.names:
            raise DataFormatError(path, "declared in meta.json's raw_ids but missing", column)
        row0 = 0
        for rg in range(handle.metadata.num_row_groups):
            table = handle.read_row_group(rg, columns=[column])
            seen.append(np.unique(_column_ids(path, table, column, row0)))
            row0 += table.num_rows
    return np.unique(np.concatenate(seen)) if seen else np.zeros(0, dtype=np.int64)


def _open(path: Path) -> pq.ParquetFile:
    try:
        return open_parquet(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataFormatError(path, f"not a readable Parquet file ({exc})") from exc


def build_maps(data: str | Path, meta: DatasetMeta, previous: IdMaps | None = None) -> IdMaps:
    """The maps of ``data``'s raw id spaces, continuing ``previous`` (rows kept)."""
    data = location(data)
    previous = previous or IdMaps()
    impressions = [
        *_split_files(data, "train"),
        *_split_files(data, VALID_SPLIT),
        *_split_files(data, "test"),
    ]
    items = [data / ITEMS_FILE]
    maps: dict[str, IdMap] = {}
    for space in meta.raw_ids:
        if space == ITEM:
            files, column = items, "item_id"
        elif space == USER:
            files, column = impressions, "user_id"
        else:
            spec = next(f for f in meta.features if f.name == space)
            files, column = (items if spec.where == "item" else impressions), space
        before = previous.maps.get(space, IdMap(np.zeros(0, dtype=np.int64)))
        maps[space] = before.grown(_read_ids(files, column))
    return IdMaps(maps)


@dataclass
class Translator:
    """Replaces a table's raw ids by rows, file by file (:func:`write_dense_view`)."""

    meta: DatasetMeta
    maps: IdMaps

    def unknown_row(self, space: str) -> int | None:
        """The row an id the map lacks reads (None: such an id is an error): a user only in
        the pre-training sequences reads the default user row."""
        return len(self.maps[space]) if space == USER else None

    def columns(self, kind: str, names: list[str]) -> list[tuple[str, str]]:
        """(space, column) pairs to translate in a file of ``kind`` with columns ``names``."""
        pairs = []
        for space in self.meta.raw_ids:
            if space == ITEM:
                cols = ITEM_COLUMNS[kind]
            elif space == USER:
                cols = USER_COLUMNS[kind]
            else:
                where = next(f.where for f in self.meta.features if f.name == space)
                wanted = "items" if where == "item" else "impressions"
                cols = (space,) if kind == wanted else ()
            pairs += [(space, c) for c in cols if c in names]
        return pairs

    def table(self, path: Path, table: pa.Table, row0: int, kind: str) -> pa.Table:
        for space, column in self.columns(kind, table.column_names):
            typ = table.schema.field(column).type
            is_list = pa.types.is_list(typ) or pa.types.is_large_list(typ)
            if is_list:
                offsets, raw = list_column(path, table, column, row0)
            else:
                offsets, raw = None, scalar_column(path, table, column, row0)
            rows = self.maps[space].rows(raw)
            missing = rows < 0
            if missing.any():
                fill = self.unknown_row(space)
                if fill is None:  # maps hold every item and value: the files changed
                    flat = int(np.flatnonzero(missing)[0])
                    row = (
                        flat
                        if offsets is None
                        else int(np.searchsorted(offsets, flat, side="right") - 1)
                    )
                    what = "item" if space == ITEM else "value"
                    where = "items.parquet" if space == ITEM else "the id map"
                    raise DataFormatError(
                        path, f"{what} {int(raw[flat])} is not in {where}", column, row0 + row
                    )
                rows[missing] = fill
            array = list_array(offsets, rows) if is_list else pa.array(rows, pa.int64())
            table = table.set_column(table.column_names.index(column), column, array)
        return table


def dense_meta(meta: DatasetMeta, maps: IdMaps, source: str) -> DatasetMeta:
    """meta.json of the dense view: vocabulary sizes from the maps, no raw_ids."""
    from dataclasses import replace

    features = [
        replace(f, vocab_size=len(maps[f.name])) if f.name in maps else f for f in meta.features
    ]
    return replace(
        meta,
        num_items=len(maps[ITEM]) if ITEM in maps else meta.num_items,
        num_users=len(maps[USER]) if USER in maps else meta.num_users,
        features=features,
        raw_ids=(),
        extra={**meta.extra, "dense_view_of": source},
    )


def _kind(relative: str) -> str:
    if relative == ITEMS_FILE:
        return "items"
    return "sequences" if relative.startswith(SEQUENCES_DIR) else "impressions"


def _retired_items(previous_view: str | None, maps: IdMaps, catalogue: pa.Table) -> pa.Table | None:
    """Rows of the previous run's dense catalogue whose items today's items.parquet dropped:
    their rows stay in the map, so the dense catalogue keeps them (category, features)."""
    if ITEM not in maps:
        return None
    present = np.zeros(len(maps[ITEM]), dtype=bool)
    present[catalogue.column("item_id").to_numpy()] = True
    if present.all():
        return None
    path = location(previous_view) / ITEMS_FILE if previous_view else None
    if path is None or not path.is_file():
        first = int(maps[ITEM].raw[np.flatnonzero(~present)[0]])
        raise DataFormatError(
            ITEMS_FILE,
            f"item {first} of the previous run's map is missing, and that run's dense view "
            f"({previous_view}) is gone: list retired items in items.parquet",
            "item_id",
        )
    old = pq.read_table(path.open("rb")).select(catalogue.column_names)
    keep = pc.is_in(old.column("item_id"), pa.array(np.flatnonzero(~present)))
    return old.filter(keep).cast(catalogue.schema)


def write_dense_view(
    data: str | Path,
    meta: DatasetMeta,
    maps: IdMaps,
    out: str | Path,
    previous_view: str | None = None,
) -> None:
    """``data`` with its raw ids replaced by rows, as a dataset in the dense public format at
    ``out``: written whole under a temporary name (object storage: meta.json last), row group
    by row group (memory stays flat; the row groups, which ranks split on, are the source's)."""
    from genctr_rec.storage import publish

    source = location(data)
    translate = Translator(meta, maps)
    with publish(out, overwrite=True, marker=META_FILE, last=META_FILE) as tmp:
        relatives = [ITEMS_FILE] + [
            f"{split}/{p.name}"
            for split in (*SPLITS, VALID_SPLIT, SEQUENCES_DIR)
            for p in _split_files(source, split)
        ]
        for relative in relatives:
            path = source / relative
            handle = _open(path)
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            writer, row0 = None, 0
            try:
                for rg in range(handle.metadata.num_row_groups):
                    table = translate.table(path, handle.read_row_group(rg), row0, _kind(relative))
                    row0 += table.num_rows
                    if writer is None:
                        writer = pq.ParquetWriter(target, table.schema, compression="lz4")
                    writer.write_table(table, row_group_size=max(table.num_rows, 1))
            finally:
                if writer is not None:
                    writer.close()
            if relative == ITEMS_FILE:
                catalogue = pq.read_table(target)
                retired = _retired_items(previous_view, maps, catalogue)
                if retired is not None:
                    pq.write_table(pa.concat_tables([catalogue, retired]), target)
        dense_meta(meta, maps, str(data)).write(tmp)
