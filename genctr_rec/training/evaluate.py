"""``genctr evaluate``: AUC, GAUC and LogLoss on the test split, over all ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from genctr_rec.calibration import Calibration, fit_platt
from genctr_rec.checkpoint import load_model
from genctr_rec.config import ConfigError, RunConfig
from genctr_rec.data.features import FeatureSchema
from genctr_rec.data.reader import ImpressionReader
from genctr_rec.data.schema import DatasetMeta
from genctr_rec.data.splits import TimeRange
from genctr_rec.distributed import DistContext, init_distributed
from genctr_rec.factory import feature_schema
from genctr_rec.metrics import ctr_metrics, on_main
from genctr_rec.progress import Progress
from genctr_rec.storage import location
from genctr_rec.training.build import build_model


@torch.no_grad()  # not inference_mode: gloo collectives fail inside it (pytorch #86830)
def collect_logits(dmp, reader: ImpressionReader, ctx: DistContext, split: str) -> dict:
    """This rank's logits, labels and user ids over ``reader`` (from its first row)."""
    model = dmp.module
    model.eval()
    reader.set_epoch(0)
    logits, labels, users = [], [], []
    with Progress(f"evaluate {split}", len(reader), "batch", ctx.is_main) as progress:
        for batch in reader:
            logits.append(dmp(*batch.to(ctx.device).model_inputs()).double().cpu().numpy())
            labels.append(batch.labels.numpy())
            users.append(batch.user_ids.numpy())
            progress.update(1, batch.batch_size * ctx.world_size)
    model.train()
    return {
        "logits": np.concatenate(logits),
        "labels": np.concatenate(labels),
        "users": np.concatenate(users),
    }


def evaluate_ctr(
    dmp,
    data: str | Path,
    ctx: DistContext,
    batch_size: int,
    max_history: int,
    split: str = "test",
    features: FeatureSchema | None = None,
    time_range: TimeRange | None = None,
    reader: ImpressionReader | None = None,
    calibration: Calibration | None = None,
) -> dict[str, float]:
    """AUC, GAUC, LogLoss of the (sharded) model on ``split`` (rows within ``time_range``),
    its scores passed through ``calibration`` when given. ``reader``: a reader built once for
    repeated evaluations (validation), reused from its first row; otherwise one is built from
    the other arguments."""
    if reader is None:
        reader = eval_reader(data, split, batch_size, ctx, max_history, features, time_range)
    arrays = collect_logits(dmp, reader, ctx, split)
    return calibrated_metrics(arrays, [calibration or Calibration()])[0]


def calibrated_metrics(arrays: dict, calibrations: list[Calibration]) -> list[dict]:
    """Collective: :func:`~genctr_rec.metrics.ctr_metrics` of the same logits
    (:func:`collect_logits`) under each calibration, from one gather to rank 0."""

    def compute(logits, labels, users) -> list[dict]:
        return [ctr_metrics(c.probabilities(logits), labels, users) for c in calibrations]

    return on_main(arrays, compute)


def fit_calibration(dmp, reader: ImpressionReader, ctx: DistContext, fitted_on: str) -> Calibration:
    """Collective: Platt scaling fitted on every rank's rows of ``reader`` (on rank 0, the
    two numbers broadcast)."""
    arrays = collect_logits(dmp, reader, ctx, "validation (calibration)")
    return on_main(
        {"logits": arrays["logits"], "labels": arrays["labels"]},
        lambda logits, labels: fit_platt(logits, labels, fitted_on),
    )


def eval_reader(
    data: str | Path,
    split: str,
    batch_size: int,
    ctx: DistContext,
    max_history: int,
    features: FeatureSchema | None = None,
    time_range: TimeRange | None = None,
) -> ImpressionReader:
    """This rank's share of ``split`` in file order (the same rows every time)."""
    return ImpressionReader(
        data,
        split,
        batch_size,
        ctx.rank,
        ctx.world_size,
        shuffle=False,
        max_history=max_history,
        features=features,
        time_range=time_range,
    )


def check_catalogue(cfg: RunConfig, data: str | Path) -> None:
    """Refuse, before any work, a dataset whose ids or declared features the model was not
    trained for (ids past its tables would be scored with the wrong rows or fail deep inside)."""
    meta = DatasetMeta.read(data)
    trained = (cfg.num_items, cfg.num_categories)
    if (meta.num_items, meta.num_categories) != trained:
        raise ConfigError(
            f"{data} has {meta.num_items} items / {meta.num_categories} categories; the model "
            f"was trained on {trained[0]} / {trained[1]}: evaluate it on its own dataset"
        )
    schema = feature_schema(cfg)
    if schema is not None and tuple(meta.features) != schema.features:
        raise ConfigError(
            f"{data} declares features {[f.name for f in meta.features]}; the model reads "
            f"{[f.name for f in schema.features]} with their vocabularies"
        )


def evaluate_run(data: str | Path | None, run: str | Path, batch_size: int | None = None) -> dict:
    """Rebuild a fine-tuning run's model from its config, load its checkpoint, evaluate on
    ``data``'s test split (the run's own dataset when None) with the run's calibration."""
    cfg = RunConfig.load(run)
    if cfg.stage != "finetune":
        raise ConfigError(f"{run} is a {cfg.stage} run; evaluate takes a finetune run")
    calibration = Calibration.of_run(run)  # a damaged file stops here, before any work
    data = cfg.dataset_for(data)
    check_catalogue(cfg, data)
    ctx = init_distributed()
    built = build_model(cfg, ctx)
    load_model(built.dmp, location(run) / "checkpoint")
    return evaluate_ctr(
        built.dmp,
        data,
        ctx,
        batch_size or cfg.train.batch_size,
        cfg.max_history,
        features=feature_schema(cfg),
        calibration=calibration,
    )
