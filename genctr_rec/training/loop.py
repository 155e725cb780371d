"""The training loop shared by both stages, owned by one :class:`StageDriver`: epochs over a
reader, one optimizer step per batch, validation every N steps and at each epoch end with early
stopping and the best model kept, checkpoints every N steps and at each epoch end, exact resume
from the latest checkpoint, progress on rank 0 (genctr_rec.progress), TensorBoard scalars, the
loss history, and the run's closing (the selected model as ``RUN/checkpoint``, metrics.json).
A stage says only how it reads, steps, validates and evaluates."""

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
from genctr_rec.storage import write_json
from genctr_rec.training.allocator import keep_freed_memory
from genctr_rec.training.loss_log import LossLog
from genctr_rec.training.preemption import Preempted, StopOnSigterm
from genctr_rec.training.rng import restore_rng, rng_state
from genctr_rec.training.sharding import sharding_summary
from genctr_rec.training.tracking import as_scalar, tensorboard_writer, write_hparams

logger = logging.getLogger(__name__)
BEST_DIR = "best"  # the best validated model so far, in the run directory


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


def _new_accumulators() -> dict[str, Any]:
    """The current epoch's running loss, examples and training seconds (checkpointed)."""
    return {"total": 0.0, "count": 0, "examples": 0, "seconds": 0.0}


