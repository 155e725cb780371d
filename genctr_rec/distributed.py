"""Process-group set-up that works the same as one process, under torchrun, or under torchx.

Under torchrun / torchx the launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous variables; alone, we start a one-process group. CUDA ranks use nccl and their local
GPU; CPU ranks use gloo.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 1800) -> DistContext:
    """Join (or create) the default process group and pick this rank's device."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    use_cuda = torch.cuda.is_available() and os.environ.get("GENCTR_DEVICE", "") != "cpu"
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        else:
            if world_size != 1:
                raise RuntimeError("WORLD_SIZE > 1 without MASTER_ADDR: launch with torchrun")
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=local_world_size,
        device=device,
        backend=backend,
    )


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object; as is with one process): how one
    rank's decision (a checkpoint chosen, an error, a metric) becomes every rank's."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def free_port() -> int:
    """A free TCP port on the loopback interface (for local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_local_group(rank: int, world_size: int, port: int) -> None:
    """Join a gloo group of ``world_size`` processes on this machine, as torchrun would: the
    launcher variables are set first, so ``init_distributed`` sees the same world."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def shutdown_distributed(wait_for_others: bool = False) -> None:
    """Leave the process group. ``wait_for_others`` (a rank that finished its work): wait at a
    barrier first, so that no rank tears down its gloo connections while a peer still reads
    from them (rank 0 leaves a broadcast before the others have received it). A rank that
    failed leaves at once: its peers may never reach the barrier."""
    if not dist.is_initialized():
        return
    if wait_for_others and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()
