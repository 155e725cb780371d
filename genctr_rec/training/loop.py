"""The training loop shared by both stages: epochs over a reader, one optimizer step per batch,
validation every N steps and at each epoch end with early stopping and the best model kept,
checkpoints every N steps and at each epoch end, exact resume from the latest checkpoint,
progress on rank 0 (genctr_rec.progress), TensorBoard scalars, and the loss history."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genctr_rec.checkpoint import CheckpointManager
from genctr_rec.data.prefetch import prefetched
from genctr_rec.distributed import DistContext
from genctr_rec.progress import Progress
from genctr_rec.training.allocator import keep_freed_memory
from genctr_rec.training.loss_log import LossLog
from genctr_rec.training.preemption import Preempted, StopOnSigterm
from genctr_rec.training.rng import restore_rng, rng_state
from genctr_rec.training.sharding import sharding_summary
from genctr_rec.training.tracking import as_scalar, tensorboard_writer

logger = logging.getLogger(__name__)


@dataclass
class Validation:
    """How a stage validates and selects its model.

    Args:
        evaluate: collective; returns metrics on held-out data (the same on every rank).
        metric: the one that selects, e.g. ``auc``, ``logloss`` or ``ndcg@10_category``.
        every_steps: also validate every N steps (0: at epoch ends only).
        patience: validations without improvement before training stops (0: never).
        save_best: collective; keeps the current model as the best one so far.
        higher_is_better: False for a loss (``logloss``).
        min_epochs: patience stops nothing before this many epochs are complete.
        lr_decay: every learning rate is multiplied by this at each validation without
            improvement (1: off).
    """

    evaluate: Callable[[], dict[str, float]]
    metric: str
    every_steps: int
    patience: int
    save_best: Callable[[], None]
    higher_is_better: bool = True
    min_epochs: int = 0
    lr_decay: float = 1.0

    def improves(self, value: float | None, best: float | None) -> bool:
        """Whether a validation ``value`` beats the ``best`` so far. An undefined figure
        (None: e.g. AUC of a split with one label class) never beats a defined one, and
        anything beats an undefined best: selection then keeps the newest model until the
        figure means something."""
        if best is None:
            return True
        if value is None:
            return False
        return value > best if self.higher_is_better else value < best


def validation_every(steps_per_epoch: int, eval_every: int, evals_per_epoch: int) -> int:
    """Steps between validations: ``eval_every`` when set, else ``evals_per_epoch`` an epoch
    (0, at epoch ends only, for one an epoch)."""
    if eval_every:
        return eval_every
    return max(1, steps_per_epoch // evals_per_epoch) if evals_per_epoch > 1 else 0


def _shown(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def _new_history() -> dict[str, Any]:
    return {
        "epoch_loss": [],
        "examples_per_s": [],
        "valid": [],
        "best": None,
        "bad_validations": 0,
        "lr_scale": 1.0,
        "stopped": None,
    }


def learning_rates(built: Any) -> dict[str, float]:
    """The tables' fused optimizer and the dense parameter groups (the second, when there is
    one, is an inherited decoder's: ``--decoder-lr``)."""
    fused = built.fused_param_groups()
    rates = {"embeddings": float(fused[0]["lr"] if fused else built.embedding_lr)}
    names = ("dense", "decoder")
    for i, group in enumerate(getattr(built.dense_optimizer, "param_groups", [])):
        rates[names[i] if i < len(names) else f"dense{i}"] = float(group["lr"])
    return rates


def _steps_left(reader: Any) -> int | None:
    """Batches this rank still reads this epoch (None when the reader cannot say)."""
    try:
        return len(reader) - reader.state_dict().get("batches_done", 0)
    except TypeError:
        return None


