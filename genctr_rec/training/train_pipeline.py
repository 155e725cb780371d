"""TorchRec's own training pipelines over the fine-tuning model.

``TrainPipelineSparseDist`` overlaps the next batch's input distribution (the sharded tables'
id all-to-alls) with the current batch's forward and backward; on GPUs it is TorchRec's main
throughput lever. It can do so only for sharded modules whose input comes straight from the
batch, which is what :class:`~genctr_rec.models.ctr.BatchCTRModel` and the reader's
``lookups`` give it: all three of the model's sharded tables are pipelined. Whether it wins on
a machine is measured by ``benchmarks/train_pipeline.py``, against the training loop's own step
on the same batches.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist

PIPELINES = ("none", "base", "sparse_dist")


def make_pipeline(name: str, built: Any, device: torch.device) -> Any:
    """TorchRec's pipeline ``name`` over ``built`` (a :class:`BuiltModel` whose model takes
    the batch: ``build_model(..., batch_forward=True)``); None for ``none``."""
    if name == "none":
        return None
    kind = {"base": TrainPipelineBase, "sparse_dist": TrainPipelineSparseDist}.get(name)
    if kind is None:
        raise ValueError(f"pipeline must be one of {PIPELINES}, got {name!r}")
    return kind(built.dmp, built.dense_optimizer, device)


def pipelined_tables(pipeline: Any) -> int:
    """How many sharded modules the pipeline distributes ahead (0 until its first step)."""
    return len(getattr(pipeline, "_pipelined_modules", []))


def train_steps(
    built: Any,
    batches: Iterable[Any],
    pipeline: str,
    device: torch.device,
    batch_forward: bool = True,
) -> dict[str, Any]:
    """Train on every batch once; returns each step's loss and the seconds each took.

    ``pipeline`` ``none`` with ``batch_forward`` steps the batch-taking model by hand (the
    same work as a pipeline, nothing overlapped); ``batch_forward=False`` is the training
    loop's own step (``CTRModel`` and its in-forward lookups), the baseline."""
    losses: list[float] = []
    seconds: list[float] = []
    runner = make_pipeline(pipeline, built, device)
    if runner is not None:
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                loss, _, _ = runner.progress(iterator)
            except StopIteration:
                break
            losses.append(float(loss))
            seconds.append(time.perf_counter() - start)
        return {"losses": losses, "seconds": seconds, "pipelined": pipelined_tables(runner)}
    for batch in batches:
        start = time.perf_counter()
        batch = batch.to(device)
        built.dense_optimizer.zero_grad(set_to_none=True)
        if batch_forward:
            loss, _ = built.dmp(batch)
        else:
            logits = built.dmp(*batch.model_inputs())
            loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        loss.backward()
        built.dense_optimizer.step()
        losses.append(float(loss))
        seconds.append(time.perf_counter() - start)
    return {"losses": losses, "seconds": seconds, "pipelined": 0}
