"""What a run leaves for TensorBoard: a writer on rank 0 (staged locally and uploaded when the
run lives in object storage), and the configuration with the final figures for the HPARAMS
tab."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from genctr_rec.distributed import DistContext
from genctr_rec.storage import cache_dir, copy_tree, is_remote


def as_scalar(value: float | None) -> float:
    """A figure for TensorBoard: an undefined one (None) as NaN, so that every run has the
    same tags."""
    return float("nan") if value is None else value


def tensorboard_writer(run_dir: Path, ctx: DistContext):
    """A SummaryWriter on rank 0, None elsewhere (or when tensorboard is unavailable)."""
    if not ctx.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a declared dependency
        return None
    if not is_remote(run_dir):
        return SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    class UploadingSummaryWriter(SummaryWriter):
        """TensorBoard cannot append to an object: events go to a local staging directory,
        copied to ``RUN/tensorboard`` on close, then deleted."""

        def close(self) -> None:
            super().close()
            if staging.is_dir():
                copy_tree(staging, run_dir / "tensorboard")
                shutil.rmtree(staging, ignore_errors=True)

    root = cache_dir() / "tensorboard"
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}.", dir=root))
    return UploadingSummaryWriter(log_dir=str(staging))


def hparams_of(cfg: Any) -> dict[str, int | float | str | bool]:
    """The run's configuration flattened for TensorBoard's HPARAMS tab (``model.dim``, ...)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in cfg.to_json().items():
        inner = value.items() if isinstance(value, dict) and key in ("model", "train") else None
        for name, item in inner or [(None, value)]:
            full = f"{key}.{name}" if name else key
            if isinstance(item, bool | int | float | str):
                flat[full] = item
            elif item is None:
                flat[full] = "none"
            elif isinstance(item, dict) and key == "train" and name == "sharding":
                flat[full] = ",".join(f"{t}={k}" for t, k in sorted(item.items())) or "auto"
    return flat


def write_hparams(run_dir: Path, cfg: Any, results: dict[str, Any], ctx: DistContext) -> None:
    """The configuration and the final figures into the run's TensorBoard directory, so that
    ``tensorboard --logdir runs/`` compares runs by their settings."""
    writer = tensorboard_writer(run_dir, ctx)
    if writer is None:
        return
    numbers = {
        f"test/{k}": as_scalar(v) for k, v in results.items() if v is None or isinstance(v, float)
    }
    writer.add_hparams(hparams_of(cfg), numbers, run_name=".")
    writer.close()