class StageDriver:
    """One stage's training in its run directory (opened by ``rundir.open_run``), and the
    loop's state: the history (losses, throughput, validations, the selected one, the
    learning-rate decay, why it stopped), the epoch's accumulators and the global step.

    Usage, as both stages do::

        driver = StageDriver(cfg, out, built, ctx, "finetune")
        driver.validate_with(evaluate, "auc", steps_per_epoch=len(reader))
        history = driver.train(reader, step)  # None: stopped on request, resume later
        driver.select()  # the best validated model back into the model
        metrics = driver.finish(quality, {"backbone": ...})

    Args:
        stop_after_steps: > 0 ends this invocation after that many steps in total (a
            checkpoint is written first) and :meth:`train` returns None: the job is resumed by
            running it again, the way preemptible or time-limited allocations are used.
        generators: random streams checkpointed and restored with the run's.

    SIGTERM (a scheduler's preemption or cancellation) stops the run at the next step with a
    checkpoint and raises :class:`~genctr_rec.training.preemption.Preempted`.
    """

    def __init__(
        self,
        cfg: Any,
        out: Path,
        built: Any,
        ctx: DistContext,
        desc: str,
        generators: dict[str, torch.Generator] | None = None,
        stop_after_steps: int = 0,
    ) -> None:
        self.cfg, self.out, self.built, self.ctx, self.desc = cfg, out, built, ctx, desc
        self.generators = generators or {}
        self.stop_after_steps = stop_after_steps
        self.epochs, self.max_steps = cfg.train.epochs, cfg.train.steps
        self.checkpoints = CheckpointManager(
            out, cfg.train.keep_checkpoints, cfg.train.checkpoint_every
        )
        self.validation: Validation | None = None
        self.plan = sharding_summary(built.dmp)
        self.history = _new_history()
        self.acc = _new_accumulators()
        self.global_step = 0
        self.writer: Any = None
        self.losses: LossLog | None = None
        self.sigterm: StopOnSigterm | None = None

    # -- set-up ------------------------------------------------------------------------------

    def validate_with(
        self,
        evaluate: Callable[[], dict[str, float]],
        metric: str,
        steps_per_epoch: int,
        higher_is_better: bool = True,
    ) -> None:
        """Validate with ``evaluate`` (collective) at the cadence, patience, minimum epochs and
        decay of the config; the best model so far is kept in ``RUN/best``."""
        train = self.cfg.train
        self.validation = Validation(
            evaluate=evaluate,
            metric=metric,
            every_steps=validation_every(steps_per_epoch, train.eval_every, train.evals_per_epoch),
            patience=train.patience,
            save_best=lambda: self.built.save_selected(self.out / BEST_DIR),
            higher_is_better=higher_is_better,
            min_epochs=train.min_epochs,
            lr_decay=train.lr_decay,
        )

    # -- the run -----------------------------------------------------------------------------

    def train(self, reader: Any, step: Callable[[Any], torch.Tensor]) -> dict[str, Any] | None:
        """Train per the config, resumed from the newest valid checkpoint; batches are decoded
        ``cfg.train.prefetch`` ahead on a background thread (default: 2 on CUDA, none on CPU).
        ``step(batch)`` returns the loss, whose backward also applies the fused embedding
        optimizer. Returns the history, or None when stopped on request."""
        keep_freed_memory()
        train, device = self.cfg.train, self.ctx.device
        precision = train.resolved_precision(device, self.cfg.max_history)
        if precision == "bf16":
            step = bf16_autocast(step, device)
        logger.info("%s: %s forward on %s", self.desc, precision, device)
        depth = train.prefetch
        if depth is None:
            depth = 2 if device.type == "cuda" else 0
        started = time.perf_counter()
        self.writer = tensorboard_writer(self.out, self.ctx)
        self.losses = LossLog(device, self.writer)
        try:
            with StopOnSigterm(device) as self.sigterm:
                done = self._run(prefetched(reader, depth), step)
        finally:
            if self.writer is not None:
                self.writer.close()
        if not done:
            return None
        # this process's training, validations and checkpoints included
        self.history["train_seconds"] = round(time.perf_counter() - started, 2)
        return self.history

    def select(self) -> None:
        """The selected (best validated) model back into the model, when there was one."""
        if self.history["best"] is not None:
            self.built.load_selected(self.out / BEST_DIR)

    def finish(self, quality: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
        """The selected model as ``RUN/checkpoint``, the figures for TensorBoard's HPARAMS and
        ``RUN/metrics.json`` (the loop's record, then ``details``). Returns the metrics."""
        self.built.save_selected(self.out / "checkpoint")
        metrics = {**run_metrics(self.desc, self.history, self.built, self.ctx), **details}
        write_hparams(self.out, self.cfg, quality, self.ctx)
        if self.ctx.is_main:
            write_json(self.out / "metrics.json", metrics)
        return metrics

    # -- the loop ----------------------------------------------------------------------------

    def _resume(self, reader: Any) -> tuple[int, bool]:
        """Load the newest valid checkpoint, if any: (first epoch, whether mid-epoch)."""
        latest = self.checkpoints.newest_valid()
        if latest is None:
            return 0, False
        built = self.built
        built.dense_optimizer.init_state()  # Adam's state must exist to be loaded into
        state = built.app_state()
        progress, rng = self.checkpoints.load(latest, state, self.plan, verified=True)
        built.load_app_state(state)
        reader.load_state_dict(progress["reader"])
        self.history, self.acc = progress["history"], progress["epoch_acc"]
        self.global_step = progress["step"]
        for key, empty in _new_history().items():  # checkpoints of 0.10 lack lr_scale
            self.history.setdefault(key, empty)
        if rng is not None:
            restore_rng(rng, self.generators)
        else:
            logger.warning("world size changed since %s: RNG streams restart", latest)
        epoch = reader.state_dict()["epoch"]
        logger.info("resumed from %s (epoch %d, step %d)", latest, epoch, self.global_step)
        return epoch, reader.state_dict()["batches_done"] > 0

    def _save(self, reader: Any) -> None:
        self.losses.flush(self.acc)
        progress = {
            "step": self.global_step,
            "reader": reader.state_dict(),
            "history": self.history,
            "epoch_acc": self.acc,
            "world_size": self.ctx.world_size,
            "sharding": self.plan,
        }
        self.checkpoints.save(
            self.global_step, self.built.app_state(), progress, rng_state(self.generators)
        )

    def _validate(self, epoch: int, epochs_done: int) -> None:
        """Validate now; decays the learning rates on a plateau and marks the run stopped
        when patience is used up (never before ``min_epochs`` complete epochs)."""
        validation, history = self.validation, self.history
        assert validation is not None
        metrics = validation.evaluate()
        record = {"step": self.global_step, "epoch": epoch, **metrics}
        history["valid"].append(record)
        best = history["best"] and history["best"].get(validation.metric)
        if validation.improves(metrics.get(validation.metric), best):
            validation.save_best()
            history["best"], history["bad_validations"] = record, 0
        else:
            history["bad_validations"] += 1
            if validation.lr_decay < 1:
                history["lr_scale"] *= validation.lr_decay
                self.built.scale_learning_rates(history["lr_scale"])
                logger.info("%s: learning rates x%.3g from now on", self.desc, history["lr_scale"])
        if self.writer is not None:
            for name, value in metrics.items():
                if value is None or isinstance(value, float):
                    self.writer.add_scalar(f"eval/{name}", as_scalar(value), self.global_step)
        logger.info(
            "%s validation at step %d: %s %s (best %s at step %d)",
            self.desc,
            self.global_step,
            validation.metric,
            _shown(metrics.get(validation.metric)),
            _shown(history["best"].get(validation.metric)),
            history["best"]["step"],
        )
        self._check_patience(epochs_done)

    def _check_patience(self, epochs_done: int) -> None:
        validation = self.validation
        assert validation is not None
        out_of_patience = 0 < validation.patience <= self.history["bad_validations"]
        if out_of_patience and epochs_done >= validation.min_epochs:
            self.history["stopped"] = {"step": self.global_step, "reason": "patience"}

    def _finished(self) -> bool:
        return self.history["stopped"] is not None or (0 < self.max_steps <= self.global_step)

    def _run(self, reader: Any, step: Callable[[Any], torch.Tensor]) -> bool:
        """Every epoch left; False when stopped on request (``stop_after_steps``)."""
        start_epoch, mid_epoch = self._resume(reader)
        # the rates as the config sets them times the decay so far (a warm start's inherited
        # optimizer state carries the previous run's rates: they restart)
        self.built.scale_learning_rates(self.history["lr_scale"])
        for epoch in range(start_epoch, self.epochs):
            if self._finished():
                break
            if not mid_epoch:
                reader.set_epoch(epoch)
                self.acc = _new_accumulators()
            mid_epoch = False
            if not self._epoch(reader, step, epoch):
                return False
            self._end_epoch(reader, epoch)
        return True

    def _epoch(self, reader: Any, step: Callable[[Any], torch.Tensor], epoch: int) -> bool:
        """One epoch's steps (the rest of it, after a resume); False when stopped on request."""
        built, ctx, acc, validation = self.built, self.ctx, self.acc, self.validation
        start = time.perf_counter()
        progress = Progress(
            f"{self.desc} epoch {epoch + 1}/{self.epochs}",
            _steps_left(reader),
            enabled=ctx.is_main,
        )
        try:
            for batch in reader:
                built.dense_optimizer.zero_grad(set_to_none=True)
                loss = step(batch)
                loss.backward()
                built.dense_optimizer.step()
                read = self.losses.add(loss, epoch, self.global_step, acc)
                acc["examples"] += batch.batch_size
                self.global_step += 1
                shown = {"loss": acc["total"] / acc["count"]} if read else {}
                progress.update(1, batch.batch_size * ctx.world_size, **shown)
                if (
                    validation is not None
                    and validation.every_steps > 0
                    and self.global_step % validation.every_steps == 0
                ):
                    acc["seconds"] += time.perf_counter() - start  # examples/s: training only
                    self.losses.flush(acc)
                    self._validate(epoch, epoch)
                    start = time.perf_counter()
                if 0 < self.max_steps <= self.global_step and self.history["stopped"] is None:
                    self.history["stopped"] = {"step": self.global_step, "reason": "max_steps"}
                every = self.checkpoints.every_steps
                stopping = 0 < self.stop_after_steps <= self.global_step
                # collective: every rank calls it after every step
                preempted = self.sigterm is not None and self.sigterm.requested()
                if stopping or preempted or (every > 0 and self.global_step % every == 0):
                    acc["seconds"] += time.perf_counter() - start
                    start = time.perf_counter()
                    self._save(reader)
                if preempted:
                    raise Preempted(self.global_step, saved=True)
                if stopping:
                    logger.info(
                        "stopping after step %d as asked; run again to resume", self.global_step
                    )
                    return False
                if self._finished():
                    break
        finally:
            progress.close()
        self.losses.flush(acc)
        acc["seconds"] += time.perf_counter() - start
        return True

    def _end_epoch(self, reader: Any, epoch: int) -> None:
        """Record the epoch, validate at its end (unless its last step just did), checkpoint."""
        history, acc, validation = self.history, self.acc, self.validation
        history["epoch_loss"].append(acc["total"] / max(acc["count"], 1))
        history["examples_per_s"].append(
            acc["examples"] * self.ctx.world_size / max(acc["seconds"], 1e-9)
        )
        if self.writer is not None:
            step = self.global_step
            self.writer.add_scalar("train/epoch_loss", history["epoch_loss"][-1], step)
            self.writer.add_scalar("train/examples_per_s", history["examples_per_s"][-1], step)
            for name, lr in learning_rates(self.built).items():
                self.writer.add_scalar(f"train/lr/{name}", lr, step)
        logger.info(
            "%s epoch %d: loss %.4f, %.0f examples/s over %d ranks",
            self.desc,
            epoch + 1,
            history["epoch_loss"][-1],
            history["examples_per_s"][-1],
            self.ctx.world_size,
        )
        validated_now = bool(history["valid"]) and history["valid"][-1]["step"] == self.global_step
        if validation is not None and history["stopped"] is None:
            if validated_now:  # at the epoch's last step: the epoch is complete now
                self._check_patience(epoch + 1)
            else:
                self._validate(epoch, epoch + 1)
        if history["stopped"] is not None and history["stopped"]["reason"] == "patience":
            logger.info(
                "%s: no improvement in %d validations, stopping at step %d; best at step %d",
                self.desc,
                validation.patience,
                self.global_step,
                history["best"]["step"],
            )
        self._save(reader)


def bf16_autocast(step: Callable[[Any], torch.Tensor], device: torch.device):
    """``step`` with its forward under bf16 autocast: matrix products and attention in bf16,
    while the parameters, the optimizers' state and the returned loss stay fp32 (the backward
    runs outside, as autocast wants)."""

    def run(batch: Any) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step(batch)
        return loss.float()

    return run


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
