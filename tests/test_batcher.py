"""The service's micro-batcher (serving/batcher.py): where batches run, what forms a batch, and
that no batch runs beside the warm-up."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from genctr_rec.serving.batcher import MicroBatcher


def _recording_scorer(calls: list[dict], seconds: float = 0.0):
    def score_batch(prepared: list) -> list[np.ndarray]:
        started = time.monotonic()
        time.sleep(seconds)
        calls.append({"thread": threading.get_ident(), "size": len(prepared), "at": started})
        return [np.array([float(p)]) for p in prepared]

    return score_batch


@pytest.mark.parametrize("score_on", ["loop", "thread"])
def test_batches_run_where_asked_and_answer_each_request(score_on: str) -> None:
    calls: list[dict] = []

    async def main() -> tuple[int, list]:
        batcher = MicroBatcher(_recording_scorer(calls), 64, 0.0, score_on=score_on)
        batcher.start()
        answers = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
        await batcher.stop()
        return threading.get_ident(), answers

    loop_thread, answers = asyncio.run(main())
    assert [float(a[0]) for a in answers] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert sum(c["size"] for c in calls) == 5
    assert len(calls) == 1  # submitted in one tick: one batch
    on_loop = [c["thread"] == loop_thread for c in calls]
    assert on_loop == [score_on == "loop"]


@pytest.mark.parametrize("score_on", ["loop", "thread"])
def test_requests_queued_during_a_batch_form_the_next_one(score_on: str) -> None:
    calls: list[dict] = []

    async def main() -> None:
        batcher = MicroBatcher(_recording_scorer(calls, 0.05), 3, 0.0, score_on=score_on)
        batcher.start()
        first = batcher.submit(0)
        await asyncio.sleep(0)  # the batcher takes the first request alone
        rest = [batcher.submit(i) for i in range(1, 8)]  # queued while it is scored
        await asyncio.gather(first, *rest)
        await batcher.stop()

    asyncio.run(main())
    assert [c["size"] for c in calls] == [1, 3, 3, 1]  # max_batch 3


@pytest.mark.parametrize("score_on", ["loop", "thread"])
def test_no_batch_runs_before_the_warm_up_has_finished(score_on: str) -> None:
    calls: list[dict] = []
    warm: dict[str, float] = {}

    async def main() -> None:
        batcher = MicroBatcher(_recording_scorer(calls), 64, 0.0, score_on=score_on)

        def warm_up() -> None:
            time.sleep(0.2)
            warm["done"] = time.monotonic()

        loop = asyncio.get_running_loop()
        warming = loop.create_task(asyncio.to_thread(warm_up))
        batcher.start(after=warming)
        await batcher.submit(1)  # sent while the warm-up runs
        await batcher.stop()

    asyncio.run(main())
    assert calls[0]["at"] >= warm["done"]


def test_an_unknown_place_is_refused() -> None:
    with pytest.raises(ValueError, match="score_on"):
        MicroBatcher(_recording_scorer([]), 64, 0.0, score_on="gpu")