def train_epochs(
    reader: Any,
    step: Callable[[Any], torch.Tensor],
    built: Any,
    epochs: int,
    ctx: DistContext,
    run_dir: Path,
    desc: str,
    checkpoints: CheckpointManager | None = None,
    generators: dict[str, torch.Generator] | None = None,
    stop_after_steps: int = 0,
    validation: Validation | None = None,
    max_steps: int = 0,
    sigterm: StopOnSigterm | None = None,
) -> dict[str, Any] | None:
    """Runs ``epochs`` epochs (or ``max_steps`` steps when > 0); ``step(batch)`` returns the
    loss, whose backward also applies the fused embedding optimizer. Resumes from
    ``checkpoints.latest()`` when there is one. With ``validation``, validates every
    ``every_steps`` steps and at each epoch end, keeps the best model through ``save_best`` and
    stops after ``patience`` validations without improvement (``history["valid"]`` lists them,
    ``history["best"]`` names the selected one).

    ``stop_after_steps`` > 0 ends this invocation after that many steps in total (a
    checkpoint is written first) and returns None: the job is resumed by running it again,
    the way preemptible or time-limited allocations are used.
    With ``sigterm`` (the handler :func:`train_run` installs), SIGTERM (a scheduler's
    preemption or cancellation) stops the run at the next step with a checkpoint and raises
    :class:`~genctr_rec.training.preemption.Preempted` (``training/preemption.py``).

    Returns per-epoch mean losses and throughput."""
    generators = generators or {}
    history = _new_history()
    acc = {"total": 0.0, "count": 0, "examples": 0, "seconds": 0.0}
    global_step, start_epoch, mid_epoch = 0, 0, False
    latest = checkpoints.newest_valid() if checkpoints else None
    plan = sharding_summary(built.dmp)
    if latest is not None:
        built.dense_optimizer.init_state()  # Adam's state must exist to be loaded into
        state = built.app_state()
        progress, rng = checkpoints.load(latest, state, plan, verified=True)
        built.load_app_state(state)
        reader.load_state_dict(progress["reader"])
        history, acc, global_step = progress["history"], progress["epoch_acc"], progress["step"]
        for key, empty in _new_history().items():  # checkpoints of 0.10 lack lr_scale
            history.setdefault(key, empty)
        start_epoch = reader.state_dict()["epoch"]
        mid_epoch = reader.state_dict()["batches_done"] > 0
        if rng is not None:
            restore_rng(rng, generators)
        else:
            logger.warning("world size changed since %s: RNG streams restart", latest)
        logger.info("resumed from %s (epoch %d, step %d)", latest, start_epoch, global_step)
    # the rates as the config sets them times the decay so far (a warm start's inherited
    # optimizer state carries the previous run's rates: they restart)
    built.scale_learning_rates(history["lr_scale"])

    def save() -> None:
        losses.flush(acc)
        progress = {
            "step": global_step,
            "reader": reader.state_dict(),
            "history": history,
            "epoch_acc": acc,
            "world_size": ctx.world_size,
            "sharding": plan,
        }
        checkpoints.save(global_step, built.app_state(), progress, rng_state(generators))

    writer = tensorboard_writer(run_dir, ctx)
    losses = LossLog(ctx.device, writer)

    def validate(epoch: int, epochs_done: int) -> None:
        """Validate now; decays the learning rates on a plateau and marks the run stopped
        when patience is used up (never before ``min_epochs`` complete epochs)."""
        assert validation is not None
        metrics = validation.evaluate()
        record = {"step": global_step, "epoch": epoch, **metrics}
        history["valid"].append(record)
        best = history["best"] and history["best"].get(validation.metric)
        if validation.improves(metrics.get(validation.metric), best):
            validation.save_best()
            history["best"], history["bad_validations"] = record, 0
        else:
            history["bad_validations"] += 1
            if validation.lr_decay < 1:
                history["lr_scale"] *= validation.lr_decay
                built.scale_learning_rates(history["lr_scale"])
                logger.info("%s: learning rates x%.3g from now on", desc, history["lr_scale"])
        if writer is not None:
            for name, value in metrics.items():
                if value is None or isinstance(value, float):
                    writer.add_scalar(f"eval/{name}", as_scalar(value), global_step)
        logger.info(
            "%s validation at step %d: %s %s (best %s at step %d)",
            desc,
            global_step,
            validation.metric,
            _shown(metrics.get(validation.metric)),
            _shown(history["best"].get(validation.metric)),
            history["best"]["step"],
        )
        check_patience(epochs_done)

    def check_patience(epochs_done: int) -> None:
        assert validation is not None
        out_of_patience = 0 < validation.patience <= history["bad_validations"]
        if out_of_patience and epochs_done >= validation.min_epochs:
            history["stopped"] = {"step": global_step, "reason": "patience"}

    def finished() -> bool:
        return history["stopped"] is not None or (0 < max_steps <= global_step)

    for epoch in range(start_epoch, epochs):
        if finished():
            break
        if not mid_epoch:
            reader.set_epoch(epoch)
            acc = {"total": 0.0, "count": 0, "examples": 0, "seconds": 0.0}
        mid_epoch = False
        start = time.perf_counter()
        progress = Progress(
            f"{desc} epoch {epoch + 1}/{epochs}", _steps_left(reader), enabled=ctx.is_main
        )
        for batch in reader:
            built.dense_optimizer.zero_grad(set_to_none=True)
            loss = step(batch)
            loss.backward()
            built.dense_optimizer.step()
            read = losses.add(loss, epoch, global_step, acc)
            acc["examples"] += batch.batch_size
            global_step += 1
            shown = {"loss": acc["total"] / acc["count"]} if read else {}
            progress.update(1, batch.batch_size * ctx.world_size, **shown)
            if (
                validation is not None
                and validation.every_steps > 0
                and global_step % validation.every_steps == 0
            ):
                acc["seconds"] += time.perf_counter() - start  # examples/s counts training only
                losses.flush(acc)
                validate(epoch, epoch)
                start = time.perf_counter()
            if 0 < max_steps <= global_step and history["stopped"] is None:
                history["stopped"] = {"step": global_step, "reason": "max_steps"}
            periodic = checkpoints is not None and checkpoints.every_steps > 0
            stopping = 0 < stop_after_steps <= global_step
            # collective: every rank calls it after every step
            preempted = sigterm is not None and sigterm.requested()
            if stopping or preempted or (periodic and global_step % checkpoints.every_steps == 0):
                acc["seconds"] += time.perf_counter() - start
                start = time.perf_counter()
                if checkpoints is not None:
                    save()
            if preempted:
                progress.close()
                if writer is not None:
                    writer.close()
                raise Preempted(global_step, saved=checkpoints is not None)
            if stopping:
                progress.close()
                logger.info("stopping after step %d as asked; run again to resume", global_step)
                if writer is not None:
                    writer.close()
                return None
            if finished():
                break
        progress.close()
        losses.flush(acc)
        acc["seconds"] += time.perf_counter() - start
        history["epoch_loss"].append(acc["total"] / max(acc["count"], 1))
        history["examples_per_s"].append(
            acc["examples"] * ctx.world_size / max(acc["seconds"], 1e-9)
        )
        if writer is not None:
            writer.add_scalar("train/epoch_loss", history["epoch_loss"][-1], global_step)
            writer.add_scalar("train/examples_per_s", history["examples_per_s"][-1], global_step)
            for name, lr in learning_rates(built).items():
                writer.add_scalar(f"train/lr/{name}", lr, global_step)
        logger.info(
            "%s epoch %d: loss %.4f, %.0f examples/s over %d ranks",
            desc,
            epoch + 1,
            history["epoch_loss"][-1],
            history["examples_per_s"][-1],
            ctx.world_size,
        )
        validated_now = bool(history["valid"]) and history["valid"][-1]["step"] == global_step
        if validation is not None and history["stopped"] is None:
            if validated_now:  # at the epoch's last step: the epoch is complete now
                check_patience(epoch + 1)
            else:
                validate(epoch, epoch + 1)
        if history["stopped"] is not None and history["stopped"]["reason"] == "patience":
            logger.info(
                "%s: no improvement in %d validations, stopping at step %d; best at step %d",
                desc,
                validation.patience,
                global_step,
                history["best"]["step"],
            )
        if checkpoints:
            save()
    if writer is not None:
        writer.close()
    return history


