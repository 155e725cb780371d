"""``genctr finetune``: stage 2, CTR training with the transfer modes of the paper's Table 1.

| transfer | decoder in the model | loaded from ``--init-from`` |
|---|---|---|
| ``none`` | no | nothing (the backbone alone) |
| ``ps`` | no | the item and category tables (parameter sharing) |
| ``decoder`` | yes, from scratch | nothing |
| ``ps_decoder`` | yes, from scratch | the item and category tables |
| ``ps_mi`` | yes | the tables and ``decoder.*`` (GenCTR: PS + model integration) |

Validation (a ``valid/`` split, else the newest slice of train/) runs ``evals_per_epoch`` times
an epoch (or every ``eval_every`` steps) and at each epoch end; the model with the best
validation figure (``select_on``: AUC, or LogLoss) is kept (``RUN/best``); each validation without
improvement multiplies the learning rates by ``lr_decay``, and training stops after ``patience``
of them once ``min_epochs`` epochs are complete. The kept model becomes the run's
``checkpoint/``; Platt scaling is fitted on the validation rows (``RUN/calibration.json``), and
the test figures describe the calibrated scores (``metrics.json``'s ``test_uncalibrated``, the
raw ones).

With ``refit``, that run is ``RUN/selection``: its selected length, in epochs, is trained again
from the same start on every train/ row (the validation slice, the newest rows, included), and
``RUN`` keeps that model (``metrics.json``'s ``refit`` says how it was chosen).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from genctr_rec.calibration import Calibration
from genctr_rec.checkpoint import load_model
from genctr_rec.config import TRANSFER_PREFIXES, TRANSFERS, ConfigError, RunConfig
from genctr_rec.data.reader import ImpressionReader
from genctr_rec.data.schema import DatasetMeta, split_files
from genctr_rec.data.splits import ValidationSplit
from genctr_rec.data.statistics import resolve_features
from genctr_rec.distributed import DistContext, init_distributed
from genctr_rec.factory import feature_schema
from genctr_rec.logs import as_json
from genctr_rec.storage import location, open_parquet
from genctr_rec.training.build import build_model
from genctr_rec.training.compiled import compile_dense_step
from genctr_rec.training.evaluate import (
    calibrated_metrics,
    collect_logits,
    eval_reader,
    evaluate_ctr,
    fit_calibration,
)
from genctr_rec.training.loop import StageDriver
from genctr_rec.training.raw_ids import plan_raw_ids, write_view
from genctr_rec.training.rundir import open_run
from genctr_rec.training.sharding import check_overrides
from genctr_rec.training.warm_start import check_features, inherit, warm_start_model

logger = logging.getLogger(__name__)


def _inherit_from_pretraining(cfg: RunConfig) -> None:
    """Transfers need the pre-training run, whose model shape the CTR model must match."""
    if cfg.transfer not in TRANSFERS:
        raise ConfigError(f"--transfer must be one of {TRANSFERS}, got {cfg.transfer!r}")
    if cfg.transfer in TRANSFER_PREFIXES:
        if not cfg.init_from:
            raise ConfigError(f"--transfer {cfg.transfer} needs --init-from PRETRAIN_RUN")
        pre = RunConfig.load(cfg.init_from)
        if pre.stage != "pretrain":
            raise ConfigError(f"--init-from {cfg.init_from} is not a pre-training run")
        if pre.num_items > cfg.num_items or pre.num_categories > cfg.num_categories:
            raise ConfigError(
                f"--init-from {cfg.init_from} was trained on tables of "
                f"{pre.num_items} items / {pre.num_categories} categories, the data "
                f"has {cfg.num_items} / {cfg.num_categories}: a catalogue may grow (ids "
                "stable, the new rows start fresh), never shrink"
            )
        for name in ("dim", "num_layers", "num_heads", "decoder", "lookup"):
            setattr(cfg.model, name, getattr(pre.model, name))
        cfg.max_history = pre.max_history


def finetune(
    cfg: RunConfig,
    out: str | Path,
    stop_after_steps: int = 0,
    explicit: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Train stage 2, select by validation, evaluate on test, write ``out/``. Returns the
    metrics. With ``cfg.warm_start`` the run continues that run (``training/warm_start.py``);
    ``explicit`` are the settings the user gave, checked against it."""
    out = location(out)
    meta = DatasetMeta.read(cfg.data)
    maps, meta = plan_raw_ids(cfg, meta, out)
    cfg.num_items, cfg.num_categories = meta.num_items, meta.num_categories
    cfg.max_history = cfg.train.max_history or meta.max_history
    previous = None
    if cfg.warm_start:
        if cfg.init_from:
            raise ConfigError(
                "--warm-start and --init-from exclude each other: a warm start "
                "continues a fine-tuning run, which already has its pre-training"
            )
        previous = inherit(cfg, cfg.warm_start, explicit or {})
    elif cfg.backbone is None:
        raise ConfigError("--backbone is required (unless --warm-start gives it)")
    if cfg.model.side_features:
        cfg.features = resolve_features(meta, cfg.data).to_json()
    if previous is not None:
        check_features(previous, cfg)
    else:
        _inherit_from_pretraining(cfg)
    split = ValidationSplit.for_dataset(cfg.data, cfg.train.valid_fraction)
    ctx = init_distributed()
    check_overrides(cfg.train.sharding)
    if cfg.train.refit and split.boundary is None:
        raise ConfigError(
            "--refit trains the validation rows once their length is chosen: it needs them "
            "carved out of train/ (--valid-fraction above 0, and no valid/ split)"
        )
    with open_run(cfg, out, ctx):
        if maps is not None:
            write_view(cfg, DatasetMeta.read(cfg.data), maps, out, ctx)
        if cfg.train.refit:
            return _refit(cfg, out, ctx, split, stop_after_steps)
        return _train_and_test(cfg, out, ctx, split, stop_after_steps)


