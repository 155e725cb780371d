"""Training losses read from the device a few steps at a time.

Reading a CUDA loss (``float(loss)``) makes the host wait for the GPU to finish the step, so
the host cannot queue the next step's kernels (or decode its batch) meanwhile. The loop hands
each step's loss here instead; it is read, checked for NaN/inf, summed into the epoch's running
mean and written to TensorBoard every ``read_every`` steps and before anything that needs the
figures (validation, a checkpoint, the epoch's end). On CPU reading costs nothing, so every
step is read at once, as before.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# steps between reads of the loss on CUDA: long enough for the host to run ahead, short enough
# that a NaN stops the run within seconds
CUDA_READ_EVERY = 20


class LossLog:
    """Pending per-step losses: :meth:`add` each step's, :meth:`flush` to read them."""

    def __init__(self, device: torch.device, writer: Any = None, read_every: int | None = None):
        self.read_every = read_every or (CUDA_READ_EVERY if device.type == "cuda" else 1)
        self.writer = writer
        self._pending: list[tuple[int, int, torch.Tensor]] = []

    def add(self, loss: torch.Tensor, epoch: int, step: int, acc: dict[str, Any]) -> bool:
        """Record step ``step``'s loss (0-based); returns True when this call read the
        pending losses into ``acc`` (then ``acc`` holds the running mean's parts)."""
        self._pending.append((epoch, step, loss.detach()))
        if len(self._pending) < self.read_every:
            return False
        self.flush(acc)
        return True

    def flush(self, acc: dict[str, Any]) -> None:
        """Read every pending loss in one transfer into ``acc`` (``total``, ``count``); a
        non-finite one raises ``FloatingPointError`` naming its epoch and step."""
        if not self._pending:
            return
        values = torch.stack([loss for *_, loss in self._pending]).tolist()
        pending, self._pending = self._pending, []
        for (epoch, step, _), value in zip(pending, values, strict=True):
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at epoch {epoch}, step {step}")
            acc["total"] += value
            acc["count"] += 1
            if self.writer is not None:
                self.writer.add_scalar("train/loss", value, step + 1)
