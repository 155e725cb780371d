"""Rank-aware, seeded, resumable streaming over the row groups of a split's Parquet files.

How an epoch is laid out (the same on every rank, so no communication is needed):

1. The split's row groups are listed from Parquet metadata (no data read) and, when shuffling,
   permuted with ``rng(seed, epoch)``. Concatenated, they form one global row order.
2. Rank ``r`` of ``W`` owns the contiguous range ``[r*N//W, (r+1)*N//W)`` of that order, so every
   row is read exactly once per epoch across ranks, and each rank reads only its own row groups.
3. A rank reads its pieces ``shuffle_window`` row groups at a time, permutes the rows of that
   window with ``rng(seed, epoch, rank, window)`` and cuts batches from the stream.
4. Every rank yields the same number of batches (training collectives need that): ranks with a
   row fewer spread their rows over the same count of batches.

The position saved by :meth:`state_dict` is (epoch, batches done); restoring it skips whole
windows without reading them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genctr_rec.data.checks import check_schema
from genctr_rec.data.jagged import gather_ranges, lengths_to_offsets
from genctr_rec.data.schema import DataFormatError
from genctr_rec.storage import location, open_parquet

logger = logging.getLogger(__name__)


@dataclass
class Jagged:
    """A list column of its own layout (a multi-valued side feature): row i holds
    ``values[starts[i] : starts[i] + lengths[i]]``. Row operations touch indices only."""

    values: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    def rows(self, rows: np.ndarray | slice) -> Jagged:
        return Jagged(self.values, self.starts[rows], self.lengths[rows])

    def flat_index(self) -> np.ndarray:
        return gather_ranges(self.starts, self.lengths)

    def compact(self) -> Jagged:
        return Jagged(
            self.values[self.flat_index()], lengths_to_offsets(self.lengths)[:-1], self.lengths
        )

    @staticmethod
    def concat(parts: list[Jagged]) -> Jagged:
        parts = [p.compact() if len(p.values) > 2 * p.lengths.sum() else p for p in parts]
        shift = np.cumsum([0] + [len(p.values) for p in parts[:-1]])
        return Jagged(
            np.concatenate([p.values for p in parts]),
            np.concatenate([p.starts + s for p, s in zip(parts, shift, strict=True)]),
            np.concatenate([p.lengths for p in parts]),
        )


@dataclass
class Columns:
    """A block of rows in numpy: scalar columns and jagged list columns sharing one layout.

    List columns named in one group share offsets (items and their categories), stored once as
    ``starts``/``lengths`` into ``values`` so that truncation and permutation touch only indices.
    ``lists`` holds list columns with layouts of their own (multi-valued side features).
    """

    scalars: dict[str, np.ndarray]
    list_values: dict[str, np.ndarray]
    starts: np.ndarray
    lengths: np.ndarray
    lists: dict[str, Jagged] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return len(self.lengths)

    def reorder(self, rows: np.ndarray) -> Columns:
        """Rows by index (a permutation) as a view: list values are shared, not gathered."""
        return Columns(
            scalars={k: v[rows] for k, v in self.scalars.items()},
            list_values=self.list_values,
            starts=self.starts[rows],
            lengths=self.lengths[rows],
            lists={k: v.rows(rows) for k, v in self.lists.items()},
        )

    def take(self, rows: np.ndarray) -> Columns:
        """Rows by index; list values are gathered into a compact block."""
        starts, lengths = self.starts[rows], self.lengths[rows]
        flat = gather_ranges(starts, lengths)
        return Columns(
            scalars={k: v[rows] for k, v in self.scalars.items()},
            list_values={k: v[flat] for k, v in self.list_values.items()},
            starts=lengths_to_offsets(lengths)[:-1],
            lengths=lengths,
            lists={k: v.rows(rows).compact() for k, v in self.lists.items()},
        )

    def slice(self, start: int, stop: int | None = None) -> Columns:
        """A view of rows ``[start, stop)``: list values are shared, nothing is copied."""
        return Columns(
            scalars={k: v[start:stop] for k, v in self.scalars.items()},
            list_values=self.list_values,
            starts=self.starts[start:stop],
            lengths=self.lengths[start:stop],
            lists={k: v.rows(slice(start, stop)) for k, v in self.lists.items()},
        )

    def num_values(self) -> int:
        """Length of the (possibly shared) list value arrays."""
        return len(next(iter(self.list_values.values()), ()))

    def flat_index(self) -> np.ndarray:
        """Indices into ``list_values`` of every row's elements, in row order."""
        return gather_ranges(self.starts, self.lengths)

    def compact(self) -> Columns:
        """The same rows with list values gathered contiguously (drops what a view skips)."""
        return self.take(np.arange(self.num_rows))

    @staticmethod
    def concat(blocks: list[Columns]) -> Columns:
        if len(blocks) == 1:
            return blocks[0]
        # a leftover view that references far more values than it uses is compacted first
        blocks = [b.compact() if b.num_values() > 2 * b.lengths.sum() else b for b in blocks]
        shift = np.cumsum([0] + [b.num_values() for b in blocks[:-1]])
        return Columns(
            scalars={k: np.concatenate([b.scalars[k] for b in blocks]) for k in blocks[0].scalars},
            list_values={
                k: np.concatenate([b.list_values[k] for b in blocks]) for k in blocks[0].list_values
            },
            starts=np.concatenate([b.starts + s for b, s in zip(blocks, shift, strict=True)]),
            lengths=np.concatenate([b.lengths for b in blocks]),
            lists={k: Jagged.concat([b.lists[k] for b in blocks]) for k in blocks[0].lists},
        )