def bf16_autocast(step: Callable[[Any], torch.Tensor], device: torch.device):
    """``step`` with its forward under bf16 autocast: matrix products and attention in bf16,
    while the parameters, the optimizers' state and the returned loss stay fp32 (the backward
    runs outside, as autocast wants)."""

    def run(batch: Any) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step(batch)
        return loss.float()

    return run


def train_run(
    cfg: Any,
    out: Path,
    reader: Any,
    step: Callable[[Any], torch.Tensor],
    built: Any,
    ctx: DistContext,
    desc: str,
    generators: dict[str, torch.Generator] | None = None,
    stop_after_steps: int = 0,
    validation: Validation | None = None,
) -> dict[str, Any] | None:
    """A stage's training in its run directory (opened by ``rundir.open_run``): checkpoints per
    the config, resumed from the newest valid one; batches are decoded ``cfg.train.prefetch``
    ahead on a background thread (default: 2 on CUDA, none on CPU). None when stopped on request
    (``stop_after_steps``)."""
    keep_freed_memory()
    checkpoints = CheckpointManager(out, cfg.train.keep_checkpoints, cfg.train.checkpoint_every)
    precision = cfg.train.resolved_precision(ctx.device, cfg.max_history)
    if precision == "bf16":
        step = bf16_autocast(step, ctx.device)
    logger.info("%s: %s forward on %s", desc, precision, ctx.device)
    depth = cfg.train.prefetch
    if depth is None:
        depth = 2 if ctx.device.type == "cuda" else 0
    started = time.perf_counter()
    with StopOnSigterm(ctx.device) as sigterm:
        history = train_epochs(
            prefetched(reader, depth),
            step,
            built,
            cfg.train.epochs,
            ctx,
            out,
            desc,
            checkpoints,
            generators,
            stop_after_steps,
            validation,
            cfg.train.steps,
            sigterm,
        )
    if history is not None:  # this process's training, validations and checkpoints included
        history["train_seconds"] = round(time.perf_counter() - started, 2)
    return history


def run_metrics(stage: str, history: dict[str, Any], built: Any, ctx: DistContext) -> dict:
    """What every run's metrics.json records besides its quality figures."""
    return {
        "stage": stage,
        "epoch_loss": history["epoch_loss"],
        "examples_per_s": history["examples_per_s"],
        "train_seconds": history.get("train_seconds"),
        "valid": history.get("valid", []),
        "selected": history.get("best"),
        "lr_scale": history.get("lr_scale", 1.0),
        "stopped": history.get("stopped"),
        "embedding_optimizer": built.embedding_optimizer,
        "embedding_lr": built.embedding_lr,
        "sharding": sharding_summary(built.dmp),
        "world_size": ctx.world_size,
        "device": str(ctx.device),
    }
