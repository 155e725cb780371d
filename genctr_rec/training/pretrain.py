"""``genctr pretrain``: stage 1, generative pre-training of the decoder and the shared tables.

The last click of every sequence is held out of training and used to report next-item HR@10 /
NDCG@10 (candidates: the true item plus 100 random items, and plus 100 items of its category),
so pre-training quality is visible on its own. The same held-out clicks validate every epoch:
the model with the best NDCG@10 among same-category candidates (what fine-tuning's decoder must
tell apart) is kept, and training stops after ``patience`` epochs without improvement.

Length: ``--steps`` or ``--epochs`` (a maximum: validation stops earlier, default 20). The
paper's 3 epochs were for a corpus far larger than most; on a small one they leave the decoder
undertrained, so the held-out clicks decide.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from genctr_rec.config import RunConfig
from genctr_rec.data.keys import SEQ_CATEGORIES, SEQ_ITEMS
from genctr_rec.data.reader import SequenceReader
from genctr_rec.data.schema import DatasetMeta
from genctr_rec.distributed import DistContext, init_distributed
from genctr_rec.logs import as_json
from genctr_rec.metrics import on_main
from genctr_rec.models.negatives import NegativeSampler
from genctr_rec.storage import location
from genctr_rec.training.build import build_model
from genctr_rec.training.loop import StageDriver
from genctr_rec.training.raw_ids import plan_raw_ids, write_view
from genctr_rec.training.rundir import open_run
from genctr_rec.training.sharding import check_overrides
from genctr_rec.training.warm_start import inherit, warm_start_model

logger = logging.getLogger(__name__)
EVAL_CANDIDATES = 100
SELECT_BY = "ndcg@10_category"


def split_last(
    sequences: KeyedJaggedTensor,
) -> tuple[KeyedJaggedTensor, torch.Tensor, torch.Tensor]:
    """(sequences without their last click, last item ids, last categories) per row.

    Rows with a single click keep nothing; their "last" entries are -1."""
    items, cats = sequences[SEQ_ITEMS], sequences[SEQ_CATEGORIES]
    lengths = items.lengths().long()
    ends = torch.cumsum(lengths, 0)
    keep = torch.ones(items.values().numel(), dtype=torch.bool)
    has = lengths > 0
    keep[ends[has] - 1] = False
    last_items = torch.full_like(lengths, -1)
    last_cats = torch.full_like(lengths, -1)
    last_items[has] = items.values()[ends[has] - 1]
    last_cats[has] = cats.values()[ends[has] - 1]
    new_lengths = (lengths - 1).clamp(min=0).int()
    kjt = KeyedJaggedTensor(
        keys=[SEQ_ITEMS, SEQ_CATEGORIES],
        values=torch.cat([items.values()[keep], cats.values()[keep]]),
        lengths=torch.cat([new_lengths, new_lengths]),
    )
    return kjt, last_items, last_cats


def _rank_of_true(scores: torch.Tensor) -> np.ndarray:
    return (scores[:, 1:] > scores[:, :1]).sum(dim=1).numpy()


@torch.no_grad()
def evaluate_next_item(dmp, cfg: RunConfig, ctx: DistContext, k: int = 10) -> dict[str, float]:
    """HR@k / NDCG@k of the held-out last clicks, over all ranks."""
    model = dmp.module
    model.eval()
    reader = SequenceReader(
        cfg.reads,
        cfg.train.batch_size,
        ctx.rank,
        ctx.world_size,
        shuffle=False,
        max_history=cfg.max_history + 1,
    )
    random_sampler = NegativeSampler.from_dataset(cfg.reads, "random", cfg.train.seed + 7, ctx.rank)
    category_sampler = NegativeSampler.from_dataset(
        cfg.reads, "category", cfg.train.seed + 7, ctx.rank
    )
    ranks: dict[str, list[np.ndarray]] = {"random": [], "category": []}
    for batch in reader:
        context, last_items, last_cats = split_last(batch.sparse_features)
        valid = last_items >= 0
        for name, sampler in (("random", random_sampler), ("category", category_sampler)):
            negatives = sampler.sample(last_items.clamp(min=0), EVAL_CANDIDATES)
            candidates = torch.cat([last_items.clamp(min=0).unsqueeze(1), negatives], dim=1)
            scores = dmp.module.score_next(
                context.to(ctx.device),
                last_cats.clamp(min=0).to(ctx.device),
                candidates.to(ctx.device),
            ).cpu()
            ranks[name].append(_rank_of_true(scores)[valid.numpy()])
    model.train()

    def hit_rates(**rank_of_true: np.ndarray) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, rank in rank_of_true.items():
            out[f"hr@{k}_{name}"] = float((rank < k).mean())
            out[f"ndcg@{k}_{name}"] = float(np.where(rank < k, 1 / np.log2(rank + 2), 0).mean())
        out["eval_sequences"] = int(len(rank_of_true["random"]))
        return out

    return on_main({n: np.concatenate(r) for n, r in ranks.items()}, hit_rates)


def pretrain(
    cfg: RunConfig,
    out: str | Path,
    stop_after_steps: int = 0,
    explicit: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Train stage 1 and write ``out/`` (config, checkpoint, metrics). Returns the metrics.
    With ``cfg.warm_start`` the run continues that pre-training run (``training/warm_start.py``);
    ``explicit`` are the settings the user gave, checked against it."""
    out = location(out)
    ctx = init_distributed()
    meta = DatasetMeta.read(cfg.data)
    maps, meta = plan_raw_ids(cfg, meta, out)
    cfg.num_items, cfg.num_categories = meta.num_items, meta.num_categories
    cfg.max_history = cfg.train.max_history or meta.max_history
    if cfg.warm_start:
        inherit(cfg, cfg.warm_start, explicit or {})
    check_overrides(cfg.train.sharding)
    with open_run(cfg, out, ctx):
        if maps is not None:
            write_view(cfg, DatasetMeta.read(cfg.data), maps, out, ctx)
        return _train_and_evaluate(cfg, out, ctx, stop_after_steps)


