"""Model checkpoints with ``torch.distributed.checkpoint``: sharded, reshardable, atomic.

Every rank writes its own shards; the directory becomes visible under its final name only
after all ranks finished (written as ``NAME.tmp``, renamed by rank 0 after a barrier). Loading
goes through DCP as well, so a checkpoint written by any world size or sharding plan loads into
any other; ``prefixes`` loads a subset (stage 2 takes ``embeddings.`` and ``decoder.`` from a
pre-training run).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

logger = logging.getLogger(__name__)
MODEL_KEY = "model"


def save_model(model: nn.Module, path: str | Path) -> None:
    """Collective: every rank calls it. ``path`` appears only once complete."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    dcp.save({MODEL_KEY: model.state_dict()}, checkpoint_id=str(tmp))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        if path.exists():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()


def load_model(
    model: nn.Module, path: str | Path, prefixes: Sequence[str] | None = None
) -> list[str]:
    """Collective: load ``path`` into ``model`` (all keys, or those under ``prefixes``).

    Returns the loaded keys. Raises if the checkpoint lacks a requested key.
    """
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no .metadata)")
    state = model.state_dict()
    if prefixes is not None:
        state = {k: v for k, v in state.items() if k.startswith(tuple(prefixes))}
        if not state:
            raise KeyError(f"the model has no state under {list(prefixes)}")
    dcp.load({MODEL_KEY: state}, checkpoint_id=str(path))
    model.load_state_dict(state, strict=False)
    logger.info("loaded %d tensors from %s", len(state), path)
    return sorted(state)
