"""Stop on SIGTERM with a checkpoint, so that a preempted or cancelled job loses no work.

Why: schedulers end a job with SIGTERM and a grace period before SIGKILL (Slurm, Kubernetes,
``torchx cancel``; torchrun forwards it to every worker). Without this, the job lost every step
since its last checkpoint (200 steps, or an epoch). With it, the loop finishes the step in
flight, every rank agrees that a stop was asked (a rank that saved alone would wait forever in
the checkpoint's collectives), the checkpoint is written, and the command exits with 143
(128 + SIGTERM) so that the scheduler sees an unfinished job; running the same command resumes
exactly where it stopped.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

# steps between agreements on CUDA, where reading the flag back waits for the GPU (as the loss
# log's reads do); every step on CPU, where it costs a tiny all-reduce
CUDA_CHECK_EVERY = 20
EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):
    """Raised by the training loop after it checkpointed on SIGTERM."""

    def __init__(self, step: int, saved: bool = True) -> None:
        what = (
            "checkpoint written; run the same command again to resume"
            if saved
            else ("no checkpoint (the loop was given none)")
        )
        super().__init__(f"stopped on SIGTERM after step {step}, {what}")
        self.step = step


class StopOnSigterm:
    """Context manager: while inside, SIGTERM sets a flag instead of ending the process;
    :meth:`requested` says (the same on every rank) whether any rank has received one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.check_every = CUDA_CHECK_EVERY if device.type == "cuda" else 1
        self._received = False
        self._calls = 0
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._received = True

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():  # signals go to main only
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def requested(self) -> bool:
        """Collective with more than one rank (every rank calls it after every step)."""
        self._calls += 1
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self._received
        if self._calls % self.check_every:
            return False
        flag = torch.tensor([int(self._received)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
