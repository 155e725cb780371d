"""Each sharded table's input, built while the batch loads rather than inside the model's
forward: what TorchRec's training pipelines (``TrainPipelineSparseDist`` and its base) need,
since they start a sharded module's input distribution for the next batch while the current
one computes, and can only do so for inputs that come straight from the batch.

Per table, the batch's ids are made unique (cutting what the all-to-all moves, as the
in-forward lookup's ``dedup`` does) and sent as bags of one id, padded with empty bags to a
stride fixed for the run: a row-wise sharded pooled lookup needs one stride on every rank, and a
fixed one needs no collective to agree on it. The stride is the most unique ids a batch can
hold, ``min(batch_size x ids per row, table rows)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec import KeyedJaggedTensor

from genctr_rec.data.keys import (
    CATEGORY_TABLE,
    HIST_CATEGORIES,
    HIST_ITEMS,
    ITEM_TABLE,
    QUERY_CATEGORY,
    TARGET_CATEGORY,
    TARGET_ITEM,
)
from genctr_rec.data.pipelineable import FieldsPipelineable


def pad_stride(kjt: KeyedJaggedTensor, stride: int) -> KeyedJaggedTensor:
    """The same KJT with empty bags appended up to ``stride`` rows per key."""
    if kjt.stride() == stride:
        return kjt
    if kjt.stride() > stride:
        raise ValueError(f"a batch of {kjt.stride()} rows is over the fixed stride {stride}")
    lengths = kjt.lengths().view(len(kjt.keys()), -1)
    pad = lengths.new_zeros(lengths.shape[0], stride - lengths.shape[1])
    return KeyedJaggedTensor(
        keys=kjt.keys(), values=kjt.values(), lengths=torch.cat([lengths, pad], dim=1).flatten()
    )


@dataclass(frozen=True)
class LookupStrides:
    """The fixed strides of a run's lookups: unique item ids, unique category ids, and rows
    (the side features' batch)."""

    items: int
    categories: int
    rows: int

    @classmethod
    def for_run(
        cls, batch_size: int, max_history: int, num_items: int, num_categories: int
    ) -> LookupStrides:
        """Item ids per row: the target and the history; category ids: target, query and the
        history's."""
        return cls(
            items=max(1, min(batch_size * (1 + max_history), num_items)),
            categories=max(1, min(batch_size * (2 + max_history), num_categories)),
            rows=batch_size,
        )


def _unique_bags(
    key: str, ids: torch.Tensor, stride: int
) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """(the unique ids as bags of one padded to ``stride``, each id's bag)."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    if unique.numel() > stride:
        raise ValueError(f"{unique.numel()} unique {key} ids are over the fixed stride {stride}")
    lengths = torch.zeros(stride, dtype=torch.int32)
    lengths[: unique.numel()] = 1
    return KeyedJaggedTensor(keys=[key], values=unique, lengths=lengths), inverse


@dataclass
class TableLookups(FieldsPipelineable):
    """One batch's input to each sharded table, and where each of the batch's ids finds its
    row in the output. ``item_rows`` indexes the target items, then the history's;
    ``category_rows`` the target categories, the query categories, then the history's."""

    items: KeyedJaggedTensor
    item_rows: torch.Tensor
    categories: KeyedJaggedTensor
    category_rows: torch.Tensor
    features: KeyedJaggedTensor | None = None  # the side features, padded to ``rows``

    @classmethod
    def of(
        cls,
        sparse: KeyedJaggedTensor,
        side: KeyedJaggedTensor | None,
        strides: LookupStrides,
    ) -> TableLookups:
        items, item_rows = _unique_bags(
            ITEM_TABLE,
            torch.cat([sparse[TARGET_ITEM].values(), sparse[HIST_ITEMS].values()]),
            strides.items,
        )
        categories, category_rows = _unique_bags(
            CATEGORY_TABLE,
            torch.cat(
                [
                    sparse[TARGET_CATEGORY].values(),
                    sparse[QUERY_CATEGORY].values(),
                    sparse[HIST_CATEGORIES].values(),
                ]
            ),
            strides.categories,
        )
        features = None if side is None else pad_stride(side, strides.rows)
        return cls(items, item_rows, categories, category_rows, features)
