"""Decoding the next batches on a background thread while the training thread steps.

A reader decodes Parquet row groups, checks them and builds the step's
:class:`~torchrec.sparse.jagged_tensor.KeyedJaggedTensor` on the thread that iterates it (a
visible share of an epoch: ``benchmarks/README.md``). Pyarrow and numpy release the GIL for
their bulk work, so a second thread can do it while the training thread waits for a GPU (a
``DataLoader`` worker process would also have to pickle every batch across). On a CPU the step
already keeps every core busy and the thread only competes with it, so training prefetches by
default on CUDA only (``TrainConfig.prefetch``).

The wrapper keeps the reader's contract exactly: ``state_dict()`` describes the batches the
*training loop* has taken, not those decoded ahead, so a checkpoint resumes at the same batch
with or without prefetching; an error the reader raises (a bad row group, with its file, field
and row) reaches the loop unchanged at the batch where it would have surfaced.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

_BATCH, _END, _ERROR = range(3)
_POLL_S = 0.1  # how often a blocked producer checks whether the consumer has gone


class Prefetcher:
    """Iterates ``reader`` on a background thread, ``depth`` batches ahead of the consumer.

    Args:
        reader: an :class:`~genctr_rec.data.reader.ImpressionReader` or ``SequenceReader`` (or
            anything with ``__iter__``, ``__len__``, ``set_epoch``, ``state_dict`` and
            ``load_state_dict``).
        depth: batches decoded ahead (at least 1).

    Example::

        batches = Prefetcher(ImpressionReader("data/synth", "train", 1024), depth=2)
        for batch in batches:
            ...
            state = batches.state_dict()  # the position after ``batch``, as the reader's own
    """

    def __init__(self, reader: Any, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.reader = reader
        self.depth = depth
        self._taken: dict[str, Any] | None = None  # state after the last batch handed out

    def __len__(self) -> int:
        return len(self.reader)

    def set_epoch(self, epoch: int) -> None:
        self.reader.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return dict(self._taken) if self._taken is not None else self.reader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reader.load_state_dict(state)

    def __iter__(self) -> Iterator[Any]:
        handoff: queue.Queue = queue.Queue(maxsize=self.depth)
        stopped = threading.Event()

        def put(item: tuple) -> bool:
            while not stopped.is_set():
                try:
                    handoff.put(item, timeout=_POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in self.reader:
                    if not put((_BATCH, batch, self.reader.state_dict())):
                        return
                put((_END, None, self.reader.state_dict()))
            except BaseException as exc:  # noqa: BLE001 - re-raised on the consumer's thread
                put((_ERROR, exc, None))

        self._taken = self.reader.state_dict()
        producer = threading.Thread(target=produce, name="genctr-prefetch", daemon=True)
        producer.start()
        try:
            while True:
                kind, payload, state = handoff.get()
                if kind == _ERROR:
                    raise payload
                self._taken = state
                if kind == _END:
                    return
                yield payload
        finally:
            stopped.set()
            producer.join()
            taken, self._taken = self._taken, None
            if self.reader.state_dict() != taken:  # decoded ahead of the loop: rewind
                self.reader.load_state_dict(taken)


def prefetched(reader: Any, depth: int) -> Any:
    """``reader`` itself when ``depth`` is 0 (decode on the training thread), else a
    :class:`Prefetcher` ``depth`` batches ahead."""
    return reader if depth <= 0 else Prefetcher(reader, depth)
