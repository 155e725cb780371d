"""Readers from a dataset directory to TorchRec-ready batches.

* :class:`ImpressionReader` (fine-tuning, evaluation): one :class:`ImpressionBatch` per step,
  sparse features as a :class:`~torchrec.sparse.jagged_tensor.KeyedJaggedTensor`.
* :class:`SequenceReader` (pre-training): one :class:`SequenceBatch` of per-user click sequences.

Both check every row group they read (ids in range, labels 0/1, paired lists of equal length)
and truncate lists to the newest ``max_history`` elements. Splitting across ranks, shuffling and
resuming are :class:`~genctr_rec.data.stream.ParquetStream`'s job.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from genctr_rec.data.catalogue import ItemCatalogue, read_item_catalogue
from genctr_rec.data.checks import (
    check_oldest_first,
    check_range,
    check_same_lengths,
    label_column,
    list_column,
    scalar_column,
)
from genctr_rec.data.features import USER_ID, FeatureSchema
from genctr_rec.data.jagged import suffix_ranges
from genctr_rec.data.keys import (
    HIST_CATEGORIES,
    HIST_ITEMS,
    QUERY_CATEGORY,
    SEQ_CATEGORIES,
    SEQ_ITEMS,
    SEQUENCE_KEYS,
    TARGET_CATEGORY,
    TARGET_ITEM,
)
from genctr_rec.data.kinds import feature_column, kind_of, side_arrays
from genctr_rec.data.lookups import LookupStrides, TableLookups
from genctr_rec.data.pipelineable import FieldsPipelineable
from genctr_rec.data.schema import (
    IMPRESSION_SCHEMA,
    META_FILE,
    SEQUENCE_SCHEMA,
    DataFormatError,
    DatasetMeta,
    split_files,
)
from genctr_rec.data.splits import TimeRange, time_masks
from genctr_rec.data.stream import Columns, Jagged, ParquetStream
from genctr_rec.storage import location


def _decode_pairs(
    path: Path,
    table: pa.Table,
    row0: int,
    meta: DatasetMeta,
    max_history: int,
    items_col: str,
    cats_col: str,
    times_col: str | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Checks a (items, categories) list pair, and with ``times_col`` their timestamps (paired,
    oldest first: the order of clicks is what pre-training learns), and returns truncated
    (starts, lengths, values)."""
    item_offsets, items = list_column(path, table, items_col, row0)
    cat_offsets, cats = list_column(path, table, cats_col, row0)
    check_same_lengths(path, items_col, item_offsets, cats_col, cat_offsets, row0)
    if times_col is not None:
        time_offsets, times = list_column(path, table, times_col, row0)
        check_same_lengths(path, items_col, item_offsets, times_col, time_offsets, row0)
        check_oldest_first(path, times_col, time_offsets, times, row0)
    check_range(path, items_col, items, meta.num_items, row0, item_offsets)
    check_range(path, cats_col, cats, meta.num_categories, row0, cat_offsets)
    starts, lengths = suffix_ranges(item_offsets[:-1], item_offsets[1:], max_history)
    return starts, lengths, {items_col: items, cats_col: cats}


@dataclass
class ImpressionBatch(FieldsPipelineable):
    """One step of fine-tuning data. Implements TorchRec's ``Pipelineable`` protocol.

    ``side_features`` (keys :attr:`FeatureSchema.sparse_keys`: ``user_id``, then the declared
    ``id`` / ``ids`` features) and ``dense_features`` ([B, declared dense features]) are present
    when the reader was given a :class:`FeatureSchema`; ``lookups``, each sharded table's input
    (:class:`~genctr_rec.data.lookups.TableLookups`), when it was given lookup strides."""

    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor  # float32 [B]
    user_ids: torch.Tensor  # int64 [B], for GAUC
    side_features: KeyedJaggedTensor | None = None
    dense_features: torch.Tensor | None = None
    lookups: TableLookups | None = None

    @property
    def batch_size(self) -> int:
        return int(self.labels.numel())

    def model_inputs(self) -> tuple:
        """What a CTR model's forward takes: (sparse, side, dense)."""
        return self.sparse_features, self.side_features, self.dense_features


@dataclass
class SequenceBatch(FieldsPipelineable):
    """One step of pre-training data: per-user click sequences, newest last."""

    sparse_features: KeyedJaggedTensor  # keys SEQUENCE_KEYS, one jagged row per user
    user_ids: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.user_ids.numel())


