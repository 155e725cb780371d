"""Micro-batching: concurrent requests scored together in one model call."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from genctr_rec.serving.config import SCORE_ON
from genctr_rec.serving.predictor import PreparedRequest

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """More requests wait for the model than the service admits (``max_queue``): answered
    503 with Retry-After, so that overload sheds requests instead of growing memory."""


class MicroBatcher:
    """Collects concurrent prepared requests into batches for ``score_batch``.

    Where a batch runs (``score_on``): ``thread`` hands it to one scoring thread, so that
    while the model runs the event loop reads and parses the next requests (larger batches,
    two cores at work under concurrent load); ``loop`` scores on the event loop's thread,
    which spares the hand-off (a thread woken and the loop woken back) and so serves requests
    that come one at a time with less CPU and latency, while under load the loop waits for the
    model (benchmarks/README.md). Either
    way batches run one at a time and never beside the warm-up (``start(after=...)``), which
    runs on the scoring thread so that ``/livez`` answers meanwhile.
    """

    def __init__(
        self,
        score_batch: Callable[[list[PreparedRequest]], list[np.ndarray]],
        max_batch: int,
        max_wait_ms: float,
        observe_batch: Callable[[int], None] | None = None,
        score_on: str = "thread",
        max_queue: int = 4096,
    ) -> None:
        if score_on not in SCORE_ON:
            raise ValueError(f"score_on must be one of {SCORE_ON}, got {score_on!r}")
        self.score_batch = score_batch
        self.observe_batch = observe_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_loop = score_on == "loop"
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genctr-score")
        self.batches = 0
        self.requests = 0
        self.max_queue = max_queue
        self.waiting = 0  # submitted, not yet answered by the model
        self._task: asyncio.Task | None = None

    def start(self, after: Awaitable | None = None) -> None:
        """Start batching; the first batch waits for ``after`` (the warm-up) to finish."""
        self._task = asyncio.get_running_loop().create_task(self._run(after))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    def submit(
        self, prepared: PreparedRequest, score_batch: Callable | None = None
    ) -> Awaitable[np.ndarray]:
        """Queue ``prepared``; ``score_batch``: the model that took it (the service's models
        change while requests wait: each is scored by the one that prepared it). Raises
        :class:`Overloaded` when ``max_queue`` requests wait already."""
        if self.waiting >= self.max_queue:
            raise Overloaded(f"{self.waiting} requests are waiting for the model")
        future = asyncio.get_running_loop().create_future()
        self.waiting += 1
        future.add_done_callback(self._answered)
        self.queue.put_nowait((prepared, future, score_batch or self.score_batch))
        return future

    def _answered(self, _: asyncio.Future) -> None:
        self.waiting -= 1

    async def _score(self, score_batch: Callable, prepared: list) -> list[np.ndarray]:
        if self.on_loop:
            return score_batch(prepared)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, score_batch, prepared)

    async def _run(self, after: Awaitable | None) -> None:
        if after is not None:
            await asyncio.gather(after, return_exceptions=True)  # its failure is logged there
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())  # what queued while the model was busy
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except TimeoutError:
                    break
            by_model: dict[Callable, list] = {}  # one model call per model (a swap's edge)
            for p, f, scorer in batch:
                if not f.done():  # a client may have gone
                    by_model.setdefault(scorer, []).append((p, f))
            for scorer, live in by_model.items():
                await self._score_group(scorer, live)

    async def _score_group(self, scorer: Callable, live: list) -> None:
        try:
            results = await self._score(scorer, [p for p, _ in live])
        except Exception as exc:  # the batch fails, the service stays up
            logger.exception("scoring a batch of %d requests failed", len(live))
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        self.batches += 1
        self.requests += len(live)
        if self.observe_batch is not None:
            self.observe_batch(len(live))
        for (_, future), result in zip(live, results, strict=True):
            if not future.done():
                future.set_result(result)