# Decodes one Arrow table (a row-group slice of `path` starting at file row `row0`) to Columns.
Decoder = Callable[[Path, pa.Table, int], Columns]


@dataclass(frozen=True)
class _Piece:
    file_index: int
    row_group: int
    start: int  # first (selected) row within the row group
    stop: int
    file_row0: int  # file row number of the row group's first row
    selected: np.ndarray | None = None  # row-group rows kept by a selection, or all


class ParquetStream:
    """Streams a split's rows as shuffled :class:`Columns` batches for one rank.

    Args:
        files: the split's Parquet files.
        schema: columns that must be present (checked on every file, by name and type).
        decoder: turns an Arrow table into :class:`Columns`, checking values.
        batch_size: rows per batch (per rank).
        rank, world_size: this process's share of the rows.
        seed: shuffling seed; the order is a function of (seed, epoch, world_size).
        shuffle: permute row groups and rows within windows.
        shuffle_window: row groups mixed together when shuffling rows.
        selection: optional boolean mask per file (over the file's rows): only those rows
            are streamed (a time slice of a split, e.g. the validation slice of train/).
            Batching, the rank split and resume work on the selected rows alone.
        columns: columns to read (default: the schema's); those beyond the schema are
            declared side features, checked by the decoder.
    """

    def __init__(
        self,
        files: list[Path],
        schema: pa.Schema,
        decoder: Decoder,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 4,
        selection: list[np.ndarray] | None = None,
        columns: list[str] | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.files = [location(f) for f in files]
        self.schema = schema
        self.decoder = decoder
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_window = max(1, shuffle_window)
        self.columns = list(columns or schema.names)
        self._handles: dict[int, pq.ParquetFile] = {}
        # (file, row group, rows streamed, file_row0, selected rows of the group or None)
        self._units: list[tuple[int, int, int, int, np.ndarray | None]] = []
        for index, path in enumerate(self.files):
            handle = self._open(index)
            check_schema(path, handle.schema_arrow, schema)
            for name in self.columns:
                if name not in handle.schema_arrow.names:
                    raise DataFormatError(
                        path,
                        "declared in meta.json's features but missing "
                        f"(file has: {', '.join(handle.schema_arrow.names)})",
                        name,
                    )
            row0 = 0
            for rg in range(handle.metadata.num_row_groups):
                rows = handle.metadata.row_group(rg).num_rows
                kept = None
                if selection is not None:
                    kept = np.flatnonzero(selection[index][row0 : row0 + rows])
                    if len(kept) == rows:
                        kept = None
                n = rows if kept is None else len(kept)
                if n:
                    self._units.append((index, rg, n, row0, kept))
                row0 += rows
        self.num_rows = sum(u[2] for u in self._units)
        if self.num_rows < world_size:
            where = self.files[0].parent if self.files else "dataset"
            chosen = " selected" if selection is not None else ""
            raise DataFormatError(
                where,
                f"has {self.num_rows}{chosen} rows, fewer than the {world_size} ranks reading it",
            )
        self.epoch = 0
        self._batches_done = 0

    def _open(self, index: int) -> pq.ParquetFile:
        if index not in self._handles:
            path = self.files[index]
            try:
                self._handles[index] = open_parquet(path)
            except (pa.ArrowException, OSError) as exc:
                raise DataFormatError(path, f"not a readable Parquet file ({exc})") from exc
        return self._handles[index]

    # ---- epoch layout -------------------------------------------------------------------
    def _rank_rows(self, rank: int) -> tuple[int, int]:
        return rank * self.num_rows // self.world_size, (
            rank + 1
        ) * self.num_rows // self.world_size

    def __len__(self) -> int:
        """Batches per epoch, identical on every rank."""
        return math.ceil(math.ceil(self.num_rows / self.world_size) / self.batch_size)

    def _batch_bounds(self) -> np.ndarray:
        lo, hi = self._rank_rows(self.rank)
        rows, count = hi - lo, len(self)
        if rows > (count - 1) * self.batch_size:
            bounds = np.minimum(np.arange(count + 1) * self.batch_size, rows)
        else:  # one row short of a full last batch: spread rows so that no batch is empty
            bounds = np.arange(count + 1) * rows // count
        return bounds

    def _pieces(self) -> list[_Piece]:
        order = np.arange(len(self._units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        lo, hi = self._rank_rows(self.rank)
        pieces, g0 = [], 0
        for k in order:
            file_index, rg, rows, row0, kept = self._units[k]
            a, b = max(lo, g0), min(hi, g0 + rows)
            if a < b:
                pieces.append(_Piece(file_index, rg, a - g0, b - g0, row0, kept))
            g0 += rows
            if g0 >= hi:
                break
        return pieces

    def _read(self, piece: _Piece) -> Columns:
        path = self.files[piece.file_index]
        try:
            table = self._open(piece.file_index).read_row_group(
                piece.row_group, columns=self.columns
            )
        except (pa.ArrowException, OSError) as exc:
            raise DataFormatError(
                path, f"cannot read row group {piece.row_group} ({exc})", row=piece.file_row0
            ) from exc
        if piece.selected is None:
            table = table.slice(piece.start, piece.stop - piece.start)
            return self.decoder(path, table, piece.file_row0 + piece.start)
        rows = piece.selected[piece.start : piece.stop]
        first = int(rows[0])
        table = table.slice(first, int(rows[-1]) - first + 1)
        return self.decoder(path, table, piece.file_row0 + first).take(rows - first)

    # ---- iteration ----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (the usual call at the top of an epoch loop)."""
        self.epoch = epoch
        self._batches_done = 0

    def __iter__(self) -> Iterator[Columns]:
        bounds = self._batch_bounds()
        pieces = self._pieces()
        skip_rows = int(bounds[self._batches_done])
        pending: list[Columns] = []
        pending_rows, consumed = 0, skip_rows
        batch = self._batches_done
        window_start = 0
        for w in range(0, len(pieces), self.shuffle_window):
            window = pieces[w : w + self.shuffle_window]
            window_rows = sum(p.stop - p.start for p in window)
            if window_start + window_rows <= skip_rows:  # resume: skip without reading
                window_start += window_rows
                continue
            block = Columns.concat([self._read(p) for p in window])
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch, self.rank, w])
                block = block.reorder(rng.permutation(block.num_rows))
            if window_start < skip_rows:
                block = block.slice(skip_rows - window_start)
            window_start += window_rows
            pending.append(block)
            pending_rows += block.num_rows
            while batch < len(bounds) - 1 and pending_rows >= bounds[batch + 1] - consumed:
                merged = Columns.concat(pending)
                size = int(bounds[batch + 1] - bounds[batch])
                out = merged.slice(0, size)
                pending = [merged.slice(size)] if merged.num_rows > size else []
                pending_rows -= size
                consumed += size
                batch += 1
                self._batches_done = batch
                yield out
        if batch != len(bounds) - 1:
            raise RuntimeError(f"stream ended after {batch} of {len(bounds) - 1} batches")
        self.epoch += 1
        self._batches_done = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_done": self._batches_done,
            "world_size": self.world_size,
            "seed": self.seed,
            "num_rows": self.num_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume mid-epoch. A different world size or dataset restarts the saved epoch."""
        self.epoch = int(state["epoch"])
        same = (
            state.get("world_size") == self.world_size
            and state.get("num_rows") == self.num_rows
            and state.get("seed") == self.seed
        )
        if not same:
            logger.warning(
                "reader state was saved with world_size=%s rows=%s seed=%s; now %s/%s/%s: "
                "restarting epoch %d from its beginning",
                state.get("world_size"),
                state.get("num_rows"),
                state.get("seed"),
                self.world_size,
                self.num_rows,
                self.seed,
                self.epoch,
            )
            self._batches_done = 0
            return
        self._batches_done = int(state["batches_done"])