def _jagged_kjt(
    keys: list[str], block: Columns, scalar_keys: list[str], list_keys: list[str]
) -> KeyedJaggedTensor:
    """One KJT: scalar features have length 1 per row, list features share the block's layout."""
    n = block.num_rows
    flat = block.flat_index()
    total = n * len(scalar_keys) + len(flat) * len(list_keys)
    values = np.empty(total, dtype=np.int64)
    pos = 0
    for key in scalar_keys:
        values[pos : pos + n] = block.scalars[key]
        pos += n
    for key in list_keys:
        np.take(block.list_values[key], flat, out=values[pos : pos + len(flat)])
        pos += len(flat)
    lengths = np.concatenate(
        [np.ones(n * len(scalar_keys), dtype=np.int32)]
        + [block.lengths.astype(np.int32)] * len(list_keys)
    )
    return KeyedJaggedTensor(
        keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
    )


def refuse_raw_ids(data_dir: str | Path, meta: DatasetMeta) -> None:
    """A dataset of raw ids is read through a run's dense view (``data/id_maps.py``), never
    directly: its ids are not rows."""
    if meta.raw_ids:
        raise DataFormatError(
            location(data_dir) / META_FILE,
            f"declares raw_ids {list(meta.raw_ids)}: its ids are not table rows; train on it "
            "with genctr pretrain / finetune, which map them (RUN/id_maps, RUN/dense-data)",
            "raw_ids",
        )


