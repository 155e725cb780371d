"""The streaming readers: content, truncation, determinism, resume, and the rank split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from genctr_rec.data.features import USER_ID, FeatureSchema
from genctr_rec.data.keys import HIST_CATEGORIES, HIST_ITEMS, IMPRESSION_KEYS, SEQ_ITEMS
from genctr_rec.data.reader import ImpressionReader, SequenceReader
from tests.distributed import run_ranks
from tests.helpers import MAX_HISTORY


def _rows_by_user(root: Path, split: str) -> dict[int, dict]:
    table = pq.read_table(root / split)
    return {row["user_id"]: row for row in table.to_pylist()}


def _epoch_ids(reader: ImpressionReader) -> list[int]:
    return [int(u) for batch in reader for u in batch.user_ids]


def test_batches_match_the_parquet_rows(small_dataset: Path) -> None:
    rows = _rows_by_user(small_dataset, "train")
    users = 500  # rows past it (user_id = row number here) read as the default row, 500
    reader = ImpressionReader(
        small_dataset,
        "train",
        batch_size=50,
        seed=3,
        max_history=4,
        features=FeatureSchema(num_users=users),
    )
    seen = 0
    for batch in reader:
        kjt = batch.sparse_features
        assert set(kjt.keys()) == set(IMPRESSION_KEYS)
        assert batch.side_features.keys() == [USER_ID]
        assert batch.dense_features is None
        items = kjt[HIST_ITEMS].to_dense()
        cats = kjt[HIST_CATEGORIES].to_dense()
        target = kjt["item_id"].values()
        for i, user in enumerate(batch.user_ids.tolist()):
            row = rows[user]
            assert items[i].tolist() == row["hist_item_ids"][-4:], "newest 4 kept, oldest dropped"
            assert cats[i].tolist() == row["hist_category_ids"][-4:]
            assert int(target[i]) == row["item_id"]
            assert float(batch.labels[i]) == row["label"]
            assert int(kjt["query_category_id"].values()[i]) == row["query_category_id"]
            assert int(batch.side_features[USER_ID].values()[i]) == min(user, users)
        seen += batch.batch_size
    assert seen == len(rows)


def test_every_row_once_and_shuffle_is_seeded(small_dataset: Path) -> None:
    total = len(_rows_by_user(small_dataset, "train"))
    a = ImpressionReader(small_dataset, "train", batch_size=64, seed=1)
    first = _epoch_ids(a)
    second = _epoch_ids(a)  # the next epoch
    again = _epoch_ids(ImpressionReader(small_dataset, "train", batch_size=64, seed=1))
    other_seed = _epoch_ids(ImpressionReader(small_dataset, "train", batch_size=64, seed=2))
    assert sorted(first) == list(range(total))
    assert sorted(second) == list(range(total))
    assert first == again, "same seed and epoch: same order"
    assert first != second, "a new epoch reshuffles"
    assert first != other_seed
    unshuffled = _epoch_ids(ImpressionReader(small_dataset, "train", 64, shuffle=False))
    assert unshuffled == list(range(total))


def test_resume_mid_epoch_continues_exactly(small_dataset: Path) -> None:
    reader = ImpressionReader(small_dataset, "train", batch_size=40, seed=5)
    reader.set_epoch(1)
    full = [b.user_ids.tolist() for b in reader]
    reader.set_epoch(1)
    head, state = [], None
    for i, batch in enumerate(reader):
        head.append(batch.user_ids.tolist())
        if i == 6:
            state = reader.state_dict()
            break
    resumed = ImpressionReader(small_dataset, "train", batch_size=40, seed=5)
    resumed.load_state_dict(state)
    tail = [b.user_ids.tolist() for b in resumed]
    assert head + tail == full
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["batches_done"] == 0


def test_sequence_reader_truncates_to_newest(small_dataset: Path) -> None:
    table = pq.read_table(small_dataset / "sequences").to_pylist()
    by_user = {r["user_id"]: r for r in table}
    seen = []
    for batch in SequenceReader(small_dataset, batch_size=16, seed=0, max_history=5):
        dense = batch.sparse_features[SEQ_ITEMS].to_dense()
        for user, items in zip(batch.user_ids.tolist(), dense, strict=True):
            assert items.tolist() == by_user[user]["item_ids"][-5:]
            seen.append(user)
    assert sorted(seen) == sorted(by_user)


def test_default_truncation_comes_from_meta(small_dataset: Path) -> None:
    reader = ImpressionReader(small_dataset, "train", batch_size=1000)
    lengths = torch.cat([b.sparse_features[HIST_ITEMS].lengths() for b in reader])
    assert int(lengths.max()) <= MAX_HISTORY


def _read_rank(rank: int, world: int, root: str, batch_size: int, stop_after: int | None):
    reader = ImpressionReader(root, "train", batch_size, rank, world, seed=11)
    reader.set_epoch(2)
    ids, state = [], None
    for i, batch in enumerate(reader):
        ids.append(batch.user_ids.tolist())
        if stop_after is not None and i + 1 == stop_after:
            state = reader.state_dict()
            break
    tail = None
    if state is not None:
        again = ImpressionReader(root, "train", batch_size, rank, world, seed=11)
        again.load_state_dict(state)
        tail = [b.user_ids.tolist() for b in again]
    return {"batches": ids, "len": len(reader), "tail": tail}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_rank_split_real_processes(small_dataset: Path, world: int) -> None:
    total = len(_rows_by_user(small_dataset, "train"))
    results = run_ranks(_read_rank, world, str(small_dataset), 37, None)
    per_rank = [[u for b in r["batches"] for u in b] for r in results]
    assert sum(len(p) for p in per_rank) == total
    assert sorted(u for p in per_rank for u in p) == list(range(total)), "each row exactly once"
    counts = {len(r["batches"]) for r in results} | {r["len"] for r in results}
    assert len(counts) == 1, "every rank runs the same number of steps"
    assert all(len(b) > 0 for r in results for b in r["batches"])
    # resume on every rank from the middle of the epoch
    resumed = run_ranks(_read_rank, world, str(small_dataset), 37, 3)
    for full, part in zip(results, resumed, strict=True):
        assert part["batches"] + part["tail"] == full["batches"]


def test_uneven_rank_sizes_give_equal_step_counts(small_dataset: Path) -> None:
    # 727 rows over 2 ranks at batch 121: 364 and 363 rows, one rank needs a spread-out split
    lens, sizes = set(), []
    for rank in range(2):
        reader = ImpressionReader(small_dataset, "train", 121, rank, 2, seed=0)
        batches = [b.batch_size for b in reader]
        lens.add(len(batches))
        sizes.append(batches)
    assert len(lens) == 1 and all(s > 0 for b in sizes for s in b)
    assert sum(map(sum, sizes)) == 727
    assert np.all(np.array(sizes) <= 121)
