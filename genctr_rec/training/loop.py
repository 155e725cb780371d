"""The training loop shared by both stages: epochs over a reader, one optimizer step per batch,
progress on rank 0 (tqdm), TensorBoard scalars, and the loss history."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from genctr_rec.training.distributed import DistContext
from genctr_rec.training.sharding import sharding_summary

logger = logging.getLogger(__name__)


def tensorboard_writer(run_dir: Path, ctx: DistContext):
    """A SummaryWriter on rank 0, None elsewhere (or when tensorboard is unavailable)."""
    if not ctx.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a declared dependency
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def train_epochs(
    reader: Any,
    step: Callable[[Any], torch.Tensor],
    dense_optimizer: torch.optim.Optimizer,
    epochs: int,
    ctx: DistContext,
    run_dir: Path,
    desc: str,
) -> dict[str, Any]:
    """Runs ``epochs`` epochs; ``step(batch)`` returns the loss, whose backward also applies the
    fused embedding optimizer. Returns per-epoch mean losses and throughput."""
    writer = tensorboard_writer(run_dir, ctx)
    history: dict[str, Any] = {"epoch_loss": [], "step_loss": [], "examples_per_s": []}
    global_step = 0
    for epoch in range(epochs):
        reader.set_epoch(epoch)
        total, count, examples = 0.0, 0, 0
        start = time.perf_counter()
        show = ctx.is_main and sys.stderr.isatty()  # a bar in a log file is noise
        bar = tqdm(
            reader,
            desc=f"{desc} epoch {epoch + 1}/{epochs}",
            disable=not show,
            leave=False,
            mininterval=1.0,
        )
        for batch in bar:
            dense_optimizer.zero_grad(set_to_none=True)
            loss = step(batch)
            loss.backward()
            dense_optimizer.step()
            value = float(loss.detach())
            if not torch.isfinite(torch.tensor(value)):
                raise FloatingPointError(
                    f"loss became {value} at epoch {epoch}, step {global_step}"
                )
            total += value
            count += 1
            examples += batch.batch_size
            history["step_loss"].append(value)
            if writer is not None:
                writer.add_scalar(f"{desc}/loss", value, global_step)
            if count % 20 == 0:
                bar.set_postfix(loss=f"{total / count:.4f}")
            global_step += 1
        seconds = time.perf_counter() - start
        history["epoch_loss"].append(total / max(count, 1))
        history["examples_per_s"].append(examples * ctx.world_size / max(seconds, 1e-9))
        logger.info(
            "%s epoch %d: loss %.4f, %.0f examples/s over %d ranks",
            desc,
            epoch + 1,
            history["epoch_loss"][-1],
            history["examples_per_s"][-1],
            ctx.world_size,
        )
    if writer is not None:
        writer.close()
    return history


def run_metrics(stage: str, history: dict[str, Any], built: Any, ctx: DistContext) -> dict:
    """What every run's metrics.json records besides its quality figures."""
    return {
        "stage": stage,
        "epoch_loss": history["epoch_loss"],
        "examples_per_s": history["examples_per_s"],
        "embedding_optimizer": built.embedding_optimizer,
        "embedding_lr": built.embedding_lr,
        "sharding": sharding_summary(built.dmp),
        "world_size": ctx.world_size,
        "device": str(ctx.device),
    }