class _Reader:
    """Shared plumbing: metadata, the stream, epochs and resumable state."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        schema: pa.Schema,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        max_history: int | None,
        shuffle_window: int,
        columns: list[str] | None = None,
        selection: list[np.ndarray] | None = None,
    ) -> None:
        self.meta = DatasetMeta.read(data_dir)
        refuse_raw_ids(data_dir, self.meta)
        self.max_history = max_history or self.meta.max_history
        self.stream = ParquetStream(
            split_files(data_dir, split),
            schema,
            self._decode,
            batch_size,
            rank,
            world_size,
            seed,
            shuffle,
            shuffle_window,
            selection=selection,
            columns=columns,
        )

    def _decode(self, path: Path, table: pa.Table, row0: int) -> Columns:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.stream)

    @property
    def num_rows(self) -> int:
        return self.stream.num_rows

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def side_inputs(
    schema: FeatureSchema, scalars: dict[str, np.ndarray], lists: dict[str, Jagged], n: int
) -> tuple[KeyedJaggedTensor, torch.Tensor | None]:
    """A training batch's side inputs for ``n`` rows: :func:`side_arrays` as the side-feature
    KJT the sharded tables take and the dense features [n, D] (None without them)."""
    values, lengths, dense = side_arrays(schema, scalars, lists, n)
    kjt = KeyedJaggedTensor(
        keys=schema.sparse_keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
    )
    return kjt, None if dense is None else torch.from_numpy(dense)


class ImpressionReader(_Reader):
    """Impressions of one split as :class:`ImpressionBatch` es for one rank.

    Args:
        data_dir: dataset directory (public format).
        split: ``train``, ``valid`` or ``test``.
        batch_size: impressions per batch per rank.
        rank, world_size: which share of the rows this process reads.
        seed: shuffle seed; ``shuffle=False`` keeps file order (evaluation).
        max_history: truncation (newest kept); defaults to ``meta.json``'s ``max_history``.
        features: read ``user_id`` (ids past ``num_users`` map to the shared default row) and
            the declared side features into ``side_features`` / ``dense_features``.
        time_range: stream only rows with ``lo <= timestamp < hi`` (the validation slice).
        lookups: also build each sharded table's input into ``batch.lookups`` (unique ids
            padded to these strides), for TorchRec's training pipelines.

    Example::

        reader = ImpressionReader("data/synth", "train", batch_size=1024, rank=0, world_size=2)
        for epoch in range(3):
            reader.set_epoch(epoch)
            for batch in reader:
                loss = model(*batch.model_inputs(), batch.labels)
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        max_history: int | None = None,
        features: FeatureSchema | None = None,
        shuffle_window: int = 4,
        time_range: TimeRange | None = None,
        lookups: LookupStrides | None = None,
    ) -> None:
        self.lookup_strides = lookups
        self._scalar_keys = [TARGET_ITEM, TARGET_CATEGORY, QUERY_CATEGORY]
        self.keys = self._scalar_keys + [HIST_ITEMS, HIST_CATEGORIES]
        self.features = features
        self.catalogue: ItemCatalogue | None = None
        meta = DatasetMeta.read(data_dir)
        if features is not None and features.of("item"):
            self.catalogue = read_item_catalogue(data_dir, meta, list(features.of("item")))
        columns = IMPRESSION_SCHEMA.names
        if features is not None:
            columns = columns + [spec.name for spec in features.of("impression")]
        files = split_files(data_dir, split)
        super().__init__(
            data_dir,
            split,
            IMPRESSION_SCHEMA,
            batch_size,
            rank,
            world_size,
            seed,
            shuffle,
            max_history,
            shuffle_window,
            columns=columns,
            selection=None if time_range is None else time_masks(files, time_range),
        )

    def _decode(self, path: Path, table: pa.Table, row0: int) -> Columns:
        meta = self.meta
        scalars = {
            name: scalar_column(path, table, name, row0)
            for name in (USER_ID, TARGET_ITEM, TARGET_CATEGORY, QUERY_CATEGORY)
        }
        check_range(path, TARGET_ITEM, scalars[TARGET_ITEM], meta.num_items, row0)
        for name in (TARGET_CATEGORY, QUERY_CATEGORY):
            check_range(path, name, scalars[name], meta.num_categories, row0)
        scalars["label"] = label_column(path, table, row0)
        starts, lengths, values = _decode_pairs(
            path, table, row0, meta, self.max_history, HIST_ITEMS, HIST_CATEGORIES
        )
        lists: dict[str, Jagged] = {}
        if self.features is not None:
            check_range(path, USER_ID, scalars[USER_ID], np.iinfo(np.int64).max, row0)
            for spec in self.features.of("impression"):
                column = feature_column(path, table, spec, row0)
                if kind_of(spec).is_list:
                    offsets, vals = column
                    lists[spec.name] = Jagged(vals, offsets[:-1], np.diff(offsets))
                else:
                    scalars[spec.name] = column
        return Columns(scalars, values, starts, lengths, lists)

    def __iter__(self) -> Iterator[ImpressionBatch]:
        list_keys = [HIST_ITEMS, HIST_CATEGORIES]
        for block in self.stream:
            kjt = _jagged_kjt(self.keys, block, self._scalar_keys, list_keys)
            users = torch.tensor(block.scalars[USER_ID])
            batch = ImpressionBatch(
                kjt,
                torch.tensor(block.scalars["label"]),  # copies: Arrow's arrays are read-only
                users,
            )
            if self.features is not None:
                scalars, lists = dict(block.scalars), dict(block.lists)
                if self.catalogue is not None:
                    item_scalars, item_lists = self.catalogue.gather(block.scalars[TARGET_ITEM])
                    scalars.update(item_scalars)
                    lists.update(item_lists)
                scalars[USER_ID] = np.minimum(block.scalars[USER_ID], self.features.num_users)
                batch.side_features, batch.dense_features = side_inputs(
                    self.features, scalars, lists, block.num_rows
                )
            if self.lookup_strides is not None:
                batch.lookups = TableLookups.of(kjt, batch.side_features, self.lookup_strides)
            yield batch


class SequenceReader(_Reader):
    """Per-user click sequences of ``sequences/`` as :class:`SequenceBatch` es for one rank.

    Args are those of :class:`ImpressionReader`; sequences are truncated to the newest
    ``max_history`` clicks.
    """

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        max_history: int | None = None,
        shuffle_window: int = 4,
    ) -> None:
        super().__init__(
            data_dir,
            "sequences",
            SEQUENCE_SCHEMA,
            batch_size,
            rank,
            world_size,
            seed,
            shuffle,
            max_history,
            shuffle_window,
        )

    def _decode(self, path: Path, table: pa.Table, row0: int) -> Columns:
        users = scalar_column(path, table, "user_id", row0)
        starts, lengths, values = _decode_pairs(
            path, table, row0, self.meta, self.max_history, "item_ids", "category_ids", "timestamps"
        )
        values = {SEQ_ITEMS: values["item_ids"], SEQ_CATEGORIES: values["category_ids"]}
        return Columns({"user_id": users}, values, starts, lengths)

    def __iter__(self) -> Iterator[SequenceBatch]:
        for block in self.stream:
            kjt = _jagged_kjt(SEQUENCE_KEYS, block, [], SEQUENCE_KEYS)
            yield SequenceBatch(kjt, torch.tensor(block.scalars["user_id"]))
