"""Negative sampling for pre-training: category-conditioned (CS) or random (RS).

CS draws negatives from the items of the target's category (the paper's "category -> item
sampling table", built from the training data) and never returns the target itself; a target
alone in its category falls back to a random negative. RS draws from all training items, never
the target. Both are vectorised: sample an index among the n - 1 others and skip the target.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from genctr_rec.data.catalogue import read_item_catalogue, row_groups
from genctr_rec.data.checks import check_range, list_column
from genctr_rec.data.schema import SEQUENCE_SCHEMA, DatasetMeta, split_files


class NegativeSampler:
    """Samples ``k`` negatives per target item.

    Args:
        item_category: category of every item id [num_items] (from items.parquet).
        train_items: ids of the items seen in the training data (the sampling table's items).
        mode: ``"category"`` (CS) or ``"random"`` (RS).
        generator: torch generator (seeded per rank).
    """

    def __init__(
        self,
        item_category: torch.Tensor,
        train_items: torch.Tensor,
        mode: str = "category",
        generator: torch.Generator | None = None,
    ) -> None:
        if mode not in ("category", "random"):
            raise ValueError(f"negatives must be 'category' or 'random', got {mode!r}")
        self.mode = mode
        self.generator = generator
        items = torch.unique(train_items)
        cats = item_category[items]
        order = torch.argsort(cats, stable=True)
        self.items = items[order]  # training items grouped by category
        num_categories = int(item_category.max()) + 1
        counts = torch.bincount(cats, minlength=num_categories)
        self.cat_start = torch.cumsum(counts, 0) - counts
        self.cat_count = counts
        # position of each training item inside the global and the per-category lists
        self.global_pos = torch.full((len(item_category),), -1, dtype=torch.long)
        self.global_pos[self.items] = torch.arange(len(self.items))
        self.item_category = item_category

    def _skip_target(self, start, count, target_pos, k):
        """Indices into ``self.items``: uniform over [start, start + count) minus target_pos."""
        n = target_pos.numel()
        draw = torch.rand(n, k, generator=self.generator)
        offset = (draw * (count - 1).clamp(min=1).unsqueeze(1)).long()
        index = start.unsqueeze(1) + offset
        index = index + (index >= target_pos.unsqueeze(1)).long()  # step over the target
        return index

    def sample(self, targets: torch.Tensor, k: int) -> torch.Tensor:
        """[N] target item ids -> [N, k] negative item ids."""
        targets = targets.cpu()
        pos = self.global_pos[targets]
        pos = torch.where(pos < 0, len(self.items), pos)  # not a training item: nothing to skip
        n_items = torch.tensor(len(self.items))
        random = self.items[
            self._skip_target(torch.zeros_like(pos), n_items.expand_as(pos), pos, k).clamp(
                max=len(self.items) - 1
            )
        ]
        if self.mode == "random":
            return random
        cats = self.item_category[targets]
        start, count = self.cat_start[cats], self.cat_count[cats]
        same = self.items[self._skip_target(start, count, pos, k).clamp(max=len(self.items) - 1)]
        alone = (count <= 1).unsqueeze(1)
        return torch.where(alone, random, same)

    @classmethod
    def from_dataset(
        cls, data_dir: str | Path, mode: str, seed: int, rank: int = 0
    ) -> NegativeSampler:
        """Build the sampling table from items.parquet and the pre-training sequences, both
        checked as the readers check them (a broken id names its file, column and row)."""
        meta = DatasetMeta.read(data_dir)
        catalogue = read_item_catalogue(data_dir, meta, features=[])
        item_category = torch.from_numpy(catalogue.categories)
        seen = []
        only_items = pa.schema([SEQUENCE_SCHEMA.field("item_ids")])  # read no other column
        for path in split_files(data_dir, "sequences"):
            for table, row0 in row_groups(path, only_items):
                offsets, items = list_column(path, table, "item_ids", row0)
                check_range(path, "item_ids", items, meta.num_items, row0, offsets)
                seen.append(np.unique(items))
        train_items = torch.from_numpy(np.unique(np.concatenate(seen)))
        generator = torch.Generator().manual_seed(seed * 1000 + rank)
        return cls(item_category, train_items, mode, generator)