def _train_and_evaluate(
    cfg: RunConfig, out: Path, ctx: DistContext, stop_after_steps: int
) -> dict[str, Any] | None:
    built = build_model(cfg, ctx)
    dmp = built.dmp
    if cfg.warm_start:
        warm_start_model(built, cfg.warm_start)
    sampler = NegativeSampler.from_dataset(cfg.reads, cfg.train.negatives, cfg.train.seed, ctx.rank)
    # one more than the history so that, after holding out the last click, the predicted
    # positions cover 0..max_history, the positions fine-tuning queries
    reader = SequenceReader(
        cfg.reads,
        cfg.train.batch_size,
        ctx.rank,
        ctx.world_size,
        seed=cfg.train.seed,
        max_history=cfg.max_history + 2,
    )
    k = cfg.train.num_negatives

    def step(batch) -> torch.Tensor:
        context, _, _ = split_last(batch.sparse_features)
        negatives = sampler.sample(context[SEQ_ITEMS].values(), k)
        return dmp(context.to(ctx.device), negatives.to(ctx.device))

    driver = StageDriver(
        cfg, out, built, ctx, "pretrain", {"negatives": sampler.generator}, stop_after_steps
    )
    if cfg.train.valid_fraction > 0:
        driver.validate_with(lambda: evaluate_next_item(dmp, cfg, ctx), SELECT_BY, len(reader))
    if driver.train(reader, step) is None:  # stopped early on request; the checkpoint resumes it
        return None
    driver.select()
    quality = evaluate_next_item(dmp, cfg, ctx)
    details = {"decoder": cfg.model.decoder, "negatives": cfg.train.negatives, **quality}
    metrics = driver.finish(quality, details)
    logger.info("pretrain done: %s", as_json({k: v for k, v in metrics.items() if "@" in k}))
    return metrics