REFIT_SELECTION = "selection"  # RUN/selection: the run that chose a refit's length


def train_rows(data: str | Path, split: str = "train") -> int:
    """Rows of a dataset's training split (from the Parquet footers)."""
    return sum(open_parquet(p).metadata.num_rows for p in split_files(location(data), split))


def refit_steps(selected: dict[str, Any], total_rows: int) -> int:
    """The selected model's steps (``selected``: metrics.json's, trained on ``total_rows`` less
    its validation rows) as steps over all ``total_rows``: the same length in epochs."""
    return max(1, round(selected["step"] * total_rows / (total_rows - selected["rows"])))


def _refit(
    cfg: RunConfig, out: Path, ctx: DistContext, split: ValidationSplit, stop_after_steps: int
) -> dict[str, Any] | None:
    """Select on validation in ``RUN/selection``, then train every train/ row for the selected
    length in epochs, from the same start, in ``RUN``."""
    first = out / REFIT_SELECTION
    done = first / "metrics.json"
    selecting = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, refit=False))
    if done.is_file():  # chosen before a restart
        chosen = json.loads(done.read_text())
    else:  # this run's data, features, split and id maps: resolved once, in finetune()
        with open_run(selecting, first, ctx):
            chosen = _train_and_test(selecting, first, ctx, split, stop_after_steps)
    if chosen is None:  # stopped on request; rerunning the command resumes it
        return None
    if chosen.get("selected") is None:
        raise ConfigError(f"--refit: {first} selected no model to take the length from")
    total = train_rows(cfg.data, split.train_split)
    held_out = chosen["selected"]["rows"]
    steps = refit_steps(chosen["selected"], total)
    again = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, valid_fraction=0.0, steps=steps, calibrate="none")
    )
    logger.info(
        "refit: the selected %d steps on %d rows are %d steps on all %d train/ rows",
        chosen["selected"]["step"], total - held_out, steps, total,
    )  # fmt: skip
    refit = {
        "selection_run": REFIT_SELECTION,
        "selected": chosen["selected"],
        "steps": steps,
        "rows": total,
        "selection_test": chosen["test"],
    }
    return _train_and_test(
        again,
        out,
        ctx,
        ValidationSplit(split.train_split, None),
        stop_after_steps,
        {"refit": refit},
    )


def _train_and_test(
    cfg: RunConfig,
    out: Path,
    ctx: DistContext,
    split: ValidationSplit,
    stop_after_steps: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    features = feature_schema(cfg)
    built = build_model(cfg, ctx)
    dmp = built.dmp
    loaded: list[str] = []
    if cfg.warm_start:
        warm_start_model(built, cfg.warm_start)
    elif cfg.transfer in TRANSFER_PREFIXES:
        loaded = load_model(
            dmp,
            location(cfg.init_from) / "checkpoint",
            TRANSFER_PREFIXES[cfg.transfer],
            grow=True,
        )
    if cfg.train.compile:
        compile_dense_step(dmp.module, cfg.max_history)
    reader = ImpressionReader(
        cfg.reads,
        split.train_split,
        cfg.train.batch_size,
        ctx.rank,
        ctx.world_size,
        seed=cfg.train.seed,
        max_history=cfg.max_history,
        features=features,
        time_range=split.train_range,
    )

    def step(batch):
        batch = batch.to(ctx.device)
        return F.binary_cross_entropy_with_logits(dmp(*batch.model_inputs()), batch.labels)

    driver = StageDriver(cfg, out, built, ctx, "finetune", None, stop_after_steps)
    if split.valid_split is not None:
        valid_reader = eval_reader(
            cfg.reads,
            split.valid_split,
            cfg.train.batch_size,
            ctx,
            cfg.max_history,
            features,
            split.valid_range,
        )  # built once: its row selection reads train/'s timestamps
        driver.validate_with(
            lambda: evaluate_ctr(
                dmp, cfg.reads, ctx, cfg.train.batch_size, cfg.max_history, reader=valid_reader
            ),
            cfg.train.select_on,
            len(reader),
            higher_is_better=cfg.train.select_on != "logloss",
        )
        logger.info(
            "validation: %s, every %d steps", split.describe(), driver.validation.every_steps
        )
    if driver.train(reader, step) is None:  # stopped early on request; the checkpoint resumes it
        return None
    driver.select()
    calibration = Calibration()
    if driver.validation is not None and cfg.train.calibrate == "platt":
        calibration = fit_calibration(dmp, valid_reader, ctx, split.describe())
        logger.info(
            "calibration on validation: scale %.4f, bias %.4f (LogLoss %s -> %s)",
            calibration.scale,
            calibration.bias,
            calibration.logloss_before,
            calibration.logloss_after,
        )
    # one pass over test: the raw scores' figures and the calibrated ones from the same logits
    test_rows = eval_reader(cfg.reads, "test", cfg.train.batch_size, ctx, cfg.max_history, features)
    raw, test = calibrated_metrics(
        collect_logits(dmp, test_rows, ctx, "test"), [Calibration(), calibration]
    )
    if ctx.is_main:
        calibration.write(out)
    details = {
        "backbone": cfg.backbone,
        "transfer": cfg.transfer,
        "init_from": cfg.init_from,
        "warm_start": cfg.warm_start,
        "loaded_tensors": len(loaded),
        "validation_split": split.describe(),
        "calibration": calibration.to_json(),
        "test": test,
        "test_uncalibrated": raw,
        **(extra or {}),
    }
    metrics = driver.finish(test, details)
    logger.info("finetune done: %s", as_json(test))
    return metrics
