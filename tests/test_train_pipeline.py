"""TorchRec's training pipelines over the fine-tuning model: the reader builds each sharded
table's input into the batch, so ``TrainPipelineSparseDist`` pipelines all three sharded tables,
and its losses are the training loop's own on the same batches."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from tests.distributed import run_ranks

STEPS, BATCH = 12, 128


def _reader(data: str, rank: int, world_size: int, strides=None):
    from genctr_rec.data.reader import ImpressionReader
    from genctr_rec.data.schema import DatasetMeta
    from genctr_rec.data.statistics import resolve_features

    meta = DatasetMeta.read(data)
    features = resolve_features(meta, data)
    return ImpressionReader(
        data, "train", BATCH, rank, world_size, seed=0, features=features, lookups=strides
    )


def test_lookups_carry_every_id_at_a_fixed_stride(toy_synth: Path) -> None:
    """Each id finds its row in the unique lookup; every batch, the short last one included,
    has the run's strides (one stride on every rank, with no collective to agree on it)."""
    from genctr_rec.data.keys import (
        HIST_CATEGORIES,
        HIST_ITEMS,
        QUERY_CATEGORY,
        TARGET_CATEGORY,
        TARGET_ITEM,
    )
    from genctr_rec.data.lookups import LookupStrides, TableLookups
    from genctr_rec.data.schema import DatasetMeta

    meta = DatasetMeta.read(toy_synth)
    strides = LookupStrides.for_run(BATCH, meta.max_history, meta.num_items, meta.num_categories)
    batches = list(_reader(str(toy_synth), 0, 1, strides))
    assert batches[-1].batch_size < BATCH, "the toy split ends in a short batch"
    for batch in batches:
        f, lookups = batch.sparse_features, batch.lookups
        items = torch.cat([f[TARGET_ITEM].values(), f[HIST_ITEMS].values()])
        cats = torch.cat(
            [f[k].values() for k in (TARGET_CATEGORY, QUERY_CATEGORY, HIST_CATEGORIES)]
        )
        assert torch.equal(lookups.items.values()[lookups.item_rows], items)
        assert torch.equal(lookups.categories.values()[lookups.category_rows], cats)
        assert lookups.items.values().unique().numel() == lookups.items.values().numel()
        assert lookups.items.stride() == strides.items
        assert lookups.categories.stride() == strides.categories
        assert lookups.features.stride() == strides.rows
        assert int(lookups.items.lengths().sum()) == lookups.items.values().numel()
    with pytest.raises(ValueError, match="over the fixed stride"):
        TableLookups.of(batches[0].sparse_features, None, LookupStrides(2, 2, BATCH))


def _pipeline_losses(rank: int, world_size: int, data: str) -> dict:
    from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
    from genctr_rec.data.lookups import LookupStrides
    from genctr_rec.data.schema import DatasetMeta
    from genctr_rec.data.statistics import resolve_features
    from genctr_rec.distributed import init_distributed
    from genctr_rec.training.build import build_model
    from genctr_rec.training.train_pipeline import train_steps

    meta = DatasetMeta.read(data)
    cfg = RunConfig(
        "finetune", data, ModelConfig(), TrainConfig(batch_size=BATCH, seed=0), backbone="dnn"
    )
    cfg.num_items, cfg.num_categories = meta.num_items, meta.num_categories
    cfg.max_history = meta.max_history
    cfg.features = resolve_features(meta, data).to_json()
    ctx = init_distributed()
    strides = LookupStrides.for_run(BATCH, meta.max_history, meta.num_items, meta.num_categories)
    batches = list(itertools.islice(_reader(data, rank, world_size, strides), STEPS))
    out = {}
    for name, pipeline, batch_forward in (
        ("loop", "none", False),  # the training loop's own step: lookups inside forward
        ("by_hand", "none", True),
        ("sparse_dist", "sparse_dist", True),
    ):
        built = build_model(cfg, ctx, batch_forward=batch_forward)
        out[name] = train_steps(built, batches, pipeline, ctx.device, batch_forward)
    return out


@pytest.mark.slow
def test_sparse_dist_pipelines_every_table_with_the_loops_losses(toy_synth: Path) -> None:
    """Two ranks, row-wise sharded item table: TorchRec's ``TrainPipelineSparseDist`` pipelines
    the item, category and side-feature tables, and every step's loss is the training loop's
    own step's on the same batches (the same model from the same seed)."""
    for result in run_ranks(_pipeline_losses, 2, str(toy_synth)):
        assert result["sparse_dist"]["pipelined"] == 3
        loop = torch.tensor(result["loop"]["losses"])
        assert len(loop) == STEPS and loop[-1] != loop[0]
        for name in ("by_hand", "sparse_dist"):
            other = torch.tensor(result[name]["losses"])
            assert torch.allclose(other, loop, atol=2e-4), (name, other - loop)
